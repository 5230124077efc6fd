"""The model file's provenance: what export writes into ONNX metadata and the service reads back.

One schema for both sides, so the service serves exactly the preprocessing, labels and weights that the
export verified. Values are strings in ONNX's metadata_props; structured ones are JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .preprocess import PreprocessConfig

FORMAT_VERSION = "1"
RANDOM_WEIGHTS_WARNING = (
    "This model carries SEEDED RANDOM WEIGHTS, not trained ones: its predictions and embeddings are "
    "meaningless. Export with --checkpoint to serve a trained model."
)


class ModelCardError(ValueError):
    """The ONNX file lacks the metadata this service needs, or it is malformed."""


@dataclass(frozen=True)
class ModelCard:
    """Everything the service needs to know about a model file, besides its graph."""

    variant: str
    preprocess: PreprocessConfig
    labels: tuple[str, ...]
    embedding_dim: int
    precision: str
    weights: dict[str, Any]
    export: dict[str, Any]
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.weights.get("sha256") == "random"

    @property
    def warning(self) -> str | None:
        return RANDOM_WEIGHTS_WARNING if self.random_weights else None

    def to_metadata(self) -> dict[str, str]:
        """The metadata_props entries for the ONNX file."""
        pre = self.preprocess
        meta = {
            "resnest.format_version": FORMAT_VERSION,
            "resnest.variant": self.variant,
            "resnest.preprocess": json.dumps(
                {
                    "input_size": pre.input_size,
                    "resize_size": pre.resize_size,
                    "crop_pct": round(pre.input_size / pre.resize_size, 4),
                    "interpolation": pre.interpolation,
                    "mean": list(pre.mean),
                    "std": list(pre.std),
                }
            ),
            "resnest.labels": json.dumps(list(self.labels)),
            "resnest.embedding_dim": str(self.embedding_dim),
            "resnest.precision": self.precision,
            "resnest.weights": json.dumps(self.weights),
            "resnest.export": json.dumps(self.export),
            "resnest.parity": json.dumps(self.parity),
        }
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
            pre = json.loads(meta["resnest.preprocess"])
            labels = tuple(json.loads(meta["resnest.labels"]))
            card = cls(
                variant=meta["resnest.variant"],
                preprocess=PreprocessConfig(
                    input_size=int(pre["input_size"]),
                    resize_size=int(pre["resize_size"]),
                    interpolation=pre["interpolation"],
                    mean=tuple(float(v) for v in pre["mean"]),  # type: ignore[arg-type]
                    std=tuple(float(v) for v in pre["std"]),  # type: ignore[arg-type]
                ),
                labels=labels,
                embedding_dim=int(meta["resnest.embedding_dim"]),
                precision=meta["resnest.precision"],
                weights=json.loads(meta["resnest.weights"]),
                export=json.loads(meta["resnest.export"]),
                parity=json.loads(meta.get("resnest.parity", "{}")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelCardError(f"model metadata is incomplete or malformed: {exc!r}") from exc
        if len(card.preprocess.mean) != 3 or len(card.preprocess.std) != 3 or not card.labels:
            raise ModelCardError("model metadata: mean/std need 3 values and labels may not be empty")
        return card
