"""The MLServer peer for bench/protocols.py: a Seldon MLServer runtime serving the same ONNX file the way an
MLServer user would write one. Adaptive batching (model-settings.json) merges requests; each batch is decoded
and preprocessed inside predict (with this service's own preprocessing, so both servers see the same tensors),
then run by ONNX Runtime. Runs inside MLServer's own environment (PYTHONPATH set to this repository).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from imaging import preprocess
from modelcard import ModelCard

MAX_PIXELS = 40_000_000
TOP = 5


class ResNeStRuntime(MLModel):
    """BYTES `image_bytes` [N, 1] of encoded images in, the top 5 "score:index:label" strings out."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri  # type: ignore[union-attr]
        self.session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # BYTES elements as MLServer hands them over: one bytes object, or a list once batches are merged.
        data = payload.inputs[0].data
        items = getattr(data, "root", data)
        blobs = [items] if isinstance(items, bytes | str) else list(items)
        batch = np.stack([preprocess(bytes(b), self.card.preprocess, MAX_PIXELS) for b in blobs])
        logits, _ = self.session.run(None, {"images": batch})
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = np.argsort(-probabilities, axis=1)[:, :TOP]
        labels = self.card.labels
        rows = zip(probabilities, best, strict=True)
        strings = np.array([[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in order] for row, order in rows], object)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("probabilities", strings)])
