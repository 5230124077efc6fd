"""The MLServer peer for bench/protocols.py: a Seldon MLServer runtime serving the same ONNX file the way an
MLServer user would write one. Adaptive batching (model-settings.json) merges requests; each batch is decoded
and preprocessed inside predict (with this service's own preprocessing, so both servers see the same tensors),
then run by ONNX Runtime. Runs inside MLServer's own environment (PYTHONPATH set to this repository).
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers.model import PeerModel


class ResNeStRuntime(MLModel):
    """BYTES `image_bytes` [N, 1] of encoded images in, the top 5 "score:index:label" strings out."""

    async def load(self) -> bool:
        self.model = PeerModel(self.settings.parameters.uri)  # type: ignore[union-attr]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # BYTES elements as MLServer hands them over: one bytes object, or a list once batches are merged.
        data = payload.inputs[0].data
        items = getattr(data, "root", data)
        blobs = [items] if isinstance(items, bytes | str) else list(items)
        top = self.model.top([bytes(b) for b in blobs])
        strings = np.array([[f"{score:f}:{i}:{label}".encode() for i, label, score in row] for row in top], object)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", strings)])
