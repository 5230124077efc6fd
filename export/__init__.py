"""PyTorch ResNeSt -> ONNX: one clean graph (logits + pooled embedding), provenance inside, parity proven."""
