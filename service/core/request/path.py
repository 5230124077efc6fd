"""The request path every protocol shares: the stages of this package, in order, for one request.

A front (HTTP multipart, the OIP over HTTP or gRPC) turns its request into a Call and the way to get its
images (encoded files, or tensors the client preprocessed), resolves the model, and calls `run`: admission,
decoding, batching and inference, each failure mapped to the error table. Postprocessing (postprocess.py) is
the front's last step, since what it answers (top-k, probabilities, embeddings) depends on what was asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ServiceError
from ..logs import AccessRecord
from ..repository.registry import ServedModel
from ..state import ServiceState
from .admission import admit, stopped
from .batching import BatcherStopped, DeadlineExceeded, InferenceFailed
from .decoding import decode_images


@dataclass(frozen=True)
class Outputs:
    """A request's model outputs and where its time went."""

    logits: np.ndarray
    embedding: np.ndarray
    preprocess_ms: float
    queue_ms: float
    inference_ms: float

    def timings(self) -> dict[str, str]:
        """Where the time went, as both fronts send it: HTTP headers, gRPC trailing metadata."""
        return {
            "x-preprocess-time-ms": f"{self.preprocess_ms:.2f}",
            "x-queue-time-ms": f"{self.queue_ms:.2f}",
            "x-inference-time-ms": f"{self.inference_ms:.2f}",
            "server-timing": f"preprocess;dur={self.preprocess_ms:.2f}, queue;dur={self.queue_ms:.2f}, "
            f"inference;dur={self.inference_ms:.2f}",
        }


@dataclass
class Call:
    """One request as the request path sees it, whatever protocol carried it."""

    record: AccessRecord  # arrival time, and where the model, image count and timings go
    deadline: float | None = None  # perf_counter time past which the client no longer waits (gRPC deadlines)
    gone: Callable[[], Awaitable[None]] | None = None  # returns when the client left; None: cancellation tells

    def timeout(self, settings_timeout_s: float) -> float:
        """Seconds left for this request: the service's deadline or the client's own, whichever comes first."""
        now = time.perf_counter()
        left = settings_timeout_s - (now - self.record.started)
        return left if self.deadline is None else min(left, self.deadline - now)


Prepare = Callable[[], Awaitable[list[np.ndarray]]]


async def run(call: Call, state: ServiceState, served: ServedModel, count: int, prepare: Prepare) -> Outputs:
    """Admit `count` images into the model's queue, `prepare` their input tensors (read and decode, or take the
    client's own), batch, and wait for the model. A client that leaves (a disconnect, a cancelled or expired
    gRPC call) is dropped before its images reach the model."""
    record = call.record
    record.images = count  # for the access record, also on failure
    record.model, record.model_version = served.name, served.version
    batcher = served.batcher
    reservation = admit(state.settings, served, count, state.draining)
    started = time.perf_counter()
    try:
        arrays = await prepare()
        ticket = batcher.submit(arrays, timeout=call.timeout(state.settings.request_timeout_s), reservation=reservation)
    except BatcherStopped:
        raise stopped(served, state.draining) from None
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
        raise stopped(served, state.draining, exc) from None
    out = Outputs(logits, embedding, preprocess_ms, (ticket.queue_wait or 0.0) * 1000, ticket.inference_time * 1000)
    record.queue_ms, record.inference_ms = round(out.queue_ms, 2), round(out.inference_ms, 2)
    return out


async def run_encoded(
    call: Call, state: ServiceState, served: ServedModel, read: Callable[[], Awaitable[Sequence[bytes]]], count: int
) -> Outputs:
    """`count` encoded image files, read once admitted (`read`), decoded as the model card says."""
    cfg = served.model.card.preprocess

    async def prepare() -> list[np.ndarray]:
        return await decode_images(state.decode_pool, state.settings, cfg, await read())

    return await run(call, state, served, count, prepare)


async def run_tensors(call: Call, state: ServiceState, served: ServedModel, batch: np.ndarray) -> Outputs:
    """Input tensors a client preprocessed itself, in the model's own input format (float32 [N, 3, S, S], or
    uint8 [N, S, S, 3] for a uint8-nhwc model; checked by the caller)."""
    dtype = np.dtype(served.model.card.preprocess.input_dtype)

    async def prepare() -> list[np.ndarray]:
        return list(np.ascontiguousarray(batch, dtype=dtype))

    return await run(call, state, served, int(batch.shape[0]), prepare)
