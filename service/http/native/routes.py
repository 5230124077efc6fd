"""The HTTP API: /classify, /embed, /explain, /model, /healthz, /readyz, /metrics."""

# No `from __future__ import annotations` here: FastAPI must see the parameter annotations as objects,
# and the limits inside them come from this app's settings, which a string annotation could not reach.

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Query, Request, UploadFile
from starlette.responses import Response

from ...core.errors import ERRORS, ServiceError
from ...core.identifiers import parse_version
from ...core.repository.registry import ServedModel
from ...core.request.explain import check_explainable, chosen_classes, explain_all, overlay_only, requested_classes
from ...core.request.postprocess import l2_normalize, requested_top_k, top_k, top_k_limits
from ...core.state import ServiceState
from ..auth import API_KEY
from ..calls import run_uploads
from ..errors import error_payload
from ..responses import JSONResponse
from ..scope import record_of
from .schemas import ClassifyResponse, EmbedResponse, ErrorResponse, ExplainResponse, Health, ModelInfo, Readiness

# /explain's pictures are the heavy part of its answer (three PNGs per image and class, base64): bounded per request,
# and in size, so one request cannot make the server render and hold hundreds of megabytes.
MAX_PICTURES, MAX_SIDE = 16, 2048
_ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": ", ".join(c for c, k in ERRORS.items() if k.http == status)}
    for status in sorted({k.http for k in ERRORS.values()})
}
Images = Annotated[
    list[UploadFile], File(description="one or more images (JPEG, PNG, GIF, WebP, BMP, TIFF) in upload order")
]
ModelName = Annotated[
    str | None, Query(alias="model", max_length=64, description="which model (default: the only one served)")
]
Version = Annotated[str | None, Query(description="which version of it, 1 to 999999999 (default: the latest served)")]


def build_router(state: ServiceState) -> APIRouter:
    """Routes bound to one app's state (limits in the OpenAPI schema come from its settings)."""
    router = APIRouter()
    _inference_routes(router, state)
    _explain_route(router, state)
    _operator_routes(router, state)
    return router


def model_info(state: ServiceState, served: ServedModel) -> dict[str, Any]:
    """GET /model's answer: what is served, how it was exported and proven, and how it is batched."""
    card = served.model.card
    pre = card.preprocess
    limits = top_k_limits(state.settings, card.num_classes)
    return {
        "name": served.name,
        "version": served.version,
        "versions": sorted(state.registry.models.get(served.name, {})),
        "models": state.registry.names(),
        "memory_bytes": served.memory_bytes,
        "variant": card.variant,
        "precision": card.precision,
        "providers": served.model.providers,
        # What the runtime really does (plain run, IO binding, CUDA graphs) and why an option is off; models
        # without a runtime of their own (injected ones) have none.
        "acceleration": getattr(served.model, "acceleration", None),
        "input_size": pre.input_size,
        "preprocess": {**pre.to_dict(), "crop_size": pre.input_size},
        "embedding_dim": card.embedding_dim,
        "num_classes": card.num_classes,
        "labels_source": card.labels_source,
        "labels": card.labels,
        "outputs": card.outputs,
        # POST /explain needs the feature map output and the classifier's rows (files exported since CAMs).
        "explainable": card.feature_map is not None and getattr(served.model, "head", None) is not None,
        "feature_map": list(card.feature_map) if card.feature_map is not None else None,
        "top_k": {"default": limits[0], "max": limits[1]} if card.has_classifier else None,
        "max_batch_size": served.batching.max_batch_size,
        "weights": card.weights,
        "warning": card.warning,
        "warnings": card.warnings,
        "parity": card.parity,
        "quantization": card.quantization or None,
        "export": card.export,
    }


def _inference_routes(router: APIRouter, state: ServiceState) -> None:
    """POST /classify and /embed: multipart images through the request path."""
    settings = state.settings
    TopK = Annotated[int | None, Query(alias="top_k", ge=1, le=settings.top_k_max, description="predictions per image")]

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERROR_RESPONSES,
        dependencies=API_KEY,
        name="classify",
        summary="Top-k classes for each uploaded image",
    )
    async def classify(
        request: Request,
        images: Images,
        top_k_: TopK = None,
        model_name: ModelName = None,
        version: Version = None,
    ) -> Response:
        served = state.resolve(model_name, parse_version(version))
        with served.use():
            card = served.model.card
            if not card.has_classifier:
                raise ServiceError("no_classifier")  # before any image is decoded
            k = requested_top_k(settings, top_k_, card.num_classes)
            out = await run_uploads(request, state, served, images)
        with state.tracing.stage(record_of(request.scope), "postprocess"):
            predictions = top_k(out.logits, k, card.labels)
        body = {
            "model": card.variant,
            "model_name": served.name,
            "model_version": served.version,
            "results": [{"filename": f.filename, "predictions": p} for f, p in zip(images, predictions, strict=True)],
        }
        state.metrics.images.labels("/classify").inc(len(images))
        return JSONResponse(body, headers=out.timings())

    @router.post(
        "/embed",
        response_model=EmbedResponse,
        responses=_ERROR_RESPONSES,
        dependencies=API_KEY,
        name="embed",
        summary="The pooled embedding of each uploaded image",
    )
    async def embed(
        request: Request,
        images: Images,
        normalize: Annotated[bool, Query(description="scale each embedding to unit L2 norm")] = False,
        model_name: ModelName = None,
        version: Version = None,
    ) -> Response:
        served = state.resolve(model_name, parse_version(version))
        with served.use():
            out = await run_uploads(request, state, served, images)
        with state.tracing.stage(record_of(request.scope), "postprocess"):
            vectors = l2_normalize(out.embedding) if normalize else out.embedding
        body = {
            "model": served.model.card.variant,
            "model_name": served.name,
            "model_version": served.version,
            "dim": int(vectors.shape[1]),
            "normalized": normalize,
            "results": [{"filename": f.filename, "embedding": v} for f, v in zip(images, vectors, strict=True)],
        }
        state.metrics.images.labels("/embed").inc(len(images))
        return JSONResponse(body, headers=out.timings())


def _explain_route(router: APIRouter, state: ServiceState) -> None:
    """POST /explain: class activation maps of the uploaded images, through the same request path."""
    settings = state.settings
    TopK = Annotated[
        int | None,
        Query(alias="top_k", ge=1, le=settings.top_k_max, description="explain each image's k most probable classes "
              "(default 1; ignored when class= names the classes)"),
    ]  # fmt: skip
    Classes = Annotated[
        list[str] | None,
        Query(alias="class", max_length=256, description="a class to explain, by index or exact label (repeatable)"),
    ]
    Format = Annotated[
        Literal["json", "png"],
        Query(alias="format", description="json: every map; png: the overlay itself (one image, one class)"),
    ]
    MaxSide = Annotated[
        int,
        Query(ge=16, le=MAX_SIDE, description="longest side of the map and overlay drawn on the original image"),
    ]
    Pictures = Annotated[bool, Query(description="false: the raw maps only, no PNGs (cheaper)")]

    @router.post(
        "/explain",
        response_model=ExplainResponse,
        responses={**_ERROR_RESPONSES, 200: {"content": {"image/png": {}}}},
        dependencies=API_KEY,
        name="explain",
        summary="Class activation maps: where in each image the model found each class",
    )
    async def explain(
        request: Request,
        images: Images,
        top_k_: TopK = None,
        classes: Classes = None,
        format_: Format = "json",
        max_side: MaxSide = 1024,
        pictures: Pictures = True,
        model_name: ModelName = None,
        version: Version = None,
    ) -> Response:
        served = state.resolve(model_name, parse_version(version))
        with served.use():
            card = served.model.card
            head = check_explainable(card, getattr(served.model, "head", None))  # before any image is decoded
            asked = requested_classes(classes or [], card)
            k = 1 if top_k_ is None else requested_top_k(settings, top_k_, card.num_classes)
            if pictures and len(images) * (len(asked) or k) > MAX_PICTURES:
                raise ServiceError("invalid_parameter", f"at most {MAX_PICTURES} image-class pairs get pictures in "
                                   "one request: ask for fewer classes or images, or pictures=false")  # fmt: skip
            if format_ == "png" and (len(images) != 1 or len(asked) > 1 or (not asked and k != 1)):
                raise ServiceError("invalid_parameter", "query.format: png answers one image and one class; ask "
                                   "for json to explain several")  # fmt: skip
            out = await run_uploads(request, state, served, images, features=True)
        assert out.features is not None
        blobs = []
        for upload in images:  # read again for the pictures: the request path consumed them
            await upload.seek(0)
            blobs.append(await upload.read())
        chosen = chosen_classes(out.logits, asked, k)
        with state.tracing.stage(record_of(request.scope), "postprocess"):
            if format_ == "png":
                loop = asyncio.get_running_loop()
                png = await loop.run_in_executor(state.decode_pool, overlay_only, blobs[0], out.features[0],
                                                 chosen[0][0], card, head, settings, max_side)  # fmt: skip
                state.metrics.images.labels("/explain").inc(1)
                return Response(png, media_type="image/png", headers=out.timings())
            explained = await explain_all(state.decode_pool, blobs, out.features, out.logits, chosen, card, head,
                                          settings, max_side, pictures)  # fmt: skip
        body = {
            "model": card.variant,
            "model_name": served.name,
            "model_version": served.version,
            "feature_map": list(card.feature_map or ()),
            "results": [{"filename": f.filename, "classes": c} for f, c in zip(images, explained, strict=True)],
        }
        state.metrics.images.labels("/explain").inc(len(images))
        return JSONResponse(body, headers=out.timings())


def _operator_routes(router: APIRouter, state: ServiceState) -> None:
    """GET /model, /healthz, /readyz and /metrics: what is served, and whether the process can serve."""

    @router.get("/model", response_model=ModelInfo, responses=_ERROR_RESPONSES, dependencies=API_KEY, name="model_info")
    async def model_info_route(model_name: ModelName = None, version: Version = None) -> Response:
        """What is served: variant, preprocessing, active providers, weights digest, parity report."""
        return JSONResponse(model_info(state, state.resolve(model_name, parse_version(version))))

    @router.get("/healthz", response_model=Health, responses={503: {"model": ErrorResponse}}, name="live")
    async def healthz(request: Request) -> Response:
        """Liveness: 200 while the process can serve; 503 once a batch worker died or inference is stuck."""
        if (failure := state.liveness_failure()) is not None:
            body = error_payload("not_ready", failure, request.state.request_id)
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, name="ready")
    async def readyz() -> Response:
        """Readiness: model loaded and warmed, batch worker alive, not draining."""
        reasons = state.not_ready_reasons()
        state.metrics.ready.set(0 if reasons else 1)
        if reasons:
            return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "reasons": []})

    @router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}}, name="metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        state.metrics.ready.set(0 if state.not_ready_reasons() else 1)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
