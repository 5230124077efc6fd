"""PyTorch ResNeSt (Split-Attention Networks): every published variant, loadable from official and timm weights."""

from __future__ import annotations

import os

from .checkpoint import CheckpointInfo, CheckpointMismatch, load_checkpoint
from .download import ChecksumError
from .init import init_random
from .resnest import ResNeSt
from .variants import VARIANTS, DataConfig, Variant, get_variant

__all__ = [
    "VARIANTS", "CheckpointInfo", "CheckpointMismatch", "ChecksumError", "DataConfig", "ResNeSt", "Variant",
    "create_model", "get_variant", "init_random", "list_models", "load_checkpoint",
]  # fmt: skip


def list_models() -> list[str]:
    """Every variant name create_model accepts, sorted."""
    return sorted(VARIANTS)


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> ResNeSt:
    """Build a variant in eval mode; load `checkpoint` (path or URL) strictly, or seed random weights."""
    if checkpoint is not None and seed is not None:
        raise ValueError("give a checkpoint or a seed for random weights, not both")
    if checkpoint is None and sha256 is not None:
        raise ValueError("sha256 verifies a checkpoint: give the checkpoint too")
    model = ResNeSt(get_variant(name))
    if checkpoint is not None:
        model.checkpoint = load_checkpoint(model, checkpoint, sha256=sha256, progress=progress)
    elif seed is not None:
        init_random(model, seed)
    return model.eval()
