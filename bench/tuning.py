"""Tuning sweep: one server setting changed at a time, each measured against the defaults in the same run.

    python -m bench.tuning --model artifacts/resnest50-fp32.onnx [--duration 12]

For each configuration the real server starts with the benchmark's settings plus the change, and the load
generator measures three points: one client with one image (latency), 16 clients with one image (many small
requests) and 4 clients with 8 images (large requests). The defaults run first and last, so the spread
between those two rows is the noise floor a change has to beat. Results: bench/results/tuning-<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from .machine import describe, summary
from .serving import BENCH_ENV, ROOT, bench_photos, free_port, server, sweep

# (name, change): what each setting trades on a machine where inference already uses every core.
CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("defaults", {}),
    ("ORT threads do not spin", {"RESNEST_ORT_SPINNING": "false"}),
    ("1 decode thread", {"RESNEST_DECODE_THREADS": "1"}),
    ("1 ORT intra-op thread", {"RESNEST_INTRA_OP_THREADS": "1"}),
    ("max batch 4", {"RESNEST_MAX_BATCH_SIZE": "4"}),
    ("max batch 16", {"RESNEST_MAX_BATCH_SIZE": "16"}),
    ("queue delay 5 ms", {"RESNEST_MAX_QUEUE_DELAY_MS": "5"}),
    ("defaults (again)", {}),
]
POINTS = [(1, 1), (16, 1), (4, 8)]  # (clients, images per request)


def run(model: Path, duration: float, warmup: float, only: list[str] | None) -> dict[str, Any]:
    """Every configuration in turn, one server each, all on this machine in one go."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        photos_dir = Path(tmp) / "photos"
        bench_photos(photos_dir)
        for name, change in CONFIGS:
            if only and name not in only:
                continue
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**BENCH_ENV, **change, "RESNEST_MODEL_PATH": str(model), "RESNEST_HOST": "127.0.0.1",
                   "RESNEST_PORT": str(port), "RESNEST_GRPC_PORT": str(free_port())}  # fmt: skip
            print(f"{name} {change} ...", file=sys.stderr, flush=True)
            with server([sys.executable, "-m", "service"], env, url) as proc:
                batch = httpx.get(f"{url}/model").json()["max_batch_size"]
                points = []
                for clients, images in POINTS:
                    points += sweep(url, proc.pid, photos_dir, [clients], [images], duration, warmup, True)
            rows.append({"name": name, "change": change, "max_batch_size": batch, "points": points})
    return {"model": str(model), "machine": describe(), "settings": BENCH_ENV, "configs": rows}


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    """JSON and a markdown table, one row per configuration."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tuning-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    head = "| configuration | " + " | ".join(f"c={c} m={m} img/s | p50 ms" for c, m in POINTS) + " | CPU % (c=16) |"
    lines = [
        f"# Tuning sweep ({tag}): {Path(result['model']).name}",
        "",
        f"Machine: {summary(result['machine'])}; {result['machine']['date']}. Benchmark settings: "
        f"{result['settings']}. One setting changed per row; the defaults ran first and last.",
        "",
        head,
        "|" + "---|" * (2 * len(POINTS) + 2),
    ]
    for row in result["configs"]:
        cells = [f"{p['images_per_s']:.1f} | {p['p50_ms']:.0f}" for p in row["points"]]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row['points'][1]['server_cpu_percent']:.0f} |")
    (out / f"tuning-{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/resnest50-fp32.onnx")
    parser.add_argument("--duration", type=float, default=12.0, help="measurement window per point (s)")
    parser.add_argument("--warmup", type=float, default=4.0, help="unmeasured ramp-up per point (s)")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    write(run(args.model, args.duration, args.warmup, args.only), args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
