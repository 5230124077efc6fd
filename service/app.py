"""App construction (routes, middleware, handlers) apart from its state, which the lifespan initialises."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .core.errors import install_handlers
from .core.limits import check_memory, check_spool, memory_limit_bytes, rss_bytes
from .core.metrics import Metrics
from .core.preprocess import configure_pillow
from .core.repository import RepositoryError, scan
from .core.runtime import InferenceModel, ModelLoadError
from .core.settings import Settings
from .core.state import ServiceState
from .native.routes import build_router
from .oip.routes import build_oip_router
from .oip.schemas import components as oip_components
from .page import build_page_router
from .web.auth import AuthMiddleware
from .web.middleware import (
    BodyDeadlineMiddleware,
    LingeringCloseMiddleware,
    RequestContextMiddleware,
    UploadLimitMiddleware,
)
from .web.routing import RouteTable

log = logging.getLogger("service")
# How long a refused upload may keep sending before the server closes on it: enough for a 20 MiB body at
# 32 Mbit/s; the bytes are discarded as they arrive, so a slow sender costs a socket, not memory.
LINGER_SECONDS = 5.0


async def _start(state: ServiceState, model: InferenceModel | None) -> None:
    """Load every configured model (a repository's, the one file, or an injected model), then check limits."""
    settings = state.settings
    registry = state.registry
    check_spool(settings)
    if model is not None:
        await registry.add(settings.single_model_name(), model)
    elif settings.model_repository is not None:
        entries = scan(settings.model_repository)
        broken = {name: str(e) for name, e in entries.items() if isinstance(e, RepositoryError)}
        if broken:  # as Triton's strict start: an operator learns of a broken model now, not from clients
            raise ModelLoadError("; ".join(f"{name}: {why}" for name, why in broken.items()))
        if not entries:
            raise ModelLoadError(f"the model repository {settings.model_repository} holds no model folder")
        for entry in entries.values():
            await registry.load(entry)  # type: ignore[arg-type]
    else:
        await registry.load_path(settings.single_model_name(), settings.model_path)
    if settings.default_model and settings.default_model not in registry.models:
        raise ModelLoadError(f"RESNEST_DEFAULT_MODEL {settings.default_model!r} is not among {registry.names()}")
    # After warm-up the models' memory (weights, arenas sized by the largest batch) is what it will stay at.
    largest_input = max(s.model.card.preprocess.input_size for s in registry.all())
    check_memory(settings, largest_input, memory_limit_bytes(), rss_bytes(), versions=len(registry.all()))
    state.started = True
    for served in registry.all():
        log.info("ready: %s version %d (%s) on %s, max batch %d", served.name, served.version,
                 served.model.card.variant, served.model.providers, settings.max_batch_size)  # fmt: skip


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
    metrics = Metrics()
    state = ServiceState(
        settings=settings,
        metrics=metrics,
        decode_pool=ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode"),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _start(state, model)  # errors here abort start-up: a process that cannot serve should not run
        try:
            yield
        finally:
            state.draining = True
            deadline = state.shutdown_deadline
            left = settings.shutdown_timeout_s if deadline is None else deadline - time.monotonic()
            # Keep a moment of the budget for the 503s of whatever stop() has to give up on.
            if not await state.registry.stop_all(timeout=left - 0.1):
                state.shutdown_timed_out = True
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            log.info("stopped")

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
    app.add_middleware(
        UploadLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        overloaded=state.overloaded,
        budget=state.uploads,
    )
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=settings.body_timeout_s, min_rate=settings.body_min_rate)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        routes=routes,
        draining=lambda: state.draining,
        model=lambda: state.registry.default_name(),
    )
    # Outermost, so a refused upload's remaining bytes are drained after its metrics are recorded.
    app.add_middleware(LingeringCloseMiddleware, seconds=LINGER_SECONDS, max_bytes=4 * settings.max_upload_bytes)
    return app
