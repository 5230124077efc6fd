"""The graph's tensor names: one input, and the outputs a classifier or a headless backbone has."""

from __future__ import annotations

# images: float32 [N, 3, S, S], normalised as the card's preprocessing says; only N is symbolic.
INPUT = "images"
# logits: float32 [N, num_classes], before softmax; absent from a headless (embedding-only) model.
LOGITS = "logits"
# embedding: float32 [N, embedding_dim], the globally pooled features the classifier reads.
EMBEDDING = "embedding"


def output_names(has_classifier: bool) -> tuple[str, ...]:
    """The graph's outputs, in order: (logits, embedding), or (embedding,) for a headless backbone."""
    return (LOGITS, EMBEDDING) if has_classifier else (EMBEDDING,)
