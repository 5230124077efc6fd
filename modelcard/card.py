"""The model card and its ONNX metadata form: what export writes and the service reads back.

Values are strings in ONNX's metadata_props; structured ones are JSON. Format 1 gained optional keys since
it was first written (num_classes, labels_source, quantization, feature_map): a file without them reads as the
1000-class ImageNet fp32 or fp16 model that every such file is, and older readers ignore them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .labels import LabelsError, check_labels
from .preprocess import PreprocessConfig
from .tensors import output_names

FORMAT_VERSION = "1"
RANDOM_WEIGHTS_WARNING = (
    "This model carries SEEDED RANDOM WEIGHTS, not trained ones: its predictions and embeddings are "
    "meaningless. Export with --checkpoint to serve a trained model."
)
GENERIC_LABELS_WARNING = (
    "This model's {n} classes have NO NAMES: it was exported without --labels, so it answers the generic "
    "labels class_0 ... class_{last}. Export with --labels FILE (one label per line, in class-index order)."
)
# Where the labels came from: the bundled ImageNet-1k list, a labels file given at export, generic
# class_<i> names (nobody named the classes), or none at all (a headless model has no classes).
LABEL_SOURCES = ("imagenet", "file", "generic", "none")
# The graph's arithmetic: float32; float16 (GPU serving, float32 inputs and outputs); int8 (static QDQ
# quantization for CPUs: int8 weights, uint8 activations, float32 inputs and outputs).
PRECISIONS = ("fp32", "fp16", "int8")


class ModelCardError(ValueError):
    """The ONNX file lacks the metadata this service needs, or it is malformed."""


@dataclass(frozen=True)
class ModelCard:
    """Everything the service needs to know about a model file, besides its graph."""

    variant: str
    preprocess: PreprocessConfig
    labels: tuple[str, ...]  # one per class, in class-index order; empty for a headless backbone
    embedding_dim: int
    precision: str
    weights: dict[str, Any]
    export: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)
    labels_source: str = "imagenet"
    # int8 only: the recipe, the calibration (method, images, their digest), the nodes left in float and the
    # accuracy report against the fp32 graph (export/quantize.py); empty for fp32 and fp16.
    quantization: dict[str, Any] = field(default_factory=dict)
    # The `features` output's (channels, height, width) where the graph has one (classifiers exported since
    # class activation maps: modelcard/cam.py); None for older files and headless backbones.
    feature_map: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.labels_source not in LABEL_SOURCES:
            raise ValueError(f"labels_source {self.labels_source!r} is not one of {LABEL_SOURCES}")
        if (self.labels_source == "none") != (not self.labels):
            raise ValueError("a model has labels exactly when it has a classifier (labels_source 'none': no labels)")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        # An int8 file says how it was quantized and what accuracy it kept, or it is not one the export wrote.
        if (self.precision == "int8") != bool(self.quantization):
            raise ValueError("a model carries a quantization record exactly when its precision is int8")
        if self.feature_map is not None:
            fmap = tuple(self.feature_map)
            object.__setattr__(self, "feature_map", fmap)
            if not self.labels:
                raise ValueError("a headless backbone has no classes to explain: it carries no feature map output")
            if len(fmap) != 3 or fmap[0] != self.embedding_dim or min(fmap) < 1:
                raise ValueError(f"feature_map must be ({self.embedding_dim}, height, width), got {fmap}")

    @property
    def num_classes(self) -> int:
        """Classes the classifier scores; 0 for a headless backbone."""
        return len(self.labels)

    @property
    def has_classifier(self) -> bool:
        return bool(self.labels)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph outputs this card promises, in order."""
        return output_names(self.has_classifier, self.feature_map is not None)

    @property
    def random_weights(self) -> bool:
        return self.weights.get("sha256") == "random"

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a user must know before trusting the answers (random weights, unnamed classes)."""
        out = []
        if self.random_weights:
            out.append(RANDOM_WEIGHTS_WARNING)
        if self.labels_source == "generic":
            out.append(GENERIC_LABELS_WARNING.format(n=self.num_classes, last=self.num_classes - 1))
        return tuple(out)

    @property
    def warning(self) -> str | None:
        """All warnings in one string, or None."""
        return " ".join(self.warnings) or None

    def to_metadata(self) -> dict[str, str]:
        """The metadata_props entries for the ONNX file."""
        meta = {
            "resnest.format_version": FORMAT_VERSION,
            "resnest.variant": self.variant,
            "resnest.preprocess": json.dumps(self.preprocess.to_dict()),
            "resnest.labels": json.dumps(list(self.labels)),
            "resnest.num_classes": str(self.num_classes),
            "resnest.labels_source": self.labels_source,
            "resnest.embedding_dim": str(self.embedding_dim),
            "resnest.precision": self.precision,
            "resnest.weights": json.dumps(self.weights),
            "resnest.export": json.dumps(self.export),
            "resnest.parity": json.dumps(self.parity),
        }
        if self.quantization:
            meta["resnest.quantization"] = json.dumps(self.quantization)
        if self.feature_map is not None:
            meta["resnest.feature_map"] = json.dumps(list(self.feature_map))
        if self.warning:
            meta["resnest.warning"] = self.warning
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ModelCard:
        """Parse metadata_props (e.g. ORT's custom_metadata_map), naming what is missing or wrong."""
        version = meta.get("resnest.format_version")
        if version != FORMAT_VERSION:
            raise ModelCardError(
                f"model metadata format {version!r} is not {FORMAT_VERSION!r}: export the model with this "
                "project's `python -m export`"
            )
        try:
            labels = json.loads(meta["resnest.labels"])
            if not isinstance(labels, list):
                raise TypeError(f"resnest.labels must be a JSON list, got {type(labels).__name__}")
            num_classes = int(meta.get("resnest.num_classes", len(labels)))
            labels = check_labels(labels, num_classes, "resnest.labels")
            card = cls(
                variant=meta["resnest.variant"],
                preprocess=PreprocessConfig.from_dict(json.loads(meta["resnest.preprocess"])),
                labels=labels,
                labels_source=meta.get("resnest.labels_source", "imagenet" if labels else "none"),
                embedding_dim=int(meta["resnest.embedding_dim"]),
                precision=meta["resnest.precision"],
                weights=json.loads(meta["resnest.weights"]),
                export=json.loads(meta["resnest.export"]),
                parity=json.loads(meta.get("resnest.parity", "{}")),
                quantization=json.loads(meta.get("resnest.quantization", "{}")),
                feature_map=json.loads(meta["resnest.feature_map"]) if "resnest.feature_map" in meta else None,
            )
        except LabelsError as exc:
            raise ModelCardError(f"model metadata: {exc}") from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelCardError(f"model metadata is incomplete or malformed: {exc!r}") from exc
        return card
