"""The BentoML peer for bench/protocols.py: the same ONNX file served as BentoML's adaptive-batching guide writes a
service (a batchable API, at most 8 images, one worker), decoding with this project's own preprocessing so
both servers see the same tensors. Runs in BentoML's own environment with PYTHONPATH at this repository:

    RESNEST_PEER_MODEL=artifacts/resnest50-fp32.onnx bentoml serve bench.peers.bentoml_service:ResNeSt --port P
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from bench.peers.model import PeerModel


@bentoml.service(workers=1, traffic={"timeout": 300})
class ResNeSt:
    """POST /classify with multipart `images` (one file per request): the top 5 classes, batched across requests."""

    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=1000)
    def classify(self, images: list[Path]) -> list[list[dict[str, object]]]:
        return self.model.predictions([p.read_bytes() for p in images])
