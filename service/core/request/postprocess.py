"""Stage 5, postprocessing: from the model's outputs to answers, for every front alike. What the outputs mean
(softmax, top k with labels, normalised embeddings) is the model card's (modelcard.outputs, which the batch
job reads too); what the service adds is how many classes a client may ask for."""

from __future__ import annotations

from modelcard.outputs import classification_strings, l2_normalize, softmax, top_k, top_k_indices

from ..errors import ServiceError
from ..settings import Settings


def top_k_limits(settings: Settings, num_classes: int) -> tuple[int, int]:
    """(default, max) top_k for a model with `num_classes` classes: the settings', capped at the class count."""
    return min(settings.top_k_default, num_classes), min(settings.top_k_max, num_classes)


def requested_top_k(settings: Settings, asked: int | None, num_classes: int) -> int:
    """The k to answer with: a default capped at the class count; more classes than the model has is a 422."""
    default, _ = top_k_limits(settings, num_classes)
    if asked is None:
        return default
    if asked > num_classes:
        raise ServiceError("invalid_parameter", f"query.top_k: {asked} is more than the model's {num_classes} classes")
    return asked


__all__ = [
    "classification_strings", "l2_normalize", "requested_top_k", "softmax", "top_k", "top_k_indices", "top_k_limits",
]  # fmt: skip
