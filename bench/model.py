"""Model-level benchmark: ONNX Runtime on the exported graph vs PyTorch eager, same machine, same weights.

    python -m bench.model [--variant resnest50] [--batches 1 8 32 64] [--repeats 5]
    python -m bench.model --int8 [--batches 1 8 32] [--rounds 5]
    python -m bench.model --uint8 [--variant resnest50] [--batches 1 8 32] [--repeats 5]

Columns: PyTorch eager; ORT on a naive export (the official `resnest` code through torch's legacy exporter,
as most published ONNX ResNeSts are made); ORT on this project's clean graph. Every figure is the median of
`repeats` timed runs after one warm-up run. On a GPU the same rows run with CUDA (fp32 and fp16).

`--int8`: the clean fp32 graph against its int8 quantization on the CPU EP (the export's recipe, and the
recipe with the stem convolutions kept in float for comparison), calibrated on the bundled photographs as
the export does. The rows take turns, `rounds` times, each in a fresh process, and every figure is the
median over the rounds: on a machine others share, load drifts within minutes, and taking turns spreads it
over all rows alike. The load average is recorded before each measurement.

On a GPU the main run adds the service's own runtime (service.core.request.inference.OrtModel) on the fp16 graph with
IO binding, with and without CUDA graphs (one captured per batch shape in warm-up), so the ceiling figures
are those of the code that serves.

`--uint8`: what device-side preprocessing (export --input-format uint8-nhwc) saves: host preprocessing per
image (500 px JPEGs: decode, resize and crop, then the float conversion or not; JPEG draft mode and Pillow's
reducing_gap beside them), bytes per image handed to the runtime, and the model's own time with each input
format, on the CPU EP and, where there is one, CUDA fp16. Results: model-uint8-<kind>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import models
from export import graph
from export import quantize as int8
from export.device_input import as_format, uint8_nhwc_input
from export.fp16 import to_fp16
from export.fuse import fuse
from modelcard import FLOAT32_NCHW, UINT8_NHWC, ModelCard, PreprocessConfig

from .machine import describe, summary

Runner = Callable[[np.ndarray], object]


def naive_graph(variant: str, seed: int, size: int) -> onnx.ModelProto | None:
    """The official implementation exported the common way (legacy tracer, dynamic batch); None without it."""
    try:
        import resnest.torch as official
    except ImportError:
        return None
    if not hasattr(official, variant):
        return None
    model = models.init_random(getattr(official, variant)(), seed).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, size, size),), buf, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def time_runs(run: Runner, batch: np.ndarray, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median images/s over `repeats` runs, after one warm-up."""
    run(batch)
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        sync()
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def ort_runner(model: onnx.ModelProto, provider: str, threads: int) -> Runner | None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=chain)
    if session.get_providers()[0] != provider:
        return None
    return lambda batch: session.run(None, {"images": batch})


def torch_runner(model: torch.nn.Module, device: str, half: bool) -> Runner:
    model = model.to(device)
    if half:
        model = model.half()

    def run(batch: np.ndarray) -> object:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device)
            return model(x.half() if half else x)

    return run


def with_card(model: onnx.ModelProto, variant: str, cfg: PreprocessConfig, precision: str) -> onnx.ModelProto:
    """`model` with a model card in its metadata, so the service's runtime can load it (random weights)."""
    net = models.create_model(variant, seed=0)
    card = ModelCard(
        variant=variant, preprocess=cfg, labels=tuple(f"class_{i}" for i in range(net.num_classes)),
        labels_source="generic", embedding_dim=net.num_features, precision=precision,
        weights={"source": "random", "sha256": "random", "seed": 0}, export={"bench": "bench.model"},
    )  # fmt: skip
    out = onnx.ModelProto()
    out.CopyFrom(model)
    onnx.helper.set_model_props(out, card.to_metadata())
    return out


def service_runner(path: str, batches: list[int], threads: int, cuda_graphs: bool) -> Runner | None:
    """The service's own runtime (OrtModel, IO binding) on `path`, warmed for `batches` as the registry does."""
    from service.core.request.inference import CUDA, OrtModel, warm_up
    from service.core.settings import Settings

    settings = Settings(
        model_path=Path(path), intra_op_threads=threads, io_binding=True, cuda_graphs=cuda_graphs,
        max_batch_size=max(batches), grpc_enabled=False, max_queue_size=max(64, max(batches)),
        max_images_per_request=min(16, max(batches)),
    )  # fmt: skip
    model = OrtModel(settings)
    print(f"service runtime: {json.dumps(model.acceleration)}", file=sys.stderr, flush=True)
    if model.providers[0] != CUDA:
        return None  # these rows are about the CUDA path: on the CPU EP they would repeat the ORT CPU row
    warm_up(model, settings.batch_shapes())
    return model.infer


def _worker(spec: dict[str, Any]) -> dict[int, float]:
    """Measure one row in this (fresh) process, so no other runtime's threads compete with it."""
    threads = spec["threads"]
    torch.set_num_threads(threads)
    size = spec["size"]
    rng = np.random.default_rng(0)
    gpu = spec["device"] == "cuda"
    if spec["runtime"] == "torch":
        runner: Runner | None = torch_runner(models.create_model(spec["variant"], seed=0), spec["device"], spec["half"])
    elif spec["runtime"] == "service":
        runner = service_runner(spec["graph"], spec["batches"], threads, spec.get("cuda_graphs", False))
    else:
        provider = "CUDAExecutionProvider" if gpu else "CPUExecutionProvider"
        runner = ort_runner(onnx.load(spec["graph"]), provider, threads)
    if runner is None:
        return {}
    sync = torch.cuda.synchronize if gpu and spec["runtime"] == "torch" else (lambda: None)
    out = {}
    for n in spec["batches"]:
        if spec.get("input") == UINT8_NHWC:
            batch = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        else:
            batch = rng.standard_normal((n, 3, size, size), dtype=np.float32)
        out[n] = time_runs(runner, batch, spec["repeats"], sync)
        print(f"{spec['name']:32s} batch {n:3d}: {out[n]:8.1f} img/s", file=sys.stderr, flush=True)
    return out


def _measure(spec: dict[str, Any]) -> dict[int, float]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.model", "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, check=True,
    )  # fmt: skip
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="resnest50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for both (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--int8", action="store_true", help="fp32 vs int8 on the CPU EP (model-int8-cpu.*)")
    parser.add_argument("--rounds", type=int, default=5, help="--int8: turns each row takes")
    parser.add_argument(
        "--gpu-only", action="store_true", help="on a GPU, leave out the CPU rows (a short device lease)"
    )
    parser.add_argument("--uint8", action="store_true", help="what uint8-nhwc input saves (model-uint8-<kind>.*)")
    parser.add_argument("--images", type=int, default=8, help="--uint8: 500 px JPEGs timed through the host path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.int8:
        return int8_main(args)
    if args.uint8:
        return uint8_main(args)

    threads = args.threads or torch.get_num_threads()
    model = models.create_model(args.variant, seed=0)
    size = model.variant.data.input_size
    clean = graph.trace_to_onnx(fuse(model), size, 18)
    naive = naive_graph(args.variant, 0, size)
    graphs = {"naive": naive, "clean": clean}
    print(
        graph.format_histogram({k: graph.op_histogram(g) for k, g in graphs.items() if g is not None}), file=sys.stderr
    )
    gpu = torch.cuda.is_available()
    base = {"variant": args.variant, "size": size, "threads": threads, "batches": args.batches, "repeats": args.repeats}
    rows: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cpu_rows = not (gpu and args.gpu_only)
        specs = [{**base, "name": "torch eager (CPU)", "runtime": "torch", "device": "cpu", "half": False}] * cpu_rows
        for name, g in graphs.items():
            if g is None:
                continue
            path = f"{tmp}/{name}.onnx"
            onnx.save(g, path)
            if cpu_rows:
                specs.append({**base, "name": f"ORT CPU, {name} graph", "runtime": "ort", "device": "cpu",
                              "graph": path})  # fmt: skip
            if gpu:
                half = f"{tmp}/{name}-fp16.onnx"
                onnx.save(to_fp16(g), half)
                specs.append({**base, "name": f"ORT CUDA fp32, {name} graph", "runtime": "ort", "device": "cuda",
                              "graph": path})  # fmt: skip
                specs.append({**base, "name": f"ORT CUDA fp16, {name} graph", "runtime": "ort", "device": "cuda",
                              "graph": half})  # fmt: skip
        if gpu:
            specs.append(
                {**base, "name": "torch eager fp16 (CUDA)", "runtime": "torch", "device": "cuda", "half": True}
            )
            # The code that serves: OrtModel on the clean fp16 graph, IO binding, with and without CUDA graphs.
            served = f"{tmp}/served-fp16.onnx"
            onnx.save(with_card(to_fp16(clean), args.variant, model.variant.data, "fp16"), served)
            for graphs in (False, True):
                name = "service runtime fp16 (CUDA), IO binding" + (" + CUDA graphs" if graphs else "")
                specs.append({**base, "name": name, "runtime": "service", "device": "cuda", "graph": served,
                              "cuda_graphs": graphs})  # fmt: skip
        for spec in specs:
            measured = _measure(spec)
            if measured:
                rows[spec["name"]] = measured
            else:
                print(f"{spec['name']}: provider not active, skipped", file=sys.stderr)
    write_results(args, rows, graphs, size, threads, gpu)
    return 0


def write_results(
    args: argparse.Namespace,
    rows: dict[str, dict[int, float]],
    graphs: dict[str, onnx.ModelProto | None],
    size: int,
    threads: int,
    gpu: bool,
) -> None:
    """JSON and a markdown table under args.out, named by device."""
    machine = describe()
    baseline = rows.get("torch eager (CPU)")
    hist = {k: graph.op_histogram(g) for k, g in graphs.items() if g is not None}
    result: dict[str, Any] = {
        "variant": args.variant, "input_size": size, "threads": threads, "repeats": args.repeats,
        "machine": machine, "images_per_second": rows,
        "nodes": {k: sum(h.values()) for k, h in hist.items()}, "shape_ops": {k: h["Shape"] for k, h in hist.items()},
    }  # fmt: skip
    kind = "gpu" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"model-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Model benchmark ({kind.upper()}): {args.variant} at {size}x{size}, images/s (median of {args.repeats})",
        "",
        f"Machine: {summary(machine)}; {threads} intra-op threads; {machine['date']}. Each row ran in its own process.",
        "",
        "| runtime | " + " | ".join(f"batch {n}" for n in args.batches) + " |",
        "|---|" + "---|" * len(args.batches),
    ]
    for name, by_batch in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_batch[n]:.1f}" for n in args.batches) + " |")
    lines.append("")
    for name, by_batch in rows.items():
        if name.startswith("ORT CPU") and baseline:
            ratios = ", ".join(f"batch {n} {by_batch[n] / baseline[n]:.2f}x" for n in args.batches)
            lines.append(f"- {name} vs torch eager: {ratios}")
    nodes = ", ".join(f"{k} {v} nodes ({result['shape_ops'][k]} Shape)" for k, v in result["nodes"].items())
    lines.append(f"- Graphs: {nodes}.")
    if not gpu:
        lines.append("- GPU rows (ORT CUDA fp32/fp16, with and without CUDA graphs; torch eager fp16): not measured "
                     "(no GPU on this machine).")  # fmt: skip
    (args.out / f"model-{kind}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- uint8-nhwc input (device-side preprocessing) -------------------------------------------------------------


def upload_jpegs(count: int, longer_side: int = 500) -> list[bytes]:
    """The bundled photographs as JPEG (quality 90), longer side `longer_side` px, as typical uploads are."""
    from PIL import Image

    from export.photos import sample_photos

    out = []
    for _, data in sample_photos()[:count]:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = longer_side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def host_cost(blobs: list[bytes], cfg: PreprocessConfig, repeats: int, **options: Any) -> float:
    """Median over `repeats` passes of the mean microseconds per image of the service's host preprocessing."""
    from imaging import preprocess

    passes = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for blob in blobs:
            preprocess(blob, cfg, 40_000_000, **options)
        passes.append((time.perf_counter() - start) / len(blobs) * 1e6)
    return statistics.median(passes[1:])  # the first pass warms Pillow's and numpy's caches


def uint8_main(args: argparse.Namespace) -> int:
    """Host cost, bytes and model time of float32-nchw against uint8-nhwc input; model-uint8-<kind>.*."""
    threads = args.threads or torch.get_num_threads()
    model = models.create_model(args.variant, seed=0)
    cfg = model.variant.data
    size = cfg.input_size
    float_cfg, u8_cfg = as_format(cfg, FLOAT32_NCHW), as_format(cfg, UINT8_NHWC)
    blobs = upload_jpegs(args.images)
    host = {
        "float32-nchw (decode, resize, crop, normalise)": host_cost(blobs, float_cfg, args.repeats),
        "uint8-nhwc (decode, resize, crop)": host_cost(blobs, u8_cfg, args.repeats),
        "uint8-nhwc + JPEG draft": host_cost(blobs, u8_cfg, args.repeats, draft=True),
        "uint8-nhwc + reducing_gap 2.0": host_cost(blobs, u8_cfg, args.repeats, reducing_gap=2.0),
    }
    # Draft mode and reducing_gap act only where the image is at least twice the resize target: 500 px
    # uploads (resized to 256) are not, so the same photographs at 2000 px show what they do there.
    large = upload_jpegs(args.images, longer_side=2000)
    host |= {
        "2000 px: float32-nchw": host_cost(large, float_cfg, args.repeats),
        "2000 px: uint8-nhwc": host_cost(large, u8_cfg, args.repeats),
        "2000 px: uint8-nhwc + JPEG draft": host_cost(large, u8_cfg, args.repeats, draft=True),
        "2000 px: uint8-nhwc + reducing_gap 2.0": host_cost(large, u8_cfg, args.repeats, reducing_gap=2.0),
    }
    for name, us in host.items():
        print(f"host {name}: {us:.0f} us/image", file=sys.stderr, flush=True)
    clean = graph.trace_to_onnx(fuse(model), size, 18)
    gpu = torch.cuda.is_available()
    base = {"variant": args.variant, "size": size, "threads": threads, "batches": args.batches,
            "repeats": args.repeats, "runtime": "ort"}  # fmt: skip
    rows: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [] if gpu and args.gpu_only else [("CPU", "cpu", "fp32", clean)]
        if gpu:
            variants.append(("CUDA", "cuda", "fp16", to_fp16(clean)))
        specs = []
        for ep, device, precision, g in variants:
            for fmt, graph_ in ((FLOAT32_NCHW, g), (UINT8_NHWC, uint8_nhwc_input(g, u8_cfg))):
                path = f"{tmp}/{device}-{precision}-{fmt}.onnx"
                onnx.save(graph_, path)
                specs.append({**base, "name": f"ORT {ep} {precision}, {fmt} input", "device": device, "graph": path,
                              "input": fmt})  # fmt: skip
        for spec in specs:
            if measured := _measure(spec):
                rows[spec["name"]] = measured
    result: dict[str, Any] = {
        "variant": args.variant, "input_size": size, "threads": threads, "repeats": args.repeats,
        "machine": describe(), "upload_jpegs": {"count": len(blobs), "longer_side_px": 500, "quality": 90,
                                                "mean_bytes": statistics.mean(len(b) for b in blobs)},
        "host_us_per_image": host,
        "bytes_per_image": {FLOAT32_NCHW: 3 * size * size * 4, UINT8_NHWC: 3 * size * size},
        "images_per_second": rows, "float_cfg": float_cfg.to_dict(),
    }  # fmt: skip
    kind = "gpu" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"model-uint8-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = uint8_markdown(result, gpu)
    (args.out / f"model-uint8-{kind}.md").write_text(text)
    print(text)
    return 0


def uint8_markdown(result: dict[str, Any], gpu: bool) -> str:
    """The tables of a --uint8 run, from its JSON."""
    machine = result["machine"]
    batches = sorted({int(n) for by in result["images_per_second"].values() for n in by})
    host = result["host_us_per_image"]
    (float_us, u8_us), nbytes = list(host.values())[:2], result["bytes_per_image"]
    lines = [
        f"# uint8-nhwc input vs float32-nchw: {result['variant']} at {result['input_size']}x{result['input_size']}",
        "",
        f"Machine: {summary(machine)}; {result['threads']} intra-op threads; {machine['date']}.",
        f"ISA flags: {', '.join(machine['cpu_flags']) or 'none reported'}.",
        f"Uploads: {result['upload_jpegs']['count']} bundled photographs as 500 px JPEGs (quality 90, mean "
        f"{result['upload_jpegs']['mean_bytes'] / 1024:.0f} KiB; the 2000 px rows: the same photographs "
        f"upscaled). Host figures: one thread, median of {result['repeats']} passes.",
        "",
        "| host preprocessing | us/image | vs float32-nchw |",
        "|---|---|---|",
        *(
            f"| {name} | {us:.0f} | {us / host.get(name.split(':')[0] + ': float32-nchw', float_us):.2f}x |"
            for name, us in host.items()
        ),
        "",
        f"Bytes per image handed to the runtime (and copied to a GPU): float32-nchw {nbytes[FLOAT32_NCHW]:,}, "
        f"uint8-nhwc {nbytes[UINT8_NHWC]:,} (4x fewer). Host time saved per image: {float_us - u8_us:.0f} us "
        f"({1 - u8_us / float_us:.0%}).",
        "",
        "| model (session.run, images/s) | " + " | ".join(f"batch {n}" for n in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name, by in result["images_per_second"].items():
        by = {int(k): v for k, v in by.items()}
        lines.append(f"| {name} | " + " | ".join(f"{by[n]:.1f}" if n in by else "-" for n in batches) + " |")
    if not gpu:
        lines += ["", "- CUDA rows: not measured (no GPU on this machine)."]
    return "\n".join(lines) + "\n"


# --- int8 ----------------------------------------------------------------------------------------------------

# The export's recipe, and the alternative the issue measured (the stem in float, 8-bit weights): on a CPU
# without VNNI that one kept accuracy by avoiding the stem's saturation, at a cost in speed.
INT8_ROWS = {
    "ORT CPU, int8 (export recipe)": int8.DEFAULT_RECIPE,
    "ORT CPU, int8, stem in float, 8-bit weights": dataclasses.replace(
        int8.DEFAULT_RECIPE, keep_float=("classifier", "stem"), reduce_range=False
    ),
}
FP32_ROW = "ORT CPU, fp32"


def int8_main(args: argparse.Namespace) -> int:
    """fp32 vs int8 rows in turns, each measurement in a fresh process; results as model-int8-<kind>.*."""
    threads = args.threads or torch.get_num_threads()
    model = models.create_model(args.variant, seed=0)
    cfg = model.variant.data
    clean = graph.trace_to_onnx(fuse(model), cfg.input_size, 18)
    calibration = int8.calibration_set(None, 8)
    base = {"variant": args.variant, "size": cfg.input_size, "threads": threads, "batches": args.batches,
            "repeats": args.repeats, "runtime": "ort", "device": "cpu"}  # fmt: skip
    samples: dict[str, dict[int, list[float]]] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = [{**base, "name": FP32_ROW, "graph": f"{tmp}/fp32.onnx"}]
        onnx.save(clean, specs[0]["graph"])
        recipes = {}
        for i, (name, recipe) in enumerate(INT8_ROWS.items()):
            path = f"{tmp}/int8-{i}.onnx"
            quantized = int8.quantize(clean, calibration.inputs(cfg), recipe)
            onnx.save(quantized, path)
            recipes[name] = {**recipe.to_dict(), "float_ops": dict(Counter(int8.float_nodes(quantized).values()))}
            specs.append({**base, "name": name, "graph": path})
        for round_ in range(args.rounds):
            for spec in specs:
                loads.append(os.getloadavg()[0])
                print(f"round {round_ + 1}/{args.rounds}, load {loads[-1]:.1f}", file=sys.stderr, flush=True)
                for n, rate in _measure(spec).items():
                    samples.setdefault(spec["name"], {}).setdefault(n, []).append(rate)
    rows = {name: {n: statistics.median(v) for n, v in by.items()} for name, by in samples.items()}
    write_int8_results(args, rows, samples, recipes, cfg.input_size, threads, loads, len(calibration))
    return 0


def write_int8_results(
    args: argparse.Namespace,
    rows: dict[str, dict[int, float]],
    samples: dict[str, dict[int, list[float]]],
    recipes: dict[str, dict[str, Any]],
    size: int,
    threads: int,
    loads: list[float],
    calibration_images: int,
) -> None:
    """model-int8-cpu.json and .md: images/s per row and batch, int8/fp32 ratios, the machine and its load."""
    load = {"min": min(loads), "median": statistics.median(loads), "max": max(loads), "cores": os.cpu_count()}
    result: dict[str, Any] = {
        "variant": args.variant, "input_size": size, "threads": threads, "batches": args.batches,
        "rounds": args.rounds, "repeats_per_round": args.repeats, "calibration_images": calibration_images,
        "machine": describe(), "load_average_1min": load, "images_per_second": rows, "samples": samples,
        "recipes": recipes, "speedup_vs_fp32": int8_speedups(samples),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model-int8-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    text = int8_markdown(result)
    (args.out / "model-int8-cpu.md").write_text(text)
    print(text)


def int8_speedups(samples: dict[str, dict[Any, list[float]]]) -> dict[str, dict[str, float]]:
    """Per row and batch, the median over rounds of (int8 / fp32 of the same round).

    Rows of one round ran minutes apart at most, rounds up to half an hour: a ratio within a round sees the
    same load on both sides, a ratio of medians across rounds does not.
    """
    fp32 = samples[FP32_ROW]
    return {
        name: {str(n): statistics.median(a / b for a, b in zip(by[n], fp32[n], strict=True)) for n in by}
        for name, by in samples.items()
        if name != FP32_ROW
    }


def int8_markdown(result: dict[str, Any]) -> str:
    """The results table of an --int8 run, from its JSON."""
    machine, load = result["machine"], result["load_average_1min"]
    batches = [str(n) for n in result["batches"]]
    rows = {name: {str(n): v for n, v in by.items()} for name, by in result["images_per_second"].items()}
    flags = ", ".join(machine["cpu_flags"]) or "none reported"
    vnni = "with VNNI" if any("vnni" in f for f in machine["cpu_flags"]) else "without VNNI"
    lines = [
        f"# int8 vs fp32 (CPU): {result['variant']} at {result['input_size']}x{result['input_size']}, images/s",
        "",
        f"Machine: {summary(machine)}; {result['threads']} intra-op threads; {machine['date']}.",
        f"ISA flags: {flags} ({vnni}).",
        f"Load average (1 min) before each measurement: median {load['median']:.1f}, {load['min']:.1f} to "
        f"{load['max']:.1f} on {load['cores']} cores, the measurement's own threads included (about 2): above "
        "that, others' jobs shared the machine, so absolute figures are noisy; the ratios within a round count.",
        f"The rows took turns for {result['rounds']} rounds, each measurement in a fresh process (median of "
        f"{result['repeats_per_round']} runs after a warm-up); int8 calibrated on {result['calibration_images']} "
        "bundled photographs as the export does. Weights: seeded random (speed does not depend on them).",
        "",
        "Images/s, median over the rounds; in brackets the median over rounds of int8 / fp32 within a round:",
        "",
        "| runtime | " + " | ".join(f"batch {n}" for n in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name, by_batch in rows.items():
        ratio = result["speedup_vs_fp32"].get(name)
        cells = [f"{by_batch[n]:.1f}" + (f" ({ratio[n]:.2f}x)" if ratio else "") for n in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, recipe in result["recipes"].items():
        lines.append(f"- {name}: {json.dumps(recipe)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
