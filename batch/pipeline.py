"""The job: inputs minus what the output folder already holds, through Ray Data (decode tasks, then the model's
actor pool), into Parquet parts committed by the driver, with the job's record in _job.json."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from modelcard import ModelCard

from .decode import MAX_FILE_BYTES, MAX_IMAGE_PIXELS, decode_batch
from .inputs import filesystem, list_inputs
from .ledger import Ledger, to_table
from .model import BOTH, CLASSIFY, EMBED, ModelOptions, Predictor, open_session, read_card
from .progress import Progress

# Ray phones home with usage statistics unless told not to; a batch job on a private cluster should not.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The record's settings that must match for a resumed job to append to the folder: otherwise its rows would
# mix two models' (or two tasks') answers.
RESUME_KEYS = ("model_sha256", "task", "top_k", "normalize")


class JobError(RuntimeError):
    """The job cannot run as asked (no inputs, a model without a classifier for classify, another job's folder)."""


@dataclass
class JobConfig:
    """Everything the command line sets."""

    inputs: list[str]
    output: str
    model: str
    task: str | None = None  # None: both for a classifier, embed for a headless model
    top_k: int = 5
    normalize: bool = False
    batch_size: int = 32
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int = 0
    decode_cpus: float = 0.5
    address: str | None = None
    num_cpus: int | None = None  # the local Ray's CPUs (default: this machine's)
    rows_per_file: int = 10_000
    flush_seconds: float = 60.0
    progress_seconds: float = 10.0
    max_file_bytes: int = MAX_FILE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    extra: dict[str, Any] = field(default_factory=dict)


def _read_model(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def resolve_task(task: str | None, card: ModelCard) -> str:
    """The task to run: as asked, where the model can answer it."""
    if task is None:
        return BOTH if card.has_classifier else EMBED
    if task in (CLASSIFY, BOTH) and not card.has_classifier:
        raise JobError(f"the model is a headless backbone (no classifier): --task {task} needs logits; use embed")
    return task


def _chunks(paths: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _decode_stage(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, Any]:
    """decode_batch, plus the node it ran on (the job's record counts each node's share)."""
    import ray

    out = decode_batch(batch, **kwargs)
    out["decode_node"] = np.full(len(out["path"]), ray.get_runtime_context().get_node_id(), dtype=object)
    return out


def _connect(config: JobConfig) -> bool:
    """Start a local Ray for the job, or join the cluster at --address; whether this job started Ray."""
    import ray

    if config.address:
        ray.init(address=config.address, log_to_driver=False, logging_level="WARNING")
        return False
    ray.init(num_cpus=config.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")  # fmt: skip
    return True


def _dataset(config: JobConfig, todo: list[str], card: ModelCard, model_ref: Any, options: ModelOptions) -> Any:
    """Paths -> decode tasks -> the model's actor pool, as Ray Data streams it (decoding overlaps inference)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own line
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's plan and timing lines, one a run
    ctx.execution_options.preserve_order = False  # rows are keyed by path: order only costs throughput
    # Blocks of a batch each: small enough that decoding spreads over every CPU from the first seconds.
    blocks = [pa.table({"path": pa.array(chunk, pa.string())}) for chunk in _chunks(todo, config.batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        _decode_stage, batch_size=config.batch_size, batch_format="numpy", num_cpus=config.decode_cpus,
        fn_kwargs={"cfg": card.preprocess, "max_bytes": config.max_file_bytes,
                   "max_pixels": config.max_image_pixels},
    )  # fmt: skip
    return ds.map_batches(
        Predictor, batch_size=config.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker or None,
        fn_constructor_kwargs={"model": [model_ref], "options": options},
    )  # fmt: skip


def run(config: JobConfig, log: Any = None) -> int:
    """Run (or resume) the job; 0 when every input is done, 130 when interrupted."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    blob = _read_model(config.model)
    digest = hashlib.sha256(blob).hexdigest()
    card = read_card(open_session(blob, ModelOptions(threads=1)))
    task = resolve_task(config.task, card)
    options = ModelOptions(task=task, top_k=config.top_k, normalize=config.normalize, threads=config.threads,
                           gpu=config.gpus_per_worker > 0)  # fmt: skip
    ledger = Ledger(config.output)
    previous = ledger.read_record() or {}
    settings = {"model_sha256": digest, "task": task, "top_k": config.top_k, "normalize": config.normalize}
    clash = {k: (previous[k], settings[k]) for k in RESUME_KEYS if k in previous and previous[k] != settings[k]}
    if clash:
        raise JobError(f"{config.output} holds another job's results ({clash}): use a new output folder")
    stale = ledger.clean()
    inputs = list_inputs(config.inputs)
    if not inputs:
        raise JobError(f"no images found in {config.inputs}")
    done = ledger.done()
    todo = [p for p in inputs if p not in done]
    done_before = len(inputs) - len(todo)
    log(f"{len(inputs)} inputs, {done_before} already done in {config.output}, {len(todo)} to run"
        + (f" ({stale} half-written parts of an interrupted run removed)" if stale else ""))  # fmt: skip
    progress = Progress(len(inputs), done_before, config.progress_seconds)
    record: dict[str, Any] = {
        "model": {"path": config.model, "sha256": digest, "variant": card.variant, "precision": card.precision,
                  "weights": card.weights, "labels_source": card.labels_source, "num_classes": card.num_classes,
                  "embedding_dim": card.embedding_dim, "preprocess": card.preprocess.to_dict()},
        **settings,
        "batch_size": config.batch_size, "workers": config.workers, "cpus_per_worker": config.cpus_per_worker,
        "gpus_per_worker": config.gpus_per_worker, "address": config.address or "local",
        "limits": {"max_file_bytes": config.max_file_bytes, "max_image_pixels": config.max_image_pixels},
        "runs": previous.get("runs", []),
    }  # fmt: skip
    state, providers, nodes = "done", Counter[str](), {}  # type: ignore[var-annotated]
    if todo:
        state, providers, nodes = _execute(config, todo, card, blob, options, ledger, progress)
    counts = ledger.counts()
    record["runs"].append({
        "started": started_at, "state": state, "images": progress.images, "ok": progress.ok,
        "errors": progress.errors, "seconds": round(time.monotonic() - progress.start, 3),
        "images_per_s": round(progress.rate(), 3), "steady_images_per_s": round(progress.steady_rate(), 3),
        "providers": dict(providers), "nodes": nodes, "config": {k: v for k, v in dataclasses.asdict(config).items()
                                                                if k not in ("inputs", "extra")},
    })  # fmt: skip
    record.update(
        state=state,
        counts={"inputs": len(inputs), "done": counts["ok"] + counts["error"], "ok": counts["ok"],
                "error": counts["error"], "parts": len(ledger.parts())},
        throughput={"images_per_s": record["runs"][-1]["images_per_s"],
                    "steady_images_per_s": record["runs"][-1]["steady_images_per_s"]},
        providers=sorted(providers),
        nodes=nodes,
    )  # fmt: skip
    ledger.write_record(record)
    log(progress.summary(state, config.output))
    return 0 if state == "done" else 130


def _execute(config: JobConfig, todo: list[str], card: ModelCard, blob: bytes, options: ModelOptions,
             ledger: Ledger, progress: Progress) -> tuple[str, Counter[str], dict[str, dict[str, int]]]:  # fmt: skip
    """Stream the results into committed parts; SIGINT/SIGTERM commit what has arrived and stop."""
    import ray

    providers: Counter[str] = Counter()
    nodes: dict[str, dict[str, int]] = {}
    pending: list[pa.Table] = []
    rows = 0
    last_commit = time.monotonic()
    state = "done"
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # Kubernetes stops pods with SIGTERM
    started_ray = _connect(config)
    try:
        ds = _dataset(config, todo, card, ray.put(blob), options)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            table = to_table(batch, card.labels)
            ok = int(np.count_nonzero(batch["status"] == "ok"))
            for key, name in (("decoded", "decode_node"), ("inferred", "node")):
                for node, n in Counter(str(x) for x in batch[name]).items():
                    nodes.setdefault(node, {"decoded": 0, "inferred": 0})[key] += n
            providers.update(str(p) for p in batch["provider"])
            pending.append(table)
            rows += table.num_rows
            progress.update(ok, table.num_rows - ok)
            if rows >= config.rows_per_file or time.monotonic() - last_commit >= config.flush_seconds:
                ledger.commit(pending)
                pending, rows, last_commit = [], 0, time.monotonic()
    except KeyboardInterrupt:
        state = "interrupted"
    finally:
        # Rows that arrived are answers: commit them, so an interrupted run loses no finished work.
        if pending:
            ledger.commit(pending)
        signal.signal(signal.SIGTERM, previous_term)
        if progress.tty:
            print(file=progress.stream)
        if started_ray or config.address:
            ray.shutdown()
    return state, providers, nodes


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
