"""The naive baseline: FastAPI calling the same ONNX Runtime session once per request, no batching.

    python -m bench.naive_server --model artifacts/resnest50-fp32.onnx --port 8001

Same preprocessing and postprocessing functions as the service, so the difference measured is the serving
architecture (batching, queueing, thread hand-off), not the math.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, File, UploadFile
from fastapi.concurrency import run_in_threadpool

from imaging import preprocess
from modelcard import ModelCard
from service.core.request.postprocess import top_k
from service.http.responses import JSONResponse


def create_app(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    app = FastAPI()

    def infer(blobs: list[bytes]) -> list[list[dict[str, object]]]:
        batch = np.stack([preprocess(b, card.preprocess, 40_000_000) for b in blobs])
        logits, _ = session.run(["logits", "embedding"], {"images": batch})
        return top_k(logits, 5, card.labels)

    @app.post("/classify")
    async def classify(images: list[UploadFile] = File(...)) -> JSONResponse:  # noqa: B008 - FastAPI idiom
        blobs = [await f.read() for f in images]
        return JSONResponse({"results": await run_in_threadpool(infer, blobs)})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": "ready"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
