"""Tracing to ONNX with a dynamic batch axis, and the graph checks the service relies on."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch

from modelcard import INPUT, output_names

# Ops that a clean graph never holds: runtime shape arithmetic (host round-trips on GPU) and unfolded BN.
FORBIDDEN_OPS = ("Shape", "BatchNormalization")
# torch's ONNX op registry warns once per torchvision op it skips ("torchvision is not installed. Skipping
# torchvision::nms"); ResNeSt uses none of them, so the warning says nothing about this export.
_TORCH_REGISTRY_LOG = "torch.onnx._internal.exporter._registration"


def _not_about_torchvision(record: logging.LogRecord) -> bool:
    return "torchvision is not installed" not in record.getMessage()


def trace_to_onnx(
    module: torch.nn.Module,
    input_size: int,
    opset: int,
    quiet: bool = True,
    outputs: Sequence[str] = output_names(True),
) -> onnx.ModelProto:
    """torch.export-based ONNX export of `module` (images -> its outputs, named `outputs`), batch axis symbolic."""
    example = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sink = io.StringIO()
    registry_log = logging.getLogger(_TORCH_REGISTRY_LOG)
    if quiet and _not_about_torchvision not in registry_log.filters:
        registry_log.addFilter(_not_about_torchvision)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink if quiet else None):  # type: ignore[type-var]
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter, not ours to fix
        program = torch.onnx.export(
            module.eval(),
            (example,),
            None,
            input_names=[INPUT],
            output_names=list(outputs),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    assert program is not None
    return program.model_proto


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Node count per op type."""
    return Counter(node.op_type for node in model.graph.node)


def format_histogram(named: dict[str, Counter[str]]) -> str:
    """Side-by-side node-type table of several graphs."""
    ops = sorted({op for hist in named.values() for op in hist}, key=lambda op: -max(h[op] for h in named.values()))
    head = f"{'op':<20}" + "".join(f"{name:>10}" for name in named)
    rows = [f"{op:<20}" + "".join(f"{hist[op]:>10}" for hist in named.values()) for op in ops]
    total = f"{'total':<20}" + "".join(f"{sum(h.values()):>10}" for h in named.values())
    return "\n".join([head, *rows, total])


def graph_problems(
    model: onnx.ModelProto, expected_outputs: Sequence[str] = output_names(True, feature_map=True)
) -> list[str]:
    """What keeps a graph from being the one the service expects; empty when it is clean."""
    problems = [f"{count} {op} node(s)" for op, count in op_histogram(model).items() if op in FORBIDDEN_OPS]
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT] or outputs != list(expected_outputs):
        problems.append(f"inputs {inputs} / outputs {outputs}, expected [{INPUT}] / {list(expected_outputs)}")
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param or any(d.dim_param for d in dims[1:]):
            problems.append(f"{value.name}: only the batch axis may be symbolic")
    return problems


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write a single self-contained .onnx file (weights inline, no external data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
