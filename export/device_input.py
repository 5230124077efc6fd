"""Device-side preprocessing: a graph that takes the cropped RGB bytes, uint8 [N, S, S, 3], and does the rest.

The host still decodes, resizes and crops (Pillow, exactly as for the float graph); the graph's first nodes
transpose the bytes to NCHW, cast them to float32 and normalise them with the same float32 constants and the
same two operations (x * scale + offset) the host's `to_tensor` uses, so the float graph after them sees the
values the host would have computed. What it saves: the float conversion on the host, and three quarters of
the bytes copied per image (S*S*3 instead of S*S*3*4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelcard import FLOAT32_NCHW, INPUT, UINT8_NHWC, PreprocessConfig

from . import parity

# Names of the prefix's tensors; none of them occurs in a traced ResNeSt.
_NCHW_U8, _FLOAT, _SCALED, _NORMALISED = "images_nchw_u8", "images_float", "images_scaled", "images_normalised"
_SCALE, _OFFSET = "preprocess_scale", "preprocess_offset"

Runner = Callable[[np.ndarray], Sequence[np.ndarray]]


def normalisation(cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 per channel, computed exactly as imaging.transforms.to_tensor does."""
    std = np.asarray(cfg.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(cfg.mean, dtype=np.float32) / std
    return scale.astype(np.float32), offset.astype(np.float32)


def uint8_nhwc_input(model: onnx.ModelProto, cfg: PreprocessConfig) -> onnx.ModelProto:
    """A copy of a float32-NCHW-input graph whose input is uint8 [N, S, S, 3], normalised inside the graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    (value,) = [v for v in graph.input if v.name == INPUT]
    batch = value.type.tensor_type.shape.dim[0].dim_param or "batch"
    for node in graph.node:
        node.input[:] = [_NORMALISED if name == INPUT else name for name in node.input]
    scale, offset = normalisation(cfg)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale.reshape(1, 3, 1, 1), _SCALE),
            numpy_helper.from_array(offset.reshape(1, 3, 1, 1), _OFFSET),
        ]
    )
    # Transpose first: moving bytes is a quarter of moving floats, and the Cast then writes NCHW directly.
    prefix = [
        helper.make_node("Transpose", [INPUT], [_NCHW_U8], perm=[0, 3, 1, 2], name="preprocess_transpose"),
        helper.make_node("Cast", [_NCHW_U8], [_FLOAT], to=TensorProto.FLOAT, name="preprocess_cast"),
        helper.make_node("Mul", [_FLOAT, _SCALE], [_SCALED], name="preprocess_scale"),
        helper.make_node("Add", [_SCALED, _OFFSET], [_NORMALISED], name="preprocess_offset"),
    ]
    nodes = [*prefix, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    size = cfg.input_size
    new_input = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [batch, size, size, 3])
    index = list(graph.input).index(value)
    graph.input.remove(value)
    graph.input.insert(index, new_input)
    onnx.checker.check_model(out)
    return out


def host_normalise(crops: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 [N, S, S, 3] crops -> the float32 [N, 3, S, S] input the host path computes from them."""
    scale, offset = normalisation(cfg)
    return np.ascontiguousarray((crops.astype(np.float32) * scale + offset).transpose(0, 3, 1, 2))


def check_input_parity(
    float_runs: dict[str, Runner],
    uint8_runs: dict[str, Runner],
    float_inputs: dict[int, np.ndarray],
    uint8_inputs: dict[str, dict[int, np.ndarray]],
    cfg: PreprocessConfig,
) -> dict[str, Any]:
    """The uint8 graph against the float graph, per provider: on the photographs (float side: the service's
    float preprocessing of the same files) and on random bytes (float side: the host normalisation of them).

    The graphs are the same after their inputs, so the float32 thresholds hold whatever the precision.
    """
    limits = parity.FP32
    cases: list[dict[str, Any]] = []
    for kind, by_size in uint8_inputs.items():
        for n, crops in by_size.items():
            reference_input = float_inputs[n] if kind == "photos" else host_normalise(crops, cfg)
            for provider, run_u8 in uint8_runs.items():
                ref_logits, ref_emb, ref_fmap = parity._split(
                    [a.astype(np.float64) for a in float_runs[provider](reference_input)]
                )
                logits, emb, fmap = parity._split(run_u8(crops))
                figures = parity.compare(ref_logits, ref_emb, logits, emb, ref_fmap, fmap)
                cases.append({"provider": provider, "inputs": kind, "batch": n, **figures,
                              "failures": parity.failures(figures, limits)})  # fmt: skip
    worst = parity._worst(cases)
    return {
        "passed": all(not c["failures"] for c in cases),
        "input_format": UINT8_NHWC,
        "reference": f"the {FLOAT32_NCHW} graph on the service's float preprocessing of the same images",
        "thresholds": limits.__dict__,
        "worst": worst,
        "cases": cases,
    }


def uint8_batches(
    photos_u8: np.ndarray, seed: int, input_size: int, sizes: Sequence[int] = parity.BATCH_SIZES
) -> dict[str, dict[int, np.ndarray]]:
    """Per kind and batch size: the photographs' uint8 crops (cycled to fill) and seeded random bytes."""
    gen = np.random.default_rng(seed + 1)
    out: dict[str, dict[int, np.ndarray]] = {"photos": {}, "random": {}}
    for n in sizes:
        out["photos"][n] = np.ascontiguousarray(photos_u8[np.arange(n) % len(photos_u8)])
        out["random"][n] = gen.integers(0, 256, (n, input_size, input_size, 3), dtype=np.uint8)
    return out


def as_format(cfg: PreprocessConfig, input_format: str) -> PreprocessConfig:
    """`cfg` with another input format (the host steps are the same; only where normalisation runs moves)."""
    return replace(cfg, input_format=input_format)
