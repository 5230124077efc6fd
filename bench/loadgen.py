"""Closed-loop load generator (run as its own process): `concurrency` clients, each sending its next request
as soon as the previous answer arrives, like Triton's perf_analyzer in concurrency mode.

    python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 16 --images 1 --duration 20 --warmup 5 \\
        --photos DIR [--protocol multipart|oip-json|oip-binary|grpc --model NAME --grpc-target HOST:PORT]

Every protocol sends the same encoded JPEGs and asks for the same answer, the top 5 classes: multipart
/classify (top_k 5), or the OIP's `image_bytes` input with the classification extension on `probabilities`
(JSON with base64 BYTES, Triton's binary tensors, or gRPC through tritonclient.grpc.aio on one channel).

Prints one JSON object: requests and images completed in the measurement window, their rate, latency
percentiles, and counts by status (connection errors included). The window opens only once every client
has had an answer, so a slow, deep queue is measured in its steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import struct
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
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


Send = Callable[[int], Awaitable[str]]  # request number -> "ok" or the failure's name


def _oip_body(blobs: list[bytes], binary: bool, classes: int) -> tuple[bytes, dict[str, str]]:
    """An OIP HTTP inference request for `blobs`: JSON (base64 BYTES) or Triton's binary tensor form."""
    output = {"name": "probabilities", "parameters": {"classification": classes}}
    tensor: dict[str, Any] = {"name": "image_bytes", "shape": [len(blobs), 1], "datatype": "BYTES"}
    if not binary:
        tensor["data"] = [base64.b64encode(b).decode() for b in blobs]
        return json.dumps({"inputs": [tensor], "outputs": [output]}).encode(), {"content-type": "application/json"}
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    tensor["parameters"] = {"binary_data_size": len(raw)}
    output["parameters"]["binary_data"] = True
    head = json.dumps({"inputs": [tensor], "outputs": [output]}).encode()
    return head + raw, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


def _sender(
    protocol: str, http: httpx.AsyncClient, grpc_client: Any, route: str, model: str, images: int,
    photos: list[bytes], classes: int, repeat: float = 1.0,
) -> Send:  # fmt: skip
    """One protocol's request: the same images and the same answer (the top `classes`) whichever it is.
    `repeat` < 1: that share of requests sends the photographs as they are (which a response cache has seen
    after their first use), the rest a copy made unique by bytes after the JPEG's end (decoded alike)."""

    def blobs(i: int) -> list[bytes]:
        chosen = [photos[(i + j) % len(photos)] for j in range(images)]
        if repeat < 1.0 and random.Random(i).random() >= repeat:
            chosen = [b + f"unique {i} {j}".encode() for j, b in enumerate(chosen)]
        return chosen

    if protocol == "multipart":
        # A route may carry its own query (/explain?pictures=false): httpx's params= would replace it, not add.
        path, _, query = route.partition("?")
        params = {**dict(urllib.parse.parse_qsl(query)), "top_k": classes}

        async def send(i: int) -> str:
            files = [("images", (f"{i}-{j}.jpg", b, "image/jpeg")) for j, b in enumerate(blobs(i))]
            response = await http.post(path, files=files, params=params)
            return "ok" if response.status_code == 200 else str(response.status_code)

        return send
    if protocol in ("oip-json", "oip-binary"):

        async def send(i: int) -> str:
            body, headers = _oip_body(blobs(i), protocol == "oip-binary", classes)
            response = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            return "ok" if response.status_code == 200 else str(response.status_code)

        return send
    if protocol == "grpc":
        import tritonclient.grpc.aio as tga
        from tritonclient.utils import InferenceServerException

        # classes 0: the server's own outputs (a peer without Triton's classification extension).
        outputs = [tga.InferRequestedOutput("probabilities", class_count=classes)] if classes else None

        async def send(i: int) -> str:
            tensor = tga.InferInput("image_bytes", [images, 1], "BYTES")
            tensor.set_data_from_numpy(np.array(blobs(i), dtype=object).reshape(-1, 1))
            try:
                await grpc_client.infer(model, [tensor], outputs=outputs)
            except InferenceServerException as exc:
                return str(exc.status())
            return "ok"

        return send
    raise ValueError(f"unknown protocol {protocol!r}")


async def drive(
    url: str, route: str, concurrency: int, images: int, photos: list[bytes], duration: float, warmup: float,
    protocol: str = "multipart", model: str = "", grpc_target: str = "", classes: int = 5, repeat: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
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

    async def client(worker: int, send: Send) -> None:
        nonlocal slowest
        i = worker
        while not window or loop.time() < window[1]:
            sent = loop.time()
            try:
                status = await send(i)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                await asyncio.sleep(0.05)
            i += concurrency
            done = loop.time()
            answered.add(worker)
            if window and window[0] <= done <= window[1]:
                statuses[status] += 1
                if status == "ok":
                    latencies.append(done - sent)
            elif not window:
                slowest = max(slowest, done - sent)
                if len(answered) == concurrency and done - start >= warmup:
                    window.extend([done, done + max(duration, 3 * slowest)])

    grpc_client = None
    if protocol == "grpc":
        import tritonclient.grpc.aio as tga

        grpc_client = tga.InferenceServerClient(grpc_target)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            send = _sender(protocol, http, grpc_client, route, model, images, photos, classes, repeat)
            await asyncio.gather(*(client(w, send) for w in range(concurrency)))
    finally:
        if grpc_client is not None:
            await grpc_client.close()
    ok = statuses["ok"]
    length = window[1] - window[0]
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "images_per_request": images,
        "window_s": length,
        "warmup_s": (window[0] - start) if window else float("nan"),
        "requests": ok,
        "images": ok * images,
        "requests_per_s": ok / length,
        "images_per_s": ok * images / length,
        "statuses": dict(statuses),
        "errors": sum(n for s, n in statuses.items() if s != "ok"),
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
    parser.add_argument("--protocol", default="multipart", choices=["multipart", "oip-json", "oip-binary", "grpc"])
    parser.add_argument("--model", default="", help="model name, for the OIP protocols")
    parser.add_argument("--grpc-target", default="", help="host:port of the gRPC endpoint, for --protocol grpc")
    parser.add_argument("--classes", type=int, default=5, help="top classes asked for (0: the server's outputs)")
    parser.add_argument("--repeat", type=float, default=1.0, help="share of requests repeating an earlier image")
    args = parser.parse_args(argv)
    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))]
    t0, cpu0 = time.perf_counter(), time.process_time()
    run = drive(
        args.url, args.route, args.concurrency, args.images, photos, args.duration, args.warmup,
        args.protocol, args.model, args.grpc_target, args.classes, args.repeat,
    )  # fmt: skip
    result = asyncio.run(run)
    result["wall_s"] = time.perf_counter() - t0
    # The client shares the machine with the server: its CPU is CPU the server could not use.
    result["client_cpu_percent"] = 100 * (time.process_time() - cpu0) / result["wall_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
