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
    FEATURES,
    FLOAT32_NCHW,
    INPUT_FORMATS,
    LABEL_SOURCES,
    PRECISIONS,
    ModelCard,
    PreprocessConfig,
    check_labels,
    output_names,
)
from modelcard.cam import ClassifierHead
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


@dataclass(frozen=True)
class _Plan:
    """An export's checked arguments: the step list follows from them."""

    labels: tuple[str, ...]
    labels_source: str
    outputs: tuple[str, ...]
    float_cfg: PreprocessConfig  # tracing, parity, calibration and int8 evaluation run on float inputs
    cfg: PreprocessConfig  # what the saved graph takes
    calibration: int8.ImageSet | None
    heldout: int8.ImageSet | None

    @property
    def device_input(self) -> bool:
        """Whether the graph gets an input-format prefix."""
        return self.cfg.input_format != FLOAT32_NCHW


def _plan(
    model: ResNeSt,
    cfg: PreprocessConfig,
    precision: str,
    labels: Sequence[str] | None,
    labels_source: str | None,
    input_format: str | None,
    calibration: int8.ImageSet | None,
    heldout: int8.ImageSet | None,
    feature_map: bool = True,
) -> _Plan:
    """Every argument checked before minutes of tracing; ValueError names the first one that is wrong."""
    if model.num_classes == 1:
        raise ValueError(SINGLE_LOGIT)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "int8":
        calibration = calibration or int8.calibration_set(None, len(sample_photos()))
        heldout = heldout or int8.heldout_set()
        int8.check_unseen(heldout, calibration)
        if heldout.labels is not None and not model.num_classes:
            raise int8.QuantizeInputError("labelled held-out images need a classifier: the model is headless")
    if labels is None:
        labels, labels_source, _ = resolve_labels(model.num_classes)
    labels = check_labels(labels, model.num_classes, "labels")
    if labels_source not in LABEL_SOURCES:
        raise ValueError(f"labels_source {labels_source!r} is not one of {LABEL_SOURCES}")
    fmt = input_format or cfg.input_format
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"input_format {fmt!r} is not one of {INPUT_FORMATS}")
    return _Plan(
        labels=tuple(labels),
        labels_source=labels_source,
        outputs=tuple(output_names(bool(model.num_classes), feature_map)),
        float_cfg=as_format(cfg, FLOAT32_NCHW),
        cfg=as_format(cfg, fmt),
        calibration=calibration,
        heldout=heldout,
    )


def _trace(
    model: ResNeSt, plan: _Plan, opset: int, compare_naive: bool, log: Callable[[str], None]
) -> tuple[onnx.ModelProto, dict[str, Counter[str]]]:
    """The fused model traced and its graph checked; the checkpoint-layout trace beside it for the histogram."""
    size, outputs = plan.cfg.input_size, list(plan.outputs)
    fmap = FEATURES in outputs
    final = graph.trace_to_onnx(fuse(model, fmap), size, opset, outputs=outputs)
    histograms = {"final": graph.op_histogram(final)}
    if compare_naive:
        naive = graph.trace_to_onnx(TwoHeads(model, fmap), size, opset, outputs=outputs)
        histograms = {"naive": graph.op_histogram(naive), **histograms}
    legend = " (naive: the checkpoint-layout model traced as is)" if compare_naive else ""
    log(f"node types{legend}:\n" + graph.format_histogram(histograms))
    if problems := graph.graph_problems(final, outputs):
        raise ExportError("graph check failed: " + "; ".join(problems))
    return final, histograms


def _failed_cases(report: dict[str, Any]) -> str:
    """One line per failed parity case, for the error message."""
    return "\n  ".join(
        f"{case['provider']}/{case['inputs']}/batch {case['batch']}: {case['failures']}"
        for case in report["cases"]
        if case["failures"]
    )


def _prove_parity(
    model: ResNeSt, final: onnx.ModelProto, plan: _Plan, precision: str, seed: int, output: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], Path]:  # fmt: skip
    """ONNX Runtime against PyTorch on random tensors and photographs; ExportError (and the report) if it fails."""
    run = runners(final.SerializeToString())
    limits = parity.FP16 if precision == "fp16" else parity.FP32
    photos = photo_batch(plan.float_cfg)
    reference = TwoHeads(model, FEATURES in plan.outputs)
    report = parity.check(reference, run, parity.batches(photos, seed, plan.cfg.input_size), limits)
    report.update(precision=precision, providers=list(run), photos=len(sample_photos()))
    # A failed report gets its own name, so it never sits beside an older model as if it described it.
    report_path = output.with_suffix(".parity.json" if report["passed"] else ".parity-failed.json")
    log(json.dumps({"providers": list(run), "worst": report["worst"]}, indent=2))
    if not report["passed"]:
        _write_report(report_path, report)
        raise ExportError(f"parity failed:\n  {_failed_cases(report)}\nfull report: {report_path}")
    return report, report_path


@dataclass(frozen=True)
class _Int8:
    """The int8 step's graph and what the card and the accuracy report say of it."""

    graph: onnx.ModelProto
    histogram: Counter[str]
    quantization: dict[str, Any]
    accuracy: dict[str, Any]
    accuracy_path: Path


def _quantize(
    fp32: onnx.ModelProto, plan: _Plan, recipe: int8.Recipe, trained: bool, output: Path,
    log: Callable[[str], None],
) -> _Int8:  # fmt: skip
    """The proven fp32 graph quantized, then held to fp32 on held-out images; ExportError if it falls short."""
    calibration, heldout = plan.calibration, plan.heldout
    assert calibration is not None and heldout is not None
    final = int8.quantize(fp32, calibration.inputs(plan.float_cfg), recipe)
    if problems := graph.graph_problems(final, list(plan.outputs)):
        raise ExportError("int8 graph check failed: " + "; ".join(problems))
    accuracy = int8.evaluate(fp32.SerializeToString(), final.SerializeToString(), heldout, plan.float_cfg,
                             trained=trained)  # fmt: skip
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
    return _Int8(final, hist, quantization, accuracy, accuracy_path)


def _prefix_input(
    final: onnx.ModelProto, plan: _Plan, report: dict[str, Any], seed: int, output: Path,
    log: Callable[[str], None],
) -> tuple[onnx.ModelProto, dict[str, Any]]:  # fmt: skip
    """The proven graph given the card's input format, checked against the float graph on the photographs."""
    cfg, fmt = plan.cfg, plan.cfg.input_format
    float_graph = final.SerializeToString()
    final = uint8_nhwc_input(final, cfg)
    if problems := graph.graph_problems(final, list(plan.outputs)):
        raise ExportError(f"{fmt} graph check failed: " + "; ".join(problems))
    photos_float = photo_batch(plan.float_cfg)
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
        raise ExportError(f"{fmt} input parity failed:\n  {_failed_cases(input_report)}\nfull report: {failed_path}")
    return final, input_report


def _card(
    model: ResNeSt, plan: _Plan, precision: str, opset: int, weights: dict[str, Any], nodes: Counter[str],
    provenance: dict[str, Any] | None, report: dict[str, Any], input_report: dict[str, Any] | None,
    quantization: dict[str, Any], feature_map: tuple[int, int, int] | None,
) -> ModelCard:  # fmt: skip
    """The model card that travels inside the graph: what it is, how it was made, what it was proven against."""
    return ModelCard(
        variant=model.variant.name,
        preprocess=plan.cfg,
        labels=plan.labels,
        labels_source=plan.labels_source,
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
            "nodes": dict(nodes),
            "input_format": plan.cfg.input_format,
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
        feature_map=feature_map,
    )


def _feature_map(final: onnx.ModelProto, plan: _Plan) -> tuple[int, int, int] | None:
    """The `features` output's (channels, height, width), as the traced graph has it; None without one."""
    if FEATURES not in plan.outputs:
        return None
    value = next(o for o in final.graph.output if o.name == FEATURES)
    channels, height, width = (d.dim_value for d in value.type.tensor_type.shape.dim[1:])
    return channels, height, width


def _save(final: onnx.ModelProto, output: Path, reports: dict[Path, dict[str, Any]], int8_export: bool) -> None:
    """The graph and its reports written together; a reader never sees a half-written model."""
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    graph.save(final, tmp)
    # The reports are written with the model they describe, never beside an older one.
    for path, report in reports.items():
        _write_report(path, report)
    if not int8_export:
        output.with_suffix(".accuracy.json").unlink(missing_ok=True)  # an earlier int8 export's, now stale
    os.replace(tmp, output)


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
    feature_map: bool = True,
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

    `feature_map` (classifiers): the last stage's map is a third output, proven against PyTorch like the
    others, and the classifier's weight and bias go into the metadata, so the service can compute exact class
    activation maps (modelcard/cam.py); off, the graph is the one files had before.
    """
    started = time.perf_counter()
    plan = _plan(model, cfg, precision, labels, labels_source, input_format, calibration, heldout, feature_map)
    fmt = plan.cfg.input_format
    steps = 4 + (precision == "int8") + plan.device_input

    def step(n: int, text: str) -> None:
        log(f"[{n}/{steps} {time.perf_counter() - started:5.1f}s] {text}")

    step(1, f"fusing and tracing at {plan.cfg.input_size}x{plan.cfg.input_size}, opset {opset}")
    final, histograms = _trace(model, plan, opset, compare_naive, log)
    if precision == "fp16":
        final = to_fp16(final)

    # int8 is proven in two steps: the fp32 graph against PyTorch here, then int8 against that graph.
    graph_precision = "fp32" if precision == "int8" else precision
    step(2, f"parity ({graph_precision}): ONNX Runtime vs PyTorch at batch sizes 1, 3, 8 on random tensors and "
            "photographs")  # fmt: skip
    report, report_path = _prove_parity(model, final, plan, graph_precision, seed, output, log)
    reports = {report_path: report}

    quantized: _Int8 | None = None
    if precision == "int8":
        assert plan.calibration is not None and plan.heldout is not None
        step(3, f"int8: calibrating on {len(plan.calibration)} images ({plan.calibration.source}, "
                f"{recipe.calibration}), then {len(plan.heldout)} held-out images ({plan.heldout.source}) "
                "against fp32")  # fmt: skip
        quantized = _quantize(final, plan, recipe, weights.get("sha256") != "random", output, log)
        final = quantized.graph
        histograms["int8"] = quantized.histogram
        reports[quantized.accuracy_path] = quantized.accuracy

    input_report: dict[str, Any] | None = None
    if plan.device_input:
        step(steps - 2, f"{fmt} input: cast, normalise and transpose in the graph; parity against the float graph")
        final, input_report = _prefix_input(final, plan, report, seed, output, log)

    step(steps - 1, "writing provenance into the model's metadata")
    nodes = histograms["int8" if precision == "int8" else "final"]
    card = _card(model, plan, precision, opset, weights, nodes, provenance, report, input_report,
                 quantized.quantization if quantized else {}, _feature_map(final, plan))  # fmt: skip
    metadata = card.to_metadata()
    if card.feature_map is not None:
        fc = model.fc
        metadata |= ClassifierHead(fc.weight.detach().numpy(), fc.bias.detach().numpy()).to_metadata()
    onnx.helper.set_model_props(final, metadata)
    final.producer_name = "resnest-serve export"
    final.doc_string = card.warning or f"ResNeSt {model.variant.name}"

    step(steps, f"saving {output}")
    _save(final, output, reports, quantized is not None)
    written = ", ".join(str(p) for p in reports)
    log(f"done in {time.perf_counter() - started:.1f}s: {output} ({output.stat().st_size / 1e6:.1f} MB), {written}")
    if quantized is None:
        return ExportResult(output, report_path, report, card, histograms)
    return ExportResult(output, report_path, report, card, histograms, quantized.accuracy_path, quantized.accuracy)


def _write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
