"""Benchmarks: model-level (ONNX Runtime vs PyTorch eager) and service-level (sweep vs ceiling vs naive)."""
