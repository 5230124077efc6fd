"""A fake model for the seam the batcher and app use: deterministic, input-dependent, instrumented."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable

import numpy as np

from export.labels import imagenet_labels
from modelcard import ModelCard, PreprocessConfig
from modelcard.cam import ClassifierHead

FAKE_SIZE = 32
FAKE_DIM = 16


def fake_card(input_size: int = FAKE_SIZE) -> ModelCard:
    """A model card like export writes, for a small input."""
    return ModelCard(
        variant="fake",
        preprocess=PreprocessConfig(
            input_size, input_size + 4, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        ),
        labels=tuple(imagenet_labels()),
        embedding_dim=FAKE_DIM,
        precision="fp32",
        weights={"source": "random", "sha256": "random", "seed": 0},
        export={"opset": 18},
        parity={"passed": True},
    )


@functools.cache
def _weights(features: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((features, 1000)) / np.sqrt(features)


def fake_outputs(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fake forward: each row depends only on its own image, so answers can be checked per image."""
    n = batch.shape[0]
    flat = batch.reshape(n, -1).astype(np.float64)
    embedding = flat[:, :FAKE_DIM] + flat.mean(axis=1, keepdims=True)
    logits = flat @ _weights(flat.shape[1])
    return logits.astype(np.float32), embedding.astype(np.float32)


class FakeModel:
    """Implements service.core.request.inference.InferenceModel; records every batch it sees."""

    def __init__(self, input_size: int = FAKE_SIZE, delay: float = 0.0) -> None:
        self.card = fake_card(input_size)
        self.providers = ["FakeExecutionProvider"]
        self.delay = delay
        self.batches: list[int] = []  # batch sizes seen, warm-up included
        self.fail: Callable[[np.ndarray], None] | None = None  # raise from here to inject a fault
        self.gate: threading.Event | None = None  # when set, infer blocks until the gate opens
        self.lock = threading.Lock()
        # Counted as a call starts, before the gate: tests wait on it for "the batch is inside the model"
        # rather than sleeping and hoping the worker got there by then.
        self.calls = 0

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.batches.append(images.shape[0])
        if self.fail is not None:
            self.fail(images)
        return fake_outputs(images)


class ExplainableFake(FakeModel):
    """A FakeModel with a feature map output and a classifier record, so /explain answers: its map is the
    embedding at each of 2 x 2 positions (so its mean is the embedding, as a real graph's is)."""

    def __init__(self, input_size: int = FAKE_SIZE) -> None:
        super().__init__(input_size)
        self.card = dataclasses.replace(self.card, feature_map=(FAKE_DIM, 2, 2))
        rng = np.random.default_rng(1)
        self.head = ClassifierHead(rng.standard_normal((1000, FAKE_DIM)), rng.standard_normal(1000))

    def infer_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, embedding = self.infer(images)
        return logits, embedding, np.repeat(np.repeat(embedding[:, :, None, None], 2, axis=2), 2, axis=3)
