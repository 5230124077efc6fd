"""Stage 5, postprocessing: from the model's outputs to answers, for every front alike: softmax probabilities,
the top k classes with their labels (as /classify's objects, or as Triton's "score:index:label" strings),
how many a client may ask for, and L2-normalised embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ServiceError
from ..settings import Settings


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for any logit scale."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float64)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[list[dict[str, object]]]:
    """Per row, the k most probable classes as {index, label, score}, best first (ties by lower index).

    The softmax runs over each row's classes (axis 1); `labels` must name exactly those classes.
    """
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"top_k needs logits (N, classes) with at least one class, got shape {logits.shape}")
    if len(labels) != logits.shape[1]:
        # Runtime refuses such a model at load; this guards other callers from silent mislabelling.
        raise ValueError(f"{len(labels)} labels for {logits.shape[1]} classes")
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    # A stable sort of 1000 scores costs microseconds and, unlike argpartition, keeps ties in index order
    # even where a tie straddles the k-th place.
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"index": int(i), "label": labels[i], "score": float(row[i])} for i in order]
        for row, order in zip(probs, best, strict=True)
    ]


def l2_normalize(embedding: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.maximum(norms, np.finfo(np.float32).tiny)


def classification_strings(values: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Per row, the k largest values as Triton's "score:index:label", best first (ties by lower index)."""
    best = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:f}:{int(i)}:{labels[i]}".encode() for row, order in zip(values, best, strict=True) for i in order]


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
