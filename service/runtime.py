"""The model runtime: an ONNX Runtime session (CUDA EP with CPU fallback) behind a small Protocol."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .model_card import ModelCard, ModelCardError
from .settings import Settings

log = logging.getLogger("service.runtime")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class InferenceModel(Protocol):
    """What the batcher needs from a model; tests inject fakes through this seam."""

    card: ModelCard
    providers: list[str]

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) -> (logits (N, classes), embedding (N, dim)), both float32."""
        ...


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured (missing file, bad metadata, GPU required but absent)."""


def _provider_chain(settings: Settings) -> list[str | tuple[str, dict[str, object]]]:
    if settings.providers == "cpu":
        return [CPU]
    cuda_options = {"device_id": settings.cuda_device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    return [(CUDA, cuda_options), CPU]


class OrtModel:
    """An InferenceSession plus the model card read from the same file."""

    def __init__(self, settings: Settings) -> None:
        path = Path(settings.model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (build it with `python -m export`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if settings.ort_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        chain = _provider_chain(settings)
        if settings.providers != "cpu" and hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels or the system, where present
            except Exception:  # absent CUDA libraries are the CPU fallback's normal case
                log.debug("CUDA libraries could not be preloaded", exc_info=True)
        self.session = ort.InferenceSession(str(path), options, providers=chain)
        # ORT falls back to CPU silently when the CUDA EP cannot start: trust only what the session reports.
        self.providers: list[str] = self.session.get_providers()
        if settings.providers in ("auto", "cuda") and self.providers[0] != CUDA:
            log.warning("CUDA EP requested but not active: serving on %s", self.providers)
        if (settings.require_gpu or settings.providers == "cuda") and self.providers[0] != CUDA:
            raise ModelLoadError(f"a GPU is required but the active providers are {self.providers}")
        try:
            self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        except ModelCardError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._check_signature()
        log.info("loaded %s (%s) from %s on %s", self.card.variant, self.card.precision, path, self.providers)

    def _check_signature(self) -> None:
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        size = self.card.preprocess.input_size
        if len(inputs) != 1 or inputs[0].name != "images" or list(inputs[0].shape[1:]) != [3, size, size]:
            raise ModelLoadError(f"model input must be images [N, 3, {size}, {size}], got {inputs}")
        if outputs != ["logits", "embedding"]:
            raise ModelLoadError(f"model outputs must be ['logits', 'embedding'], got {outputs}")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.session.run(["logits", "embedding"], {"images": images})
        return logits, embedding


def warm_up(model: InferenceModel, batch_sizes: list[int]) -> None:
    """Run every batch shape once, so no client request pays for kernel selection or allocation."""
    size = model.card.preprocess.input_size
    for n in batch_sizes:
        model.infer(np.zeros((n, 3, size, size), dtype=np.float32))
