"""Where a request's time goes, on the real server: wall time by stage at one client, CPU by component under load.

    python -m bench.profile --model artifacts/resnest50-fp32.onnx [--protocols multipart grpc] \\
        [--concurrency 1 16] [--duration 20] [--requests 100]

Two measurements of one server (both fronts up, the same 500 px JPEGs, the top 5 classes back):

1. Wall time at one client, per protocol: `--requests` sequential requests from this process (each encoded
   before its clock starts; HTTP through bench/http1.py's lean client, gRPC through grpcio; multipart once
   more through httpx, as a Python application calls it, to show the client's own share), each split into
   the service's own stage timings (preprocess, queue, inference: the X-*-Time-Ms headers and gRPC trailing
   metadata) and what is left of the client's round trip (HTTP or gRPC framing, multipart parsing,
   middleware, routing, hand-offs between the event loop, the decode pool and the inference thread, encoding
   the answer). Medians.
2. CPU per image, per protocol and concurrency, while bench/loadgen.py drives a closed loop from its own
   process: each server thread's CPU time from the kernel (the service names its decode and inference threads)
   over the images the server's /metrics say it inferred meanwhile; and the event loop's share split by
   component, from py-spy's samples of the main thread (`--rate` per second, non-blocking), each given to the
   innermost frame a component owns (COMPONENTS). Sample counts alone would overstate: on a busy machine a
   thread that is runnable but waiting for a core samples as active.

Results: bench/results/profile-<tag>.json and .md, with the machine. Needs py-spy (`pip install py-spy`) and
permission to ptrace the server (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from . import forms
from .http1 import Connection, request_bytes
from .machine import describe, summary
from .protocols import MODEL_NAME, point
from .serving import BENCH_ENV, ROOT, bench_photos, free_port, server

# (component, patterns on "function (file:line)" frames); the first pattern found scanning a stack from its
# innermost frame outwards names the sample. Order matters only among patterns that can match one frame.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("inference (ONNX Runtime)", ("onnxruntime/", "request/inference.py")),
    ("decode + preprocess", ("imaging/", "PIL/")),
    ("multipart parsing", ("multipart/", "formparsers.py", "datastructures.py")),
    (
        "upload limits, deadline, key, lingering close",
        ("middleware/uploads.py", "middleware/deadline.py", "middleware/lingering.py", "http/auth.py"),
    ),
    (
        "request id, access record, metrics",
        ("middleware/context.py", "core/logs.py", "core/metrics.py", "prometheus_client/", "logging/"),
    ),
    ("JSON encoding", ("orjson", "responses.py", "encoders.py", "json/")),
    ("FastAPI routing, dependencies, validation", ("fastapi/", "pydantic", "starlette/routing.py")),
    ("request path (admission, batching, postprocess)", ("core/request/", "core/repository/", "core/oip/")),
    ("gRPC front and grpcio", ("service/grpc/", "grpc/", "google/protobuf")),
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools", "h11/")),
    ("Starlette plumbing", ("starlette/",)),
    (
        "event loop and threads (asyncio, uvloop, futures)",
        ("asyncio/", "uvloop", "concurrent/futures", "threading.py", "queue.py"),
    ),
]
# Samples whose innermost frame is uvloop's own run loop: its C code (socket reads and writes, callback
# dispatch), or a moment the loop was runnable and waiting for a core on a busy machine.
LOOP_NATIVE = "event loop: uvloop's C code, or waiting for a core"
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def component(stack: list[str]) -> str:
    """The component that owns a sample: the innermost frame any pattern matches ('other' if none)."""
    if stack and "asyncio/runners.py" in stack[-1]:
        return LOOP_NATIVE
    for frame in reversed(stack):
        for name, patterns in COMPONENTS:
            if any(p in frame for p in patterns):
                return name
    return "other"


def on_event_loop(stack: list[str]) -> bool:
    """Whether a sample is of the main thread, which runs the event loop (its stack starts in service/__main__)."""
    return any("service/__main__.py" in frame for frame in stack)


def read_collapsed(path: Path) -> tuple[Counter[str], Counter[str]]:
    """The event-loop thread's samples in py-spy's raw (collapsed) output, per component and per innermost frame
    (to check the attribution). Idle samples are not in it."""
    counts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f for f in stack.split(";") if FRAME.match(f)]
        if not frames or not on_event_loop(frames):
            continue
        owner = component(frames)
        counts[owner] += int(n)
        leaves[f"{owner} <- {frames[-1]}"] += int(n)
    return counts, leaves


def thread_role(pid: int, tid: int) -> str:
    """What a server thread does, from its OS name (the service names its pools) or its position."""
    if tid == pid:
        return "event loop (main thread)"
    try:
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "other threads"
    if name.startswith("decode"):
        return "decode pool"
    if name.startswith("inference"):
        return "inference thread (runs the model, with ORT's pool)"
    if name in ("python", "python3"):
        return "ORT intra-op pool"
    return "grpc and libuv threads"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of `pid` has used."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def images_inferred(url: str) -> float:
    """The server's count of images inferred so far (the batch-size histogram's sum)."""
    match = re.search(r"^resnest_batch_size_sum ([0-9.e+-]+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    return float(match.group(1)) if match else 0.0


def cpu_profile(pid: int, url: str, photos_dir: Path, protocol: str, concurrency: int, duration: float,
                grpc_target: str, rate: int, spy: str) -> dict[str, Any]:  # fmt: skip
    """CPU ms per image by component while a closed loop runs; the load's own figures beside them."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--url", url, "--concurrency", str(concurrency), "--images",
             "1", "--duration", str(duration + 4), "--warmup", "3", "--photos", str(photos_dir), "--protocol",
             protocol, "--model", MODEL_NAME, "--grpc-target", grpc_target, "--classes", "5"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(3)  # past the ramp-up: every client has sent
        before, cpu_before = images_inferred(url), thread_cpu(pid)
        subprocess.run([spy, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(duration)),
                        "--nonblocking", "--threads", "--format", "raw", "--output", str(raw)],
                       check=True, capture_output=True)  # fmt: skip
        images = images_inferred(url) - before
        cpu_after = thread_cpu(pid)
        out, _ = load.communicate(timeout=600)
        counts, leaves = read_collapsed(raw)
    roles: Counter[str] = Counter()
    for tid, seconds in cpu_after.items():
        roles[thread_role(pid, tid)] += seconds - cpu_before.get(tid, 0.0)
    per_thread = {role: 1000 * seconds / images for role, seconds in roles.most_common()} if images else {}
    # The event loop's measured CPU, shared out in proportion to its py-spy samples.
    loop_ms = per_thread.get("event loop (main thread)", 0.0)
    total = sum(counts.values())
    loop = {name: loop_ms * n / total for name, n in counts.most_common()} if total else {}
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "seconds": duration,
        "images": images,
        "samples": total,
        "cpu_ms_per_image_by_thread": per_thread,
        "cpu_ms_per_image_total": sum(per_thread.values()),
        "event_loop_ms_per_image": loop,
        "load": json.loads(out.strip().splitlines()[-1]),
        "top_frames": {f: loop_ms * n / total for f, n in leaves.most_common(25)} if total else {},
    }


def _stages(headers: dict[str, str]) -> dict[str, float]:
    return {s: float(headers[f"x-{s}-time-ms"]) for s in ("preprocess", "queue", "inference")}


def wall_split(url: str, grpc_target: str, photos: list[bytes], protocol: str, requests: int) -> dict[str, Any]:
    """Sequential requests' round trips and the service's stage timings; medians of each, and of the rest."""
    rows: list[dict[str, float]] = []
    if protocol == "multipart httpx":
        # How a Python application calls the route: httpx builds the multipart body and speaks HTTP/1.1 in
        # Python (h11) inside the round trip; beside the lean client's row, the client's own share of it.
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(requests + 10):
                started = time.perf_counter()
                files = [("images", (f"{i}.jpg", photos[i % len(photos)], "image/jpeg"))]
                response = client.post("/classify", files=files, params={"top_k": 5})
                total = 1000 * (time.perf_counter() - started)
                response.raise_for_status()
                rows.append({"total": total, **_stages(dict(response.headers))})
    elif protocol == "multipart":
        # The lean client with each request encoded before its clock starts, as the gRPC side below.
        parsed = urllib.parse.urlsplit(url)
        head = {"content-type": forms.content_type()}
        raws = [request_bytes("POST", "/classify?top_k=5", parsed.netloc, head, forms.images(p)) for p in photos]

        async def sequential() -> None:
            connection = Connection(parsed.hostname or "127.0.0.1", parsed.port or 80)
            try:
                for i in range(requests + 10):
                    started = time.perf_counter()
                    response = await connection.request(raws[i % len(raws)])
                    total = 1000 * (time.perf_counter() - started)
                    if response.status != 200:
                        raise RuntimeError(f"/classify answered {response.status}: {response.body[:200]!r}")
                    rows.append({"total": total, **_stages(response.headers)})
            finally:
                connection.close()

        asyncio.run(sequential())
    elif protocol == "grpc":
        import grpc

        from service.grpc.messages import METHODS, SERVICE

        request_type, response_type = METHODS["ModelInfer"]
        with grpc.insecure_channel(grpc_target) as channel:
            infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_type.FromString)  # fmt: skip
            for i in range(requests + 10):
                # What tritonclient sends: BYTES in raw_input_contents (4-byte length, then the bytes).
                request = request_type(model_name=MODEL_NAME)
                request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1, 1])
                blob = photos[i % len(photos)]
                request.raw_input_contents.append(len(blob).to_bytes(4, "little") + blob)
                request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
                started = time.perf_counter()
                # with_call: the stage timings come back as trailing metadata.
                _, call = infer.with_call(request, timeout=60)
                total = 1000 * (time.perf_counter() - started)
                rows.append({"total": total, **_stages(dict(call.trailing_metadata()))})
    else:
        raise ValueError(f"wall split is measured for multipart and grpc, not {protocol!r}")
    rows = rows[10:]  # the first ones warm connections and caches
    for row in rows:
        row["outside the stages"] = row["total"] - row["preprocess"] - row["queue"] - row["inference"]
    return {"protocol": protocol, "requests": len(rows),
            "median_ms": {k: statistics.median(r[k] for r in rows) for k in rows[0]}}  # fmt: skip


def tables(result: dict[str, Any]) -> list[str]:
    """Markdown tables of both measurements (the README renders them too, bench/figures.py)."""
    lines = [f"Wall time at one client, medians of {result['wall'][0]['requests']} sequential requests (ms):", "",
             "| protocol | round trip | preprocess | queue | inference | outside the stages |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for w in result["wall"]:
        m = w["median_ms"]
        lines.append(f"| {w['protocol']} | {m['total']:.1f} | {m['preprocess']:.1f} | {m['queue']:.1f} | "
                     f"{m['inference']:.1f} | {m['outside the stages']:.1f} |")  # fmt: skip
    profiles = result["cpu"]
    heads = [f"{p['protocol']} c={p['concurrency']}" for p in profiles]
    head = ["| " + " | ".join(["", *heads]) + " |", "|---|" + "---|" * len(heads)]

    def rows(key: str, names: list[str]) -> list[str]:
        out = []
        for name in names:
            cells = [p[key].get(name, 0.0) for p in profiles]
            if any(c >= 0.05 for c in cells):
                out.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        return out

    threads = sorted({r for p in profiles for r in p["cpu_ms_per_image_by_thread"]})
    seconds = profiles[0]["seconds"]
    lines += ["", f"Server CPU per image by thread (ms, from the kernel's per-thread CPU time over {seconds:.0f} s):",
              "", *head, *rows("cpu_ms_per_image_by_thread", threads)]  # fmt: skip
    lines.append("| **total** | " + " | ".join(f"**{p['cpu_ms_per_image_total']:.1f}**" for p in profiles) + " |")
    rates = " | ".join(f"{p['load']['images_per_s']:.1f}" for p in profiles)
    lines.append(f"| img/s (load generator) | {rates} |")
    lines += ["", f"The event loop's CPU per image by component (ms; its measured CPU shared out by py-spy samples at "
              f"{result['rate']} Hz):", "", *head,
              *rows("event_loop_ms_per_image", [LOOP_NATIVE] + [n for n, _ in COMPONENTS] + ["other"])]  # fmt: skip
    return lines


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    """JSON, and Markdown tables of both measurements."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    machine = result["machine"]
    lines = [f"# Where a request's time goes: {result['model']}", "",
             summary(machine) + f"; ISA flags: {', '.join(machine.get('cpu_flags', []))}; {machine['date']}", "",
             *tables(result)]  # fmt: skip
    (out / f"profile-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--protocols", nargs="+", default=["multipart", "grpc"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sampling per point")
    parser.add_argument("--requests", type=int, default=100, help="sequential requests for the wall-time split")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--env", nargs="*", default=[], help="extra RESNEST_X=value settings for the server")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    port, grpc_port = free_port(), free_port()
    url, target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    env = {**BENCH_ENV, **dict(kv.split("=", 1) for kv in args.env), "RESNEST_MODEL_PATH": str(args.model.resolve()),
           "RESNEST_DEFAULT_MODEL": MODEL_NAME, "RESNEST_HOST": "127.0.0.1", "RESNEST_PORT": str(port),
           "RESNEST_GRPC_PORT": str(grpc_port)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, server([sys.executable, "-m", "service"], env, url) as proc:
        photos_dir = Path(tmp) / "photos"
        photos = bench_photos(photos_dir)
        point(url, photos_dir, args.protocols[0], 1, 3, 2, target)  # warm every path once, unmeasured
        walled = [q for p in args.protocols for q in {"multipart": ["multipart", "multipart httpx"]}.get(p, [p])]
        wall = [
            wall_split(url, target, photos, p, args.requests) for p in walled if p.split()[0] in ("multipart", "grpc")
        ]
        cpu = [cpu_profile(proc.pid, url, photos_dir, p, c, args.duration, target, args.rate, spy)
               for c in args.concurrency for p in args.protocols]  # fmt: skip
    result = {"model": str(args.model), "machine": describe(), "settings": env, "rate": args.rate,
              "wall": wall, "cpu": cpu}  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
