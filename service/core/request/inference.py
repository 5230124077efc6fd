"""Stage 4, inference: the model itself, an ONNX Runtime session (CUDA EP with CPU fallback) behind a small
Protocol, and its warm-up.

Batches reach the session one of two ways. The plain path is `session.run` (ORT allocates and copies as it
likes). With IO binding (RESNEST_IO_BINDING, the default) each warmed batch shape has its own reused host
buffer (page-locked with cudaHostRegister on CUDA, so the copy to the device is one DMA), input and output
tensors bound once, and outputs fetched once; on CUDA, RESNEST_CUDA_GRAPHS adds one captured CUDA graph per
shape (ORT's enable_cuda_graph with gpu_graph_id), captured during warm-up. Where an option cannot work
(CPU EP, a shape outside the warmed set), the plain path runs; `OrtModel.acceleration` says what is active.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from modelcard import EMBEDDING, FEATURES, INPUT, LOGITS, ModelCard, ModelCardError
from modelcard.cam import ClassifierHead, ClassifierHeadError
from providers import CPU, CUDA, CudaProbe, describe, probe_cuda, quiet_ort, required_libraries

from ..settings import Settings

log = logging.getLogger("service.runtime")


class InferenceModel(Protocol):
    """What the batcher needs from a model; tests inject fakes through this seam."""

    card: ModelCard
    providers: list[str]

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) (uint8 (N, S, S, 3) for a uint8-nhwc card) -> (logits (N, classes),
        embedding (N, dim)), both float32.

        A headless model (card.num_classes 0) returns zero-width logits (N, 0), so the batcher and every
        other caller handle one shape of answer.
        """
        ...


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured (missing file, bad metadata, GPU required but absent)."""


def _gpu_required(settings: Settings) -> bool:
    return settings.require_gpu or settings.providers == "cuda"


def _provider_chain(
    settings: Settings, probe: CudaProbe | None, cuda_graph: bool = False
) -> list[str | tuple[str, dict[str, object]]]:
    """CUDA (CPU behind it) only where the probe found it can start: asked for elsewhere, ORT floods the log."""
    if settings.providers == "cpu" or probe is None or not probe.available:
        return [CPU]
    cuda_options: dict[str, object] = {"device_id": settings.cuda_device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    if cuda_graph:
        cuda_options["enable_cuda_graph"] = "1"
    return [(CUDA, cuda_options), CPU]


# ORT's run option that picks a captured graph; -1 runs the session without capture or replay.
GRAPH_ID = "gpu_graph_id"
NO_GRAPH = "-1"
# Regular runs per shape in warm-up when graphs are on: ORT allocates on the first and captures on a later
# one; a third run replays, so the first request already gets the replay.
GRAPH_WARM_RUNS = 3
_PAGE = 4096


def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime the CUDA EP loaded (by soname, so the same copy); None where it is not there."""
    try:
        return ctypes.CDLL(required_libraries()[1])
    except OSError:
        return None


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> tuple[np.ndarray, bool]:
    """A page-aligned host array of `shape`, page-locked for the device's copy engine when `pin` and possible."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + _PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % _PAGE
    array = raw[start : start + nbytes].view(dtype).reshape(shape)
    if not pin:
        return array, False
    cudart = _cudart()
    if cudart is None:
        return array, False
    ptr = ctypes.c_void_p(array.ctypes.data)
    if cudart.cudaHostRegister(ptr, ctypes.c_size_t(nbytes), ctypes.c_uint(0)) != 0:
        return array, False  # not allowed here (limits on locked memory): pageable memory still works
    # Unlocked when the buffer is collected: numpy would otherwise free pages the driver still holds locked.
    weakref.finalize(raw, cudart.cudaHostUnregister, ptr)
    return array, True


@dataclass(eq=False)
class _Slot:
    """One warmed batch shape's bound tensors: host buffer, device copies (CUDA), outputs, binding."""

    host: np.ndarray
    binding: Any  # ort.IOBinding
    run_options: ort.RunOptions
    device_input: ort.OrtValue | None  # CUDA: the input on the device, refreshed in place from `host`
    outputs: list[ort.OrtValue]
    host_outputs: list[np.ndarray] | None  # CPU: ORT writes the outputs straight into these


class OrtModel:
    """An InferenceSession plus the model card read from the same file."""

    def __init__(self, settings: Settings, shapes: Sequence[int] | None = None) -> None:
        """A session over settings.model_path; `shapes` are the batch sizes warm-up and the batcher will use
        (IO binding keeps one set of bound buffers for each), the settings' by default."""
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
        graph_error = ""
        want_graphs = settings.cuda_graphs and settings.io_binding and chain[0] != CPU
        with quiet_ort(quiet):
            if want_graphs:
                try:  # refused when a node would run on the CPU EP (graphs replay device work only)
                    self.session = ort.InferenceSession(
                        str(path), options, providers=_provider_chain(settings, probe, cuda_graph=True)
                    )
                except Exception as exc:  # ORT's own error type; the plain CUDA session is the fallback
                    graph_error = f"ONNX Runtime refused CUDA graphs for this model: {exc}"
                    log.warning("%s; serving without them", graph_error)
                    want_graphs = False
            if not want_graphs:
                self.session = ort.InferenceSession(str(path), options, providers=chain)
        # ORT falls back to CPU silently when the CUDA EP cannot start: trust only what the session reports.
        self.providers: list[str] = self.session.get_providers()
        if _gpu_required(settings) and self.providers[0] != CUDA:
            raise ModelLoadError(f"a GPU is required but the CUDA EP did not start: active providers {self.providers}")
        # A GPU machine whose CUDA EP failed deserves a warning; a machine without one serves on CPU as designed.
        level = logging.WARNING if probe is not None and probe.available and self.providers[0] != CUDA else logging.INFO
        log.log(level, "%s", describe(self.providers, probe, settings.cuda_device_id))
        try:
            meta = self.session.get_modelmeta().custom_metadata_map
            self.card = ModelCard.from_metadata(meta)
            # Class activation maps need the classifier's rows; files without a feature map carry none.
            self.head = ClassifierHead.from_metadata(meta) if self.card.feature_map is not None else None
        except (ModelCardError, ClassifierHeadError) as exc:
            raise ModelLoadError(str(exc)) from exc
        del meta
        self._check_signature()
        self._setup_binding(settings, list(settings.batch_shapes() if shapes is None else shapes), want_graphs,
                            graph_error)  # fmt: skip
        log.info("loaded %s (%s) from %s on %s; %s", self.card.variant, self.card.precision, path, self.providers,
                 self.acceleration["path"])  # fmt: skip

    # -- IO binding and CUDA graphs ----------------------------------------------------------------------
    def _setup_binding(self, settings: Settings, shapes: list[int], graphs: bool, graph_error: str) -> None:
        """Decide the path each batch takes and record it in `acceleration` (GET /model shows it)."""
        # A binding is one set of buffers: one batch at a time, from stacking into the host buffer (which holds
        # the lock around infer) to the outputs' fetch. Re-entrant: infer takes it again inside that block.
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        on_cuda = self.providers[0] == CUDA
        self._device_id = settings.cuda_device_id
        self._binding_shapes = shapes if settings.io_binding else []
        self._graphs = graphs and on_cuda and bool(self._binding_shapes)
        self._pin = on_cuda
        self._pinned = False
        if not settings.cuda_graphs:
            why_not = "off (RESNEST_CUDA_GRAPHS=false)"
        elif not settings.io_binding:
            why_not = "needs RESNEST_IO_BINDING: a graph replays fixed device addresses"
        elif graph_error:
            why_not = graph_error
        elif not on_cuda:
            why_not = f"the CUDA EP is not active ({self.providers[0]} serves): the plain path runs"
        else:
            why_not = ""
        self.acceleration: dict[str, Any] = {
            "path": "plain",
            "input_format": self.card.preprocess.input_format,
            "io_binding": {
                "requested": settings.io_binding,
                "active": bool(self._binding_shapes),
                "device": "cuda" if on_cuda else "cpu",
                "batch_sizes": list(self._binding_shapes),
                "pinned_host_buffers": False,
                "reason": "" if settings.io_binding else "off (RESNEST_IO_BINDING=false)",
            },
            "cuda_graphs": {
                "requested": settings.cuda_graphs,
                "active": self._graphs,
                "batch_sizes": list(self._binding_shapes) if self._graphs else [],
                "captured": [],
                "reason": why_not,
            },
        }
        self._describe_path()

    def _describe_path(self) -> None:
        acc = self.acceleration
        acc["path"] = ("io_binding+cuda_graphs" if acc["cuda_graphs"]["active"] else "io_binding") if (
            acc["io_binding"]["active"]) else "plain"  # fmt: skip

    @property
    def warm_up_runs(self) -> int:
        """Runs per batch shape that warm-up needs: graphs are captured after a regular run."""
        return GRAPH_WARM_RUNS if self._graphs else 1

    def _make_slot(self, n: int) -> _Slot:
        pre = self.card.preprocess
        shape = (n, *pre.input_shape)
        dtype = np.dtype(pre.input_dtype)
        host, pinned = _host_buffer(shape, dtype, self._pin)
        self._pinned = self._pinned or pinned
        self.acceleration["io_binding"]["pinned_host_buffers"] = self._pinned
        binding = self.session.io_binding()
        run_options = ort.RunOptions()
        widths = {LOGITS: self.card.num_classes, EMBEDDING: self.card.embedding_dim}
        if self.providers[0] == CUDA:
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, "cuda", self._device_id)
            binding.bind_ortvalue_input(INPUT, device_input)
            outputs = [
                ort.OrtValue.ortvalue_from_shape_and_type([n, widths[name]], np.float32, "cuda", self._device_id)
                for name in self._outputs
            ]
            host_outputs = None
            run_options.add_run_config_entry(GRAPH_ID, str(n) if self._graphs else NO_GRAPH)
        else:
            device_input = None
            binding.bind_cpu_input(INPUT, host)  # read in place: no copy at all on the CPU EP
            host_outputs = [np.empty((n, widths[name]), dtype=np.float32) for name in self._outputs]
            outputs = [ort.OrtValue.ortvalue_from_numpy(out) for out in host_outputs]
        for name, value in zip(self._outputs, outputs, strict=True):
            binding.bind_ortvalue_output(name, value)
        return _Slot(host, binding, run_options, device_input, outputs, host_outputs)

    def _slot(self, n: int) -> _Slot | None:
        """The bound tensors of shape `n`, made on first use; None outside the warmed set (plain path)."""
        if n not in self._binding_shapes:
            return None
        slot = self._slots.get(n)
        if slot is None:
            slot = self._slots[n] = self._make_slot(n)
        return slot

    @contextlib.contextmanager
    def input_buffer(self, n: int) -> Iterator[np.ndarray | None]:
        """The reused host buffer of batch shape `n` (None outside the warmed set), the model held for the
        block: the batcher stacks into it and infers it before any other batch can touch it."""
        with self._lock:
            slot = self._slot(n)
            yield None if slot is None else slot.host

    def _run_bound(self, slot: _Slot, images: np.ndarray) -> list[np.ndarray]:
        if images is not slot.host:
            np.copyto(slot.host, images)
        if slot.device_input is not None:
            slot.device_input.update_inplace(slot.host)  # one host -> device copy, from page-locked memory
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        if slot.host_outputs is not None:
            return [out.copy() for out in slot.host_outputs]  # the buffers are the next batch's
        return [value.numpy() for value in slot.outputs]  # one device -> host copy per output

    def _check_signature(self) -> None:
        """The graph must be the one the card describes: a mismatch would fail (or mislabel) every request."""
        card = self.card
        inputs = self.session.get_inputs()
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        shape, dtype = list(card.preprocess.input_shape), card.preprocess.input_dtype
        # ORT names element types "tensor(float)" and "tensor(uint8)"
        ort_type = "tensor(uint8)" if card.preprocess.uint8_input else "tensor(float)"
        if len(inputs) != 1 or inputs[0].name != INPUT or list(inputs[0].shape[1:]) != shape:
            raise ModelLoadError(f"model input must be {INPUT} {dtype} [N, {', '.join(map(str, shape))}], got {inputs}")
        if inputs[0].type != ort_type:
            raise ModelLoadError(
                f"the model card says input_format {card.preprocess.input_format} ({dtype}), the graph's input is "
                f"{inputs[0].type}: export the file again"
            )
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
        if card.feature_map is not None:
            if outputs[FEATURES][1:] != list(card.feature_map):
                raise ModelLoadError(f"the model card says feature_map {list(card.feature_map)}, the features "
                                     f"output is {outputs[FEATURES]}")  # fmt: skip
            if self.head is None or self.head.weight.shape != (card.num_classes, card.embedding_dim):
                shape = None if self.head is None else self.head.weight.shape
                raise ModelLoadError(f"the model's classifier record is {shape}, its card says "
                                     f"({card.num_classes}, {card.embedding_dim}): export the file again")  # fmt: skip
        # The feature map is fetched only for the batches that ask for it (infer_features): ORT computes it
        # anyway (the embedding is its mean), but copying it out costs every other batch nothing.
        self._outputs: list[str] = [name for name in card.outputs if name != FEATURES]

    def _check_input(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        pre = self.card.preprocess
        if dtype != np.dtype(pre.input_dtype) or shape != pre.input_shape:
            raise ValueError(
                f"this model takes {pre.input_dtype} [N, {', '.join(map(str, pre.input_shape))}] "
                f"({pre.input_format}), got {dtype} {list(shape)}"
            )

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batch through IO binding when its shape is warmed and binding is on, else session.run."""
        self._check_input(images.dtype, images.shape[1:])
        with self._lock:
            return self._run(images, self._slot(len(images)))

    def infer_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, embedding, features) of one batch, on the plain path (ValueError for a model without a
        feature map output): only the batches that need class activation maps pay for the copy."""
        if self.card.feature_map is None:
            raise ValueError("this model has no feature map output: export it again to explain its answers")
        self._check_input(images.dtype, images.shape[1:])
        options = self._plain_options if self._graphs else None
        with self._lock:
            logits, embedding, features = self.session.run(list(self.card.outputs), {INPUT: images}, options)
        return logits, embedding, features

    def _run(self, batch: np.ndarray, slot: _Slot | None) -> tuple[np.ndarray, np.ndarray]:
        """Called with the lock held."""
        if slot is not None:
            outputs = self._run_bound(slot, batch)
            if self._graphs and len(batch) not in self.acceleration["cuda_graphs"]["captured"]:
                self.acceleration["cuda_graphs"]["captured"].append(len(batch))
        else:
            # Shapes outside the warmed set; a graph session skips capture and replay for them.
            options = self._plain_options if self._graphs else None
            outputs = self.session.run(self._outputs, {INPUT: batch}, options)
        if not self.card.has_classifier:
            return np.zeros((len(batch), 0), dtype=np.float32), outputs[0]
        return outputs[0], outputs[1]

    @property
    def _plain_options(self) -> ort.RunOptions:
        options = ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID, NO_GRAPH)
        return options


def stack(
    rows: Sequence[np.ndarray], size: int, shape: tuple[int, ...], dtype: np.dtype, out: np.ndarray | None = None
) -> np.ndarray:
    """`rows` as one (size, *shape) batch of `dtype`, zero past the last row; written into `out` when given."""
    if out is None or out.shape != (size, *shape) or out.dtype != dtype:
        out = np.empty((size, *shape), dtype=dtype)
    for i, row in enumerate(rows):
        out[i] = row
    out[len(rows) :] = 0
    return out


def warm_up(model: InferenceModel, batch_sizes: list[int]) -> None:
    """Run every batch shape (several times where CUDA graphs are captured), so no client request pays for
    kernel selection, allocation or capture."""
    pre = model.card.preprocess
    # Models that only take float32 (tests' fakes) have no input_shape/input_dtype beyond the card's.
    shape, dtype = (
        getattr(pre, "input_shape", (3, pre.input_size, pre.input_size)),
        getattr(pre, "input_dtype", "float32"),
    )
    runs = getattr(model, "warm_up_runs", 1)
    for n in batch_sizes:
        for _ in range(runs):
            model.infer(np.zeros((n, *shape), dtype=dtype))
