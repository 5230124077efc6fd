"""The Open Inference Protocol's model as this service serves it, apart from any transport: the inputs and
outputs of every model, metadata, configuration and inference. The HTTP routes (service/http/oip/) and the
gRPC servicer (service/grpc/) both call these, so the two protocols answer alike.

Every model takes one of two inputs: `images`, FP32 [N, 3, S, S] (UINT8 [N, S, S, 3] for a model exported with
uint8-nhwc input), for clients that preprocess themselves,
or `image_bytes`, BYTES [N] (or [N, 1]) of encoded image files, decoded and preprocessed exactly as
/classify does. Outputs: `logits`, `embedding`, and `probabilities` (the softmax /classify scores, computed
by the service), each optionally as the top k "score:index:label" strings (Triton's classification); and,
for models exported with it, `features` FP32 [N, C, h, w], the last feature map that class activation maps
are computed from, sent only when a request names it (it is 49 times the embedding's size at 224 px).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from modelcard import EMBEDDING, FEATURES, INPUT, LOGITS
from providers import CUDA

from ..errors import ServiceError
from ..repository.config import VersionPolicy
from ..repository.registry import ServedModel
from ..request.inference import ModelLoadError
from ..request.path import Call, Outputs, run_encoded, run_tensors
from ..request.postprocess import classification_strings, softmax
from ..state import ServiceState
from .tensors import BYTES, InferRequest, OutputTensor, ProtocolError

log = logging.getLogger("service.oip")
# The preprocessed input is the graph's own input; encoded files are the protocol's second input.
TENSOR_INPUT, BYTES_INPUT = INPUT, "image_bytes"
PROBABILITIES = "probabilities"
# Metadata's platform is the OIP specification's name for ONNX; Triton's model configuration has its own.
PLATFORM, TRITON_PLATFORM, TRITON_BACKEND = "onnx_onnxv1", "onnxruntime_onnx", "onnxruntime"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
SERVER_NAME = "resnest-serve"


def server_version() -> str:
    """The installed package's version (the server metadata's `version`)."""
    try:
        return version("resnest-serve")
    except PackageNotFoundError:
        return "0.1.0"


def server_metadata() -> dict[str, Any]:
    """The server metadata: name, version, extensions."""
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def output_names(served: ServedModel) -> list[str]:
    """The model's outputs; `probabilities` only where it has a classifier, `features` where its file has it."""
    card = served.model.card
    return [*card.outputs, PROBABILITIES] if card.has_classifier else list(card.outputs)


def default_outputs(served: ServedModel) -> list[str]:
    """What a request that names no outputs gets: all but the feature map, which only a request naming it pays."""
    return [name for name in output_names(served) if name != FEATURES]


def image_tensor(served: ServedModel) -> tuple[str, list[int]]:
    """The `images` input as the model's graph takes it: (datatype, one image's shape), FP32 [3, S, S], or
    UINT8 [S, S, 3] for a model exported with uint8-nhwc input (normalised on the device)."""
    cfg = served.model.card.preprocess
    return ("UINT8" if cfg.uint8_input else "FP32"), list(cfg.input_shape)


def tensor_meta(served: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as OIP metadata tensors, -1 for the batch."""
    card = served.model.card
    datatype, shape = image_tensor(served)
    inputs = [
        {"name": TENSOR_INPUT, "datatype": datatype, "shape": [-1, *shape]},
        {"name": BYTES_INPUT, "datatype": BYTES, "shape": [-1, 1]},
    ]
    shapes = {LOGITS: [card.num_classes], PROBABILITIES: [card.num_classes], EMBEDDING: [card.embedding_dim],
              FEATURES: list(card.feature_map or ())}  # fmt: skip
    outputs = [{"name": n, "datatype": "FP32", "shape": [-1, *shapes[n]]} for n in output_names(served)]
    return inputs, outputs


def model_metadata(state: ServiceState, served: ServedModel) -> dict[str, Any]:
    """The model metadata: name, the versions served, platform, inputs and outputs."""
    inputs, outputs = tensor_meta(served)
    versions = [str(v) for v in sorted(state.registry.models.get(served.name, {}))]
    return {"name": served.name, "versions": versions, "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def model_config(state: ServiceState, served: ServedModel) -> dict[str, Any]:
    """Triton's model configuration, in its JSON form (the gRPC front parses it into the ModelConfig message):
    the batching in force for this version (its config.pbtxt over the settings), as Triton's fields."""
    card = served.model.card
    datatype, shape = image_tensor(served)
    layout = "FORMAT_NHWC" if card.preprocess.uint8_input else "FORMAT_NCHW"
    _, outputs = tensor_meta(served)
    # As loaded (the one-file shortcut and injected models: version 1 only), not as the disk says now.
    policy = state.registry.policies.get(served.name, VersionPolicy())
    batching = served.batching.to_triton()
    return {
        "name": served.name,
        "platform": TRITON_PLATFORM,
        "backend": TRITON_BACKEND,
        "max_batch_size": batching["max_batch_size"],
        "input": [
            {"name": TENSOR_INPUT, "data_type": f"TYPE_{datatype}", "format": layout, "dims": shape},
            {"name": BYTES_INPUT, "data_type": "TYPE_STRING", "dims": [1]},
        ],
        "output": [{"name": o["name"], "data_type": "TYPE_FP32", "dims": o["shape"][1:]} for o in outputs],
        "dynamic_batching": batching["dynamic_batching"],
        "version_policy": policy.describe(),
        "instance_group": [{"count": 1, "kind": "KIND_GPU" if served.model.providers[0] == CUDA else "KIND_CPU"}],
        "parameters": {"variant": {"string_value": card.variant}, "precision": {"string_value": card.precision}},
    }


def require_ready(served: ServedModel) -> None:
    """503 unless the model version can take requests."""
    if not served.ready:
        raise ServiceError("not_ready", f"model {served.name!r} version {served.version} is not ready")


def take_input(request: InferRequest, served: ServedModel) -> tuple[str, np.ndarray | list[bytes]]:
    """The request's one input, checked against the model: ("images", tensor) or ("image_bytes", files)."""
    if len(request.inputs) != 1:
        raise ProtocolError(f"send exactly one input, {TENSOR_INPUT!r} or {BYTES_INPUT!r}")
    (tensor,) = request.inputs
    datatype, shape = image_tensor(served)
    if tensor.name == TENSOR_INPUT:
        if tensor.datatype != datatype or len(tensor.shape) != 4 or list(tensor.shape[1:]) != shape:
            dims = ", ".join(str(d) for d in shape)
            raise ProtocolError(f"input {TENSOR_INPUT!r} must be {datatype} [N, {dims}]")
        batch = np.asarray(tensor.data)
        if datatype == "FP32" and not np.isfinite(batch).all():
            raise ProtocolError(f"input {TENSOR_INPUT!r} holds NaN or infinite values")
        return TENSOR_INPUT, batch
    if tensor.name == BYTES_INPUT:
        if tensor.datatype != BYTES or len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ((), (1,)):
            raise ProtocolError(f"input {BYTES_INPUT!r} must be BYTES [N] or [N, 1]: one encoded image each")
        return BYTES_INPUT, tensor.data
    raise ProtocolError(f"unknown input {tensor.name!r}; this model takes {TENSOR_INPUT!r} or {BYTES_INPUT!r}")


def read_request(
    parse: Callable[[int, int], InferRequest], served: ServedModel, max_images: int
) -> tuple[InferRequest, str, Any]:
    """A transport's `parse(max_elements, max_images)`, bounded by what `max_images` images of this model
    hold before any array is made, then checked against the model; a ProtocolError is the table's error."""
    size = served.model.card.preprocess.input_size
    try:
        parsed = parse(max_images * 3 * size * size, max_images)
    except ProtocolError as exc:
        raise ServiceError(exc.code, str(exc)) from None
    kind, data = check_request(parsed, served)
    return parsed, kind, data


def check_request(request: InferRequest, served: ServedModel) -> tuple[str, Any]:
    """The request's input and requested outputs checked against the model, before any image is decoded."""
    try:
        kind, data = take_input(request, served)
        asked = {o.name for o in request.outputs or ()}
        if unknown := asked - set(output_names(served)):
            raise ProtocolError(f"unknown output(s) {sorted(unknown)}; this model has {output_names(served)}")
        for spec in request.outputs or ():
            if spec.classification and spec.name in (EMBEDDING, FEATURES):
                raise ProtocolError(f"classification applies to 'logits' or 'probabilities', not {spec.name!r}")
    except ProtocolError as exc:
        raise ServiceError(exc.code, str(exc)) from None
    return kind, data


def select_outputs(request: InferRequest, served: ServedModel, out: Outputs) -> list[OutputTensor]:
    """The outputs asked for (all when none are named), each in the form asked for."""
    card = served.model.card
    arrays = {LOGITS: out.logits, EMBEDDING: out.embedding}
    if card.has_classifier:
        arrays[PROBABILITIES] = softmax(out.logits)
    if out.features is not None:
        arrays[FEATURES] = out.features
    if request.outputs is None:
        return [
            OutputTensor(n, "FP32", arrays[n].shape, arrays[n], request.binary_default) for n in default_outputs(served)
        ]
    tensors = []
    for spec in request.outputs:
        values = arrays[spec.name]
        if spec.classification:
            k = min(spec.classification, values.shape[1])
            strings = classification_strings(values, k, card.labels)
            tensors.append(OutputTensor(spec.name, BYTES, (values.shape[0], k), strings, spec.binary))
        else:
            tensors.append(OutputTensor(spec.name, "FP32", values.shape, values, spec.binary))
    return tensors


async def infer(
    call: Call, state: ServiceState, served: ServedModel, request: InferRequest, kind: str, data: Any
) -> tuple[list[OutputTensor], Outputs]:
    """One checked inference request through the shared request path; its output tensors and timings."""
    features = any(spec.name == FEATURES for spec in request.outputs or ())
    if kind == TENSOR_INPUT:
        out = await run_tensors(call, state, served, data, features)
    else:

        async def files() -> list[bytes]:
            return data  # type: ignore[no-any-return]

        out = await run_encoded(call, state, served, files, len(data), features)
    with state.tracing.stage(call.record, "postprocess"):
        return select_outputs(request, served, out), out


# -- the model repository (Triton's explicit model control) -------------------------------------------------
def repository_index(state: ServiceState, only_ready: bool = False) -> list[dict[str, Any]]:
    """Every model on disk or served, with its state (READY, UNAVAILABLE, LOADING) and why."""
    return [
        {"name": r.name, "version": r.version, "state": r.state, **({"reason": r.reason} if r.reason else {})}
        for r in state.registry.index()
        if not only_ready or r.state == "READY"
    ]


def require_control(state: ServiceState) -> None:
    """403 unless explicit model control is on (Triton's default mode: the repository is fixed at start-up)."""
    if not state.settings.model_control:
        raise ServiceError("model_control_disabled")


async def load_model(state: ServiceState, name: str, has_parameters: bool = False) -> None:
    """Load or reload `name` from the repository (or the one file); a failure leaves what was served."""
    settings, registry = state.settings, state.registry
    if has_parameters:
        raise ServiceError("invalid_request", "load parameters (config or file overrides) are not supported")
    try:
        if settings.model_repository is None:
            if name != settings.single_model_name():
                raise ServiceError("model_not_found", f"unknown model {name!r}")
            await registry.load_path(name, settings.model_path)
        else:
            await registry.load_from_repository(name)
    except (ModelLoadError, OSError, ValueError) as exc:
        # The cause (paths, ONNX Runtime's own message) is for the operator's log, not the client.
        log.error("loading model %r failed: %s", name, exc)
        raise ServiceError(
            "model_load_failed", f"failed to load {name!r} (the server log says why); what was served is unchanged"
        ) from None


async def unload_model(state: ServiceState, name: str) -> None:
    """Unload every version of `name`; requests in flight on it finish first."""
    await state.registry.unload(name)
