"""What every peer app runs: this project's preprocessing, the ONNX session, and the top 5 classes of each image."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from imaging import preprocess
from modelcard import ModelCard

MAX_PIXELS = 40_000_000
TOP = 5


class PeerModel:
    """The file named by RESNEST_PEER_MODEL (or `path`) on the CPU EP, with its card."""

    def __init__(self, path: str | None = None) -> None:
        path = path or os.environ["RESNEST_PEER_MODEL"]
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)

    def top(self, blobs: list[bytes]) -> list[list[tuple[int, str, float]]]:
        """Encoded images -> per image, the top 5 (index, label, probability), best first."""
        batch = np.stack([preprocess(b, self.card.preprocess, MAX_PIXELS) for b in blobs])
        (logits,) = self.session.run(["logits"], {"images": batch})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = np.argsort(-probabilities, axis=1)[:, :TOP]
        labels = self.card.labels
        rows = zip(probabilities, best, strict=True)
        return [[(int(i), labels[i], float(row[i])) for i in order] for row, order in rows]

    def predictions(self, blobs: list[bytes]) -> list[list[dict[str, object]]]:
        """The same as JSON objects, as the multipart peers answer them."""
        return [[{"index": i, "label": label, "score": score} for i, label, score in row] for row in self.top(blobs)]
