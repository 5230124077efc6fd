"""ONNX Runtime sessions for the export's own parity run: CPU always, CUDA where it really starts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def runners(model_bytes: bytes) -> dict[str, Runner]:
    """One runner per execution provider that is actually active for this model on this machine."""
    out: dict[str, Runner] = {}
    wanted = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        wanted.insert(0, "CUDAExecutionProvider")
    for provider in wanted:
        chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        session = ort.InferenceSession(model_bytes, providers=chain)
        if session.get_providers()[0] != provider:
            continue  # the CUDA EP failed to start here (no GPU or no CUDA libraries): ORT fell back

        def run(batch: np.ndarray, session: ort.InferenceSession = session) -> tuple[np.ndarray, np.ndarray]:
            logits, embedding = session.run(["logits", "embedding"], {"images": batch})
            return logits, embedding

        out[provider] = run
    return out
