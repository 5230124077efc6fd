"""The request path every protocol shares: the stages of this package, in order, for one request.

A front (HTTP multipart, the OIP over HTTP or gRPC) turns its request into a Call and the way to get its
images (encoded files, or tensors the client preprocessed), resolves the model, and calls `run`: admission,
decoding (or the response cache, where it holds the image), batching and inference, each failure mapped to
the error table, each stage a span of the request's trace when tracing is on. Postprocessing
(postprocess.py) is the front's last step, since what it answers (top-k, probabilities, embeddings) depends
on what was asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..cache import Entry, file_keys, key_prefix, tensor_keys
from ..errors import ServiceError
from ..logs import AccessRecord
from ..repository.registry import ServedModel
from ..state import ServiceState
from .admission import admit, stopped
from .batching import BatcherStopped, DeadlineExceeded, InferenceFailed, Ticket
from .decoding import decode_images


@dataclass(frozen=True)
class Outputs:
    """A request's model outputs and where its time went."""

    logits: np.ndarray
    embedding: np.ndarray
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    cache: str | None = None  # "hit": every image came from the response cache; "miss"; None: no cache
    features: np.ndarray | None = None  # the last feature map (N, C, h, w), only where the request asked

    def parameters(self) -> dict[str, str]:
        """The OIP response's parameters: whether the response cache answered, when there is one."""
        return {} if self.cache is None else {"cache": self.cache}

    def timings(self) -> dict[str, str]:
        """Where the time went (and whether the cache answered), as both fronts send it: HTTP headers, gRPC
        trailing metadata."""
        cache = {} if self.cache is None else {"x-cache": self.cache}
        return {
            **cache,
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


class Inputs:
    """A request's images as read: what keys them in the response cache, and how they become input tensors."""

    def keys(self, prefix: str) -> list[str]:
        raise NotImplementedError

    async def tensors(self, state: ServiceState, served: ServedModel, rows: list[int]) -> list[np.ndarray]:
        raise NotImplementedError


@dataclass
class EncodedFiles(Inputs):
    """Encoded image files, decoded as the model card says."""

    files: Sequence[bytes]

    def keys(self, prefix: str) -> list[str]:
        return file_keys(prefix, self.files)

    async def tensors(self, state: ServiceState, served: ServedModel, rows: list[int]) -> list[np.ndarray]:
        cfg = served.model.card.preprocess
        return await decode_images(state.decode_pool, state.settings, cfg, [self.files[i] for i in rows])


@dataclass
class ClientTensors(Inputs):
    """Input tensors a client preprocessed itself, in the model's own input format (float32 [N, 3, S, S], or
    uint8 [N, S, S, 3] for a uint8-nhwc model; checked by the caller)."""

    batch: np.ndarray

    def keys(self, prefix: str) -> list[str]:
        return tensor_keys(prefix, self.batch)

    async def tensors(self, state: ServiceState, served: ServedModel, rows: list[int]) -> list[np.ndarray]:
        return list(self.batch[rows])


Read = Callable[[], Awaitable[Inputs]]


async def run(
    call: Call, state: ServiceState, served: ServedModel, count: int, read: Read, features: bool = False
) -> Outputs:
    """Admit `count` images into the model's queue, `read` them, take what the response cache holds and make
    input tensors of the rest (decode, or the client's own), batch, and wait for the model. A client that
    leaves (a disconnect, a cancelled or expired gRPC call) is dropped before its images reach the model.

    `features`: the answer needs the last feature map too (class activation maps; the caller checked that the
    model has one); the response cache, which holds no feature maps, is passed by."""
    record, tracing = call.record, state.tracing
    cache = None if features else state.cache
    record.images = count  # for the access record, also on failure
    record.model, record.model_version = served.name, served.version
    batcher = served.batcher
    with tracing.stage(record, "admission"):
        reservation = admit(state.settings, served, count, state.draining)
    started = time.perf_counter()
    cached: list[Entry | None] = [None] * count
    keys: list[str] = []
    ticket: Ticket | None = None
    submitted_ns = 0
    try:
        with tracing.stage(record, "decode"):
            inputs = await read()
            if cache is not None:
                keys = inputs.keys(key_prefix(served))
                cached = await cache.lookup(served.name, keys)
            missing = [i for i, entry in enumerate(cached) if entry is None]
            arrays = await inputs.tensors(state, served, missing) if missing else []
        if arrays:
            timeout = call.timeout(state.settings.request_timeout_s)
            ticket = batcher.submit(arrays, timeout=timeout, reservation=reservation, trace=tracing.context_of(record),
                                    features=features)  # fmt: skip
            submitted_ns = time.time_ns() if record.span is not None else 0
    except BatcherStopped:
        raise stopped(served, state.draining) from None
    finally:
        reservation.release()  # a no-op once submit() took it over
    preprocess_ms = (time.perf_counter() - started) * 1000
    record.preprocess_ms = round(preprocess_ms, 2)
    if cache is not None:
        record.cache = "miss" if missing else "hit"
    if ticket is None:  # every image came from the cache: the model never saw this request
        logits = np.stack([entry.logits for entry in cached if entry is not None])
        embedding = np.stack([entry.embedding for entry in cached if entry is not None])
        return Outputs(logits, embedding, preprocess_ms, 0.0, 0.0, record.cache)
    logits, embedding = await _wait(call, served, state, ticket)
    if record.span is not None:
        tracing.span_between(record, "queue", submitted_ns, ticket.first_batch_ns)
        tracing.span_between(record, "inference", ticket.first_batch_ns, ticket.last_batch_ns,
                             links=ticket.batch_spans, **{"resnest.batches": ticket.batches})  # fmt: skip
    if cache is not None:
        await cache.store_outputs([keys[i] for i in missing], logits, embedding)
        if len(missing) < count:  # some images came from the cache: the answer holds all of them, in order
            logits, embedding = _merge(cached, missing, logits, embedding)
    out = Outputs(logits, embedding, preprocess_ms, (ticket.queue_wait or 0.0) * 1000, ticket.inference_time * 1000,
                  record.cache, ticket.feature_maps)  # fmt: skip
    record.queue_ms, record.inference_ms = round(out.queue_ms, 2), round(out.inference_ms, 2)
    return out


async def _wait(call: Call, served: ServedModel, state: ServiceState, ticket: Ticket) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs for the ticket's images, or the request's error; the ticket is dropped if the
    client leaves first."""
    batcher = served.batcher
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
        return waiter.result()
    except DeadlineExceeded:
        raise ServiceError("deadline_exceeded") from None
    except InferenceFailed:
        raise ServiceError("internal_error") from None
    except BatcherStopped as exc:
        raise stopped(served, state.draining, exc) from None


def _merge(
    cached: list[Entry | None], missing: list[int], logits: np.ndarray, embedding: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The request's outputs in image order: the model's rows for `missing`, the cache's for the others."""
    all_logits = np.empty((len(cached), logits.shape[1]), dtype=np.float32)
    all_embedding = np.empty((len(cached), embedding.shape[1]), dtype=np.float32)
    all_logits[missing], all_embedding[missing] = logits, embedding
    for i, entry in enumerate(cached):
        if entry is not None:
            all_logits[i], all_embedding[i] = entry.logits, entry.embedding
    return all_logits, all_embedding


async def run_encoded(
    call: Call,
    state: ServiceState,
    served: ServedModel,
    read: Callable[[], Awaitable[Sequence[bytes]]],
    count: int,
    features: bool = False,
) -> Outputs:
    """`count` encoded image files, read once admitted (`read`), decoded as the model card says."""

    async def inputs() -> Inputs:
        return EncodedFiles(await read())

    return await run(call, state, served, count, inputs, features)


async def run_tensors(
    call: Call, state: ServiceState, served: ServedModel, batch: np.ndarray, features: bool = False
) -> Outputs:
    """Input tensors a client preprocessed itself, in the model's own input format (checked by the caller)."""
    dtype = np.dtype(served.model.card.preprocess.input_dtype)
    tensors = ClientTensors(np.ascontiguousarray(batch, dtype=dtype))

    async def inputs() -> Inputs:
        return tensors

    return await run(call, state, served, int(batch.shape[0]), inputs, features)
