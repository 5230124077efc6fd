"""The LitServe peer for bench/protocols.py: the same ONNX file served as LitServe's batching docs write an API (at
most 8 requests, 10 ms batch timeout, one worker), decoding with this project's own preprocessing so both
servers see the same tensors. Runs in LitServe's own environment with PYTHONPATH at this repository:

    RESNEST_PEER_MODEL=artifacts/resnest50-fp32.onnx python -m bench.peers.litserve_app PORT
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as an object to see that
# it takes the raw Request (and so parses the multipart form).
import sys
from typing import Any

import litserve as ls
from fastapi import Request

from bench.peers.model import PeerModel


class ResNeStAPI(ls.LitAPI):
    """POST /classify with multipart `images` (one file per request): the top 5 classes, batched across requests."""

    def setup(self, device: str) -> None:
        self.model = PeerModel()

    def decode_request(self, request: Request) -> bytes:
        return request["images"].file.read()

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return inputs

    def predict(self, blobs: list[bytes]) -> list[list[dict[str, Any]]]:
        return self.model.predictions(blobs)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"predictions": output}


if __name__ == "__main__":
    api = ResNeStAPI(max_batch_size=8, batch_timeout=0.01, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(port=int(sys.argv[1]), generate_client_file=False)
