"""PyTorch ResNeSt (Split-Attention Networks): every published variant, loadable from official and timm weights."""

from __future__ import annotations

import os

from .checkpoint import (
    CheckpointInfo,
    CheckpointMismatch,
    ClassCountMismatch,
    check_state_dict,
    classifier_width,
    fetch_checkpoint,
    fit_classifier,
    load_checkpoint,
    read_state_dict,
)
from .download import ChecksumError
from .init import init_random
from .resnest import ResNeSt
from .variants import VARIANTS, Variant, get_variant

__all__ = [
    "VARIANTS", "CheckpointInfo", "CheckpointMismatch", "ChecksumError", "ClassCountMismatch", "ResNeSt", "Variant",
    "classifier_width", "create_model", "get_variant", "init_random", "list_models", "load_checkpoint",
]  # fmt: skip


def list_models() -> list[str]:
    """Every variant name create_model accepts, sorted."""
    return sorted(VARIANTS)


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    sha256: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> ResNeSt:
    """Build a variant in eval mode; load `checkpoint` (path or URL) strictly, or seed random weights.

    The class count comes from the checkpoint's classifier; `num_classes`, if given, must agree with it,
    or be 0 to keep only the backbone (embeddings). Without a checkpoint it defaults to ImageNet's 1000.
    """
    if checkpoint is not None and seed is not None:
        raise ValueError("give a checkpoint or a seed for random weights, not both")
    if checkpoint is None and sha256 is not None:
        raise ValueError("sha256 verifies a checkpoint: give the checkpoint too")
    variant = get_variant(name)
    if checkpoint is None:
        model = ResNeSt(variant, 1000 if num_classes is None else num_classes)
        if seed is not None:
            init_random(model, seed)
        return model.eval()
    path, digest = fetch_checkpoint(checkpoint, sha256=sha256, progress=progress)
    raw = read_state_dict(path)
    state, classes = fit_classifier(raw, num_classes)
    model = ResNeSt(variant, classes)
    model.load_state_dict(check_state_dict(model, state), strict=True)
    model.checkpoint = CheckpointInfo(os.fspath(checkpoint), str(path), digest, num_classes=classifier_width(raw))
    return model.eval()
