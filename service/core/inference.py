"""The request path every protocol shares: admission, decoding off the loop, batching, waiting, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
    args = (cfg, settings.max_image_pixels, settings.jpeg_draft, settings.resize_reducing_gap)
    jobs = [loop.run_in_executor(state.decode_pool, preprocess, blob, *args) for blob in blobs]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, ImageError):
            raise ServiceError(result.code, f"image {i}: {result}")
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


@dataclass
class Call:
    """One request as the request path sees it, whatever protocol carried it."""

    started: float  # time.perf_counter() when it arrived
    record: Any  # where the access record's fields go (attributes: images, model, timings)
    deadline: float | None = None  # perf_counter time past which the client no longer waits (gRPC deadlines)
    gone: Callable[[], Awaitable[None]] | None = None  # returns when the client left; None: cancellation tells

    def timeout(self, settings_timeout_s: float) -> float:
        """Seconds left for this request: the service's deadline or the client's own, whichever comes first."""
        now = time.perf_counter()
        left = settings_timeout_s - (now - self.started)
        return left if self.deadline is None else min(left, self.deadline - now)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def http_call(request: Request) -> Call:
    """An HTTP request as a Call: its arrival time from RequestContextMiddleware, its disconnect as `gone`."""
    return Call(request.state.started, request.state, gone=lambda: _client_gone(request))


Prepare = Callable[[], Awaitable[list[np.ndarray]]]


async def run(call: Call, state: ServiceState, served: ServedModel, count: int, prepare: Prepare) -> Outputs:
    """The one request path of every protocol: admit `count` images into the model's queue, `prepare` their
    input tensors (read and decode, or take the client's own), batch, and wait, mapping every failure to the
    error table. A client that leaves (a disconnect, a cancelled or expired gRPC call) is dropped before its
    images reach the model."""
    record = call.record
    record.images = count  # for the access record, also on failure
    record.model, record.model_version = served.name, served.version
    batcher = served.batcher
    reservation = admit(state, served, count)
    started = time.perf_counter()
    try:
        arrays = await prepare()
        ticket = batcher.submit(arrays, timeout=call.timeout(state.settings.request_timeout_s), reservation=reservation)
    except BatcherStopped:
        raise _stopped(state, served=served) from None
    finally:
        reservation.release()  # a no-op once submit() took it over
    preprocess_ms = (time.perf_counter() - started) * 1000
    record.preprocess_ms = round(preprocess_ms, 2)
    waiter = asyncio.ensure_future(batcher.wait(ticket))
    watcher = asyncio.ensure_future(call.gone()) if call.gone is not None else None
    try:
        await asyncio.wait({waiter} if watcher is None else {waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
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
    record.queue_ms, record.inference_ms = round(out.queue_ms, 2), round(out.inference_ms, 2)
    return out


async def run_uploads(call: Call, state: ServiceState, served: ServedModel, images: list[UploadFile]) -> Outputs:
    """Multipart uploads (/classify, /embed)."""
    check_part_types(images)

    async def prepare() -> list[np.ndarray]:
        return await decode(state, served, [await upload.read() for upload in images])

    return await run(call, state, served, len(images), prepare)


async def run_encoded(call: Call, state: ServiceState, served: ServedModel, blobs: list[bytes]) -> Outputs:
    """Encoded image files from another protocol (an OIP BYTES tensor): decoded exactly as uploads are."""

    async def prepare() -> list[np.ndarray]:
        return await decode(state, served, blobs)

    return await run(call, state, served, len(blobs), prepare)


async def run_tensors(call: Call, state: ServiceState, served: ServedModel, batch: np.ndarray) -> Outputs:
    """Input tensors a client preprocessed itself, in the model's own input format (float32 [N, 3, S, S], or
    uint8 [N, S, S, 3] for a uint8-nhwc model; checked by the caller)."""
    dtype = np.dtype(served.model.card.preprocess.input_dtype)

    async def prepare() -> list[np.ndarray]:
        return list(np.ascontiguousarray(batch, dtype=dtype))

    return await run(call, state, served, int(batch.shape[0]), prepare)
