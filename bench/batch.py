"""The batch job's throughput against the model's own ceiling and the service's multipart route, in one run.

    python -m bench.batch --model artifacts/resnest50-fp32.onnx [--images 480] [--batch-size 16]

The same 500 px JPEGs (the bundled photographs, copied to make `--images` files) go through: the raw ONNX
Runtime session on preprocessed tensors at several batch sizes (the ceiling: no decoding, no framework); the
job (`python -m batch` with a local Ray, every file decoded, inferred and written to Parquet; its steady rate
from its own record, start-up excluded); and the service's `POST /classify` at 16 clients. Ratios within the
run are the result; the machine (CPU model and ISA flags) is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .machine import describe, summary
from .protocols import ours
from .serving import BENCH_ENV, ROOT, bench_photos, ceiling


def _files(folder: Path, count: int) -> Path:
    """`count` JPEG files in folder/images, the bundled photographs repeated under distinct names."""
    photos = sorted(bench_photos(folder / "photos"))
    images = folder / "images"
    images.mkdir()
    for i in range(count):
        (images / f"{i:05d}.jpg").write_bytes(photos[i % len(photos)])
    return images


def job(model: Path, images: Path, out: Path, batch_size: int, workers: int, threads: int) -> dict[str, Any]:
    """One run of the job to completion; its _job.json."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "batch", str(images), "-o", str(out), "-m", str(model), "--batch-size",
               str(batch_size), "--workers", str(workers), "--threads-per-worker", str(threads),
               "--progress-seconds", "5"]  # fmt: skip
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=1800)
    return json.loads((out / "_job.json").read_text())


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    """JSON with everything, and a Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"batch-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    ceiling_rate = result["ceiling"]["images_per_s"]
    lines = [
        "# The batch job against the model's ceiling and the service",
        "",
        summary(result["machine"]) + f"; ISA flags: {', '.join(result['machine'].get('cpu_flags', []))}",
        "",
        f"{result['images']} JPEG files of 500 px, `{Path(result['model']).name}`.",
        "",
        "| what | img/s | of the ceiling |",
        "|---|---|---|",
        f"| raw ONNX Runtime session, batch {result['ceiling']['best_batch']} (preprocessed tensors) | "
        f"{ceiling_rate:.1f} | 1.00 |",
    ]
    for row in result["jobs"]:
        rate = row["steady_images_per_s"]
        lines.append(f"| batch job, --batch-size {row['batch_size']} (steady; decode, infer, write Parquet) | "
                     f"{rate:.1f} | {rate / ceiling_rate:.2f} |")  # fmt: skip
    service = result["service"]
    lines.append(f"| service, `POST /classify`, 16 clients | {service['images_per_s']:.1f} | "
                 f"{service['images_per_s'] / ceiling_rate:.2f} |")  # fmt: skip
    (out / f"batch-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--workers", type=int, default=1, help="model actors")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per actor (0: one per core)")
    parser.add_argument("--duration", type=float, default=15.0, help="the service's measurement window (s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    model = args.model.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = _files(folder, args.images)
        photos = [p.read_bytes() for p in sorted((folder / "photos").glob("*.jpg"))]
        print("ceiling ...", file=sys.stderr, flush=True)
        top = ceiling(model, photos, [1, 8, 16, 32], seconds=6.0)
        jobs = []
        for size in args.batch_size:
            print(f"batch job, --batch-size {size} ...", file=sys.stderr, flush=True)
            out = folder / f"out-{size}"
            record = job(model, images, out, size, args.workers, args.threads)
            run = record["runs"][-1]
            jobs.append({"batch_size": size, "images_per_s": run["images_per_s"],
                         "steady_images_per_s": run["steady_images_per_s"], "seconds": run["seconds"],
                         "ok": run["ok"], "errors": run["errors"], "providers": run["providers"]})  # fmt: skip
            shutil.rmtree(out)
        print("service ...", file=sys.stderr, flush=True)
        (service,) = ours(model, folder / "photos", [16], ["multipart"], args.duration, 3.0, dict(BENCH_ENV))
    result = {
        "machine": describe(), "model": str(args.model), "images": args.images, "workers": args.workers,
        "threads": args.threads, "ceiling": top, "jobs": jobs, "service": service,
    }  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
