"""Protocol benchmark: the same server, the same 500 px JPEGs and the same answer (the top 5 classes) over each
protocol it speaks, in one run, and optionally peers (BentoML, LitServe, MLServer) on the same file.

    python -m bench.protocols --model artifacts/resnest50-fp32.onnx [--concurrency 1 16] [--rounds 2] \
        [--protocols multipart grpc] [--peer bentoml litserve mlserver]   # peers: `make peers` first

Protocols: multipart /classify, OIP HTTP JSON (base64 BYTES), OIP HTTP binary (Triton's binary tensors) and OIP
gRPC (tritonclient.grpc.aio, one channel). Each point is a closed loop from its own load-generator process
(bench/loadgen.py); the order of protocols rotates every round so drift on a shared machine does not favour
one. Each --peer (bench/peers: its own virtual environment, adaptive batching of at most 8 images as its
documentation configures it, decoding inside the batch) is measured between our rounds in its own protocol.
Results: JSON and markdown under bench/results/, with the machine; the raw session's ceiling is measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort

from modelcard import ModelCard

from .machine import describe, summary
from .peers import NAMES as PEERS
from .peers.launch import serve
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


def peer(name: str, venvs: Path, model: Path, photos_dir: Path, folder: Path, concurrencies: list[int],
         duration: float, warmup: float) -> list[dict[str, Any]]:  # fmt: skip
    """One peer (bench/peers) on the same file, one JPEG per request, at every concurrency, in its own protocol."""
    rows = []
    with serve(name, venvs, model, folder) as running:
        for c in concurrencies:
            with Sampler(running.pid) as sampler:
                # classes 0 over gRPC: MLServer has no classification extension, its runtime answers the top 5.
                classes = 0 if running.protocol == "grpc" else 5
                row = point(running.url, photos_dir, running.protocol, c, duration, warmup, running.grpc_target,
                            classes=classes)  # fmt: skip
            row.update(sampler.summary(), server=name)
            rows.append(row)
            _report(row, f"{name} {running.protocol}")
    return rows


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The goals, from the medians over rounds: the multipart route against gRPC, the peers and the ceiling."""
    table, protocols = result["summary"], result.get("protocols", list(PROTOCOLS))
    out = []
    low, peak = min(result["concurrency"]), max(result["concurrency"])
    rate = {key: v["images_per_s"] for key, v in table.items()}
    if ("multipart", low) in table and ("grpc", low) in table:
        ratio = rate[("multipart", low)] / rate[("grpc", low)]
        out.append((f"c={low}: multipart >= 0.97x gRPC img/s", f"{ratio:.3f}x", ratio >= 0.97))
    for name in result.get("peers", []):
        if ("multipart", low) in table and (name, low) in table:
            ours, theirs = rate[("multipart", low)], rate[(name, low)]
            out.append((f"c={low}: multipart ahead of {name}", f"{ours:.1f} vs {theirs:.1f} img/s", ours > theirs))
    if ("multipart", low) in table:
        bound = result["ceiling"]["single_image_ms"] + result["preprocess"]["ms_per_image"]
        p50 = table[("multipart", low)]["p50_ms"]
        out.append((f"c={low}: multipart p50 <= 1.10x inference + preprocessing",
                    f"{p50:.1f} / {bound:.1f} ms = {p50 / bound:.2f}x", p50 <= 1.10 * bound))  # fmt: skip
    ceiling = result["ceiling"]["images_per_s"]
    for protocol in protocols:
        if (protocol, peak) in table:
            r = rate[(protocol, peak)] / ceiling
            out.append((f"c={peak}: {protocol} >= 0.95x the ceiling", f"{r:.2f}x", r >= 0.95))
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (protocol or peer, concurrency): the median over rounds of img/s, p50 and p99."""

    def key_of(r: dict[str, Any]) -> tuple[str, int]:
        return (r["protocol"] if r["server"] == "ours" else r["server"], r["concurrency"])

    keys = sorted({key_of(r) for r in rows})
    table = {}
    for key in keys:
        picked = [r for r in rows if key_of(r) == key]
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
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--peer", nargs="*", default=[], choices=PEERS, help="peers to measure between our rounds")
    parser.add_argument("--peers", type=Path, default=ROOT / ".peers", help="their virtual environments (make peers)")
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
            shift = round_ % len(args.protocols)
            order = args.protocols[shift:] + args.protocols[:shift]
            print(f"round {round_ + 1}: ours ({', '.join(order)}) ...", file=sys.stderr, flush=True)
            rows += ours(args.model, photos_dir, args.concurrency, order, args.duration, args.warmup, settings)
            for name in args.peer:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                rows += peer(name, args.peers, args.model, photos_dir, Path(tmp) / f"{name}{round_}",
                             args.concurrency, args.duration, args.warmup)  # fmt: skip
        result: dict[str, Any] = {
            "variant": card.variant, "model": str(args.model), "machine": describe(), "settings": settings,
            "preprocess": preprocess_cost(photos, card), "ceiling": ceil, "concurrency": args.concurrency,
            "rounds": args.rounds, "duration_s": args.duration, "protocols": args.protocols, "peers": args.peer,
            "rows": rows, "summary": summarise(rows),
        }  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
