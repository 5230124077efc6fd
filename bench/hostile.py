"""Hostile and careless clients, all at once, against one real server, while two well-behaved keyed clients
(one on HTTP, one on gRPC) keep asking for answers.

    python -m bench.hostile --model artifacts/resnest50-fp32.onnx [--duration 30]

The attack: uploads that declare 20 MiB and send nothing, uploads that trickle a few bytes a second (each
reconnects when the server cuts it off), grpc.health Watch streams held open, 20 MiB gRPC inference calls with
a wrong key, and odd parameters on every route (versions like "²" or 5,000 digits, model names that climb out
of the repository, oversized numbers). Measured: the keyed clients' errors and latency against their own quiet
latency in the same run, every status the odd parameters got, the server's RSS growth against the upload
budget, and how the slow uploads ended. tests/test_hostile_clients.py runs the same scenario and asserts it;
run here it writes bench/results/hostile-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .forms import content_type, images, opening

DECLARED = 20 * 2**20  # what the slow uploads say they will send


@dataclass(frozen=True)
class Attack:
    """How many of each hostile client, and for how long."""

    silent: int = 64
    trickle: int = 64
    watchers: int = 512
    wrong_key: int = 64
    wrong_key_bytes: int = 20 * 2**20 - 4096  # under the upload limit: only the key can refuse it
    duration_s: float = 30.0
    quiet_s: float = 8.0  # the keyed clients alone, before the attack
    settle_s: float = 3.0  # the attack alone, before the keyed clients are measured through it


@dataclass
class Figures:
    """What the run measured."""

    attack: dict[str, Any]
    quiet_p50_ms: dict[str, float] = field(default_factory=dict)
    attack_p50_ms: dict[str, float] = field(default_factory=dict)
    keyed_requests: dict[str, int] = field(default_factory=dict)
    keyed_errors: dict[str, list[str]] = field(default_factory=dict)
    odd_statuses: dict[str, int] = field(default_factory=dict)
    odd_5xx: list[str] = field(default_factory=list)
    slow_uploads: dict[str, int] = field(default_factory=dict)
    slow_upload_seconds: dict[str, float] = field(default_factory=dict)
    watchers_open: int = 0
    watchers_refused: int = 0
    wrong_key_statuses: dict[str, int] = field(default_factory=dict)
    rss_before_mib: float = 0.0
    rss_growth_mib: float = 0.0
    upload_budget_mib: float = 0.0


def trickled_body(size: int = 4096) -> bytes:
    """The start of a well-formed multipart body, for a trickling client to send a byte at a time (the
    parser must keep waiting for more, not refuse it as malformed)."""
    return opening() + b"\xff" * size


def _slow_head(port: int, key: str) -> bytes:
    return (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type()}\r\nContent-Length: {DECLARED}\r\n\r\n"
    ).encode()


async def slow_upload(
    port: int, key: str, trickle: bool, until: float, ends: Counter[str], seconds: list[float]
) -> None:
    """Declare a 20 MiB upload and send nothing (or a byte every half second); reconnect when cut off."""
    while time.monotonic() < until:
        opened = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_slow_head(port, key))
            await writer.drain()
            answer = asyncio.ensure_future(reader.read(4096))
            body = iter(trickled_body())
            while not answer.done() and time.monotonic() < until:
                if trickle:
                    writer.write(bytes([next(body, 0xFF)]))
                    await writer.drain()
                await asyncio.wait({answer}, timeout=0.5)
            if not answer.done():
                answer.cancel()
                writer.close()
                ends["still open at the end"] += 1
                return
            head = answer.result().split(b"\r\n", 1)[0].decode("latin-1")
            ends[head.split(" ", 2)[1] if head.startswith("HTTP/") else "closed"] += 1
            seconds.append(time.monotonic() - opened)
            writer.close()
        except (OSError, IndexError):
            ends["connection error"] += 1
            await asyncio.sleep(0.1)


def odd_requests(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method and path, httpx arguments) of odd parameters on every route."""
    huge = "9" * 5000
    upload = {
        "content": images(b"\xff\xd8 not really"),
        "headers": {"content-type": content_type()},
    }
    oip = {"json": {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]}}
    return [
        ("version ²", "POST /classify?version=%C2%B2", upload),
        ("version 5000 digits", f"POST /classify?version={huge}", upload),
        ("version Arabic-Indic", "POST /embed?version=%D9%A3", upload),
        ("version 0", "POST /classify?version=0", upload),
        ("model climbing", "POST /classify?model=..%2F..%2Fetc%2Fpasswd", upload),
        ("top_k huge", f"POST /classify?top_k={huge}", upload),
        ("top_k negative", "POST /classify?top_k=-3", upload),
        ("model info version ²", "GET /model?version=%C2%B2", {}),
        ("model info 5000 digits", f"GET /model?version={huge}", {}),
        ("oip version ²", f"POST /v2/models/{model}/versions/%C2%B2/infer", oip),
        ("oip version 4400 digits", f"POST /v2/models/{model}/versions/{'9' * 4400}/infer", oip),
        ("oip metadata version 5000 digits", f"GET /v2/models/{model}/versions/{huge}", {}),
        ("oip ready version ²", f"GET /v2/models/{model}/versions/%C2%B2/ready", {}),
        ("oip config version 0", f"GET /v2/models/{model}/versions/0/config", {}),
        ("oip model climbing", "POST /v2/models/..%2F..%2Fetc/infer", oip),
        ("oip load absolute path", "POST /v2/repository/models/%2Ftmp%2Fm/load", {}),
        ("oip load climbing", "POST /v2/repository/models/..%2Fm/load", {}),
        ("oip header length huge", f"POST /v2/models/{model}/infer",
         {**oip, "headers": {"inference-header-content-length": huge}}),
    ]  # fmt: skip


async def odd_parameters(
    http: httpx.AsyncClient, model: str, until: float, statuses: Counter[str], bad: list[str]
) -> None:
    """Every odd request in turn until the attack ends; 5xx answers are recorded by label."""
    cases = odd_requests(model)
    i = 0
    while time.monotonic() < until:
        label, target, kwargs = cases[i % len(cases)]
        method, path = target.split(" ", 1)
        try:
            status = (await http.request(method, path, **kwargs)).status_code
        except httpx.HTTPError as exc:
            status, label = 0, f"{label}: {type(exc).__name__}"
        statuses[str(status)] += 1
        if status >= 500 or status == 0:
            bad.append(f"{label} -> {status}")
        i += 1
        await asyncio.sleep(0.05)


async def odd_grpc(
    metadata: Any, request_type: Any, key: str, until: float, statuses: Counter[str], bad: list[str]
) -> None:
    """Odd model versions and names over gRPC ModelMetadata, keyed (so the parsers, not the key, answer)."""
    cases = [("²", "m"), ("9" * 5000, "m"), ("0", "m"), ("", "../../etc"), ("", "/tmp/m"), ("", "x" * 5000)]
    i = 0
    while time.monotonic() < until:
        version, name = cases[i % len(cases)]
        request = request_type(name=name, version=version)
        try:
            await metadata(request, metadata=(("authorization", f"Bearer {key}"),), timeout=10)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        statuses[f"grpc {code}"] += 1
        if code in ("INTERNAL", "UNKNOWN"):
            bad.append(f"grpc version {version[:10]!r} name {name[:10]!r} -> {code}")
        i += 1
        await asyncio.sleep(0.05)


async def watchers(target: str, count: int, until: float, opened: list[int], refused: list[int]) -> None:
    """`count` health Watch streams over a few channels, held until the attack ends."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]

    async def watch(i: int) -> None:
        stub = health_pb2_grpc.HealthStub(channels[i % len(channels)])
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            await asyncio.wait_for(call.read(), 10)
            opened[0] += 1
            await asyncio.sleep(max(until - time.monotonic(), 0))
        except (grpc.aio.AioRpcError, TimeoutError):
            refused[0] += 1
        finally:
            call.cancel()

    try:
        await asyncio.gather(*(watch(i) for i in range(count)))
    finally:
        for channel in channels:
            await channel.close()


async def wrong_keys(target: str, count: int, size: int, until: float, statuses: Counter[str]) -> None:
    """`count` concurrent inference calls of `size` bytes with a wrong key, sent again each second."""
    payload = b"\0" * size
    options = [("grpc.max_send_message_length", -1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(4)]
    calls = [c.unary_unary("/inference.GRPCInferenceService/ModelInfer", lambda b: b, lambda b: b) for c in channels]

    async def one(i: int) -> None:
        while time.monotonic() < until:
            try:
                await calls[i % len(calls)](payload, metadata=(("authorization", "Bearer wrong"),), timeout=30)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                statuses[exc.code().name] += 1
            await asyncio.sleep(1.0)

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for channel in channels:
            await channel.close()


async def keyed(send: Callable[[], Awaitable[None]], until: float, latencies: list[float], errors: list[str]) -> None:
    """A well-behaved client: one request after another until `until`; every failure is kept."""
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            await send()
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # every failure is a finding
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")


def _p50_ms(latencies: list[float]) -> float:
    return round(statistics.median(latencies) * 1000, 2) if latencies else float("nan")


async def attack(url: str, grpc_target: str, key: str, model: str, plan: Attack) -> dict[str, Any]:
    """Every hostile client at once for `plan.duration_s`; what each of them got."""
    from service.grpc.messages import METHODS

    port = int(url.rsplit(":", 1)[1])
    until = time.monotonic() + plan.duration_s
    ends: Counter[str] = Counter()
    seconds: dict[str, list[float]] = {"silent": [], "trickle": []}
    odd: Counter[str] = Counter()
    bad: list[str] = []
    opened, refused = [0], [0]
    wrong: Counter[str] = Counter()
    headers = {"authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        request, response = METHODS["ModelMetadata"]
        metadata = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                       request.SerializeToString, response.FromString)  # fmt: skip
        await asyncio.gather(
            *(slow_upload(port, key, False, until, ends, seconds["silent"]) for _ in range(plan.silent)),
            *(slow_upload(port, key, True, until, ends, seconds["trickle"]) for _ in range(plan.trickle)),
            watchers(grpc_target, plan.watchers, until, opened, refused),
            wrong_keys(grpc_target, plan.wrong_key, plan.wrong_key_bytes, until, wrong),
            odd_parameters(http, model, until, odd, bad),
            odd_grpc(metadata, request, key, until, odd, bad),
        )
    return {
        "odd_statuses": dict(sorted(odd.items())),
        "odd_5xx": bad,
        "slow_uploads": dict(ends),
        "slow_upload_seconds": {k: round(statistics.median(v), 2) for k, v in seconds.items() if v},
        "watchers_open": opened[0],
        "watchers_refused": refused[0],
        "wrong_key_statuses": dict(wrong),
    }


Latencies = dict[str, list[float]]
Errors = dict[str, list[str]]


async def _keyed_clients(url: str, grpc_target: str, key: str, model: str, photo: bytes, seconds: float,
                         during: Callable[[], None] = lambda: None) -> tuple[Latencies, Errors]:  # fmt: skip
    """Both keyed clients at once, one request after another each, for `seconds` (after three warm-up requests
    each); `during` is called every 50 ms meanwhile."""
    from service.grpc.messages import METHODS

    headers = {"authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        infer_request, infer_response = METHODS["ModelInfer"]
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    infer_request.SerializeToString, infer_response.FromString)  # fmt: skip
        request = infer_request(model_name=model)
        tensor = request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1, 1])
        tensor.contents.bytes_contents.append(photo)

        async def send_http() -> None:
            answer = await http.post("/classify", files={"images": ("a.jpg", photo, "image/jpeg")})
            if answer.status_code != 200:
                raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")

        async def send_grpc() -> None:
            await infer(request, metadata=tuple(headers.items()), timeout=60)

        senders = {"http": send_http, "grpc": send_grpc}
        latencies: dict[str, list[float]] = {name: [] for name in senders}
        errors: dict[str, list[str]] = {name: [] for name in senders}
        for send in senders.values():
            for _ in range(3):
                await send()
        until = time.monotonic() + seconds

        async def sample() -> None:
            while time.monotonic() < until:
                during()
                await asyncio.sleep(0.05)

        await asyncio.gather(sample(), *(keyed(send, until, latencies[n], errors[n]) for n, send in senders.items()))
    return latencies, errors


def scenario(url: str, grpc_target: str, key: str, pid: int, model: str, photo: bytes, budget: int,
             plan: Attack) -> Figures:  # fmt: skip
    """The keyed clients' quiet latency, then the same clients through the attack, which runs in a process of its
    own (its event loop and its copies of 20 MiB messages are not the keyed clients')."""
    figures = Figures(attack=asdict(plan), upload_budget_mib=round(budget / 2**20, 1))
    quiet, errors = asyncio.run(_keyed_clients(url, grpc_target, key, model, photo, plan.quiet_s))
    figures.quiet_p50_ms = {name: _p50_ms(v) for name, v in quiet.items()}
    process = psutil.Process(pid)
    before = process.memory_info().rss
    peak = [before]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "attack.json"
        command = [sys.executable, "-m", "bench.hostile", "attack", "--url", url, "--grpc-target", grpc_target,
                   "--key", key, "--model", model, "--plan", json.dumps(asdict(plan)),
                   "--report", str(report)]  # fmt: skip
        attacker = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1])
        try:
            time.sleep(plan.settle_s)  # the attack takes hold before the keyed clients are measured
            during, more_errors = asyncio.run(_keyed_clients(
                url, grpc_target, key, model, photo, plan.duration_s - plan.settle_s - 1.0,
                lambda: peak.append(process.memory_info().rss),
            ))  # fmt: skip
        finally:
            code = attacker.wait(timeout=plan.duration_s + 120)
        if code != 0:
            raise RuntimeError(f"the attack process failed with exit code {code}")
        found = json.loads(report.read_text())
    figures.attack_p50_ms = {name: _p50_ms(v) for name, v in during.items()}
    figures.keyed_requests = {name: len(v) for name, v in during.items()}
    figures.keyed_errors = {name: errors[name] + more_errors[name] for name in errors}
    for name, value in found.items():
        setattr(figures, name, value)
    figures.rss_before_mib = round(before / 2**20, 1)
    figures.rss_growth_mib = round((max(peak) - before) / 2**20, 1)
    return figures


def write(figures: Figures, machine: dict[str, Any], settings: dict[str, str], out: Path) -> None:
    """bench/results/hostile-cpu.json and .md."""
    from .machine import summary

    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "server_settings": settings, **asdict(figures)}
    (out / "hostile-cpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Hostile clients against one server",
        "",
        f"Machine: {summary(machine)}; ISA flags: {', '.join(machine.get('cpu_flags', [])) or 'none listed'}. "
        f"Model: {settings.get('RESNEST_MODEL_PATH', '?')}. Generated by `python -m bench.hostile`.",
        "",
        f"Attack for {figures.attack['duration_s']:g} s: {figures.attack['silent']} silent and "
        f"{figures.attack['trickle']} trickling 20 MiB uploads (reconnecting when cut off), "
        f"{figures.attack['watchers']} gRPC Watch streams, {figures.attack['wrong_key']} wrong-key "
        f"{figures.attack['wrong_key_bytes'] / 2**20:.0f} MiB gRPC calls (each sent again a second after its refusal), "
        "odd parameters on every route. The attack runs in a process of its own on the same machine, so its CPU "
        "competes with the server's.",
        "",
        "| keyed client | quiet p50 ms | under attack p50 ms | ratio | requests | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name in figures.quiet_p50_ms:
        q, a = figures.quiet_p50_ms[name], figures.attack_p50_ms[name]
        lines.append(f"| {name} | {q} | {a} | {a / q:.2f} | {figures.keyed_requests[name]} | "
                     f"{len(figures.keyed_errors[name])} |")  # fmt: skip
    lines += [
        "",
        f"- Slow uploads ended with: {figures.slow_uploads}; median seconds from connect to answer: "
        f"{figures.slow_upload_seconds}.",
        f"- Watch streams open: {figures.watchers_open}, refused: {figures.watchers_refused}.",
        f"- Wrong-key calls: {figures.wrong_key_statuses}.",
        f"- Odd parameters, answers by status: {figures.odd_statuses}; 5xx or transport errors: "
        f"{figures.odd_5xx or 'none'}.",
        f"- Server RSS {figures.rss_before_mib} MiB before the attack, peak growth {figures.rss_growth_mib} MiB "
        f"(upload budget {figures.upload_budget_mib} MiB).",
    ]
    (out / "hostile-cpu.md").write_text("\n".join(lines) + "\n")


HOSTILE_ENV = {"RESNEST_API_KEY": "hostile-bench-key", "RESNEST_BODY_TIMEOUT_S": "5"}


def _attack_main(argv: list[str]) -> int:
    """`python -m bench.hostile attack ...`: the attack process the scenario starts."""
    parser = argparse.ArgumentParser(prog="bench.hostile attack")
    for flag in ("--url", "--grpc-target", "--key", "--model", "--plan", "--report"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    found = asyncio.run(attack(args.url, args.grpc_target, args.key, args.model, Attack(**json.loads(args.plan))))
    Path(args.report).write_text(json.dumps(found))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["attack"]:
        return _attack_main(argv[1:])
    from service.core.settings import Settings

    from .machine import describe
    from .serving import ROOT, bench_photos, free_port, server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    http_port, grpc_port = free_port(), free_port()
    env = {**HOSTILE_ENV, "RESNEST_MODEL_PATH": str(args.model), "RESNEST_HOST": "127.0.0.1",
           "RESNEST_PORT": str(http_port), "RESNEST_GRPC_PORT": str(grpc_port),
           "RESNEST_LOG_LEVEL": "warning"}  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    with tempfile.TemporaryDirectory() as folder, server([sys.executable, "-m", "service"], env, url) as proc:
        photo = bench_photos(Path(folder))[0]
        budget = Settings().max_buffered_upload_bytes
        figures = scenario(url, f"127.0.0.1:{grpc_port}", HOSTILE_ENV["RESNEST_API_KEY"], proc.pid, args.model.stem,
                           photo, budget, Attack(duration_s=args.duration))  # fmt: skip
    write(figures, describe(), {k: v for k, v in env.items() if k != "RESNEST_API_KEY"}, args.out)
    print(json.dumps(asdict(figures), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
