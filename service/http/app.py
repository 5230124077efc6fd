"""App construction (routes, middleware, handlers) apart from its state, which the lifespan initialises."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from imaging import configure_pillow

from ..core.lifecycle import new_state, start, stop
from ..core.request.inference import InferenceModel
from ..core.settings import Settings
from .auth import AuthMiddleware
from .errors import install_handlers
from .middleware import (
    BodyDeadlineMiddleware,
    LingeringCloseMiddleware,
    RequestContextMiddleware,
    UploadLimitMiddleware,
)
from .native.routes import build_router
from .oip.routes import build_oip_router
from .oip.schemas import components as oip_components
from .page import build_page_router
from .routing import RouteTable

# How long a refused upload may keep sending before the server closes on it: enough for a 20 MiB body at
# 32 Mbit/s; the bytes are discarded as they arrive, so a slow sender costs a socket, not memory.
LINGER_SECONDS = 5.0


def _document_oip_bodies(app: FastAPI) -> None:
    """Add the OIP request body's component schemas to the app's OpenAPI document (read raw, not by FastAPI)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(oip_components())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings, model: InferenceModel | None = None) -> FastAPI:
    """The ASGI app. Without `model`, the lifespan loads the repository or settings.model_path with ONNX Runtime."""
    configure_pillow()
    state = new_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await start(state, model)
        try:
            yield
        finally:
            await stop(state)

    app = FastAPI(
        title="ResNeSt inference service",
        version="0.1.0",
        summary="ImageNet top-k classification and pooled embeddings from a ResNeSt, batched on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.service = state
    install_handlers(app)
    routers = [build_router(state), build_oip_router(state), build_page_router()]
    for router in routers:  # the service's own API, the Open Inference Protocol v2, and GET / (the page)
        app.include_router(router)
    _document_oip_bodies(app)
    routes = RouteTable([*app.router.routes, *(route for router in routers for route in router.routes)])
    # Innermost first. A request meets them in the reverse order: its route and id, its key (before any body
    # byte), its body's deadline, then the upload limits.
    app.add_middleware(UploadLimitMiddleware, state=state)
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=state.metrics,
        routes=routes,
        draining=lambda: state.draining,
        model=lambda: state.registry.default_name(),
        tracing=state.tracing,
    )
    # Outermost, so a refused upload's remaining bytes are drained after its metrics are recorded.
    app.add_middleware(LingeringCloseMiddleware, seconds=LINGER_SECONDS, max_bytes=4 * settings.max_upload_bytes)
    return app
