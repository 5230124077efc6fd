"""The export pipeline as a function: fuse, trace, check the graph, verify parity, stamp provenance, save."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

# The service's own decoding and preprocessing, so the photographs in the parity check reach the graph exactly
# as uploads will.
from imaging import preprocess
from modelcard import (
    FLOAT32_NCHW,
    INPUT_FORMATS,
    LABEL_SOURCES,
    PRECISIONS,
    ModelCard,
    PreprocessConfig,
    check_labels,
    output_names,
)
from models import ResNeSt

from . import graph, parity
from . import quantize as int8
from .device_input import as_format, check_input_parity, uint8_batches, uint8_nhwc_input
from .fp16 import to_fp16
from .fuse import TwoHeads, fuse
from .labels import resolve_labels
from .photos import sample_photos
from .sessions import runners

# The service answers softmax probabilities over the classes: one logit would always score 1.0.
SINGLE_LOGIT = (
    "a 1-class head is a sigmoid (binary or regression) head, and this service serves softmax classifiers, "
    "where one class always scores 1.0: train a 2-class head, or export the backbone with --num-classes 0"
)


class ExportError(RuntimeError):
    """The graph, its parity or its int8 accuracy failed a check: nothing was written but the failed report."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and measured."""

    path: Path
    report_path: Path
    report: dict[str, Any]
    card: ModelCard
    histograms: dict[str, Counter[str]]
    accuracy_path: Path | None = None  # int8: the accuracy report against the fp32 graph
    accuracy: dict[str, Any] | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def photo_batch(cfg: PreprocessConfig) -> np.ndarray:
    """The bundled photographs through the service's own preprocessing."""
    return np.stack([preprocess(data, cfg, max_pixels=1 << 28) for _, data in sample_photos()])


@torch.no_grad()
def export_model(
    model: ResNeSt,
    cfg: PreprocessConfig,
    output: Path,
    *,
    weights: dict[str, Any],
    labels: Sequence[str] | None = None,
    labels_source: str | None = None,
    provenance: dict[str, Any] | None = None,
    precision: str = "fp32",
    opset: int = 18,
    seed: int = 0,
    compare_naive: bool = True,
    log: Callable[[str], None] = _stderr,
    calibration: int8.ImageSet | None = None,
    heldout: int8.ImageSet | None = None,
    recipe: int8.Recipe = int8.DEFAULT_RECIPE,
    input_format: str | None = None,
) -> ExportResult:
    """Export an eval-mode ResNeSt to `output` (and `<output>.parity.json`); ExportError if a check fails.

    `labels` name the model's classes in index order (with `labels_source`, one of modelcard.LABEL_SOURCES);
    without them they follow from the class count (export.labels.resolve_labels). `provenance` is merged into
    the card's export record (labels file, preprocessing overrides).

    int8: the fp32 graph, once its parity is proven, is quantized with `recipe`, calibrated on `calibration`
    (default: the bundled photographs), and compared with fp32 on `heldout` (default: the held-out
    photographs, which judge nothing of another domain: for a folder of one's own, int8.split_calibration
    gives both; labelled images are also scored), which calibration must not contain; the report goes to
    `<output>.accuracy.json` (naming every held-out file) and into the card.

    `input_format` (default: `cfg`'s) "uint8-nhwc": the proven graph gets a uint8 [N, S, S, 3] input that it
    casts, normalises and transposes itself (export/device_input.py), checked against the float graph on the
    service's host preprocessing of the photographs; the card records the format, so the service feeds bytes.
    """
    started = time.perf_counter()
    if model.num_classes == 1:
        raise ValueError(SINGLE_LOGIT)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8":
        calibration = calibration or int8.calibration_set(None, len(sample_photos()))
        heldout = heldout or int8.heldout_set()
        int8.check_unseen(heldout, calibration)  # before minutes of tracing
        if heldout.labels is not None and not model.num_classes:
            raise int8.QuantizeInputError("labelled held-out images need a classifier: the model is headless")
    if labels is None:
        labels, labels_source, _ = resolve_labels(model.num_classes)
    labels = check_labels(labels, model.num_classes, "labels")
    if labels_source not in LABEL_SOURCES:
        raise ValueError(f"labels_source {labels_source!r} is not one of {LABEL_SOURCES}")
    outputs = output_names(bool(model.num_classes))
    fmt = input_format or cfg.input_format
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"input_format {fmt!r} is not one of {INPUT_FORMATS}")
    # Tracing, parity, calibration and int8 evaluation all run on the float graph with float inputs.
    float_cfg, cfg = as_format(cfg, FLOAT32_NCHW), as_format(cfg, fmt)
    device_input = fmt != FLOAT32_NCHW

    steps = 4 + (precision == "int8") + device_input

    def step(n: int, text: str) -> None:
        log(f"[{n}/{steps} {time.perf_counter() - started:5.1f}s] {text}")

    step(1, f"fusing and tracing at {cfg.input_size}x{cfg.input_size}, opset {opset}")
    final = graph.trace_to_onnx(fuse(model), cfg.input_size, opset, outputs=outputs)
    histograms = {"final": graph.op_histogram(final)}
    if compare_naive:
        naive = graph.trace_to_onnx(TwoHeads(model), cfg.input_size, opset, outputs=outputs)
        histograms = {"naive": graph.op_histogram(naive), **histograms}
    legend = " (naive: the checkpoint-layout model traced as is)" if compare_naive else ""
    log(f"node types{legend}:\n" + graph.format_histogram(histograms))
    if problems := graph.graph_problems(final, outputs):
        raise ExportError("graph check failed: " + "; ".join(problems))
    if precision == "fp16":
        final = to_fp16(final)

    # int8 is proven in two steps: the fp32 graph against PyTorch here, then int8 against that graph.
    graph_precision = "fp32" if precision == "int8" else precision
    step(2, f"parity ({graph_precision}): ONNX Runtime vs PyTorch at batch sizes 1, 3, 8 on random tensors and "
            "photographs")  # fmt: skip
    run = runners(final.SerializeToString())
    limits = parity.FP16 if precision == "fp16" else parity.FP32
    report = parity.check(TwoHeads(model), run, parity.batches(photo_batch(float_cfg), seed, cfg.input_size), limits)
    report.update(precision=graph_precision, providers=list(run), photos=len(sample_photos()))
    # A failed report gets its own name, so it never sits beside an older model as if it described it.
    report_path = output.with_suffix(".parity.json" if report["passed"] else ".parity-failed.json")
    log(json.dumps({"providers": list(run), "worst": report["worst"]}, indent=2))
    if not report["passed"]:
        _write_report(report_path, report)
        failed = [
            f"{case['provider']}/{case['inputs']}/batch {case['batch']}: {case['failures']}"
            for case in report["cases"]
            if case["failures"]
        ]
        raise ExportError("parity failed:\n  " + "\n  ".join(failed) + f"\nfull report: {report_path}")

    quantization: dict[str, Any] = {}
    accuracy: dict[str, Any] | None = None
    accuracy_path: Path | None = None
    if precision == "int8":
        assert calibration is not None and heldout is not None
        step(3, f"int8: calibrating on {len(calibration)} images ({calibration.source}, {recipe.calibration}), "
                f"then {len(heldout)} held-out images ({heldout.source}) against fp32")  # fmt: skip
        fp32 = final
        final = int8.quantize(fp32, calibration.inputs(float_cfg), recipe)
        if problems := graph.graph_problems(final, outputs):
            raise ExportError("int8 graph check failed: " + "; ".join(problems))
        accuracy = int8.evaluate(fp32.SerializeToString(), final.SerializeToString(), heldout, float_cfg,
                                 trained=weights.get("sha256") != "random")  # fmt: skip
        accuracy_path = output.with_suffix(".accuracy.json" if accuracy["passed"] else ".accuracy-failed.json")
        log(int8.heldout_line(accuracy["heldout"], accuracy_path))
        log(json.dumps({k: accuracy[k] for k in ("agreement", "accuracy") if k in accuracy}, indent=2))
        if not accuracy["passed"]:
            _write_report(accuracy_path, accuracy)
            raise ExportError("int8 accuracy below its thresholds:\n  " + "\n  ".join(accuracy["failures"])
                              + f"\nfull report: {accuracy_path}")  # fmt: skip
        float_nodes = int8.float_nodes(final)
        hist = graph.op_histogram(final)
        log(f"int8 graph: {hist['QuantizeLinear']} QuantizeLinear, {hist['DequantizeLinear']} DequantizeLinear; "
            f"computing in float: {dict(Counter(float_nodes.values()))}")  # fmt: skip
        quantization = {
            "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {ort.__version__})",
            "recipe": recipe.to_dict(),
            "calibration": {
                "method": recipe.calibration,
                "images": len(calibration),
                "source": calibration.source,
                "sha256": calibration.digest(),
            },
            "float_groups": list(recipe.keep_float),
            "float_nodes": float_nodes,
            "float_ops": dict(Counter(float_nodes.values())),
            "accuracy": {k: v for k, v in accuracy.items() if k not in ("failures", "providers")},
        }
        if heldout.labels is not None:  # --eval's: all of its folder, whose names would bloat every GET /model
            quantization["accuracy"]["heldout"] = {k: v for k, v in accuracy["heldout"].items() if k != "files"}
        histograms["int8"] = hist

    input_report: dict[str, Any] | None = None
    if device_input:
        step(steps - 2, f"{fmt} input: cast, normalise and transpose in the graph; parity against the float graph")
        float_graph = final.SerializeToString()
        final = uint8_nhwc_input(final, cfg)
        if problems := graph.graph_problems(final, outputs):
            raise ExportError(f"{fmt} graph check failed: " + "; ".join(problems))
        photos_float = photo_batch(float_cfg)
        photos_u8 = photo_batch(cfg)  # the same files, through the service's uint8 host preprocessing
        float_inputs = {n: photos_float[np.arange(n) % len(photos_float)] for n in parity.BATCH_SIZES}
        input_report = check_input_parity(runners(float_graph), runners(final.SerializeToString()), float_inputs,
                                          uint8_batches(photos_u8, seed, cfg.input_size), cfg)  # fmt: skip
        report["input_format"] = input_report
        log(json.dumps({"input_format": fmt, "worst": input_report["worst"]}, indent=2))
        if not input_report["passed"]:
            report["passed"] = False
            failed_path = output.with_suffix(".parity-failed.json")
            _write_report(failed_path, report)
            failed = [f"{c['provider']}/{c['inputs']}/batch {c['batch']}: {c['failures']}"
                      for c in input_report["cases"] if c["failures"]]  # fmt: skip
            raise ExportError(f"{fmt} input parity failed:\n  " + "\n  ".join(failed) + f"\nfull report: {failed_path}")

    step(steps - 1, "writing provenance into the model's metadata")
    card = ModelCard(
        variant=model.variant.name,
        preprocess=cfg,
        labels=tuple(labels),
        labels_source=labels_source,
        embedding_dim=model.num_features,
        precision=precision,
        weights=weights,
        export={
            "opset": opset,
            "exporter": "torch.onnx (dynamo)",
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "nodes": dict(histograms["int8" if precision == "int8" else "final"]),
            "input_format": fmt,
            **(provenance or {}),
        },
        parity={
            **{k: report[k] for k in ("passed", "precision", "providers", "thresholds", "worst")},
            **(
                {"input_format": {k: input_report[k] for k in ("passed", "input_format", "reference", "worst")}}
                if input_report
                else {}
            ),
        },
        quantization=quantization,
    )
    onnx.helper.set_model_props(final, card.to_metadata())
    final.producer_name = "resnest-serve export"
    final.doc_string = card.warning or f"ResNeSt {model.variant.name}"

    step(steps, f"saving {output}")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    graph.save(final, tmp)
    # The reports are written with the model they describe, never beside an older one.
    _write_report(report_path, report)
    if accuracy_path is not None and accuracy is not None:
        _write_report(accuracy_path, accuracy)
    else:
        output.with_suffix(".accuracy.json").unlink(missing_ok=True)  # an earlier int8 export's, now stale
    os.replace(tmp, output)  # a reader never sees a half-written model
    reports = ", ".join(str(p) for p in (report_path, accuracy_path) if p is not None)
    log(f"done in {time.perf_counter() - started:.1f}s: {output} ({output.stat().st_size / 1e6:.1f} MB), {reports}")
    return ExportResult(output, report_path, report, card, histograms, accuracy_path, accuracy)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
