"""The graph's tensor names: one input, and the outputs a classifier or a headless backbone has."""

from __future__ import annotations

# images: float32 [N, 3, S, S], normalised as the card's preprocessing says; or, where the preprocessing's
# input_format is uint8-nhwc, the cropped RGB bytes uint8 [N, S, S, 3], normalised inside the graph. Only N
# is symbolic.
INPUT = "images"
# logits: float32 [N, num_classes], before softmax; absent from a headless (embedding-only) model.
LOGITS = "logits"
# embedding: float32 [N, embedding_dim], the globally pooled features the classifier reads.
EMBEDDING = "embedding"
# features: float32 [N, embedding_dim, h, w], the last stage's feature map the embedding is the spatial mean
# of; a classifier's class activation maps are its classifier rows applied at each position. Files exported
# before it existed lack it (the card says so: ModelCard.feature_map).
FEATURES = "features"


def output_names(has_classifier: bool, feature_map: bool = False) -> tuple[str, ...]:
    """The graph's outputs, in order: (logits, embedding[, features]), or (embedding,) for a headless backbone
    (which has no classes to explain, so no feature map output)."""
    if not has_classifier:
        return (EMBEDDING,)
    return (LOGITS, EMBEDDING, FEATURES) if feature_map else (LOGITS, EMBEDDING)
