"""The request path shared by /classify and /embed: read uploads, preprocess off the loop, batch, wait."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from fastapi import Request, UploadFile

from .batcher import BatcherStopped, DeadlineExceeded, InferenceFailed, QueueFull, Reservation
from .errors import ServiceError
from .preprocess import ImageError, preprocess
from .state import ServiceState

# Declared part types we try to decode; anything else (text/plain, image/svg+xml, ...) is a 415.
ACCEPTED_PART_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/gif", "image/webp", "image/bmp",
     "image/x-ms-bmp", "image/tiff", "application/octet-stream", ""}
)  # fmt: skip


@dataclass(frozen=True)
class Outputs:
    """A request's model outputs and where its time went."""

    logits: np.ndarray
    embedding: np.ndarray
    preprocess_ms: float
    queue_ms: float
    inference_ms: float

    def timing_headers(self) -> dict[str, str]:
        return {
            "x-preprocess-time-ms": f"{self.preprocess_ms:.2f}",
            "x-queue-time-ms": f"{self.queue_ms:.2f}",
            "x-inference-time-ms": f"{self.inference_ms:.2f}",
            "server-timing": f"preprocess;dur={self.preprocess_ms:.2f}, queue;dur={self.queue_ms:.2f}, "
            f"inference;dur={self.inference_ms:.2f}",
        }


def _ensure_ready(state: ServiceState) -> None:
    if state.model is None or not state.warmed or state.batcher is None:
        raise ServiceError("not_ready", "the model is still loading; retry shortly", {"retry-after": "1"})


def _stopped(state: ServiceState, reason: BatcherStopped | None = None) -> ServiceError:
    """The answer when the batcher refuses or drops work: shutting down, or its worker is gone."""
    if state.draining:
        message = f"the server is shutting down: {reason}" if reason and str(reason) else None
        return ServiceError("draining", message)
    return ServiceError("not_ready", "the batch worker stopped" if reason else None)


def _admit(state: ServiceState, images: list[UploadFile]) -> Reservation:
    """Checks that need no pixel: image count, declared part types, then room in the queue."""
    settings = state.settings
    if len(images) > settings.max_images_per_request:
        raise ServiceError("too_many_images", f"at most {settings.max_images_per_request} images per request")
    for i, upload in enumerate(images):
        declared = (upload.content_type or "").split(";")[0].strip().lower()
        if declared not in ACCEPTED_PART_TYPES:
            raise ServiceError("unsupported_media_type", f"image {i}: content type {declared!r} is not accepted")
    assert state.batcher is not None
    try:
        return state.batcher.reserve(len(images))
    except QueueFull as exc:
        raise ServiceError("overloaded", headers={"retry-after": str(exc.retry_after)}) from None
    except BatcherStopped:
        raise _stopped(state) from None


async def _decode_all(state: ServiceState, images: list[UploadFile]) -> list[np.ndarray]:
    settings = state.settings
    datas = [await upload.read() for upload in images]
    assert state.model is not None
    cfg = state.model.card.preprocess
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(state.decode_pool, preprocess, data, cfg, settings.max_image_pixels, settings.jpeg_draft)
        for data in datas
    ]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, ImageError):
            raise ServiceError(result.code, f"image {i}: {result}")
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_images(request: Request, state: ServiceState, images: list[UploadFile]) -> Outputs:
    """Preprocess and infer a request's images, mapping every failure to the error table."""
    # For the access record (RequestContextMiddleware reads them from scope["state"]), also on failure.
    request.state.images = len(images)
    _ensure_ready(state)
    batcher = state.batcher
    assert batcher is not None
    reservation = _admit(state, images)
    started = time.perf_counter()
    try:
        arrays = await _decode_all(state, images)
        elapsed = time.perf_counter() - request.state.started
        ticket = batcher.submit(arrays, timeout=state.settings.request_timeout_s - elapsed, reservation=reservation)
    except BatcherStopped:
        raise _stopped(state) from None
    finally:
        reservation.release()  # a no-op once submit() took it over
    preprocess_ms = (time.perf_counter() - started) * 1000
    request.state.preprocess_ms = round(preprocess_ms, 2)
    waiter = asyncio.ensure_future(batcher.wait(ticket))
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not waiter.done():
            batcher.cancel(ticket)  # the client left (or we are cancelled): its images never reach the model
            waiter.cancel()
    if not waiter.done() or waiter.cancelled():
        raise ServiceError("client_closed_request")
    try:
        logits, embedding = waiter.result()
    except DeadlineExceeded:
        raise ServiceError("deadline_exceeded") from None
    except InferenceFailed:
        raise ServiceError("internal_error") from None
    except BatcherStopped as exc:
        raise _stopped(state, exc) from None
    out = Outputs(logits, embedding, preprocess_ms, (ticket.queue_wait or 0.0) * 1000, ticket.inference_time * 1000)
    request.state.queue_ms, request.state.inference_ms = round(out.queue_ms, 2), round(out.inference_ms, 2)
    return out
