"""The model runtime: an ONNX Runtime session (CUDA EP with CPU fallback) behind a small Protocol."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from modelcard import EMBEDDING, INPUT, LOGITS, ModelCard, ModelCardError

from .providers import CudaProbe, describe, probe_cuda, quiet_ort
from .settings import Settings

log = logging.getLogger("service.runtime")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class InferenceModel(Protocol):
    """What the batcher needs from a model; tests inject fakes through this seam."""

    card: ModelCard
    providers: list[str]

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) -> (logits (N, classes), embedding (N, dim)), both float32.

        A headless model (card.num_classes 0) returns zero-width logits (N, 0), so the batcher and every
        other caller handle one shape of answer.
        """
        ...


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured (missing file, bad metadata, GPU required but absent)."""


def _gpu_required(settings: Settings) -> bool:
    return settings.require_gpu or settings.providers == "cuda"


def _provider_chain(settings: Settings, probe: CudaProbe | None) -> list[str | tuple[str, dict[str, object]]]:
    """CUDA (CPU behind it) only where the probe found it can start: asked for elsewhere, ORT floods the log."""
    if settings.providers == "cpu" or probe is None or not probe.available:
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
        # Loads CUDA/cuDNN (nvidia-* wheels or the system) where all are present; prints nothing.
        probe = None if settings.providers == "cpu" else probe_cuda()
        if probe is not None and not probe.available and _gpu_required(settings):
            raise ModelLoadError(f"a GPU is required but the CUDA EP cannot start: {probe.reason} ({probe.detail})")
        chain = _provider_chain(settings, probe)
        # A fallback to the CPU is reported below in one line; ORT's own account of it is kept for debug, and
        # for a required GPU, whose failure should be loud.
        quiet = chain[0] != CPU and not _gpu_required(settings) and settings.log_level != "debug"
        with quiet_ort(quiet):
            self.session = ort.InferenceSession(str(path), options, providers=chain)
        # ORT falls back to CPU silently when the CUDA EP cannot start: trust only what the session reports.
        self.providers: list[str] = self.session.get_providers()
        if _gpu_required(settings) and self.providers[0] != CUDA:
            raise ModelLoadError(f"a GPU is required but the CUDA EP did not start: active providers {self.providers}")
        # A GPU machine whose CUDA EP failed deserves a warning; a machine without one serves on CPU as designed.
        level = logging.WARNING if probe is not None and probe.available and self.providers[0] != CUDA else logging.INFO
        log.log(level, "%s", describe(self.providers, probe, settings.cuda_device_id))
        try:
            self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        except ModelCardError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._check_signature()
        log.info("loaded %s (%s) from %s on %s", self.card.variant, self.card.precision, path, self.providers)

    def _check_signature(self) -> None:
        """The graph must be the one the card describes: a mismatch would fail (or mislabel) every request."""
        card = self.card
        inputs = self.session.get_inputs()
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        size = card.preprocess.input_size
        if len(inputs) != 1 or inputs[0].name != INPUT or list(inputs[0].shape[1:]) != [3, size, size]:
            raise ModelLoadError(f"model input must be {INPUT} [N, 3, {size}, {size}], got {inputs}")
        if list(outputs) != list(card.outputs):
            kind = f"a {card.num_classes}-class classifier" if card.has_classifier else "a headless backbone"
            expected = list(card.outputs)
            raise ModelLoadError(f"the model card describes {kind} with outputs {expected}, got {list(outputs)}")
        if card.has_classifier and outputs[LOGITS][1:] != [card.num_classes]:
            width = outputs[LOGITS][1:]
            classes = f"{width[0]} classes" if len(width) == 1 and isinstance(width[0], int) else f"shape {width}"
            # Fewer labels than classes would fail requests at run time, more would mislabel them silently.
            raise ModelLoadError(
                f"the model file carries {card.num_classes} labels but its logits output has {classes}: labels "
                "and classes must match one to one (export it again with one label per class)"
            )
        if outputs[EMBEDDING][1:] != [card.embedding_dim]:
            raise ModelLoadError(
                f"the model card says embedding_dim {card.embedding_dim}, the embedding output is {outputs[EMBEDDING]}"
            )
        self._outputs: list[str] = list(card.outputs)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.card.has_classifier:
            (embedding,) = self.session.run(self._outputs, {INPUT: images})
            return np.zeros((len(images), 0), dtype=np.float32), embedding
        logits, embedding = self.session.run(self._outputs, {INPUT: images})
        return logits, embedding


def warm_up(model: InferenceModel, batch_sizes: list[int]) -> None:
    """Run every batch shape once, so no client request pays for kernel selection or allocation."""
    size = model.card.preprocess.input_size
    for n in batch_sizes:
        model.infer(np.zeros((n, 3, size, size), dtype=np.float32))
