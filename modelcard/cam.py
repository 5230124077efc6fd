"""Class activation maps (Zhou et al., 2016), exact for ResNeSt: the network ends in global average pooling and
one linear layer, so for class c the map is the classifier's row applied at every position of the last feature
map, cam_c = W_c . F, and its spatial mean plus the class's bias is the class's logit.

The graph outputs F (`features`); the classifier's weight and bias travel in the file's metadata, in float32
(ONNX Runtime cannot hand a graph's initializers to its caller, and an output that carried them, or the maps
of every class, would be computed on every request: ORT runs the whole graph whatever is fetched).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WEIGHT_KEY = "resnest.classifier.weight"
BIAS_KEY = "resnest.classifier.bias"
SHAPE_KEY = "resnest.classifier.shape"


class ClassifierHeadError(ValueError):
    """The file's classifier record is missing or does not fit its card."""


@dataclass(frozen=True)
class ClassifierHead:
    """The linear layer after global average pooling: weight (classes, channels) and bias (classes,), float32."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ClassifierHeadError(f"classifier weight {weight.shape} and bias {bias.shape} do not fit")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    def to_metadata(self) -> dict[str, str]:
        """metadata_props entries: the shape as JSON, the values as base64 of little-endian float32."""
        return {
            SHAPE_KEY: json.dumps(list(self.weight.shape)),
            WEIGHT_KEY: base64.b64encode(self.weight.astype("<f4").tobytes()).decode("ascii"),
            BIAS_KEY: base64.b64encode(self.bias.astype("<f4").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ClassifierHead | None:
        """The head a file carries, None where it carries none (files exported before class activation maps)."""
        if WEIGHT_KEY not in meta:
            return None
        try:
            classes, channels = (int(v) for v in json.loads(meta[SHAPE_KEY]))
            weight = np.frombuffer(base64.b64decode(meta[WEIGHT_KEY], validate=True), dtype="<f4")
            bias = np.frombuffer(base64.b64decode(meta[BIAS_KEY], validate=True), dtype="<f4")
            return cls(weight.reshape(classes, channels), bias)
        except (KeyError, ValueError, TypeError) as exc:
            raise ClassifierHeadError(f"the model's classifier record is malformed: {exc}") from exc


def class_maps(features: np.ndarray, head: ClassifierHead, classes: Sequence[int]) -> np.ndarray:
    """One image's maps for `classes`: features (channels, h, w) -> (len(classes), h, w), float32.

    Accumulated in float64, so the maps' means reproduce the served logits to float32 rounding.
    """
    channels, height, width = features.shape
    if channels != head.channels:
        raise ValueError(f"features have {channels} channels, the classifier reads {head.channels}")
    rows = head.weight[np.asarray(classes, dtype=np.int64)].astype(np.float64)
    maps = rows @ features.reshape(channels, height * width).astype(np.float64)
    return maps.reshape(len(classes), height, width).astype(np.float32)


def logits_of(maps: np.ndarray, head: ClassifierHead, classes: Sequence[int]) -> np.ndarray:
    """What the maps say the logits are: each map's spatial mean plus its class's bias (the exactness check)."""
    return maps.astype(np.float64).mean(axis=(1, 2)) + head.bias[np.asarray(classes, dtype=np.int64)]
