"""Closed-loop HTTP load generator (run as its own process): `concurrency` clients, each sending its next
request as soon as the previous answer arrives, like Triton's perf_analyzer in concurrency mode.

    python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 16 --images 1 --duration 20 --warmup 5 \\
        --photos DIR

Prints one JSON object: requests and images completed in the measurement window, their rate, latency
percentiles, and counts by status (connection errors included). The window opens only once every client
has had an answer, so a slow, deep queue is measured in its steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ms = np.asarray(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


async def drive(
    url: str, route: str, concurrency: int, images: int, photos: list[bytes], duration: float, warmup: float
) -> dict[str, Any]:
    """Run the closed loop and measure one stable window.

    The window opens once `warmup` has passed AND every client has had an answer (at high concurrency one
    round trip can exceed any fixed warm-up), and lasts `duration` or three of the slowest round trips seen
    so far, whichever is longer, so even a deep queue is sampled over several cycles. Throughput and latency
    are taken from the requests that complete inside the window, as perf_analyzer does.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    answered: set[int] = set()
    window: list[float] = []  # [open, close], set once steady
    latencies: list[float] = []
    slowest = 0.0  # longest round trip before the window opened
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal slowest
        i = worker
        while not window or loop.time() < window[1]:
            files = [("images", (f"{i}-{j}.jpg", photos[(i + j) % len(photos)], "image/jpeg")) for j in range(images)]
            i += concurrency
            sent = loop.time()
            try:
                response = await http.post(route, files=files)
                status = str(response.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                await asyncio.sleep(0.05)
            done = loop.time()
            answered.add(worker)
            if window and window[0] <= done <= window[1]:
                statuses[status] += 1
                if status == "200":
                    latencies.append(done - sent)
            elif not window:
                slowest = max(slowest, done - sent)
                if len(answered) == concurrency and done - start >= warmup:
                    window.extend([done, done + max(duration, 3 * slowest)])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
    ok = statuses["200"]
    length = window[1] - window[0]
    return {
        "concurrency": concurrency,
        "images_per_request": images,
        "window_s": length,
        "warmup_s": (window[0] - start) if window else float("nan"),
        "requests": ok,
        "images": ok * images,
        "requests_per_s": ok / length,
        "images_per_s": ok * images / length,
        "statuses": dict(statuses),
        "errors": sum(n for s, n in statuses.items() if s != "200"),
        **percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="closed-loop load generator")
    parser.add_argument("--url", required=True)
    parser.add_argument("--route", default="/classify")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--photos", type=Path, required=True, help="folder of .jpg files to send")
    args = parser.parse_args(argv)
    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))]
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = asyncio.run(drive(args.url, args.route, args.concurrency, args.images, photos, args.duration, args.warmup))
    result["wall_s"] = time.perf_counter() - t0
    # The client shares the machine with the server: its CPU is CPU the server could not use.
    result["client_cpu_percent"] = 100 * (time.process_time() - cpu0) / result["wall_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
