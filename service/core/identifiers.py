"""Model names and versions as clients write them: one parser for every protocol and the repository on disk.

A version is `[1-9][0-9]{0,8}` (what int() would accept beyond that, "²", "٣" or 5,000 digits, is refused
here rather than failing later); a model name is one path segment of the repository's own pattern, checked
before any filesystem access.
"""

from __future__ import annotations

import re

from .errors import ServiceError

VERSION = re.compile(r"[1-9][0-9]{0,8}")
# A model folder's name: one path segment, no leading dot, nothing a shell or a URL would read twice.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 of [A-Za-z0-9_.-], starting with a letter or digit"


def parse_version(text: str | None, where: str = "version") -> int | None:
    """None for no version (the latest), else the positive integer `text` spells; 422 for anything else."""
    if text is None or text == "":
        return None
    if not VERSION.fullmatch(text):  # ASCII digits only: str.isdigit() accepts superscripts int() refuses
        shown = text if len(text) <= 20 else f"{text[:20]}..."
        raise ServiceError("invalid_parameter", f"{where}: {shown!r} is not a model version (1 to 999999999)")
    return int(text)


def is_model_name(name: str) -> bool:
    """Whether `name` can name a model (a repository folder), before it is used anywhere."""
    return MODEL_NAME.fullmatch(name) is not None
