"""Closed-loop load generator (run as its own process): `concurrency` clients, each sending its next request
as soon as the previous answer arrives, like Triton's perf_analyzer in concurrency mode.

    python -m bench.loadgen --url http://127.0.0.1:8000 --concurrency 16 --images 1 --duration 20 --warmup 5 \\
        --photos DIR [--protocol multipart|oip-json|oip-binary|grpc --model NAME --grpc-target HOST:PORT] \\
        [--client lean|httpx]

Every protocol sends the same encoded JPEGs and asks for the same answer, the top 5 classes: multipart
/classify (top_k 5), or the OIP's `image_bytes` input with the classification extension on `probabilities`
(JSON with base64 BYTES, Triton's binary tensors, or gRPC through tritonclient.grpc.aio on one channel).
Each request is encoded once and reused, and HTTP goes through bench/http1.py's lean client by default: the
client's CPU is taken from the server it measures (`--client httpx` shows how much).

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

from . import forms
from .forms import content_type
from .http1 import Connection, ResponseError, request_bytes, target_of

TIMEOUT_S = 600.0  # one request's limit: a closed loop measures slow answers, it does not give up on them


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


class _Http:
    """The HTTP client the closed loop sends with: the lean one (bench/http1.py; requests encoded once, a
    keep-alive connection per client) by default, or httpx, as a Python application would call a server."""

    def __init__(self, kind: str, url: str, concurrency: int) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host = parsed.netloc
        self.connections = [Connection(parsed.hostname or "127.0.0.1", parsed.port or 80) for _ in range(concurrency)]
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.httpx = httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) if kind == "httpx" else None

    async def post(self, worker: int, target: str, headers: dict[str, str], body: bytes) -> int:
        """POST `body` to `target` (path and query) on `worker`'s connection; the answer's status."""
        if self.httpx is not None:
            return (await self.httpx.post(target, content=body, headers=headers)).status_code
        raw = request_bytes("POST", target, self.host, headers, body)
        async with asyncio.timeout(TIMEOUT_S):
            return (await self.connections[worker].request(raw)).status

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        if self.httpx is not None:
            await self.httpx.aclose()


def _sender(
    protocol: str, http: _Http, grpc_client: Any, route: str, model: str, images: int, photos: list[bytes],
    classes: int, concurrency: int, repeat: float = 1.0,
) -> Send:  # fmt: skip
    """One protocol's request: the same images and the same answer (the top `classes`) whichever it is.
    `repeat` < 1: that share of requests sends the photographs as they are (which a response cache has seen
    after their first use), the rest a copy made unique by bytes after the JPEG's end (decoded alike).

    Requests are encoded once per distinct set of images and reused, as perf_analyzer prepares its inputs up
    front: the client's CPU is the server's loss on a shared machine (a unique copy is encoded when sent)."""

    def blobs(i: int) -> tuple[list[bytes], bool]:
        chosen = [photos[(i + j) % len(photos)] for j in range(images)]
        if repeat < 1.0 and random.Random(i).random() >= repeat:
            return [b + f"unique {i} {j}".encode() for j, b in enumerate(chosen)], False
        return chosen, True

    def prepared(encode: Callable[[list[bytes]], Any]) -> Callable[[int], Any]:
        """`encode` of request i's images, kept per distinct set of photographs."""
        cache: dict[int, Any] = {}

        def get(i: int) -> Any:
            chosen, reusable = blobs(i)
            if not reusable:
                return encode(chosen)
            key = i % len(photos)
            if key not in cache:
                cache[key] = encode(chosen)
            return cache[key]

        return get

    if protocol in ("multipart", "oip-json", "oip-binary"):
        if protocol == "multipart":
            # A route may carry its own query (/explain?pictures=false): top_k is added to it, not put in its place.
            target = target_of(route, {"top_k": classes})
            form = {"content-type": content_type()}
            body_of = prepared(lambda chosen: (forms.images(*chosen), form))
        else:
            target = f"/v2/models/{model}/infer"
            body_of = prepared(lambda chosen: _oip_body(chosen, protocol == "oip-binary", classes))

        async def send(i: int) -> str:
            body, headers = body_of(i)
            status = await http.post(i % concurrency, target, headers, body)
            return "ok" if status == 200 else str(status)

        return send
    if protocol == "grpc":
        import tritonclient.grpc.aio as tga
        from tritonclient.utils import InferenceServerException

        # classes 0: the server's own outputs (a peer without Triton's classification extension).
        outputs = [tga.InferRequestedOutput("probabilities", class_count=classes)] if classes else None

        def tensor_of(chosen: list[bytes]) -> Any:
            tensor = tga.InferInput("image_bytes", [images, 1], "BYTES")
            tensor.set_data_from_numpy(np.array(chosen, dtype=object).reshape(-1, 1))
            return tensor

        inputs = prepared(tensor_of)

        async def send(i: int) -> str:
            try:
                await grpc_client.infer(model, [inputs(i)], outputs=outputs)
            except InferenceServerException as exc:
                return str(exc.status())
            return "ok"

        return send
    raise ValueError(f"unknown protocol {protocol!r}")


async def drive(
    url: str, route: str, concurrency: int, images: int, photos: list[bytes], duration: float, warmup: float,
    protocol: str = "multipart", model: str = "", grpc_target: str = "", classes: int = 5, repeat: float = 1.0,
    client: str = "lean",
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

    async def client_loop(worker: int, send: Send) -> None:
        nonlocal slowest
        i = worker
        while not window or loop.time() < window[1]:
            sent = loop.time()
            try:
                status = await send(i)
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ResponseError) as exc:
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
    http = _Http(client, url, concurrency)
    try:
        send = _sender(protocol, http, grpc_client, route, model, images, photos, classes, concurrency, repeat)
        await asyncio.gather(*(client_loop(w, send) for w in range(concurrency)))
    finally:
        await http.close()
        if grpc_client is not None:
            await grpc_client.close()
    ok = statuses["ok"]
    length = window[1] - window[0]
    return {
        "protocol": protocol,
        "client": client if protocol != "grpc" else "tritonclient.grpc.aio",
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
    parser.add_argument(
        "--client",
        default="lean",
        choices=["lean", "httpx"],
        help="HTTP client: requests encoded once over keep-alive sockets (bench/http1.py), or httpx",
    )
    args = parser.parse_args(argv)
    photos = [p.read_bytes() for p in sorted(args.photos.glob("*.jpg"))]
    t0, cpu0 = time.perf_counter(), time.process_time()
    run = drive(
        args.url, args.route, args.concurrency, args.images, photos, args.duration, args.warmup,
        args.protocol, args.model, args.grpc_target, args.classes, args.repeat, args.client,
    )  # fmt: skip
    result = asyncio.run(run)
    result["wall_s"] = time.perf_counter() - t0
    # The client shares the machine with the server: its CPU is CPU the server could not use.
    result["client_cpu_percent"] = 100 * (time.process_time() - cpu0) / result["wall_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
