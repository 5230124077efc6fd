"""The README's measured figures, generated from bench/results/*.json so they cannot go stale.

    python -m bench.figures            # rewrite every generated block of README.md in place
    python -m bench.figures --check    # exit 1, naming each block that differs from its JSON

A block sits between `<!-- figures: NAME -->` and `<!-- /figures -->`; NAME is the results file
(bench/results/NAME.json) and picks the render function that turns its parsed JSON into Markdown. Only the
standard library, so it runs anywhere (no onnxruntime, no numpy).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Json = dict[str, Any]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench/results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.DOTALL)

# The ISA flags that decide ONNX Runtime's CPU kernels, in the order a reader scans them.
KEY_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")

# The performance goals the figures are held to (targets, not measurements).
PEAK_GOAL, P50_GOAL, NAIVE_GOAL, FIFO_GOAL, PROTOCOL_GOAL, AVX2_INT8_GOAL = 0.9, 1.15, 1.2, 2.0, 0.9, 1.4

MODEL_LABELS = {
    "torch eager (CPU)": "PyTorch eager",
    "ORT CPU, naive graph": "ORT, official code exported the usual way ({nodes} nodes, {shapes} Shape)",
    "ORT CPU, clean graph": "ORT, this project's graph ({nodes} nodes, {shapes} Shape)",
}
INT8_FP32 = "ORT CPU, fp32"
INT8_EXPORT = "ORT CPU, int8 (export recipe)"
INT8_STEM = "ORT CPU, int8, stem in float, 8-bit weights"
INT8_LABELS = {
    INT8_FP32: "fp32 (this project's graph)",
    INT8_EXPORT: "**int8, the export's recipe** (everything but the classifier, 7-bit weights)",
    INT8_STEM: "int8, stem in float, 8-bit weights (the issue's fix for AVX2)",
}
SERVING_POINTS = [(1, 1), (16, 1), (64, 1), (16, 8), (64, 8)]  # (clients, images per request) shown
PROTOCOL_LABELS = {
    "multipart": "ours, multipart `/classify`",
    "oip-json": "ours, OIP HTTP JSON",
    "oip-binary": "ours, OIP HTTP binary",
    "grpc": "ours, OIP gRPC",
    "mlserver": "MLServer 1.7.1, OIP gRPC",
}
# Rows of the tuning table: label, the configurations it shows (bench/tuning.py's names), what it shows.
TUNING_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("ORT threads do not spin", ("ORT threads do not spin",), "spinning wakes faster than it costs decoding"),
    ("1 decode thread (default 2)", ("1 decode thread",), "decoding must overlap inference"),
    ("1 ORT intra-op thread (default: one per core)", ("1 ORT intra-op thread",), "inference needs every core"),
    (
        "max batch 4 / 16 (default 8)",
        ("max batch 4", "max batch 16"),
        "on a CPU the batch size barely matters; 16 fills slowly",
    ),
    ("queue delay 5 ms (default 0)", ("queue delay 5 ms",), "waiting to fill a batch only adds latency"),
]
TUNING_P50 = {"queue delay 5 ms"}  # configurations whose 1 x 1 cell also shows the p50 change
DEFAULTS = ("defaults", "defaults (again)")


# --- formatting ----------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def pct(change: float) -> str:
    """A relative change as a signed whole percentage, 0% without a sign."""
    n = round(100 * change)
    return "0%" if n == 0 else f"{n:+d}%"


def span(low: float, high: float, digits: int = 1, unit: str = "") -> str:
    """`low-high` at the given decimals, or one figure when both print alike."""
    a, b = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return f"{a}{unit}" if a == b else f"{a}-{b}{unit}"


def images(n: int) -> str:
    """`1 image` or `n images`."""
    return f"{n} image" if n == 1 else f"{n} images"


def verdict(met: bool) -> str:
    """A goal's outcome, bold when missed."""
    return "met" if met else "**not met**"


def isa(flags: list[str]) -> str:
    """The ISA flags that matter for inference, and whether VNNI is missing."""
    shown = [f for f in KEY_FLAGS if f in flags]
    if not shown:
        return "ISA flags not recorded"
    return ", ".join(shown) + ("" if "avx512_vnni" in flags else "; no VNNI")


def machine_line(result: Json, torch: bool = False) -> str:
    """Where and when the figures were measured, from the JSON's `machine`."""
    m = result["machine"]
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    libs = f"onnxruntime {m['onnxruntime']}" + (f", torch {m['torch']}" if torch and m.get("torch") else "")
    return f"Machine: {m['cpu']} ({isa(m.get('cpu_flags', []))}), {m['cores']} cores, {gpu}; {libs}; {m['date'][:10]}."


def load_generator(result: Json) -> str:
    """Which client the load generator sent HTTP with (runs before bench/http1.py's lean client used httpx)."""
    clients = {r.get("client", "httpx") for r in result["rows"] if r.get("protocol") != "grpc"}
    if clients == {"lean"}:
        return ("Load generator: HTTP through `bench/http1.py` (each request encoded once, keep-alive sockets), gRPC "
                "through tritonclient, each from a process of its own on the same cores.")  # fmt: skip
    return f"Load generator: HTTP through {', '.join(sorted(clients))}, gRPC through tritonclient, on the same cores."


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, unpadded."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def load_line(load: Json, what: str) -> str:
    """The 1-minute load average the JSON sampled."""
    return (
        f"Load average (1 min) {what}: median {load['median']:.1f}, {load['min']:.1f} to {load['max']:.1f} "
        f"on {load['cores']} cores."
    )


# --- model alone ---------------------------------------------------------------------------------------------


def render_model(result: Json) -> str:
    """model-cpu: images/s per runtime and batch; this project's graph against PyTorch eager."""
    rows = result["images_per_second"]
    batches = sorted({int(n) for by in rows.values() for n in by})
    base = rows.get("torch eager (CPU)")
    out = []
    for name, by in rows.items():
        label, kind = MODEL_LABELS.get(name, name), "naive" if "naive" in name else "clean"
        if "{" in label:
            label = label.format(nodes=result["nodes"][kind], shapes=result["shape_ops"][kind])
        cells = [f"{by[str(n)]:.1f}" if str(n) in by else "-" for n in batches]
        if name == "ORT CPU, clean graph" and base:
            cells = [
                f"{c} ({by[str(n)] / base[str(n)]:.2f}x)" if str(n) in by and str(n) in base else c
                for c, n in zip(cells, batches, strict=True)
            ]
        out.append([label, *cells])
    lines = [
        machine_line(result, torch=True),
        "",
        f"Images/s, median of {result['repeats']} runs; in brackets against PyTorch eager:",
        "",
    ]
    return "\n".join(lines + table(["runtime", *(f"batch {n}" for n in batches)], out))


# --- the service under load ----------------------------------------------------------------------------------


def _points(rows: list[Json]) -> dict[tuple[int, int], Json]:
    """A sweep's rows by (clients, images per request)."""
    return {(r["concurrency"], r["images_per_request"]): r for r in rows}


def _serving_table(result: Json) -> list[str]:
    """Ours (and the naive server, where it ran) at the README's load points."""
    ours, naive = _points(result["ours"]), _points(result.get("naive") or [])
    fattest = max(naive.values(), key=lambda r: r["server_rss_mib"]) if naive else None
    header = ["clients x images/request", "img/s", "p50 / p99 ms"]
    if naive:
        header = ["clients x images/request", "ours img/s", "ours p50 / p99 ms", "naive img/s", "naive p50 / p99 ms"]
    rows = []
    for point in (p for p in SERVING_POINTS if p in ours):
        row = [f"{point[0]} x {point[1]}"]
        for r in (ours[point], naive.get(point)) if naive else (ours[point],):
            if r is None:
                row += ["-", "-"]
                continue
            rss = f" (RSS {r['server_rss_mib'] / 1024:.1f} GiB)" if r is fattest else ""
            row += [f"{r['images_per_s']:.1f}{rss}", f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}"]
        rows.append(row)
    return table(header, rows)


def _peak_line(result: Json) -> str:
    """Peak throughput against the ceiling, and decoding's share of the cores at that rate."""
    peak = max(r["images_per_s"] for r in result["ours"])
    ceiling = result["ceiling"]["images_per_s"]
    decode = result["preprocess"]["ms_per_image"]
    share = peak * decode / 1000 / result["machine"]["cores"]
    cpu = [r["server_cpu_percent"] for r in result["ours"]]
    return (
        f"- Peak {peak:.1f} img/s = {peak / ceiling:.2f}x the ceiling: the {PEAK_GOAL}x goal is "
        f"{verdict(peak >= PEAK_GOAL * ceiling)}. The server used {span(min(cpu), max(cpu), 0, '%')} CPU "
        f"(of {100 * result['machine']['cores']}%); decoding ({decode:.1f} ms/image) took {share:.0%} of the "
        f"{result['machine']['cores']} cores at the peak."
    )


def _latency_line(result: Json) -> str | None:
    """p50 at one client against single-image inference + preprocessing."""
    if (1, 1) not in (ours := _points(result["ours"])):
        return None
    p50 = ours[(1, 1)]["p50_ms"]
    budget = result["ceiling"]["single_image_ms"] + result["preprocess"]["ms_per_image"]
    return (
        f"- At one client, p50 {p50:.1f} ms = {p50 / budget:.2f}x single-image inference + preprocessing "
        f"({budget:.1f} ms): the {P50_GOAL}x goal is {verdict(p50 <= P50_GOAL * budget)}."
    )


def _crowd_line(result: Json) -> str:
    """The most clients: errors, p99 against the FIFO bound, how full the batches were."""
    ours, naive = _points(result["ours"]), _points(result.get("naive") or [])
    top = max(c for c, _ in ours)
    crowd = [(m, r) for (c, m), r in sorted(ours.items()) if c == top]
    errors = sum(r["errors"] for _, r in crowd)
    bounds = [f"{r['p99_ms'] / (1000 * top * m / r['images_per_s']):.2f}x with {images(m)}" for m, r in crowd]
    full = [r["mean_batch_size"] for (c, _), r in ours.items() if c >= 16 and r.get("mean_batch_size")]
    met = errors == 0 and all(r["p99_ms"] <= FIFO_GOAL * 1000 * top * m / r["images_per_s"] for m, r in crowd)
    line = (
        f"- At {top} clients {'nothing errors' if not errors else f'{errors} errors'}; p99 against the FIFO bound "
        f"(queued images / throughput): {', '.join(bounds)} per request (the goal allows "
        f"{FIFO_GOAL:g}x: {verdict(met)})"
    )
    if full:
        line += f"; batches fill to {span(min(full), max(full))} images on their own from 16 clients"
    if (top, 1) in naive:
        tail = naive[(top, 1)]
        line += f". The naive server's p99 is {tail['p99_ms'] / tail['p50_ms']:.1f}x its p50 there"
    return line + "."


def _naive_line(result: Json) -> str | None:
    """Throughput against the naive server at 16 clients, per images per request."""
    ours, naive = _points(result["ours"]), _points(result.get("naive") or [])
    parts = []
    for m in sorted({m for c, m in ours if c == 16 and (c, m) in naive}):
        ratio = ours[(16, m)]["images_per_s"] / naive[(16, m)]["images_per_s"]
        parts.append(f"{ratio:.2f}x with {images(m)} per request ({NAIVE_GOAL}x goal {verdict(ratio >= NAIVE_GOAL)})")
    return f"- Throughput against the naive server at 16 clients: {', '.join(parts)}." if parts else None


def _batching_line(result: Json) -> str | None:
    """How much a batch of 8 gains over single images in the raw session."""
    by = result["ceiling"]["images_per_s_by_batch"]
    if "1" not in by or "8" not in by:
        return None
    return (
        f"- In the raw session a batch of 8 runs {by['8'] / by['1'] - 1:.0%} faster per image than a batch of 1 "
        f"({by['8']:.1f} against {by['1']:.1f} img/s)."
    )


def _soak_line(result: Json) -> str | None:
    """Resident memory over the soak, and the naive server's largest."""
    soak = result.get("soak")
    if not soak:
        return None
    line = (
        f"- Resident memory after {soak['requests']:,} more requests: {soak['growth_percent']:+.1f}% "
        f"({soak['rss_after_warmup_mib']:.0f} -> {soak['rss_after_mib']:.0f} MiB)"
    )
    if result.get("naive"):
        line += f"; the naive server reached {max(r['server_rss_mib'] for r in result['naive']) / 1024:.1f} GiB"
    return line + "."


def _earlier_line(result: Json) -> str | None:
    """Earlier runs the JSON keeps, with why they do not count."""
    runs = result.get("earlier_runs")
    if not runs:
        return None
    said = "; ".join(f"peak {r['peak_vs_ceiling']:.2f}x the ceiling, {r['note']}" for r in runs)
    return f"- Earlier runs the same hour (`earlier_runs` in the JSON): {said}."


def render_serving(result: Json) -> str:
    """serving-*: the sweep's table and its headline ratios."""
    ceiling, pre = result["ceiling"], result["preprocess"]
    by_batch = ", ".join(f"b{k} {v:.1f}" for k, v in ceiling["images_per_s_by_batch"].items())
    client = [r["client_cpu_percent"] for r in result["ours"] if "client_cpu_percent" in r]
    lines = [machine_line(result)]
    if load := result.get("load_average_1min"):
        lines.append(load_line(load, "through the run"))
    lines += [
        "",
        f"Ceiling (raw session, preprocessed tensors): {ceiling['images_per_s']:.1f} img/s at batch "
        f"{ceiling['best_batch']} ({by_batch}); single image {ceiling['single_image_ms']:.1f} ms; preprocessing "
        f"{pre['ms_per_image']:.2f} ms per image.",
        "",
        *_serving_table(result),
        "",
        _peak_line(result),
    ]
    lines += [x for x in (_latency_line(result), _crowd_line(result), _naive_line(result)) if x]
    lines += [x for x in (_batching_line(result), _soak_line(result)) if x]
    if client:
        lines.append(f"- The load generator used {span(min(client), max(client), 0, '%')} of one core.")
    lines += [x for x in (_earlier_line(result),) if x]
    return "\n".join(lines)


# --- tuning --------------------------------------------------------------------------------------------------


def _tuning(result: Json, explain: bool) -> str:
    """tuning-*: each change against the mean of the two default rows, and the noise between those."""
    configs = {c["name"]: c for c in result["configs"]}
    defaults = [configs[n]["points"] for n in DEFAULTS if n in configs]
    labels = [f"{p['concurrency']} x {p['images_per_request']}" for p in defaults[0]]
    ips = [[p["images_per_s"] for p in d] for d in defaults]
    low, high = [min(v) for v in zip(*ips, strict=True)], [max(v) for v in zip(*ips, strict=True)]
    mean = [sum(v) / len(v) for v in zip(*ips, strict=True)]
    p50 = sum(d[0]["p50_ms"] for d in defaults) / len(defaults)
    noise = max(h / lo - 1 for lo, h in zip(low, high, strict=True))

    def cell(name: str, i: int) -> str:
        point = configs[name]["points"][i]
        text = pct(point["images_per_s"] / mean[i] - 1)
        return text + (f" (p50 {point['p50_ms'] - p50:+.0f} ms)" if i == 0 and name in TUNING_P50 else "")

    rows, named = [], {n for _, names, _ in TUNING_ROWS for n in names}
    spec = TUNING_ROWS + [(n, (n,), "") for n in configs if n not in named and n not in DEFAULTS]
    for label, names, shows in spec:
        if all(n in configs for n in names):
            cells = [" / ".join(cell(n, i) for n in names) for i in range(len(labels))]
            rows.append([label, *cells, *([shows] if explain else [])])
    better, worse = [], []
    for name, config in configs.items():
        if name in DEFAULTS:
            continue
        values = [p["images_per_s"] for p in config["points"]]
        if any(v > h * (1 + noise) for v, h in zip(values, high, strict=True)):
            better.append(name)
        if all(v < lo * (1 - noise) for v, lo in zip(values, low, strict=True)):
            changes = [v / m - 1 for v, m in zip(values, mean, strict=True)]
            worse.append(f"{name} ({pct(max(changes))} to {pct(min(changes))})")
    runs = ", ".join(f"{a:.1f}/{b:.1f} img/s at {label}" for a, b, label in zip(*ips, labels, strict=True))
    lines = [
        machine_line(result),
        "",
        f"The defaults ran first and last ({runs}): they differ by up to {noise:.0%}, the noise a change has to "
        "beat. Each cell is a change against the mean of the two default rows:",
        "",
        *table(["change", *labels, *(["what it shows"] if explain else [])], rows),
        "",
    ]
    if better:
        lines.append(f"- Beyond the noise, better than the defaults somewhere: {', '.join(better)}.")
    else:
        lines.append("- No change beats the better default row by more than the noise, so the defaults stand.")
    if worse:
        lines.append(f"- Worse than the defaults beyond the noise at every point: {', '.join(worse)}.")
    return "\n".join(lines)


def render_tuning(result: Json) -> str:
    """tuning-cpu: the table with what each change shows."""
    return _tuning(result, explain=True)


def render_tuning_int8(result: Json) -> str:
    """tuning-int8-cpu: the same table, without fp32's explanations."""
    return _tuning(result, explain=False)


# --- int8 ----------------------------------------------------------------------------------------------------


def render_int8(result: Json) -> str:
    """model-int8-cpu: fp32 and int8 images/s, int8 / fp32 within a round, the stem's cost."""
    batches = [str(n) for n in result["batches"]]
    speedups = result["speedup_vs_fp32"]
    rows = []
    for name, by in result["images_per_second"].items():
        ratio = speedups.get(name)
        cells = []
        for n in batches:
            text = f"{ratio[n]:.2f}x" if ratio else ""
            text = f"**{text}**" if ratio and name == INT8_EXPORT else text
            cells.append(f"{by[n]:.1f}" + (f" ({text})" if ratio else ""))
        rows.append([INT8_LABELS.get(name, name), *cells])
    flags = result["machine"].get("cpu_flags", [])
    vnni = "with VNNI" if "avx512_vnni" in flags else "without VNNI"
    lines = [
        machine_line(result),
        load_line(result["load_average_1min"], "before each measurement, its own threads included"),
        "",
        f"Images/s, median over {result['rounds']} rounds; in brackets the median over rounds of int8 / fp32 "
        "within a round:",
        "",
        *table(["runtime", *(f"batch {n}" for n in batches)], rows),
        "",
    ]
    if INT8_EXPORT in speedups:
        got = [speedups[INT8_EXPORT][n] for n in batches]
        side = "above" if min(got) >= AVX2_INT8_GOAL else "not above"
        lines.append(
            f"- {vnni[0].upper() + vnni[1:]}, int8 runs {span(min(got), max(got))}x fp32: {side} the {AVX2_INT8_GOAL}x "
            "the issue asks of an AVX2-only CPU."
        )
    samples = result["samples"]
    if INT8_EXPORT in samples and INT8_STEM in samples:
        cost = [
            1 - median([s / e for s, e in zip(samples[INT8_STEM][n], samples[INT8_EXPORT][n], strict=True)])
            for n in batches
        ]
        lines.append(
            f"- Keeping the stem in float with 8-bit weights costs {span(100 * min(cost), 100 * max(cost), 0, '%')} "
            "of the export recipe's speed (median within a round)."
        )
    slow = [min(v) / median(v) for by in samples.values() for v in by.values()]
    lines.append(
        f"- The slowest round of a row and batch ran at {span(100 * min(slow), 100 * max(slow), 0, '%')} of its "
        "median (`samples` in the JSON keep every round)."
    )
    return "\n".join(lines)


# --- uint8-nhwc input ----------------------------------------------------------------------------------------


def _ms(us: float) -> str:
    """Microseconds as milliseconds, three significant figures."""
    ms = us / 1000
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def render_uint8(result: Json) -> str:
    """model-uint8-cpu: host preprocessing per input format and option, bytes, the model with each input."""
    host = result["host_us_per_image"]
    sizes: dict[str, dict[str, float]] = {}
    for name, us in host.items():
        size, _, rest = name.rpartition(": ") if re.match(r"\d+ px: ", name) else ("", "", name)
        sizes.setdefault(size or f"{result['upload_jpegs']['longer_side_px']} px", {})[rest.split(" (")[0]] = us
    columns = list(next(iter(sizes.values())))
    base = columns[0]
    rows = []
    for size, by in sizes.items():
        cells = [_ms(by[c]) + ("" if c == base else f" ({by[c] / by[base]:.2f}x)") if c in by else "-" for c in columns]
        rows.append([f"{size} JPEG", *cells])
    header = ["host preprocessing per image", *(c.replace("uint8-nhwc + ", "+ ") for c in columns)]
    first = next(iter(sizes.values()))
    saved = first[base] - first[columns[1]]
    nbytes = result["bytes_per_image"]
    model = result["images_per_second"]
    batches = sorted({int(n) for by in model.values() for n in by})
    lines = [
        machine_line(result),
        "",
        f"Uploads: {result['upload_jpegs']['count']} bundled photographs as {result['upload_jpegs']['longer_side_px']}"
        f" px JPEGs (the larger rows: the same photographs upscaled); host figures: one thread, median of "
        f"{result['repeats']} passes; in brackets against {base}:",
        "",
        *table(header, rows),
        "",
        f"- {columns[1]} saves {saved:.0f} us of host time per {next(iter(sizes))} image ({saved / first[base]:.0%}); "
        f"bytes per image to the runtime: {nbytes[base]:,} ({base}) against {nbytes[columns[1]]:,} ({columns[1]}).",
        "",
        *table(
            ["model (session.run, images/s)", *(f"batch {n}" for n in batches)],
            [[name, *(f"{by[str(n)]:.1f}" if str(n) in by else "-" for n in batches)] for name, by in model.items()],
        ),
    ]
    return "\n".join(lines)


# --- protocols -----------------------------------------------------------------------------------------------


def render_protocols(result: Json) -> str:
    """protocols-cpu: every protocol and MLServer at low and high concurrency, against the ceiling."""
    summary = {(r["protocol"], r["concurrency"]): r for r in result["summary"]}
    low, high = min(result["concurrency"]), max(result["concurrency"])
    ceiling = result["ceiling"]
    rows = []
    for protocol in [*PROTOCOL_LABELS, *sorted({p for p, _ in summary} - set(PROTOCOL_LABELS))]:
        if (protocol, low) not in summary or (protocol, high) not in summary:
            continue
        a, b = summary[(protocol, low)], summary[(protocol, high)]
        rows.append(
            [
                PROTOCOL_LABELS.get(protocol, protocol),
                f"{a['images_per_s']:.1f}",
                f"{a['p50_ms']:.1f}",
                f"{a['p99_ms']:.1f}",
                f"{b['images_per_s']:.1f}",
                f"{b['images_per_s'] / ceiling['images_per_s']:.2f}",
                f"{b['p50_ms']:.0f}",
                f"{b['p99_ms']:.0f}",
            ]
        )
    clients = f"{low} client{'s' if low > 1 else ''}"
    header = [
        "server / protocol",
        f"{clients}: img/s",
        "p50 ms",
        "p99 ms",
        f"{high} clients: img/s",
        "x ceiling",
        "p50 ms",
        "p99 ms",
    ]
    ours = [p for p in PROTOCOL_LABELS if p != "mlserver" and (p, high) in summary]
    rates = {p: summary[(p, high)]["images_per_s"] for p in ours}
    best, slowest = max(rates.values()), min(rates, key=rates.__getitem__)
    errors = sum(r["errors"] for r in result["summary"])
    cpu = [r["server_cpu_percent"] for (p, _), r in summary.items() if p in ours]
    grpc_low, multipart_low = summary[("grpc", low)]["p50_ms"], summary[("multipart", low)]["p50_ms"]
    lines = [
        machine_line(result),
        "",
        f"Raw session ceiling in the same run: {ceiling['images_per_s']:.1f} img/s (batch {ceiling['best_batch']}); "
        f"single image {ceiling['single_image_ms']:.1f} ms; preprocessing {result['preprocess']['ms_per_image']:.2f} "
        f"ms per image. Medians over {result['rounds']} rounds of {result['duration_s']:.0f} s:",
        "",
        *table(header, rows),
        "",
        f"- At {clients} gRPC's p50 ({grpc_low:.1f} ms) is {'below' if grpc_low <= multipart_low else 'above'} "
        f"multipart's ({multipart_low:.1f}): the goal is {verdict(grpc_low <= multipart_low)}.",
        f"- At {high} clients every protocol of ours is at least {min(rates.values()) / best:.2f}x the best "
        f"({PROTOCOL_LABELS[slowest].removeprefix('ours, ')} the slowest; the goal is {PROTOCOL_GOAL}x: "
        f"{verdict(min(rates.values()) >= PROTOCOL_GOAL * best)}); "
        f"{'no request failed' if not errors else f'{errors} requests failed'}; our server used "
        f"{span(min(cpu), max(cpu), 0, '%')} CPU throughout.",
    ]
    if ("mlserver", low) in summary and ("mlserver", high) in summary and ("grpc", high) in summary:
        ml_low, ml_high, grpc_high = summary[("mlserver", low)], summary[("mlserver", high)], summary[("grpc", high)]
        lines.append(
            f"- MLServer at {clients}: p50 {ml_low['p50_ms'] - grpc_low:.0f} ms later than ours over gRPC "
            f"({ml_low['p50_ms']:.1f} against {grpc_low:.1f} ms). At {high} clients: "
            f"{ml_high['images_per_s'] / ceiling['images_per_s']:.2f}x the ceiling against our gRPC's "
            f"{grpc_high['images_per_s'] / ceiling['images_per_s']:.2f}x, and a p99 "
            f"{ml_high['p99_ms'] / grpc_high['p99_ms']:.1f}x ours ({ml_high['p99_ms']:.0f} against "
            f"{grpc_high['p99_ms']:.0f} ms)."
        )
    return "\n".join(lines)


# --- hostile clients -----------------------------------------------------------------------------------------


def render_hostile(result: Json) -> str:
    """hostile-cpu: the keyed clients under attack and what each attack got."""
    attack, settings = result["attack"], result["server_settings"]
    requests = sum(result["keyed_requests"].values())
    errors = sum(len(e) for e in result["keyed_errors"].values())
    ratios = " and ".join(
        f"{result['attack_p50_ms'][k] / q:.2f}x ({'gRPC' if k == 'grpc' else k.upper()})"
        for k, q in result["quiet_p50_ms"].items()
    )
    odd = sum(result["odd_statuses"].values())
    statuses = ", ".join(f"{k}: {v}" for k, v in result["odd_statuses"].items())
    wrong = sum(result["wrong_key_statuses"].values())
    wrong_how = ", ".join(result["wrong_key_statuses"])
    cut = result["slow_uploads"].get("408", 0)
    still = result["slow_uploads"].get("still open at the end", 0)
    model = Path(settings.get("RESNEST_MODEL_PATH", "?")).name
    lines = [
        machine_line(result),
        "",
        f"`{model}`, {attack['duration_s']:g} s of attack ({attack['silent']} silent and {attack['trickle']} "
        f"trickling uploads, {attack['watchers']} Watch streams, {attack['wrong_key']} wrong-key callers, odd "
        "parameters on every route):",
        "",
        f"- {'No keyed error' if not errors else f'{errors} keyed errors'} in {requests} requests; p50 {ratios} "
        "of the quiet p50, with the attack's process competing for the same cores.",
        f"- {cut} slow uploads cut off with 408 after a median {max(result['slow_upload_seconds'].values()):.1f} s "
        f"(`RESNEST_BODY_TIMEOUT_S={settings.get('RESNEST_BODY_TIMEOUT_S', '?')}`); {still} still open at the end.",
        f"- {result['watchers_open']} Watch streams open, {result['watchers_refused']} refused; {wrong:,} wrong-key "
        f"{attack['wrong_key_bytes'] / 2**20:.0f} MiB calls refused ({wrong_how}).",
        f"- {'No' if not result['odd_5xx'] else len(result['odd_5xx'])} 5xx among {odd:,} odd requests ({statuses}).",
        f"- The server's RSS grew by {result['rss_growth_mib']:.1f} MiB from {result['rss_before_mib']:.1f} MiB "
        f"(the upload budget is {result['upload_budget_mib']:g} MiB).",
    ]
    return "\n".join(lines)


# --- protocols against peers (the multipart-overhead goals) --------------------------------------------------
PEER_LABELS = {
    "multipart": "ours, multipart `/classify`",
    "grpc": "ours, OIP gRPC",
    "bentoml": "BentoML 1.4.40, multipart",
    "litserve": "LitServe 0.2.19, multipart",
    "mlserver": "MLServer 1.7.1, OIP gRPC",
}


def render_peers(result: Json) -> str:
    """protocols-peers-*: our multipart and gRPC routes beside the three peers, each round against its ceiling."""
    from .protocols import goals

    summary = {(r["protocol"], r["concurrency"]): r for r in result["summary"]}
    low, high = min(result["concurrency"]), max(result["concurrency"])
    rows = []
    for key, label in PEER_LABELS.items():
        if (key, low) not in summary or (key, high) not in summary:
            continue
        a, b = summary[(key, low)], summary[(key, high)]
        rows.append([label, f"{a['images_per_s']:.1f}", f"{a['p50_ms']:.1f}", f"{b['images_per_s']:.1f}",
                     f"{b.get('x_ceiling', 0.0):.2f}", f"{b['p50_ms']:.0f}", f"{b['p99_ms']:.0f}",
                     str(a["errors"] + b["errors"])])  # fmt: skip
    clients = f"{low} client{'s' if low > 1 else ''}"
    header = ["server / route", f"{clients}: img/s", "p50 ms", f"{high} clients: img/s", "x ceiling", "p50 ms",
              "p99 ms", "errors"]  # fmt: skip
    ceilings = ", ".join(f"{c['images_per_s']:.1f}" for c in result["ceilings"])
    measured = goals({**result, "summary": summary})
    lines = [
        machine_line(result),
        "",
        f"`{Path(result['model']).name}`; the raw session's ceiling, measured at the start of each round: {ceilings} "
        f"img/s; single image {result['ceiling']['single_image_ms']:.1f} ms, preprocessing "
        f"{result['preprocess']['ms_per_image']:.2f} ms per image (medians). {result['rounds']} rounds of "
        f"{result['duration_s']:.0f} s windows per concurrency, every server in each round; medians over rounds, "
        "`x ceiling` "
        f"each round against its own ceiling. {load_generator(result)}",
        "",
        *table(header, rows),
        "",
        "Goals (each a ratio taken within a round; median, and the rounds' spread):",
        "",
        *table(["goal", "measured", "met"], [[g, m, verdict(ok)] for g, m, ok in measured]),
    ]
    return "\n".join(lines)


# --- a setting's cost: tracing on against off, the response cache --------------------------------------------
def render_ab(result: Json) -> str:
    """ab-*: the same checkout with two settings, in alternating turns; the ratio within each round."""
    rows = []
    two_routes = result.get("before_route", "/classify") != result.get("after_route", "/classify")
    for p in result["comparison"]:
        rate, p50 = p["images_per_s"], p["p50_ms"]
        # Two routes compared: the protocol's label would name /classify for both sides.
        label = "ours, multipart" if two_routes and p["protocol"] == "multipart" else p["protocol"]
        rows.append([PROTOCOL_LABELS.get(label, label), str(p["concurrency"]),
                     f"{rate['before']:.1f}", f"{rate['after']:.1f}", f"{rate['ratio']:.3f}",
                     f"{rate['before_spread']:.3f}", f"{p50['before']:.1f}", f"{p50['after']:.1f}",
                     f"{p50['ratio']:.3f}", f"{p['errors']['before']} / {p['errors']['after']}"])  # fmt: skip
    before, after = list(result["before_env"]), list(result["after_env"])
    # Runs that compare two model files, or two routes of one server, name them on each side.
    before_model, model = Path(result.get("before_model") or result["model"]).name, Path(result["model"]).name
    if before_model != model:
        before, after = [*before, before_model], [*after, model]
    if result.get("before_route", "/classify") != result.get("after_route", "/classify"):
        before, after = [*before, f"POST {result['before_route']}"], [*after, f"POST {result['after_route']}"]
    before, after = before or ["defaults"], after or ["defaults"]
    loadgen = " ".join(result.get("loadgen") or []) or "none"
    lines = [
        machine_line(result),
        "",
        f"`{model}`; before: {', '.join(f'`{e}`' for e in before)}; after: "
        f"{', '.join(f'`{e}`' for e in after)}; load generator options: `{loadgen}`. {result['rounds']} rounds "
        f"of {result['duration_s']:.0f} s windows, the sides alternating (order flipped every round); the ratio is "
        "the median of after / before within each round, `spread` the before side's own max / min across rounds"
        + (
            f"; {result['spans_received']:,} spans received by the OTLP receiver"
            if result.get("spans_received")
            else ""
        )
        + ":",
        "",
        *table(
            [
                "route",
                "clients",
                "img/s before",
                "img/s after",
                "after / before",
                "spread",
                "p50 ms before",
                "p50 ms after",
                "after / before",
                "errors",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


def render_batch(result: Json) -> str:
    """batch-*: the offline job beside the raw session's ceiling and the service's multipart route."""
    top = result["ceiling"]
    ceiling_rate = top["images_per_s"]
    rows = [[f"raw ONNX Runtime session, batch {top['best_batch']} (preprocessed tensors, no decoding)",
             f"{ceiling_rate:.1f}", "1.00"]]  # fmt: skip
    for run in result["jobs"]:
        rate = run["steady_images_per_s"]
        rows.append([f"`resnest-batch --batch-size {run['batch_size']}`, steady (decode, infer, write Parquet)",
                     f"{rate:.1f}", f"{rate / ceiling_rate:.2f}"])  # fmt: skip
    service = result["service"]
    rows.append(["the service, `POST /classify`, 16 clients", f"{service['images_per_s']:.1f}",
                 f"{service['images_per_s'] / ceiling_rate:.2f}"])  # fmt: skip
    lines = [
        machine_line(result),
        "",
        f"{result['images']} JPEG files of 500 px, `{Path(result['model']).name}`, one model actor on a local Ray:",
        "",
        *table(["what", "img/s", "of the ceiling"], rows),
    ]
    return "\n".join(lines)


def render_profile(result: Json) -> str:
    """profile-*: one request's time split by stage at one client, and the server's CPU per image by thread."""
    from .profile import tables

    first, *rest = tables(result)
    return "\n".join([machine_line(result), "", f"`{Path(result['model']).name}`. {first}", *rest])


RENDERERS: dict[str, Callable[[Json], str]] = {
    "model-cpu": render_model,
    "serving-cpu": render_serving,
    "tuning-cpu": render_tuning,
    "model-int8-cpu": render_int8,
    "serving-int8-cpu": render_serving,
    "tuning-int8-cpu": render_tuning_int8,
    "model-uint8-cpu": render_uint8,
    "protocols-cpu": render_protocols,
    "hostile-cpu": render_hostile,
    "protocols-peers-cpu": render_peers,
    "protocols-int8-cpu": render_peers,
    "ab-tracing-cpu": render_ab,
    "ab-cache-cpu": render_ab,
    "ab-feature-map-cpu": render_ab,
    "ab-explain-cpu": render_ab,
    "ab-explain-maps-cpu": render_ab,
    "batch-cpu": render_batch,
    "profile-cpu": render_profile,
}


# --- the README ----------------------------------------------------------------------------------------------


def render(name: str, results: Path = RESULTS) -> str:
    """One block's Markdown, from bench/results/<name>.json."""
    if name not in RENDERERS:
        raise KeyError(f"no render function for block {name!r} (known: {', '.join(RENDERERS)})")
    return RENDERERS[name](json.loads((results / f"{name}.json").read_text()))


def regenerate(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The text with every block rendered anew, and the names of the blocks that changed or are missing."""
    stale: list[str] = []

    def replace(match: re.Match[str]) -> str:
        body = "\n" + render(match["name"], results) + "\n\n"
        if match["body"] != body:
            stale.append(match["name"])
        return match.group(1) + body + match.group(4)

    new = BLOCK.sub(replace, text)
    found = {m["name"] for m in BLOCK.finditer(text)}
    stale += [f"{name} (no block in the README)" for name in RENDERERS if name not in found]
    return new, stale


def check(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """The stale blocks of a README: empty when every block is what its JSON gives."""
    return regenerate(readme.read_text(), results)[1]


def write(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """Rewrite a README's blocks in place; the names of those that changed."""
    text = readme.read_text()
    new, stale = regenerate(text, results)
    if new != text:
        readme.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.figures [--check]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a block is stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.check:
        stale = check(args.readme, args.results)
        for name in stale:
            print(f"stale: {name} (run `python -m bench.figures`)", file=sys.stderr)
        return 1 if stale else 0
    stale = write(args.readme, args.results)
    for name in stale:
        print(f"rewrote: {name}" if "(no block" not in name else f"missing: {name}")
    return 1 if any("(no block" in name for name in stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
