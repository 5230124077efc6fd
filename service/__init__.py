"""ResNeSt inference service: ONNX Runtime behind FastAPI, with a dynamic batcher. Imports no torch."""
