"""The job's inputs: folders (recursive), globs and manifests (text, CSV or Parquet with a `path` column), local
or on any filesystem pyarrow reads (s3://, gs://, ...), as one sorted list of unique paths."""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import os
from collections.abc import Iterable

import pyarrow.fs as pafs
import pyarrow.parquet as pq

# A folder or glob yields the files Pillow's accepted formats use (imaging.FORMATS); anything else in a
# folder (a README, a checksum file) is not an input. A manifest names its files and gets each one tried.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".gif", ".webp", ".bmp", ".dib",
                              ".tif", ".tiff"})  # fmt: skip
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".csv", ".parquet"})
_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """An input argument that names nothing the job can list."""


def is_remote(path: str) -> bool:
    """A URI with a scheme pyarrow resolves (s3://, gs://, ...), not a local path."""
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem a path lives on and the path within it; local paths are made absolute."""
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    local = path.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(local)


def _join(base: str, fs_path: str) -> str:
    """A path as the job records it: the scheme kept for a remote file, absolute for a local one."""
    if is_remote(base):
        return f"{base.split('://', 1)[0]}://{fs_path}"
    return fs_path


def _is_image(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(arg: str, fs: pafs.FileSystem, root: str) -> list[str]:
    selector = pafs.FileSelector(root, recursive=True)
    return [_join(arg, info.path) for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and _is_image(info.path)]  # fmt: skip


def _glob(arg: str) -> list[str]:
    if not is_remote(arg):
        return [os.path.abspath(p) for p in glob.glob(arg, recursive=True) if os.path.isfile(p) and _is_image(p)]
    fs, pattern = pafs.FileSystem.from_uri(arg)
    # Object stores have no glob: list below the pattern's fixed prefix, then match.
    parts = pattern.split("/")
    fixed = "/".join(part for part in parts[: next(i for i, p in enumerate(parts) if set(p) & _GLOB_CHARS)])
    infos = fs.get_file_info(pafs.FileSelector(fixed, recursive=True))
    return [_join(arg, i.path) for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern)]


def _manifest(arg: str, fs: pafs.FileSystem, path: str) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        table = pq.read_table(path, columns=["path"], filesystem=fs) if "path" in pq.read_schema(
            path, filesystem=fs).names else None  # fmt: skip
        if table is None:
            raise InputError(f"{arg}: a Parquet manifest needs a `path` column")
        names = [p for p in table.column("path").to_pylist() if p]
    else:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8-sig")
        if ext == ".csv":
            rows = csv.DictReader(io.StringIO(text))
            if "path" not in (rows.fieldnames or []):
                raise InputError(f"{arg}: a CSV manifest needs a `path` column")
            names = [row["path"].strip() for row in rows if (row["path"] or "").strip()]
        else:
            names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # Relative entries are relative to the manifest's folder, so a manifest moves with its images.
    base = arg.rsplit("/", 1)[0] if is_remote(arg) else os.path.dirname(path)
    return [n if is_remote(n) or os.path.isabs(n) else _absolute(base, n) for n in names]


def _absolute(base: str, name: str) -> str:
    return f"{base}/{name}" if is_remote(base) else os.path.normpath(os.path.join(base, name))


def list_inputs(args: Iterable[str]) -> list[str]:
    """Every image path the arguments name, sorted and each once (a file named twice is one input)."""
    found: set[str] = set()
    for arg in args:
        if set(arg) & _GLOB_CHARS:
            found.update(_glob(arg))
            continue
        fs, path = filesystem(arg)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            found.update(_walk(arg, fs, path))
        elif info.type == pafs.FileType.File:
            is_manifest = os.path.splitext(path)[1].lower() in MANIFEST_EXTENSIONS
            found.update(_manifest(arg, fs, path) if is_manifest else [_join(arg, path)])
        else:
            raise InputError(f"{arg}: no such file, folder or manifest")
    return sorted(found)
