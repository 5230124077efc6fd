"""The model card: the contract between the export and the service, owned by neither.

What a model file promises its server: the tensor names, the preprocessing, the labels, the weights' and the
export's provenance, all carried in the ONNX file's metadata. Pure Python (no torch, no onnxruntime), so the
PyTorch side (models/, export/) and the serving side (service/) import the same definitions. What the outputs
mean (outputs.py) and class activation maps (cam.py) need numpy, so they are imported by name, never here.
"""

from __future__ import annotations

from .card import (
    FORMAT_VERSION,
    GENERIC_LABELS_WARNING,
    LABEL_SOURCES,
    PRECISIONS,
    RANDOM_WEIGHTS_WARNING,
    ModelCard,
    ModelCardError,
)
from .labels import LabelsError, check_labels, duplicate_labels, generic_labels, parse_labels, read_labels
from .preprocess import (
    FLOAT32_NCHW,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_FORMATS,
    INTERPOLATIONS,
    UINT8_NHWC,
    PreprocessConfig,
)
from .tensors import EMBEDDING, FEATURES, INPUT, LOGITS, output_names

__all__ = [
    "EMBEDDING",
    "FEATURES",
    "FLOAT32_NCHW",
    "FORMAT_VERSION",
    "GENERIC_LABELS_WARNING",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT",
    "INPUT_FORMATS",
    "INTERPOLATIONS",
    "LABEL_SOURCES",
    "LOGITS",
    "PRECISIONS",
    "RANDOM_WEIGHTS_WARNING",
    "UINT8_NHWC",
    "LabelsError",
    "ModelCard",
    "ModelCardError",
    "PreprocessConfig",
    "check_labels",
    "duplicate_labels",
    "generic_labels",
    "output_names",
    "parse_labels",
    "read_labels",
]  # fmt: skip
