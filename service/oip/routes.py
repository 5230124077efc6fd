"""The Open Inference Protocol v2 over HTTP (KServe v2, Triton's HTTP API), with Triton's extensions: binary
tensors, classification, model configuration and explicit model control.

Every model takes one of two inputs: `images`, FP32 [N, 3, S, S], for clients that preprocess themselves,
or `image_bytes`, BYTES [N] (or [N, 1]) of encoded image files, decoded and preprocessed exactly as
/classify does. Outputs: `logits`, `embedding`, and `probabilities` (the softmax /classify scores, computed
by the service), each as JSON or binary, and with `"classification": k` as "score:index:label" strings.
Admission, decoding, batching and the error table are the ones of every other route (service/core/inference.py).
"""

# No `from __future__ import annotations` here: FastAPI must see the parameter annotations as objects.

import asyncio
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from ..core.errors import ServiceError
from ..core.inference import Outputs, run_encoded, run_tensors
from ..core.postprocess import softmax
from ..core.registry import ServedModel
from ..core.repository import VersionPolicy
from ..core.responses import JSONResponse
from ..core.runtime import CUDA, ModelLoadError
from ..core.state import ServiceState
from ..web.auth import key_check
from .codec import BYTES, InferRequest, OutputTensor, ProtocolError, encode_response, parse_request
from .schemas import (
    INFER_BODY,
    INFER_OK,
    Empty,
    Live,
    ModelMetadata,
    Readiness,
    RepositoryEntry,
    ServerMetadata,
    error_responses,
)

# The statuses each kind of route can answer (documented in OpenAPI, checked by the schema fuzzer).
_META_ERRORS = error_responses(401, 404, 422, 503)
_INFER_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 499, 500, 503, 504)
_CONTROL_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 503)

log = logging.getLogger("service.oip")
TENSOR_INPUT, BYTES_INPUT = "images", "image_bytes"
PROBABILITIES = "probabilities"
# Metadata's platform is the OIP specification's name for ONNX; Triton's model configuration has its own.
PLATFORM, TRITON_PLATFORM, TRITON_BACKEND = "onnx_onnxv1", "onnxruntime_onnx", "onnxruntime"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]


def _server_version() -> str:
    try:
        return version("resnest-serve")
    except PackageNotFoundError:
        return "0.1.0"


def _output_names(served: ServedModel) -> list[str]:
    card = served.model.card
    return [*card.outputs, PROBABILITIES] if card.has_classifier else list(card.outputs)


def _tensor_meta(served: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as OIP metadata tensors, -1 for the batch."""
    card = served.model.card
    size = card.preprocess.input_size
    inputs = [
        {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
        {"name": BYTES_INPUT, "datatype": BYTES, "shape": [-1, 1]},
    ]
    widths = {"logits": card.num_classes, PROBABILITIES: card.num_classes, "embedding": card.embedding_dim}
    outputs = [{"name": n, "datatype": "FP32", "shape": [-1, widths[n]]} for n in _output_names(served)]
    return inputs, outputs


def classification_strings(values: np.ndarray, k: int, labels: list[str] | tuple[str, ...]) -> list[bytes]:
    """Per row, the k largest values as Triton's "score:index:label", best first (ties by lower index)."""
    best = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:f}:{int(i)}:{labels[i]}".encode() for row, order in zip(values, best, strict=True) for i in order]


def _take_input(request: InferRequest, served: ServedModel) -> tuple[str, np.ndarray | list[bytes]]:
    """The request's one input, checked against the model: ("images", tensor) or ("image_bytes", files)."""
    if len(request.inputs) != 1:
        raise ProtocolError(f"send exactly one input, {TENSOR_INPUT!r} or {BYTES_INPUT!r}")
    (tensor,) = request.inputs
    size = served.model.card.preprocess.input_size
    if tensor.name == TENSOR_INPUT:
        if tensor.datatype != "FP32" or len(tensor.shape) != 4 or tensor.shape[1:] != (3, size, size):
            raise ProtocolError(f"input {TENSOR_INPUT!r} must be FP32 [N, 3, {size}, {size}]")
        batch = np.asarray(tensor.data)
        if not np.isfinite(batch).all():
            raise ProtocolError(f"input {TENSOR_INPUT!r} holds NaN or infinite values")
        return TENSOR_INPUT, batch
    if tensor.name == BYTES_INPUT:
        if tensor.datatype != BYTES or len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ((), (1,)):
            raise ProtocolError(f"input {BYTES_INPUT!r} must be BYTES [N] or [N, 1]: one encoded image each")
        return BYTES_INPUT, tensor.data
    raise ProtocolError(f"unknown input {tensor.name!r}; this model takes {TENSOR_INPUT!r} or {BYTES_INPUT!r}")


def _outputs(request: InferRequest, served: ServedModel, out: Outputs) -> list[OutputTensor]:
    """The outputs asked for (all when none are named), each in the form asked for."""
    card = served.model.card
    available = _output_names(served)
    arrays = {"logits": out.logits, "embedding": out.embedding}
    if card.has_classifier:
        arrays[PROBABILITIES] = softmax(out.logits)
    wanted = request.outputs
    if wanted is None:
        return [OutputTensor(n, "FP32", arrays[n].shape, arrays[n], request.binary_default) for n in available]
    tensors = []
    for spec in wanted:
        if spec.name not in available:
            raise ProtocolError(f"unknown output {spec.name!r}; this model has {available}")
        values = arrays[spec.name]
        if spec.classification:
            if spec.name == "embedding":
                raise ProtocolError("classification applies to 'logits' or 'probabilities', not 'embedding'")
            k = min(spec.classification, values.shape[1])
            strings = classification_strings(values, k, card.labels)
            tensors.append(OutputTensor(spec.name, BYTES, (values.shape[0], k), strings, spec.binary))
        else:
            tensors.append(OutputTensor(spec.name, "FP32", values.shape, values, spec.binary))
    return tensors


def _parse(body: bytes, header: str | None, served: ServedModel, max_images: int) -> tuple[InferRequest, str, Any]:
    """The request, its one input and its outputs checked against the model, before any image is decoded."""
    size = served.model.card.preprocess.input_size
    try:
        parsed = parse_request(body, header, max_images * 3 * size * size, max_images)
        kind, data = _take_input(parsed, served)
        asked = {o.name for o in parsed.outputs or ()}
        if unknown := asked - set(_output_names(served)):
            raise ProtocolError(f"unknown output(s) {sorted(unknown)}; this model has {_output_names(served)}")
    except ProtocolError as exc:
        raise ServiceError(exc.code, str(exc)) from None
    return parsed, kind, data


async def _control_body(request: Request, limit: int = 64 * 1024) -> dict[str, Any]:
    """The optional JSON object of a control request, refused past `limit` bytes while it streams in."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError("payload_too_large", f"a control request's body is at most {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ServiceError("invalid_request", "the request body is not valid JSON") from None
    return doc if isinstance(doc, dict) else {}


def build_oip_router(state: ServiceState) -> APIRouter:
    """The /v2 routes over this app's registry."""
    settings, registry = state.settings, state.registry
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

    guarded = [Depends(key_check(settings))]
    Name = Annotated[str, Path(max_length=64, description="the model's name")]
    Version = Annotated[int, Path(ge=1, description="the model version")]

    # -- health and metadata -------------------------------------------------------------------------------
    @router.get("", summary="Server metadata", response_model=ServerMetadata)
    async def server_metadata() -> Response:
        return JSONResponse({"name": "resnest-serve", "version": _server_version(), "extensions": EXTENSIONS})

    @router.get(
        "/health/live",
        summary="Server liveness (200 while the process can serve)",
        response_model=Live,
        responses=error_responses(503),
    )
    async def live() -> Response:
        if state.worker_dead:
            raise ServiceError("not_ready", "a batch worker died")
        return JSONResponse({"live": True})

    @router.get(
        "/health/ready",
        summary="Server readiness (200 when every loaded model is ready)",
        response_model=Readiness,
        responses=error_responses(503),
    )
    async def ready() -> Response:
        reasons = state.not_ready_reasons()
        if reasons:
            raise ServiceError("draining" if state.draining else "not_ready", "; ".join(reasons))
        return JSONResponse({"ready": True})

    async def model_metadata(name: str, model_version: int | None) -> Response:
        served = state.resolve(name, model_version)
        inputs, outputs = _tensor_meta(served)
        versions = [str(v) for v in sorted(registry.models.get(served.name, {}))]
        return JSONResponse(
            {"name": served.name, "versions": versions, "platform": PLATFORM, "inputs": inputs, "outputs": outputs}
        )

    async def model_ready(name: str, model_version: int | None) -> Response:
        served = state.resolve(name, model_version)
        if not served.ready:
            raise ServiceError("not_ready", f"model {name!r} version {served.version} is not ready")
        return JSONResponse({"name": served.name, "version": str(served.version), "ready": True})

    async def model_config(name: str, model_version: int | None) -> Response:
        served = state.resolve(name, model_version)
        card = served.model.card
        size = card.preprocess.input_size
        _, outputs = _tensor_meta(served)
        # As loaded (the one-file shortcut and injected models: version 1 only), not as the disk says now.
        policy = registry.policies.get(served.name, VersionPolicy())
        config = {
            "name": served.name,
            "platform": TRITON_PLATFORM,
            "backend": TRITON_BACKEND,
            "max_batch_size": settings.max_batch_size,
            "input": [
                {"name": TENSOR_INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, size, size]},
                {"name": BYTES_INPUT, "data_type": "TYPE_STRING", "dims": [1]},
            ],
            "output": [{"name": o["name"], "data_type": "TYPE_FP32", "dims": o["shape"][1:]} for o in outputs],
            "dynamic_batching": {
                "preferred_batch_size": settings.batch_shapes(),
                "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            },
            "version_policy": policy.describe(),
            "instance_group": [{"count": 1, "kind": "KIND_GPU" if served.model.providers[0] == CUDA else "KIND_CPU"}],
            "parameters": {"variant": {"string_value": card.variant}, "precision": {"string_value": card.precision}},
        }
        return JSONResponse(config)

    # Each model route twice, with and without /versions/{v}, as the protocol has them.
    meta = {"responses": _META_ERRORS, "dependencies": guarded}

    @router.get("/models/{model_name}", summary="Model metadata", response_model=ModelMetadata, **meta)
    async def metadata_latest(model_name: Name) -> Response:
        return await model_metadata(model_name, None)

    @router.get(
        "/models/{model_name}/versions/{model_version}", summary="Model metadata", response_model=ModelMetadata, **meta
    )
    async def metadata_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_metadata(model_name, model_version)

    # Readiness is a probe, open like the health routes.
    @router.get(
        "/models/{model_name}/ready", summary="Model readiness", response_model=Readiness, responses=_META_ERRORS
    )
    async def ready_latest(model_name: Name) -> Response:
        return await model_ready(model_name, None)

    @router.get(
        "/models/{model_name}/versions/{model_version}/ready",
        summary="Model readiness",
        response_model=Readiness,
        responses=_META_ERRORS,
    )
    async def ready_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_ready(model_name, model_version)

    @router.get("/models/{model_name}/config", summary="Model configuration (Triton)", **meta)
    async def config_latest(model_name: Name) -> Response:
        return await model_config(model_name, None)

    @router.get("/models/{model_name}/versions/{model_version}/config", summary="Model configuration", **meta)
    async def config_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_config(model_name, model_version)

    # -- inference -----------------------------------------------------------------------------------------
    async def infer(request: Request, name: str, model_version: int | None) -> Response:
        served = state.resolve(name, model_version)
        with served.use():
            body = await request.body()  # bounded by UploadLimitMiddleware, like every upload
            header = request.headers.get("inference-header-content-length")
            # Parsing millions of elements takes a while: off the event loop, like decoding.
            loop = asyncio.get_running_loop()
            parsed, kind, data = await loop.run_in_executor(
                state.decode_pool, _parse, body, header, served, settings.max_images_per_request
            )
            if kind == TENSOR_INPUT:
                out = await run_tensors(request, state, served, data)  # type: ignore[arg-type]
            else:
                out = await run_encoded(request, state, served, data)  # type: ignore[arg-type]
            try:
                tensors = _outputs(parsed, served, out)
            except ProtocolError as exc:
                raise ServiceError("invalid_request", str(exc)) from None
        payload, header_length = encode_response(served.name, str(served.version), parsed.id, tensors)
        state.metrics.images.labels("/v2/models/{model}/infer").inc(len(out.logits))
        headers = out.timing_headers()
        if header_length is None:
            return Response(payload, media_type="application/json", headers=headers)
        headers["inference-header-content-length"] = str(header_length)
        return Response(payload, media_type="application/octet-stream", headers=headers)

    async def infer_latest(request: Request, model_name: Name) -> Response:
        return await infer(request, model_name, None)

    async def infer_versioned(request: Request, model_name: Name, model_version: Version) -> Response:
        return await infer(request, model_name, model_version)

    infer_doc = {"dependencies": guarded, "openapi_extra": INFER_BODY, "responses": {**INFER_OK, **_INFER_ERRORS}}
    router.add_api_route("/models/{model_name}/infer", infer_latest, methods=["POST"],
                         summary="Inference (JSON or binary tensors)", **infer_doc)  # fmt: skip
    router.add_api_route("/models/{model_name}/versions/{model_version}/infer", infer_versioned, methods=["POST"],
                         summary="Inference on one version", **infer_doc)  # fmt: skip

    # -- repository (Triton's explicit model control) ----------------------------------------------------
    control = {"dependencies": guarded, "responses": _CONTROL_ERRORS}

    def require_control() -> None:
        if not settings.model_control:  # Triton's default mode: the repository is fixed at start-up
            raise ServiceError("model_control_disabled")

    @router.post(
        "/repository/index",
        summary="Every model on disk or served, with its state",
        response_model=list[RepositoryEntry],
        **control,
    )
    async def repository_index(request: Request) -> Response:
        only_ready = (await _control_body(request)).get("ready") is True
        rows = [
            {"name": r.name, "version": r.version, "state": r.state, **({"reason": r.reason} if r.reason else {})}
            for r in registry.index()
            if not only_ready or r.state == "READY"
        ]
        return JSONResponse(rows)

    @router.post(
        "/repository/models/{model_name}/load", summary="Load or reload a model", response_model=Empty, **control
    )
    async def repository_load(request: Request, model_name: Name) -> Response:
        require_control()
        if (await _control_body(request)).get("parameters"):
            raise ServiceError("invalid_request", "load parameters (config or file overrides) are not supported")
        try:
            if settings.model_repository is None:
                if model_name != settings.single_model_name():
                    raise ServiceError("model_not_found", f"unknown model {model_name!r}")
                await registry.load_path(model_name, settings.model_path)
            else:
                await registry.load_from_repository(model_name)
        except (ModelLoadError, OSError, ValueError) as exc:
            # The cause (paths, ONNX Runtime's own message) is for the operator's log, not the client.
            log.error("loading model %r failed: %s", model_name, exc)
            raise ServiceError(
                "model_load_failed",
                f"failed to load {model_name!r} (the server log says why); what was served is unchanged",
            ) from None
        return JSONResponse({})

    @router.post("/repository/models/{model_name}/unload", summary="Unload a model", response_model=Empty, **control)
    async def repository_unload(request: Request, model_name: Name) -> Response:
        require_control()
        await _control_body(request)
        await registry.unload(model_name)
        return JSONResponse({})

    return router
