"""App construction (routes, middleware, handlers) apart from its state, which the lifespan initialises."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .batcher import Batcher
from .errors import install_handlers
from .limits import check_memory, check_spool, memory_limit_bytes, rss_bytes
from .metrics import Metrics
from .middleware import LingeringCloseMiddleware, RequestContextMiddleware, UploadLimitMiddleware
from .page import build_page_router
from .preprocess import configure_pillow
from .routes import build_router
from .runtime import InferenceModel, OrtModel, warm_up
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("service")
# How long a refused upload may keep sending before the server closes on it: enough for a 20 MiB body at
# 32 Mbit/s; the bytes are discarded as they arrive, so a slow sender costs a socket, not memory.
LINGER_SECONDS = 5.0


async def _start(state: ServiceState, model: InferenceModel | None) -> None:
    settings = state.settings
    check_spool(settings)
    if model is None:
        model = await asyncio.to_thread(OrtModel, settings)
    state.model = model
    card = model.card
    if card.warning:
        log.warning("%s", card.warning)
    state.metrics.model_info.labels(
        settings.model_path.stem,
        "1",
        card.variant,
        card.precision,
        model.providers[0],
        card.weights.get("sha256", "?")[:16],
    ).set(1)
    shapes = settings.batch_shapes()
    log.info("warming up batch sizes %s", shapes)
    await asyncio.to_thread(warm_up, model, shapes)
    # After warm-up the model's memory (weights, arenas sized by the largest batch) is what it will stay at.
    check_memory(settings, card.preprocess.input_size, memory_limit_bytes(), rss_bytes())
    state.warmed = True
    state.batcher = Batcher(
        model,
        max_batch=settings.max_batch_size,
        max_queue=settings.max_queue_size,
        max_delay=settings.max_queue_delay_ms / 1000,
        pad_to=shapes if settings.pad_batches else None,
        cut_to=shapes,
        observer=state.metrics.observer(),
    )
    state.batcher.start()
    log.info("ready: %s on %s, max batch %d", card.variant, model.providers, settings.max_batch_size)


def create_app(settings: Settings, model: InferenceModel | None = None) -> FastAPI:
    """The ASGI app. Without `model`, the lifespan loads settings.model_path with ONNX Runtime."""
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
            if state.batcher is not None:
                deadline = state.shutdown_deadline
                left = settings.shutdown_timeout_s if deadline is None else deadline - time.monotonic()
                # Keep a moment of the budget for the 503s of whatever stop() has to give up on.
                if not await state.batcher.stop(timeout=left - 0.1):
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
    app.include_router(build_router(state))
    app.include_router(build_page_router())  # GET /, public and outside the OpenAPI schema
    app.add_middleware(
        UploadLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        max_requests=settings.max_concurrent_requests,
        overloaded=state.overloaded,
        max_buffered=settings.max_buffered_upload_bytes,
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        draining=lambda: state.draining,
        model=lambda: state.model.card.variant if state.model is not None else None,
    )
    # Outermost, so a refused upload's remaining bytes are drained after its metrics are recorded.
    app.add_middleware(LingeringCloseMiddleware, seconds=LINGER_SECONDS, max_bytes=4 * settings.max_upload_bytes)
    return app
