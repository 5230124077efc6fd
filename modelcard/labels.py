"""Class labels: reading a labels file, checking labels against a class count, generic names."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path


class LabelsError(ValueError):
    """A labels file or list that cannot name the model's classes."""


def _check_label(label: object, where: str) -> str:
    if not isinstance(label, str):
        raise LabelsError(f"{where}: a label must be a string, got {label!r}")
    text = label.strip()
    if not text:
        raise LabelsError(f"{where}: empty label (every class needs a name; a blank line shifts every label after it)")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise LabelsError(f"{where}: label {text!r} contains a control character")
    return text


def parse_labels(text: str, source: str, as_json: bool | None = None) -> tuple[str, ...]:
    """Labels in class-index order from one-label-per-line text or a JSON list of strings.

    `as_json=None` decides from the text: JSON when it starts with '['. Surrounding whitespace is stripped,
    trailing blank lines are ignored; any other blank line is an error (it would shift the labels after it).
    """
    text = text.removeprefix("\ufeff")  # a byte-order mark, as Windows editors write
    if as_json is None:
        as_json = text.lstrip().startswith("[")
    if as_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LabelsError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise LabelsError(f"{source}: a JSON labels file must hold a list of strings, got {type(data).__name__}")
        return tuple(_check_label(label, f"{source}: item {i}") for i, label in enumerate(data))
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return tuple(_check_label(line, f"{source}: line {i}") for i, line in enumerate(lines, start=1))


def read_labels(path: str | Path) -> tuple[str, ...]:
    """A labels file: one label per line (UTF-8), or a JSON list (a .json name or text starting with '[')."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    labels = parse_labels(text, str(path), as_json=True if path.suffix.lower() == ".json" else None)
    if not labels:
        raise LabelsError(f"{path}: no labels in the file")
    return labels


def check_labels(labels: Sequence[str], num_classes: int, source: str = "labels") -> tuple[str, ...]:
    """The labels as a tuple, if there is exactly one per class; LabelsError naming both counts otherwise."""
    if len(labels) != num_classes:
        raise LabelsError(
            f"{source} holds {len(labels)} labels but the model has {num_classes} classes: "
            f"give exactly one label per class, in class-index order"
        )
    return tuple(_check_label(label, f"{source}: label {i}") for i, label in enumerate(labels))


def generic_labels(num_classes: int) -> tuple[str, ...]:
    """class_0, class_1, ...: names for classes nobody named."""
    return tuple(f"class_{i}" for i in range(num_classes))


def duplicate_labels(labels: Iterable[str]) -> list[str]:
    """Labels that occur more than once (legal, as in ImageNet's two "crane"s, but often a mistake)."""
    return sorted(label for label, n in Counter(labels).items() if n > 1)
