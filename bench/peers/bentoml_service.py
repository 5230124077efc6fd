"""The BentoML peer for bench/peers.py: the same ONNX file served as BentoML's adaptive-batching guide writes a
service (a batchable API, at most 8 images, one worker), decoding with this project's own preprocessing so
both servers see the same tensors. Runs in BentoML's own environment with PYTHONPATH at this repository:

    RESNEST_PEER_MODEL=artifacts/resnest50-fp32.onnx bentoml serve bench.peers.bentoml_service:ResNeSt --port P
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort

from imaging import preprocess
from modelcard import ModelCard

MAX_PIXELS = 40_000_000
TOP = 5


@bentoml.service(workers=1, traffic={"timeout": 300})
class ResNeSt:
    """POST /classify with multipart `images` (one file per request): the top 5 classes, batched across requests."""

    def __init__(self) -> None:
        self.session = ort.InferenceSession(os.environ["RESNEST_PEER_MODEL"], providers=["CPUExecutionProvider"])
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)

    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=1000)
    def classify(self, images: list[Path]) -> list[list[dict[str, object]]]:
        batch = np.stack([preprocess(p.read_bytes(), self.card.preprocess, MAX_PIXELS) for p in images])
        logits, _ = self.session.run(None, {"images": batch})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = np.argsort(-probabilities, axis=1)[:, :TOP]
        labels = self.card.labels
        return [[{"index": int(i), "label": labels[i], "score": float(row[i])} for i in order]
                for row, order in zip(probabilities, best, strict=True)]  # fmt: skip
