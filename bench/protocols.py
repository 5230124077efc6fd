"""Protocol benchmark: the same server, the same 500 px JPEGs and the same answer (the top 5 classes) over each
protocol it speaks, in one run, and optionally peers (BentoML, LitServe, MLServer) on the same file.

    python -m bench.protocols --model artifacts/resnest50-fp32.onnx [--concurrency 1 16] [--rounds 2] \
        [--protocols multipart grpc] [--peer bentoml litserve mlserver]   # peers: `make peers` first

Protocols: multipart /classify, OIP HTTP JSON (base64 BYTES), OIP HTTP binary (Triton's binary tensors) and OIP
gRPC (tritonclient.grpc.aio, one channel). Each point is a closed loop from its own load-generator process
(bench/loadgen.py). Each --peer (bench/peers: its own virtual environment, adaptive batching of at most 8 images
as its documentation configures it, decoding inside the batch) is measured in its own protocol.

Every server is started once and stays up for the whole run, with every process under it stopped (SIGSTOP)
except during its own points (and once it has finished what the load generator left in flight), so an idle
server takes no CPU (LitServe's workers poll) and no server is measured in a different hour from the others:
every round measures each server and protocol in turn, at one concurrency, in an order that rotates every
round, and all rounds at one concurrency come before the next concurrency's, lowest first. The raw session's
ceiling and the cost of preprocessing are measured again at the start of every round (all servers stopped),
and each round's figures are read against its own ceiling: on a shared machine the speed of the hardware
drifts within a run. Results: JSON and markdown under bench/results/, with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import psutil

from modelcard import ModelCard

from .machine import describe, summary
from .peers import NAMES as PEERS
from .peers.launch import serve
from .serving import BENCH_ENV, ROOT, Sampler, bench_photos, ceiling, free_port, preprocess_cost, server

PROTOCOLS = ("multipart", "oip-json", "oip-binary", "grpc")
MODEL_NAME = "resnest"


def point(url: str, photos_dir: Path, protocol: str, concurrency: int, duration: float, warmup: float,
          grpc_target: str = "", classes: int = 5, model: str = MODEL_NAME, extra: Sequence[str] = ()
          ) -> dict[str, Any]:  # fmt: skip
    """One closed-loop measurement from a load-generator process of its own (`extra`: more of its options)."""
    command = [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--concurrency", str(concurrency), "--images", "1",
        "--duration", str(duration), "--warmup", str(warmup), "--photos", str(photos_dir), "--protocol", protocol,
        "--model", model, "--grpc-target", grpc_target, "--classes", str(classes), *extra,
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
         warmup: float, settings: dict[str, str], checkout: Path = ROOT, extra: Sequence[str] = ()
         ) -> list[dict[str, Any]]:  # fmt: skip
    """This service (as `checkout` holds it), both fronts up, every protocol at every concurrency, in `order`
    (`extra`: more options for the load generator)."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**settings, "RESNEST_MODEL_PATH": str(model), "RESNEST_DEFAULT_MODEL": MODEL_NAME,
           "RESNEST_HOST": "127.0.0.1", "RESNEST_PORT": str(port), "RESNEST_GRPC_PORT": str(grpc_port)}  # fmt: skip
    rows = []
    with server([sys.executable, "-m", "service"], env, url, cwd=checkout) as proc:
        for c in concurrencies:
            for protocol in order:
                with Sampler(proc.pid) as sampler:
                    row = point(url, photos_dir, protocol, c, duration, warmup, f"127.0.0.1:{grpc_port}",
                                extra=extra)  # fmt: skip
                row.update(sampler.summary(), server="ours")
                rows.append(row)
                _report(row, protocol)
    return rows


def signal_tree(pid: int, signum: int) -> None:
    """Signal a server and every process under it: not its process group, which a child may leave (BentoML's
    workers start sessions of their own)."""
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)


def tree_cpu(pid: int, seconds: float) -> float:
    """% of a core a server and its processes use over `seconds`."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent()
    time.sleep(seconds)
    busy = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            busy += proc.cpu_percent()
    return busy


def wait_idle(pid: int, below: float, every: float = 0.25, limit: float = 60.0) -> None:
    """Return once a server and its processes use less than `below` % of a core over two samples in a row."""
    quiet, deadline = 0, time.monotonic() + limit
    while quiet < 2 and time.monotonic() < deadline:
        quiet = quiet + 1 if tree_cpu(pid, every) < below else 0


@dataclass(frozen=True)
class Target:
    """One server and protocol to measure: the server's process tree stays stopped (SIGSTOP) between its turns,
    so the servers all stay up for the whole run and an idle one (LitServe's workers poll) takes no CPU."""

    server: str  # "ours" or the peer's name
    protocol: str
    url: str
    grpc_target: str
    pid: int
    photos_dir: Path
    idle_cpu: float  # % of a core it uses with nothing to do (LitServe's workers poll)
    classes: int = 5

    def measure(self, concurrency: int, duration: float, warmup: float) -> dict[str, Any]:
        """One closed-loop point, the server resumed for it and stopped again afterwards."""
        signal_tree(self.pid, signal.SIGCONT)
        try:
            with Sampler(self.pid) as sampler:
                row = point(self.url, self.photos_dir, self.protocol, concurrency, duration, warmup,
                            self.grpc_target, classes=self.classes)  # fmt: skip
        finally:
            # Requests the load generator left in flight are finished before the stop: one that spanned it
            # would teach an adaptive batcher (BentoML's) a latency no client saw, and cost its next turn.
            wait_idle(self.pid, below=self.idle_cpu + 10.0)
            signal_tree(self.pid, signal.SIGSTOP)
        row.update(sampler.summary(), server=self.server)
        _report(row, self.protocol if self.server == "ours" else f"{self.server} {self.protocol}")
        return row


def start_all(stack: contextlib.ExitStack, model: Path, photos_dir: Path, tmp: Path, settings: dict[str, str],
              protocols: Sequence[str], peers: Sequence[str], venvs: Path) -> list[Target]:  # fmt: skip
    """Start this service (both fronts) and every peer once, each stopped until its turn; stopped servers are
    resumed before `stack` stops them (a stopped process would not act on SIGTERM)."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**settings, "RESNEST_MODEL_PATH": str(model), "RESNEST_DEFAULT_MODEL": MODEL_NAME,
           "RESNEST_HOST": "127.0.0.1", "RESNEST_PORT": str(port), "RESNEST_GRPC_PORT": str(grpc_port)}  # fmt: skip
    targets = []
    proc = stack.enter_context(server([sys.executable, "-m", "service"], env, url))
    idle = tree_cpu(proc.pid, 2.0)
    targets += [Target("ours", p, url, f"127.0.0.1:{grpc_port}", proc.pid, photos_dir, idle) for p in protocols]
    stack.callback(signal_tree, proc.pid, signal.SIGCONT)
    signal_tree(proc.pid, signal.SIGSTOP)
    for name in peers:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        running = stack.enter_context(serve(name, venvs, model, tmp / name))
        # classes 0 over gRPC: MLServer has no classification extension, its runtime answers the top 5.
        classes = 0 if running.protocol == "grpc" else 5
        idle = tree_cpu(running.pid, 2.0)
        targets.append(Target(name, running.protocol, running.url, running.grpc_target, running.pid, photos_dir,
                              idle, classes))  # fmt: skip
        stack.callback(signal_tree, running.pid, signal.SIGCONT)
        signal_tree(running.pid, signal.SIGSTOP)
    return targets


def _key(row: dict[str, Any]) -> str:
    return row["protocol"] if row["server"] == "ours" else row["server"]


def per_round(result: dict[str, Any], key: str, c: int, value: Any) -> list[float]:
    """value(row, round's ceiling, round's preprocessing) for the rows of (key, c), one per round."""
    out = []
    for row in result["rows"]:
        if _key(row) == key and row["concurrency"] == c:
            r = row.get("round", 0)
            ceilings, pre = (
                result.get("ceilings") or [result["ceiling"]],
                result.get("preprocesses") or [result["preprocess"]],
            )
            out.append(value(row, ceilings[min(r, len(ceilings) - 1)], pre[min(r, len(pre) - 1)]))
    return out


def _ratio_by_round(result: dict[str, Any], a: str, b: str, c: int) -> list[float]:
    """a's img/s over b's, round by round (both measured in the same round)."""
    rates: dict[str, dict[int, float]] = {a: {}, b: {}}
    for row in result["rows"]:
        if _key(row) in rates and row["concurrency"] == c:
            rates[_key(row)][row.get("round", 0)] = row["images_per_s"]
    return [rates[a][r] / rates[b][r] for r in sorted(rates[a]) if r in rates[b]]


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}x (rounds {min(values):.{digits}f}-{max(values):.{digits}f})"


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The goals, each the median over rounds of a ratio taken within a round (its spread beside it): the
    multipart route against gRPC and the peers, its p50 and every protocol's peak against the round's ceiling."""
    table, protocols = result["summary"], result.get("protocols", list(PROTOCOLS))
    out = []
    low, peak = min(result["concurrency"]), max(result["concurrency"])
    if ("multipart", low) in table and ("grpc", low) in table:
        ratios = _ratio_by_round(result, "multipart", "grpc", low)
        out.append((f"c={low}: multipart >= 0.97x gRPC img/s", _spread(ratios, 3), statistics.median(ratios) >= 0.97))
    for name in result.get("peers", []):
        if ("multipart", low) in table and (name, low) in table:
            ratios = _ratio_by_round(result, "multipart", name, low)
            out.append((f"c={low}: multipart ahead of {name}", _spread(ratios, 3), statistics.median(ratios) > 1.0))
    if ("multipart", low) in table:

        def over_bound(row: dict[str, Any], ceil: dict[str, Any], pre: dict[str, Any]) -> float:
            return float(row["p50_ms"] / (ceil["single_image_ms"] + pre["ms_per_image"]))

        bound = per_round(result, "multipart", low, over_bound)
        out.append((f"c={low}: multipart p50 <= 1.10x inference + preprocessing", _spread(bound),
                    statistics.median(bound) <= 1.10))  # fmt: skip
    for protocol in protocols:
        if (protocol, peak) in table:
            share = per_round(result, protocol, peak, lambda row, ceil, pre: row["images_per_s"] / ceil["images_per_s"])
            out.append((f"c={peak}: {protocol} >= 0.95x the ceiling", _spread(share), statistics.median(share) >= 0.95))
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (protocol or peer, concurrency): the median over rounds of img/s, p50 and p99."""

    def key_of(r: dict[str, Any]) -> tuple[str, int]:
        return (r["protocol"] if r["server"] == "ours" else r["server"], r["concurrency"])

    keys = sorted({key_of(r) for r in rows})
    ceilings = {r.get("round", 0): r.get("ceiling_images_per_s") for r in rows}
    table = {}
    for key in keys:
        picked = [r for r in rows if key_of(r) == key]
        table[key] = {m: statistics.median(r[m] for r in picked) for m in ("images_per_s", "p50_ms", "p99_ms")}
        table[key]["errors"] = sum(r["errors"] for r in picked)
        table[key]["client_cpu_percent"] = statistics.median(r["client_cpu_percent"] for r in picked)
        table[key]["server_cpu_percent"] = statistics.median(r["server_cpu_percent"] for r in picked)
        if all(ceilings.get(r.get("round", 0)) for r in picked):  # each row against its own round's ceiling
            table[key]["x_ceiling"] = statistics.median(
                r["images_per_s"] / ceilings[r.get("round", 0)] for r in picked
            )  # fmt: skip
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
        f"Raw session ceiling (median of the rounds' own): {ceil['images_per_s']:.1f} img/s at batch "
        f"{ceil['best_batch']}, {ceil['single_image_ms']:.1f} ms at batch 1 (each round: "
        + ", ".join(f"{c['images_per_s']:.1f}" for c in result.get("ceilings", [ceil]))
        + f" img/s); preprocessing {result['preprocess']['ms_per_image']:.2f} ms per image. Medians over "
        f"{result['rounds']} rounds ({result['duration_s']:.0f} s windows), protocols in rotating order, peers "
        "between our rounds; `x ceiling` and the goals take each round against its own ceiling.",
        "",
        "| server / protocol | clients | img/s | x ceiling | p50 ms | p99 ms | errors | server CPU % | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (protocol, c), v in table.items():
        lines.append(
            f"| {protocol} | {c} | {v['images_per_s']:.1f} | "
            f"{v.get('x_ceiling', v['images_per_s'] / ceil['images_per_s']):.2f} | "
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
    parser.add_argument("--peer", nargs="*", default=[], choices=PEERS, help="peers to measure beside us")
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
        rows: list[dict[str, Any]] = []
        ceilings, preprocesses = [], []
        with contextlib.ExitStack() as stack:
            targets = start_all(stack, args.model, photos_dir, Path(tmp), settings, args.protocols, args.peer,
                                args.peers)  # fmt: skip
            # Every round of the lowest concurrency before any of the next: an adaptive batcher that was just
            # overloaded (BentoML's) serves one client far slower for tens of seconds afterwards.
            for c in args.concurrency:
                for round_ in range(args.rounds):
                    print(f"c={c}, round {round_ + 1}: ceiling ...", file=sys.stderr, flush=True)
                    ceilings.append(ceiling(args.model, photos, [1, 8], args.ceiling_seconds))
                    preprocesses.append(preprocess_cost(photos, card))
                    print(f"  {ceilings[-1]['images_per_s']:.1f} img/s at batch {ceilings[-1]['best_batch']}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    shift = round_ % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        row = target.measure(c, args.duration, args.warmup)
                        # Rounds are numbered across concurrencies: each has its own ceiling.
                        rows.append({**row, "round": len(ceilings) - 1,
                                     "ceiling_images_per_s": ceilings[-1]["images_per_s"]})  # fmt: skip
        best = max(ceilings[0]["images_per_s_by_batch"], key=lambda b: statistics.median(
            c["images_per_s_by_batch"][b] for c in ceilings))  # fmt: skip
        ceil = {
            "providers": ceilings[0]["providers"], "best_batch": best,
            "images_per_s": statistics.median(c["images_per_s"] for c in ceilings),
            "single_image_ms": statistics.median(c["single_image_ms"] for c in ceilings),
        }  # fmt: skip
        preprocess = {"ms_per_image": statistics.median(p["ms_per_image"] for p in preprocesses)}
        result: dict[str, Any] = {
            "variant": card.variant, "model": str(args.model), "machine": describe(), "settings": settings,
            "preprocess": preprocess, "ceiling": ceil, "ceilings": ceilings, "preprocesses": preprocesses,
            "concurrency": args.concurrency,
            "rounds": args.rounds, "duration_s": args.duration, "protocols": args.protocols, "peers": args.peer,
            "rows": rows, "summary": summarise(rows),
        }  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
