"""What the model's outputs mean, for every reader of a model file alike (the service, the batch job, the
export's reports): softmax probabilities, the top k classes with the card's labels (as objects, or as Triton's
"score:index:label" strings) and L2-normalised embeddings. numpy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for any logit scale."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float64)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k_indices(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k most probable classes' indices (N, k) and their probabilities (N, k), best first, ties by
    lower index; k is capped at the class count."""
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"top_k needs logits (N, classes) with at least one class, got shape {logits.shape}")
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    # A stable sort of 1000 scores costs microseconds and, unlike argpartition, keeps ties in index order
    # even where a tie straddles the k-th place.
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return best, np.take_along_axis(probs, best, axis=1)


def top_k(logits: np.ndarray, k: int, labels: Sequence[str]) -> list[list[dict[str, object]]]:
    """Per row, the k most probable classes as {index, label, score}, best first (ties by lower index).

    The softmax runs over each row's classes (axis 1); `labels` must name exactly those classes.
    """
    if logits.ndim == 2 and len(labels) != logits.shape[1]:
        # Runtime refuses such a model at load; this guards other callers from silent mislabelling.
        raise ValueError(f"{len(labels)} labels for {logits.shape[1]} classes")
    best, scores = top_k_indices(logits, k)
    return [
        [{"index": int(i), "label": labels[i], "score": float(s)} for i, s in zip(order, row, strict=True)]
        for order, row in zip(best, scores, strict=True)
    ]


def l2_normalize(embedding: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.maximum(norms, np.finfo(np.float32).tiny)


def classification_strings(values: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Per row, the k largest values as Triton's "score:index:label", best first (ties by lower index)."""
    best = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:f}:{int(i)}:{labels[i]}".encode() for row, order in zip(values, best, strict=True) for i in order]
