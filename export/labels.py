"""The 1000 ImageNet class labels shipped with the project (see data/SOURCE.md)."""

from __future__ import annotations

from importlib import resources


def imagenet_labels() -> list[str]:
    """Labels in class-index order: 0 is "tench", 999 is "toilet tissue"."""
    text = resources.files("export").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    labels = [line.split("\t", 1)[1] for line in text.splitlines() if line]
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet_classes.tsv holds {len(labels)} labels, expected 1000")
    return labels
