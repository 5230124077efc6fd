"""Before and after: two checkouts of the service on the same model file, in turns, in one run.

    git worktree add /tmp/before <commit>
    python -m bench.ab --before /tmp/before --model artifacts/resnest50-fp32.onnx [--rounds 3] \\
        [--protocols multipart grpc] [--concurrency 1 16]

A change that should not move the figures (a refactor) is measured against the commit before it on the same
machine in the same hour: each round serves the before checkout and then this one (the order flips every
round, so drift favours neither), every protocol at every concurrency from a load-generator process of its own
(bench/protocols.py's points). The verdict is the median over rounds of after / before per point, beside the
spread of before against itself across rounds: a ratio inside that spread is noise.

A setting's cost is measured the same way on one checkout: sides that differ only in their settings, e.g.
tracing off against on (an OTLP receiver of bench/otlp.py started for the run, its address in `{otlp}`):

    python -m bench.ab --after-env 'RESNEST_OTEL_ENDPOINT={otlp}' --label tracing --concurrency 16
    python -m bench.ab --before-env RESNEST_CACHE_BYTES=0 --after-env RESNEST_CACHE_BYTES=268435456 \
        --loadgen --repeat 0.5 --label cache     # half the requests repeat an image

Or two model files (a graph change's cost), or two routes of one server (what one answer costs beside another):

    python -m bench.ab --before-model artifacts/resnest50-fp32-nofeatures.onnx --label feature-map
    python -m bench.ab --after-route /explain --protocols multipart --label explain --loadgen --classes 1
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

from .machine import describe, summary
from .otlp import Receiver, receiver
from .protocols import ours
from .serving import BENCH_ENV, ROOT, bench_photos

# A ratio this close to 1 counts as no change even where the before side happened to repeat itself exactly.
FLOOR = 1.02


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (protocol, concurrency) and metric: each side's median, the median over rounds of after / before
    within a round (both sides of a round see the same machine), and before's own spread across rounds."""
    out = []
    for protocol, c in sorted({(r["protocol"], r["concurrency"]) for r in rows}):
        picked = [r for r in rows if (r["protocol"], r["concurrency"]) == (protocol, c)]
        side = {s: {r["round"]: r for r in picked if r["side"] == s} for s in ("before", "after")}
        point: dict[str, Any] = {"protocol": protocol, "concurrency": c}
        for metric in ("images_per_s", "p50_ms", "p99_ms"):
            before = [r[metric] for r in side["before"].values()]
            paired = [
                side["after"][n][metric] / side["before"][n][metric] for n in side["before"] if n in side["after"]
            ]
            ratio = statistics.median(paired)
            spread = max(before) / min(before)
            point[metric] = {
                "before": statistics.median(before),
                "after": statistics.median(r[metric] for r in side["after"].values()),
                "ratio": ratio,
                "round_ratios": paired,
                "before_spread": spread,
                "within_noise": max(ratio, 1 / ratio) <= max(spread, FLOOR),
            }
        point["errors"] = {s: sum(r["errors"] for r in side[s].values()) for s in side}
        out.append(point)
    return out


def write(result: dict[str, Any], out: Path, tag: str) -> None:
    """JSON with every row, and a Markdown table of the verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ab-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Before and after: {result['before_commit']} -> {result['after_commit']}"
        + (f" ({result['label']})" if result.get("label") else ""),
        *(
            [
                "",
                f"Settings: before {result['before_env']}, after {result['after_env']}; load generator options "
                f"{result.get('loadgen') or 'none'}.",
            ]
            if result.get("label")
            else []
        ),
        "",
        summary(result["machine"]) + f"; ISA flags: {', '.join(result['machine'].get('cpu_flags', []))}",
        "",
        f"{result['rounds']} rounds, {result['duration_s']:.0f} s windows, sides alternating (order flipped every "
        "round). img/s and p50 are medians over rounds; `after / before` is the median over rounds of the ratio "
        "within a round; `spread` is the before side's max / min across rounds, its own noise: a ratio inside "
        f"it (or within {FLOOR - 1:.0%}) is no change.",
        "",
        "| protocol | clients | img/s before | img/s after | after / before | spread | p50 ms before | p50 ms after "
        "| after / before | spread | within noise | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["comparison"]:
        rate, p50 = p["images_per_s"], p["p50_ms"]
        lines.append(
            f"| {p['protocol']} | {p['concurrency']} | {rate['before']:.1f} | {rate['after']:.1f} | "
            f"{rate['ratio']:.3f} | {rate['before_spread']:.3f} | {p50['before']:.1f} | {p50['after']:.1f} | "
            f"{p50['ratio']:.3f} | {p50['before_spread']:.3f} | "
            f"{'yes' if rate['within_noise'] and p50['within_noise'] else 'NO'} | "
            f"{p['errors']['before']} / {p['errors']['after']} |"
        )
    (out / f"ab-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _settings(pairs: list[str], sink: Receiver) -> dict[str, str]:
    """KEY=value pairs as settings, `{otlp}` standing for the run's OTLP receiver."""
    return dict(pair.replace("{otlp}", sink.endpoint).split("=", 1) for pair in pairs)


def _commit(checkout: Path) -> str:
    """The checkout's commit, short, with '+' when its tree has changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head.stdout.strip() + ("+" if dirty else "")


def rewrite(path: Path) -> None:
    """The comparison and its table again from a run's JSON (after a change to how they are computed)."""
    result = json.loads(path.read_text())
    result["comparison"] = compare(result["rows"])
    write(result, path.parent, path.stem.removeprefix("ab-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout (git worktree) of the commit before (default: this)")
    parser.add_argument("--before-env", nargs="*", default=[], help="RESNEST_X=value settings of the before side")
    parser.add_argument("--after-env", nargs="*", default=[], help="RESNEST_X=value settings of the after side")
    parser.add_argument("--loadgen", nargs=argparse.REMAINDER, default=[], help="options for bench/loadgen.py")
    parser.add_argument("--label", default="", help="what differs, for the table's title")
    parser.add_argument("--before-model", type=Path, help="the before side's model file (default: --model)")
    parser.add_argument("--before-route", default="/classify", help="the multipart route the before side is sent")
    parser.add_argument("--after-route", default="/classify", help="the multipart route the after side is sent")
    parser.add_argument("--rewrite", type=Path, help="recompute an earlier run's comparison from its JSON, run nothing")
    parser.add_argument("--model", type=Path, default=Path("artifacts/resnest50-fp32.onnx"))
    parser.add_argument("--protocols", nargs="+", default=["multipart", "grpc"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=12.0, help="measurement window per point (s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured ramp-up per point (s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    if args.rewrite:
        rewrite(args.rewrite)
        return 0
    differ = args.before_env or args.after_env or args.before_model or args.before_route != args.after_route
    if args.before is None and not differ:
        parser.error("--before, or settings, a model or a route that differ (--before-env / --after-env, "
                     "--before-model, --before-route / --after-route), is required")  # fmt: skip

    model = args.model.resolve()
    models = {"before": (args.before_model or args.model).resolve(), "after": model}
    routes = {"before": args.before_route, "after": args.after_route}
    sides = {"before": (args.before or ROOT).resolve(), "after": ROOT}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, receiver("http") as sink:
        photos_dir = Path(tmp) / "photos"
        bench_photos(photos_dir)
        for round_ in range(args.rounds):
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for name in order:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                env = {**BENCH_ENV, **_settings(args.before_env if name == "before" else args.after_env, sink)}
                extra = [*args.loadgen, "--route", routes[name]]
                for row in ours(models[name], photos_dir, args.concurrency, args.protocols, args.duration,
                                args.warmup, env, checkout=sides[name], extra=extra):  # fmt: skip
                    rows.append({**row, "side": name, "round": round_})
    result = {
        "before_commit": _commit(sides["before"]), "after_commit": _commit(sides["after"]), "model": str(args.model),
        "machine": describe(), "settings": BENCH_ENV, "rounds": args.rounds, "duration_s": args.duration,
        "comparison": compare(rows), "rows": rows, "label": args.label, "loadgen": args.loadgen,
        "before_env": args.before_env, "after_env": args.after_env, "spans_received": len(sink.spans),
        "before_model": str(args.before_model or args.model), "before_route": args.before_route,
        "after_route": args.after_route,
    }  # fmt: skip
    write(result, args.out, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
