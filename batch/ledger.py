"""The output folder as the job's ledger: Parquet part files, each written whole or not at all, whose `path`
columns say which inputs are done. A resumed job skips those and writes new parts beside them."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .inputs import filesystem

PART = re.compile(r"^part-(\d{6,})\.parquet$")
# Temporary names start with a dot: readers of the folder (pyarrow, Ray, Spark, DuckDB) skip hidden files, so a
# part being written is never read as data, and a crash's leftover is removed by the next run.
TMP_PREFIX = ".tmp-"
JOB_FILE = "_job.json"

SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
    pa.field("error_code", pa.string()),  # the service's error code (invalid_image, image_too_large, ...)
    pa.field("error", pa.string()),  # the service's message for the file (without its "image i: " prefix)
    pa.field("indices", pa.list_(pa.int32())),  # top-k class indices, best first
    pa.field("labels", pa.list_(pa.string())),  # their labels, from the model card
    pa.field("scores", pa.list_(pa.float32())),  # their softmax probabilities
    pa.field("embedding", pa.list_(pa.float32())),  # the pooled embedding (L2-normalised with --normalize)
])  # fmt: skip


def _list_column(values: np.ndarray | None, ok: np.ndarray, kind: pa.DataType) -> pa.Array:
    """(N, w) values as a list column, null where the row failed or the task did not ask for it."""
    if values is None:
        return pa.nulls(len(ok), pa.list_(kind))
    values = np.asarray(values)
    width = values.shape[1] if values.ndim == 2 else 0
    flat = pa.array(values.reshape(-1), type=kind) if values.size else pa.array([], type=kind)
    offsets = pa.array(np.arange(len(ok) + 1, dtype=np.int32) * width, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(~ok))


def to_table(batch: dict[str, Any], labels: Sequence[str]) -> pa.Table:
    """One predictor batch (numpy columns) as rows of the output schema; `labels` are the model card's."""
    status = [str(s) for s in batch["status"]]
    ok = np.asarray([s == "ok" for s in status], dtype=bool)

    def text(key: str) -> pa.Array:
        return pa.array([None if good else str(v) for v, good in zip(batch[key], ok, strict=True)], pa.string())

    indices = batch.get("indices")
    names = None if indices is None else np.asarray(labels, dtype=object)[indices]
    return pa.table([
        pa.array([str(p) for p in batch["path"]], pa.string()),
        pa.array(status, pa.string()),
        text("error_code"),
        text("error"),
        _list_column(None if indices is None else indices.astype(np.int32), ok, pa.int32()),
        _list_column(names, ok, pa.string()),
        _list_column(batch.get("scores"), ok, pa.float32()),
        _list_column(batch.get("embedding"), ok, pa.float32()),
    ], schema=SCHEMA)  # fmt: skip


class Ledger:
    """The output folder: which inputs are done (the committed parts' paths), and the next part to write."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.fs, self.root = filesystem(output)
        self.fs.create_dir(self.root, recursive=True)
        # Local parts are renamed into place (atomic on a POSIX filesystem); an object store's PUT is atomic
        # by itself (an object is visible only once whole), so there the part is written under its own name.
        self.rename = isinstance(self.fs, pafs.LocalFileSystem)
        self._next = 0

    def _entries(self) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def parts(self) -> list[str]:
        """The committed part files' paths within the filesystem, in write order."""
        found = [i.path for i in self._entries() if i.type == pafs.FileType.File and PART.match(i.base_name)]
        return sorted(found, key=lambda p: int(PART.match(p.rsplit("/", 1)[-1]).group(1)))  # type: ignore[union-attr]

    def clean(self) -> int:
        """Remove temporary parts a crash left half-written; how many there were."""
        stale = [i.path for i in self._entries() if i.base_name.startswith(TMP_PREFIX)]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def done(self) -> set[str]:
        """The input paths whose rows are already committed; also sets the next part's number."""
        paths: set[str] = set()
        parts = self.parts()
        for part in parts:
            paths.update(pq.read_table(part, columns=["path"], filesystem=self.fs).column("path").to_pylist())
        if parts:
            self._next = int(PART.match(parts[-1].rsplit("/", 1)[-1]).group(1)) + 1  # type: ignore[union-attr]
        return paths

    def counts(self) -> dict[str, int]:
        """Rows committed in all parts so far, by status."""
        totals = {"ok": 0, "error": 0}
        for part in self.parts():
            for status in pq.read_table(part, columns=["status"], filesystem=self.fs).column("status").to_pylist():
                totals[status] = totals.get(status, 0) + 1
        return totals

    def commit(self, tables: Sequence[pa.Table]) -> str:
        """Write the rows as the next part, whole or not at all; its name."""
        table = pa.concat_tables(tables)
        name = f"part-{self._next:06d}.parquet"
        final = f"{self.root}/{name}"
        if not self.rename:
            pq.write_table(table, final, filesystem=self.fs)
        else:
            tmp = f"{self.root}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name says the part is done
            os.replace(tmp, final)
            _fsync_dir(self.root)
        self._next += 1
        return name

    def read_record(self) -> dict[str, Any] | None:
        """The previous run's _job.json, if any."""
        path = f"{self.root}/{JOB_FILE}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def write_record(self, record: dict[str, Any]) -> None:
        """_job.json, replaced atomically like the parts."""
        data = (json.dumps(record, indent=2, sort_keys=False) + "\n").encode()
        final = f"{self.root}/{JOB_FILE}"
        if not self.rename:
            with self.fs.open_output_stream(final) as stream:
                stream.write(data)
            return
        tmp = f"{self.root}/{TMP_PREFIX}{uuid.uuid4().hex}-{JOB_FILE}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


def _fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (POSIX: the directory entry lives in the directory's own data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
