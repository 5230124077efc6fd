"""Protocol benchmark: the same server, the same 500 px JPEGs and the same answer (the top 5 classes) over each
protocol it speaks, in one run, and optionally a peer, Seldon MLServer, over OIP gRPC.

    python -m bench.protocols --model artifacts/resnest50-fp32.onnx [--concurrency 1 16] [--rounds 2] \\
        [--mlserver /path/to/venv/bin/mlserver]

Protocols: multipart /classify, OIP HTTP JSON (base64 BYTES), OIP HTTP binary (Triton's binary tensors) and OIP
gRPC (tritonclient.grpc.aio, one channel). Each point is a closed loop from its own load-generator process
(bench/loadgen.py); the order of protocols rotates every round so drift on a shared machine does not favour
one. With --mlserver, MLServer 1.7.1 (its own virtual environment; adaptive batching of at most 8 images, 10 ms,
decoding inside the batch, bench/mlserver_runtime.py) is measured between our rounds on the same file.
Results: JSON and markdown under bench/results/, with the machine; the raw session's ceiling is measured in
the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnxruntime as ort

from modelcard import ModelCard

from .machine import describe, summary
from .serving import BENCH_ENV, ROOT, Sampler, bench_photos, ceiling, free_port, preprocess_cost, server

PROTOCOLS = ("multipart", "oip-json", "oip-binary", "grpc")
MODEL_NAME = "resnest"


def point(url: str, photos_dir: Path, protocol: str, concurrency: int, duration: float, warmup: float,
          grpc_target: str = "", classes: int = 5, model: str = MODEL_NAME) -> dict[str, Any]:  # fmt: skip
    """One closed-loop measurement from a load-generator process of its own."""
    command = [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--concurrency", str(concurrency), "--images", "1",
        "--duration", str(duration), "--warmup", str(warmup), "--photos", str(photos_dir), "--protocol", protocol,
        "--model", model, "--grpc-target", grpc_target, "--classes", str(classes),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(row: dict[str, Any], label: str) -> None:
    print(
        f"  {label:<18} c={row['concurrency']:3d}: {row['images_per_s']:6.1f} img/s, p50 {row['p50_ms']:7.1f} ms, "
        f"p99 {row['p99_ms']:7.1f} ms, errors {row['errors']}, client CPU {row['client_cpu_percent']:.0f}%",
        file=sys.stderr,
        flush=True,
    )


def ours(model: Path, photos_dir: Path, concurrencies: list[int], order: list[str], duration: float,
         warmup: float, settings: dict[str, str], checkout: Path = ROOT) -> list[dict[str, Any]]:  # fmt: skip
    """This service (as `checkout` holds it), both fronts up, every protocol at every concurrency, in `order`."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**settings, "RESNEST_MODEL_PATH": str(model), "RESNEST_DEFAULT_MODEL": MODEL_NAME,
           "RESNEST_HOST": "127.0.0.1", "RESNEST_PORT": str(port), "RESNEST_GRPC_PORT": str(grpc_port)}  # fmt: skip
    rows = []
    with server([sys.executable, "-m", "service"], env, url, cwd=checkout) as proc:
        for c in concurrencies:
            for protocol in order:
                with Sampler(proc.pid) as sampler:
                    row = point(url, photos_dir, protocol, c, duration, warmup, f"127.0.0.1:{grpc_port}")
                row.update(sampler.summary(), server="ours")
                rows.append(row)
                _report(row, protocol)
    return rows


@contextlib.contextmanager
def mlserver(executable: Path, model: Path, folder: Path) -> Iterator[tuple[str, str, int]]:
    """MLServer on `model` with bench/mlserver_runtime.py; yields (HTTP url, gRPC target, pid)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port, "host": "127.0.0.1",
        # Inference in MLServer's main process: its worker processes fail to start under uvloop 0.23 ("no
        # current event loop"), and on two cores a second process would only compete for them anyway.
        "parallel_workers": 0,
    }))  # fmt: skip
    (folder / "model-settings.json").write_text(json.dumps({
        "name": MODEL_NAME, "implementation": "bench.mlserver_runtime.ResNeStRuntime",
        "parameters": {"uri": str(model.resolve())}, "max_batch_size": 8, "max_batch_time": 0.01,
    }))  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(folder / "mlserver.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(executable), "start", str(folder)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"MLServer exited with {proc.returncode}:\n{(folder / 'mlserver.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("MLServer not ready")
            time.sleep(0.5)
        yield url, f"127.0.0.1:{grpc_port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def peer(executable: Path, model: Path, photos_dir: Path, folder: Path, concurrencies: list[int], duration: float,
         warmup: float) -> list[dict[str, Any]]:  # fmt: skip
    """MLServer over OIP gRPC, one JPEG per request, at every concurrency."""
    rows = []
    with mlserver(executable, model, folder) as (url, target, pid):
        for c in concurrencies:
            with Sampler(pid) as sampler:
                row = point(url, photos_dir, "grpc", c, duration, warmup, target, classes=0)
            row.update(sampler.summary(), server="mlserver")
            rows.append(row)
            _report(row, "mlserver grpc")
    return rows


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's goals, from the medians over rounds."""
    table = result["summary"]
    out = []
    low, peak = min(result["concurrency"]), max(result["concurrency"])
    grpc_p50, multipart_p50 = table[("grpc", low)]["p50_ms"], table[("multipart", low)]["p50_ms"]
    out.append((f"c={low}: gRPC p50 <= multipart p50", f"{grpc_p50:.1f} vs {multipart_p50:.1f} ms",
                grpc_p50 <= multipart_p50))  # fmt: skip
    rates = {p: table[(p, peak)]["images_per_s"] for p in PROTOCOLS}
    best = max(rates.values())
    for protocol, rate in rates.items():
        out.append((f"c={peak}: {protocol} >= 0.9x the best protocol", f"{rate / best:.2f}x ({rate:.1f} img/s)",
                    rate >= 0.9 * best))  # fmt: skip
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (protocol or peer, concurrency): the median over rounds of img/s, p50 and p99."""
    keys = sorted({(r["protocol"] if r["server"] == "ours" else "mlserver", r["concurrency"]) for r in rows})
    table = {}
    for key in keys:
        picked = [r for r in rows if (r["protocol"] if r["server"] == "ours" else "mlserver", r["concurrency"]) == key]
        table[key] = {m: statistics.median(r[m] for r in picked) for m in ("images_per_s", "p50_ms", "p99_ms")}
        table[key]["errors"] = sum(r["errors"] for r in picked)
        table[key]["client_cpu_percent"] = statistics.median(r["client_cpu_percent"] for r in picked)
        table[key]["server_cpu_percent"] = statistics.median(r["server_cpu_percent"] for r in picked)
    return table


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = result.pop("summary")
    serial = {**result, "summary": [{"protocol": p, "concurrency": c, **v} for (p, c), v in table.items()]}
    (out / f"protocols-{tag}.json").write_text(json.dumps(serial, indent=2) + "\n")
    result["summary"] = table
    ceil = result["ceiling"]
    lines = [
        f"# Protocols: {result['variant']}, one 500 px JPEG per request, top 5 classes back",
        "",
        summary(result["machine"]),
        "",
        f"Raw session ceiling (same run): {ceil['images_per_s']:.1f} img/s at batch {ceil['best_batch']}, "
        f"{ceil['single_image_ms']:.1f} ms at batch 1; preprocessing {result['preprocess']['ms_per_image']:.2f} ms "
        f"per image. Medians over {result['rounds']} rounds ({result['duration_s']:.0f} s windows), protocols in "
        "rotating order.",
        "",
        "| server / protocol | clients | img/s | x ceiling | p50 ms | p99 ms | errors | server CPU % | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (protocol, c), v in table.items():
        lines.append(
            f"| {protocol} | {c} | {v['images_per_s']:.1f} | {v['images_per_s'] / ceil['images_per_s']:.2f} | "
            f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['errors']} | {v['server_cpu_percent']:.0f} | "
            f"{v['client_cpu_percent']:.0f} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {'yes' if met else 'NO'} |" for goal, measured, met in goals(result)]
    (out / f"protocols-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=15.0, help="measurement window per point (s)")
    parser.add_argument("--warmup", type=float, default=4.0, help="unmeasured ramp-up per point (s)")
    parser.add_argument("--ceiling-seconds", type=float, default=6.0)
    parser.add_argument("--mlserver", type=Path, help="the `mlserver` executable of an MLServer 1.7.1 environment")
    parser.add_argument("--env", nargs="*", default=[], help="extra RESNEST_X=value settings for our server")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)

    settings = {**BENCH_ENV, **dict(kv.split("=", 1) for kv in args.env)}
    with tempfile.TemporaryDirectory() as tmp:
        photos_dir = Path(tmp) / "photos"
        photos = bench_photos(photos_dir)
        card = ModelCard.from_metadata(
            ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
            .get_modelmeta()
            .custom_metadata_map
        )
        print("ceiling ...", file=sys.stderr, flush=True)
        ceil = ceiling(args.model, photos, [1, 8], args.ceiling_seconds)
        print(f"  {ceil['images_per_s']:.1f} img/s at batch {ceil['best_batch']}", file=sys.stderr, flush=True)
        rows: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = list(PROTOCOLS[round_ % len(PROTOCOLS) :] + PROTOCOLS[: round_ % len(PROTOCOLS)])
            print(f"round {round_ + 1}: ours ({', '.join(order)}) ...", file=sys.stderr, flush=True)
            rows += ours(args.model, photos_dir, args.concurrency, order, args.duration, args.warmup, settings)
            if args.mlserver:
                print(f"round {round_ + 1}: MLServer ...", file=sys.stderr, flush=True)
                rows += peer(args.mlserver, args.model, photos_dir, Path(tmp) / f"mlserver{round_}",
                             args.concurrency, args.duration, args.warmup)  # fmt: skip
        result: dict[str, Any] = {
            "variant": card.variant, "model": str(args.model), "machine": describe(), "settings": settings,
            "preprocess": preprocess_cost(photos, card), "ceiling": ceil, "concurrency": args.concurrency,
            "rounds": args.rounds, "duration_s": args.duration, "rows": rows, "summary": summarise(rows),
        }  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
