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

from modelcard import LABEL_SOURCES, ModelCard, PreprocessConfig, check_labels, output_names
from models import ResNeSt

# The service's own decoding and preprocessing, so the photographs in the parity check reach the graph exactly
# as uploads will.
from service.preprocess import preprocess

from . import graph, parity
from .fp16 import to_fp16
from .fuse import TwoHeads, fuse
from .labels import resolve_labels
from .photos import sample_photos
from .runtime import runners

# The service answers softmax probabilities over the classes: one logit would always score 1.0.
SINGLE_LOGIT = (
    "a 1-class head is a sigmoid (binary or regression) head, and this service serves softmax classifiers, "
    "where one class always scores 1.0: train a 2-class head, or export the backbone with --num-classes 0"
)


class ExportError(RuntimeError):
    """The graph or its parity failed a check: nothing was written but the parity report."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and measured."""

    path: Path
    report_path: Path
    report: dict[str, Any]
    card: ModelCard
    histograms: dict[str, Counter[str]]


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
) -> ExportResult:
    """Export an eval-mode ResNeSt to `output` (and `<output>.parity.json`); ExportError if a check fails.

    `labels` name the model's classes in index order (with `labels_source`, one of modelcard.LABEL_SOURCES);
    without them they follow from the class count (export.labels.resolve_labels). `provenance` is merged into
    the card's export record (labels file, preprocessing overrides).
    """
    started = time.perf_counter()
    if model.num_classes == 1:
        raise ValueError(SINGLE_LOGIT)
    if labels is None:
        labels, labels_source, _ = resolve_labels(model.num_classes)
    labels = check_labels(labels, model.num_classes, "labels")
    if labels_source not in LABEL_SOURCES:
        raise ValueError(f"labels_source {labels_source!r} is not one of {LABEL_SOURCES}")
    outputs = output_names(bool(model.num_classes))

    def step(n: int, text: str) -> None:
        log(f"[{n}/4 {time.perf_counter() - started:5.1f}s] {text}")

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

    step(2, "parity: ONNX Runtime vs PyTorch at batch sizes 1, 3, 8 on random tensors and photographs")
    run = runners(final.SerializeToString())
    limits = parity.FP16 if precision == "fp16" else parity.FP32
    report = parity.check(TwoHeads(model), run, parity.batches(photo_batch(cfg), seed, cfg.input_size), limits)
    report.update(precision=precision, providers=list(run), photos=len(sample_photos()))
    # A failed report gets its own name, so it never sits beside an older model as if it described it.
    report_path = output.with_suffix(".parity.json" if report["passed"] else ".parity-failed.json")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps({"providers": list(run), "worst": report["worst"]}, indent=2))
    if not report["passed"]:
        failed = [
            f"{case['provider']}/{case['inputs']}/batch {case['batch']}: {case['failures']}"
            for case in report["cases"]
            if case["failures"]
        ]
        raise ExportError("parity failed:\n  " + "\n  ".join(failed) + f"\nfull report: {report_path}")

    step(3, "writing provenance into the model's metadata")
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
            "nodes": dict(histograms["final"]),
            **(provenance or {}),
        },
        parity={k: report[k] for k in ("passed", "precision", "providers", "thresholds", "worst")},
    )
    onnx.helper.set_model_props(final, card.to_metadata())
    final.producer_name = "resnest-serve export"
    final.doc_string = card.warning or f"ResNeSt {model.variant.name}"

    step(4, f"saving {output}")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    graph.save(final, tmp)
    os.replace(tmp, output)  # a reader never sees a half-written model
    log(f"done in {time.perf_counter() - started:.1f}s: {output} ({output.stat().st_size / 1e6:.1f} MB), {report_path}")
    return ExportResult(output, report_path, report, card, histograms)
