"""`resnest-batch` / `python -m batch`: the command line of the offline job."""

from __future__ import annotations

import argparse
import sys

from .decode import MAX_FILE_BYTES, MAX_IMAGE_PIXELS
from .inputs import InputError
from .model import TASKS


def parser() -> argparse.ArgumentParser:
    """The job's options."""
    p = argparse.ArgumentParser(
        prog="resnest-batch",
        description="Classify and/or embed many images with the served ONNX model, on Ray Data, into Parquet. "
        "Run the same command again to resume an interrupted job.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="folders (recursive), globs, or manifests (.txt, .csv or .parquet with "
        "a `path` column); local paths or s3://, gs://, ... where pyarrow reads them",
    )
    p.add_argument("-o", "--output", required=True, help="output folder: Parquet parts and _job.json")
    p.add_argument("-m", "--model", required=True, help="the ONNX file the service serves (path or URI)")
    p.add_argument(
        "--task", choices=TASKS, default=None, help="what to compute (default: both, or embed for a headless model)"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (capped at the model's classes)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings (as /embed?normalize=true)")
    # Offline, throughput is all: 32 measured ahead of 16 (bench/results/batch-cpu.json).
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--workers", type=int, default=1, help="model actors (one ONNX Runtime session each)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each model actor reserves")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs each model actor reserves; > 0 puts its session on the CUDA EP (CPU fallback)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads per actor (0: one per physical core, as the service)",
    )
    p.add_argument("--decode-cpus", type=float, default=0.5, help="Ray CPUs each decoding task reserves")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (`auto`, `ray://host:10001`, host:port); default: a local Ray for the job",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="rows per Parquet part at most")
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=60.0,
        help="commit a part at least this often, so an interruption loses at most this much work",
    )
    p.add_argument("--progress-seconds", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES, help="larger files are error rows")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="larger images are error rows")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the job; the exit status is 0 when every input is done, 130 when interrupted, 2 on a usage error."""
    args = parser().parse_args(argv)
    for name in ("top_k", "batch_size", "workers", "rows_per_file"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1")
    # Ray is imported only here, so `--help` and the usage errors above answer without it.
    from .pipeline import JobConfig, JobError, run

    config = JobConfig(
        inputs=args.inputs,
        output=args.output,
        model=args.model,
        task=args.task,
        top_k=args.top_k,
        normalize=args.normalize,
        batch_size=args.batch_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        threads=args.threads_per_worker,
        decode_cpus=args.decode_cpus,
        address=args.address,
        num_cpus=args.num_cpus,
        rows_per_file=args.rows_per_file,
        flush_seconds=args.flush_seconds,
        progress_seconds=args.progress_seconds,
        max_file_bytes=args.max_file_bytes,
        max_image_pixels=args.max_image_pixels,
    )
    try:
        return run(config)
    except (JobError, InputError) as exc:
        print(f"resnest-batch: {exc}", file=sys.stderr)
        return 2
