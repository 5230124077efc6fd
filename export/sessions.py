"""ONNX Runtime sessions for the export's own parity run: CPU always, CUDA where it really starts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from modelcard import INPUT
from providers.probe import CPU, CUDA, probe_cuda, quiet_ort

# A batch -> the graph's outputs in graph order: (logits, embedding), or (embedding,) when headless.
Runner = Callable[[np.ndarray], tuple[np.ndarray, ...]]


def runners(model_bytes: bytes) -> dict[str, Runner]:
    """One runner per execution provider that is actually active for this model on this machine."""
    out: dict[str, Runner] = {}
    wanted = [CPU]
    # Only where its libraries and a GPU are there (found without ORT's noisy probe and preload_dlls()).
    if probe_cuda().available:
        wanted.insert(0, CUDA)
    for provider in wanted:
        chain = [provider] if provider == CPU else [provider, CPU]
        with quiet_ort(provider != CPU):  # a CUDA EP that still fails to start is seen below, not logged red
            session = ort.InferenceSession(model_bytes, providers=chain)
        if session.get_providers()[0] != provider:
            continue  # the CUDA EP failed to start here (no GPU or no CUDA libraries): ORT fell back

        def run(batch: np.ndarray, session: ort.InferenceSession = session) -> tuple[np.ndarray, ...]:
            return tuple(session.run(None, {INPUT: batch}))

        out[provider] = run
    return out
