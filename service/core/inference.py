"""The request path every protocol shares: admission, decoding off the loop, batching, waiting, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from fastapi import Request, UploadFile

from .batcher import BatcherStopped, DeadlineExceeded, InferenceFailed, QueueFull, Reservation
from .errors import ServiceError
from .preprocess import ImageError, preprocess
from .registry import ServedModel
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


def _stopped(
    state: ServiceState, reason: BatcherStopped | None = None, served: ServedModel | None = None
) -> ServiceError:
    """The answer when the batcher refuses or drops work: shutting down, the model unloaded, or its worker gone."""
    if served is not None and served.unloading and not state.draining:
        return ServiceError("model_unavailable", f"model {served.name!r} version {served.version} was unloaded")
    if state.draining:
        message = f"the server is shutting down: {reason}" if reason and str(reason) else None
        return ServiceError("draining", message)
    return ServiceError("not_ready", "the batch worker stopped" if reason else None)


def check_part_types(images: list[UploadFile]) -> None:
    """Multipart only: a part declared as a non-image type is a 415 before anything is read."""
    for i, upload in enumerate(images):
        declared = (upload.content_type or "").split(";")[0].strip().lower()
        if declared not in ACCEPTED_PART_TYPES:
            raise ServiceError("unsupported_media_type", f"image {i}: content type {declared!r} is not accepted")


def admit(state: ServiceState, served: ServedModel, count: int) -> Reservation:
    """Checks that need no pixel: the image count, then room in the model's queue (429 before decoding)."""
    settings = state.settings
    if count == 0:
        raise ServiceError("invalid_parameter", "the request holds no image")
    if count > settings.max_images_per_request:
        raise ServiceError("too_many_images", f"at most {settings.max_images_per_request} images per request")
    try:
        return served.batcher.reserve(count)
    except QueueFull as exc:
        raise ServiceError("overloaded", headers={"retry-after": str(exc.retry_after)}) from None
    except BatcherStopped:
        raise _stopped(state, served=served) from None


async def decode(state: ServiceState, served: ServedModel, blobs: list[bytes]) -> list[np.ndarray]:
    """Encoded image files -> the model's input tensors, on the decode pool; any failure is that image's 4xx."""
    settings = state.settings
    cfg = served.model.card.preprocess
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(state.decode_pool, preprocess, blob, cfg, settings.max_image_pixels, settings.jpeg_draft)
        for blob in blobs
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


Prepare = Callable[[], Awaitable[list[np.ndarray]]]


async def run(request: Request, state: ServiceState, served: ServedModel, count: int, prepare: Prepare) -> Outputs:
    """The one request path of every protocol: admit `count` images into the model's queue, `prepare` their
    input tensors (read and decode, or take the client's own), batch, and wait, mapping every failure to the
    error table. A client that disconnects is dropped before its images reach the model."""
    # For the access record (RequestContextMiddleware reads them from scope["state"]), also on failure.
    request.state.images = count
    request.state.model, request.state.model_version = served.name, served.version
    batcher = served.batcher
    reservation = admit(state, served, count)
    started = time.perf_counter()
    try:
        arrays = await prepare()
        elapsed = time.perf_counter() - request.state.started
        ticket = batcher.submit(arrays, timeout=state.settings.request_timeout_s - elapsed, reservation=reservation)
    except BatcherStopped:
        raise _stopped(state, served=served) from None
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
        raise _stopped(state, exc, served) from None
    out = Outputs(logits, embedding, preprocess_ms, (ticket.queue_wait or 0.0) * 1000, ticket.inference_time * 1000)
    request.state.queue_ms, request.state.inference_ms = round(out.queue_ms, 2), round(out.inference_ms, 2)
    return out


async def run_uploads(request: Request, state: ServiceState, served: ServedModel, images: list[UploadFile]) -> Outputs:
    """Multipart uploads (/classify, /embed)."""
    check_part_types(images)

    async def prepare() -> list[np.ndarray]:
        return await decode(state, served, [await upload.read() for upload in images])

    return await run(request, state, served, len(images), prepare)


async def run_encoded(request: Request, state: ServiceState, served: ServedModel, blobs: list[bytes]) -> Outputs:
    """Encoded image files from another protocol (an OIP BYTES tensor): decoded exactly as uploads are."""

    async def prepare() -> list[np.ndarray]:
        return await decode(state, served, blobs)

    return await run(request, state, served, len(blobs), prepare)


async def run_tensors(request: Request, state: ServiceState, served: ServedModel, batch: np.ndarray) -> Outputs:
    """Input tensors a client preprocessed itself ([N, 3, S, S] float32, checked by the caller)."""

    async def prepare() -> list[np.ndarray]:
        return list(np.ascontiguousarray(batch, dtype=np.float32))

    return await run(request, state, served, int(batch.shape[0]), prepare)
