"""Peers measured beside this service on the same ONNX file: BentoML, LitServe and Seldon MLServer, each in a
virtual environment of its own (`make peers` builds them under .peers/ from requirements-<name>.txt), each
configured as its own documentation shows for adaptive batching of at most 8 images, and each decoding with
this project's preprocessing and answering through model.py, so every server computes the same answer.

| peer | protocol the load generator speaks | batching |
|---|---|---|
| bentoml | multipart POST /classify (`bentoml_service.py`) | batchable API, max 8, max_latency_ms 1000 (adaptive) |
| litserve | multipart POST /classify (`litserve_app.py`) | max_batch_size 8, batch_timeout 10 ms |
| mlserver | OIP gRPC ModelInfer (`mlserver_runtime.py`) | max_batch_size 8, max_batch_time 10 ms |

launch.py starts them from this project's environment; the apps themselves import only what their own
environments hold (numpy, onnxruntime, Pillow and this repository's imaging and modelcard).
"""

NAMES = ("bentoml", "litserve", "mlserver")
MODEL_NAME = "resnest"
