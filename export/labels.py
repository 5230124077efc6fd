"""An export's labels: ImageNet's bundled list (see data/SOURCE.md), a labels file, or generic names."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

from modelcard import LabelsError, check_labels, generic_labels, read_labels

IMAGENET_CLASSES = 1000


def imagenet_labels() -> list[str]:
    """Labels in class-index order: 0 is "tench", 999 is "toilet tissue"."""
    text = resources.files("export").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    labels = [line.split("\t", 1)[1] for line in text.splitlines() if line]
    if len(labels) != IMAGENET_CLASSES:
        raise RuntimeError(f"imagenet_classes.tsv holds {len(labels)} labels, expected {IMAGENET_CLASSES}")
    return labels


def resolve_labels(num_classes: int, labels_file: Path | None = None) -> tuple[tuple[str, ...], str, dict[str, Any]]:
    """(labels, labels_source, provenance) for a model with `num_classes` classes (0: headless).

    A labels file must name every class; without one, a 1000-class head is taken to be ImageNet's (as timm
    does) and any other gets generic class_<i> names, which the card flags with a warning.
    Raises LabelsError: a file unreadable, malformed or of the wrong length, or one given to a headless model.
    """
    if num_classes == 0:
        if labels_file is not None:
            raise LabelsError(f"--labels {labels_file}: the model is headless (no classifier), so it has no classes")
        return (), "none", {}
    if labels_file is not None:
        labels = check_labels(read_labels(labels_file), num_classes, f"labels file {labels_file}")
        digest = hashlib.sha256(Path(labels_file).read_bytes()).hexdigest()
        return labels, "file", {"labels_file": {"path": str(labels_file), "sha256": digest}}
    if num_classes == IMAGENET_CLASSES:
        return tuple(imagenet_labels()), "imagenet", {}
    return generic_labels(num_classes), "generic", {}
