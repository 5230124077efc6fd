"""The Open Inference Protocol v2 over HTTP (KServe v2, Triton's HTTP API), with Triton's extensions: binary
tensors, classification, model configuration and explicit model control.

What models take and give, and how inference runs, is service/core/oip/protocol.py's, shared with the gRPC
front; this module owns the routes and their OpenAPI description, codec.py the HTTP wire.
"""

# No `from __future__ import annotations` here: FastAPI must see the parameter annotations as objects.

import asyncio
from functools import partial
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from ...core.errors import ServiceError
from ...core.identifiers import parse_version
from ...core.oip import protocol
from ...core.state import ServiceState
from ..auth import API_KEY, CONTROL_KEY
from ..calls import http_call
from ..responses import JSONResponse
from .codec import encode_response, parse_request
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


Name = Annotated[str, Path(max_length=64, description="the model's name")]
Version = Annotated[str, Path(description="the model version, 1 to 999999999")]


def build_oip_router(state: ServiceState) -> APIRouter:
    """The /v2 routes over this app's registry."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
    _health_routes(router, state)
    _model_routes(router, state)
    _infer_routes(router, state)
    _repository_routes(router, state)
    return router


def _health_routes(router: APIRouter, state: ServiceState) -> None:
    """Server metadata, liveness and readiness: open, as probes are."""

    @router.get("", summary="Server metadata", response_model=ServerMetadata, name="server_metadata")
    async def server_metadata() -> Response:
        return JSONResponse(protocol.server_metadata())

    @router.get(
        "/health/live",
        name="live",
        summary="Server liveness (200 while the process can serve)",
        response_model=Live,
        responses=error_responses(503),
    )
    async def live() -> Response:
        if (failure := state.liveness_failure()) is not None:
            raise ServiceError("not_ready", failure)
        return JSONResponse({"live": True})

    @router.get(
        "/health/ready",
        name="ready",
        summary="Server readiness (200 when every loaded model is ready)",
        response_model=Readiness,
        responses=error_responses(503),
    )
    async def ready() -> Response:
        reasons = state.not_ready_reasons()
        if reasons:
            raise ServiceError("draining" if state.draining else "not_ready", "; ".join(reasons))
        return JSONResponse({"ready": True})


def _model_routes(router: APIRouter, state: ServiceState) -> None:
    """A model's metadata, readiness and configuration, each with and without /versions/{v}, as the protocol
    has them."""

    async def model_metadata(name: str, model_version: str | None) -> Response:
        return JSONResponse(protocol.model_metadata(state, state.resolve(name, parse_version(model_version))))

    async def model_ready(name: str, model_version: str | None) -> Response:
        served = state.resolve(name, parse_version(model_version))
        protocol.require_ready(served)
        return JSONResponse({"name": served.name, "version": str(served.version), "ready": True})

    async def model_config(name: str, model_version: str | None) -> Response:
        return JSONResponse(protocol.model_config(state, state.resolve(name, parse_version(model_version))))

    meta = {"responses": _META_ERRORS, "dependencies": API_KEY, "name": "model_metadata"}
    config = {**meta, "name": "model_config"}
    # Readiness is a probe, open like the health routes.
    ready = {"responses": _META_ERRORS, "response_model": Readiness, "name": "model_ready"}

    @router.get("/models/{model_name}", summary="Model metadata", response_model=ModelMetadata, **meta)
    async def metadata_latest(model_name: Name) -> Response:
        return await model_metadata(model_name, None)

    @router.get(
        "/models/{model_name}/versions/{model_version}", summary="Model metadata", response_model=ModelMetadata, **meta
    )
    async def metadata_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_metadata(model_name, model_version)

    @router.get("/models/{model_name}/ready", summary="Model readiness", **ready)
    async def ready_latest(model_name: Name) -> Response:
        return await model_ready(model_name, None)

    @router.get("/models/{model_name}/versions/{model_version}/ready", summary="Model readiness", **ready)
    async def ready_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_ready(model_name, model_version)

    @router.get("/models/{model_name}/config", summary="Model configuration (Triton)", **config)
    async def config_latest(model_name: Name) -> Response:
        return await model_config(model_name, None)

    @router.get("/models/{model_name}/versions/{model_version}/config", summary="Model configuration", **config)
    async def config_versioned(model_name: Name, model_version: Version) -> Response:
        return await model_config(model_name, model_version)


def _infer_routes(router: APIRouter, state: ServiceState) -> None:
    """Inference, JSON or binary tensors, through the request path."""
    limit = state.settings.max_images_per_request

    async def infer(request: Request, name: str, model_version: str | None) -> Response:
        served = state.resolve(name, parse_version(model_version))
        with served.use():
            body = await request.body()  # bounded by UploadLimitMiddleware, like every upload
            header = request.headers.get("inference-header-content-length")
            parse = partial(parse_request, body, header)
            # Parsing millions of elements takes a while: off the event loop, like decoding.
            loop = asyncio.get_running_loop()
            parsed, kind, data = await loop.run_in_executor(state.decode_pool, protocol.read_request, parse, served,
                                                            limit)  # fmt: skip
            tensors, out = await protocol.infer(http_call(request), state, served, parsed, kind, data)
        payload, header_length = encode_response(served.name, str(served.version), parsed.id, tensors,
                                                 out.parameters())  # fmt: skip
        state.metrics.images.labels("/v2/models/{model}/infer").inc(len(out.logits))
        headers = out.timings()
        if header_length is None:
            return Response(payload, media_type="application/json", headers=headers)
        headers["inference-header-content-length"] = str(header_length)
        return Response(payload, media_type="application/octet-stream", headers=headers)

    async def infer_latest(request: Request, model_name: Name) -> Response:
        return await infer(request, model_name, None)

    async def infer_versioned(request: Request, model_name: Name, model_version: Version) -> Response:
        return await infer(request, model_name, model_version)

    infer_doc = {"dependencies": API_KEY, "openapi_extra": INFER_BODY, "responses": {**INFER_OK, **_INFER_ERRORS},
                 "name": "model_infer"}  # fmt: skip
    router.add_api_route("/models/{model_name}/infer", infer_latest, methods=["POST"],
                         summary="Inference (JSON or binary tensors)", **infer_doc)  # fmt: skip
    router.add_api_route("/models/{model_name}/versions/{model_version}/infer", infer_versioned, methods=["POST"],
                         summary="Inference on one version", **infer_doc)  # fmt: skip


def _repository_routes(router: APIRouter, state: ServiceState) -> None:
    """Triton's explicit model control: the index (API key), load and unload (the control key)."""
    control = {"dependencies": CONTROL_KEY, "responses": _CONTROL_ERRORS}

    @router.post(
        "/repository/index",
        summary="Every model on disk or served, with its state",
        response_model=list[RepositoryEntry],
        name="repository_index",
        responses=_CONTROL_ERRORS,
        dependencies=API_KEY,
    )
    async def repository_index(request: Request) -> Response:
        only_ready = (await _control_body(request)).get("ready") is True
        return JSONResponse(protocol.repository_index(state, only_ready))

    @router.post(
        "/repository/models/{model_name}/load",
        summary="Load or reload a model",
        response_model=Empty,
        name="repository_load",
        **control,
    )
    async def repository_load(request: Request, model_name: Name) -> Response:
        protocol.require_control(state)
        await protocol.load_model(state, model_name, bool((await _control_body(request)).get("parameters")))
        return JSONResponse({})

    @router.post(
        "/repository/models/{model_name}/unload",
        summary="Unload a model",
        response_model=Empty,
        name="repository_unload",
        **control,
    )
    async def repository_unload(request: Request, model_name: Name) -> Response:
        protocol.require_control(state)
        await _control_body(request)
        await protocol.unload_model(state, model_name)
        return JSONResponse({})
