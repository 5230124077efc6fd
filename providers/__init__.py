"""Which ONNX Runtime execution providers can serve on this machine, found out quietly (providers/probe.py).

Below both the export (its parity run) and the service (its sessions): ctypes and onnxruntime only.
"""

from __future__ import annotations

from .probe import CPU, CUDA, CudaProbe, describe, probe_cuda, quiet_ort, required_libraries

__all__ = ["CPU", "CUDA", "CudaProbe", "describe", "probe_cuda", "quiet_ort", "required_libraries"]
