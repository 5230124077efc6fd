"""Dynamic batching: one task owns a bounded queue of images and feeds the model batch after batch.

Batch size counts images, not requests, so a request with several images may span batches, and /classify
and /embed share batches (one forward yields both outputs); a batch holding a request that asks for the
feature map (/explain) fetches it too, for every image of that batch, and only then. Work queued while a
batch runs goes out as soon as that batch returns; `max_delay` is waited only when the worker was idle, to
let a batch fill. Inference runs on one dedicated thread so the event loop keeps answering (health checks included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..threads import named_pool
from .inference import InferenceModel, stack

if TYPE_CHECKING:
    from ..tracing import Tracing

log = logging.getLogger("service.batcher")


class QueueFull(Exception):
    """No room for the request's images: answer 429 with Retry-After."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before all its images were inferred."""


class BatcherStopped(Exception):
    """The batcher is closed (draining), its worker died, or shutdown ran out of time for this request."""


class InferenceFailed(Exception):
    """The model raised on a batch holding this request's images."""


@dataclass(eq=False)
class Ticket:
    """One request's images in flight; its future resolves once every image has its outputs."""

    size: int
    submitted: float
    deadline: float
    future: asyncio.Future[None]
    remaining: int = 0
    logits: np.ndarray | None = None
    embedding: np.ndarray | None = None
    queue_wait: float | None = None  # submit -> start of its first batch
    inference_time: float = 0.0  # summed over the batches it took part in
    batches: int = 0
    features: bool = False  # the request needs the last feature map (class activation maps)
    feature_maps: np.ndarray | None = None
    # Tracing only (None or 0 otherwise): the request span's context, for its batches to link to; the wall
    # clock (ns) at the start of its first batch and the end of its last; the spans of those batches.
    trace: Any = None
    first_batch_ns: int = 0
    last_batch_ns: int = 0
    batch_spans: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class Reservation:
    """Room for `size` images held for a request while it decodes; released on submit or on failure."""

    batcher: Batcher
    size: int
    active: bool = True

    def release(self) -> None:
        if self.active:
            self.active = False
            self.batcher._reserved -= self.size


@dataclass(eq=False)
class _Item:
    ticket: Ticket
    index: int
    array: np.ndarray


@dataclass
class BatchObserver:
    """Callbacks for metrics; all optional."""

    on_batch: Callable[[int, int, float], None] = lambda images, padded, seconds: None
    on_queue_depth: Callable[[int], None] = lambda depth: None
    on_queue_wait: Callable[[float], None] = lambda seconds: None


@dataclass
class Batcher:
    """The single owner of the image queue and of the model."""

    model: InferenceModel
    max_batch: int
    max_queue: int
    max_delay: float = 0.0
    pad_to: Sequence[int] | None = None  # pad each batch up to the smallest of these sizes that holds it
    cut_to: Sequence[int] | None = None  # or run only the largest of these sizes that the queue fills
    observer: BatchObserver = field(default_factory=BatchObserver)
    tracing: Tracing | None = None  # set only when tracing is on: a span per batch that served a traced request
    labels: dict[str, Any] = field(default_factory=dict)  # the batch span's attributes (model, version)

    def __post_init__(self) -> None:
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._executor = named_pool(1, "inference")
        self._running_since: float | None = None
        self._call: Future[tuple[np.ndarray, np.ndarray]] | None = None  # the model call on the thread
        self._inflight: list[Ticket] = []  # tickets of the batch being run
        self._seconds_per_image = 0.05  # EWMA, for Retry-After
        self._reserved = 0  # images admitted and still decoding: they count against max_queue
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._guarded(), name="batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A model call is running on the inference thread (even if the worker gave up waiting for it)."""
        return self._call is not None and not self._call.done()

    def stalled_for(self) -> float:
        """Seconds the current batch has been running (0 when idle)."""
        since = self._running_since
        return 0.0 if since is None else asyncio.get_running_loop().time() - since

    async def stop(self, timeout: float) -> bool:
        """Refuse new work, finish what is queued (up to `timeout`), then release the thread.

        Past `timeout` every request still queued or inside the model fails with BatcherStopped, so its
        client is answered rather than left waiting. Returns whether everything finished in time.
        """
        self._closed = True
        self._wake.set()
        finished = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), max(timeout, 0.0))
            except TimeoutError:
                finished = False
                self._task.cancel()
                self.abort("shutdown timed out before this request was inferred")
            except Exception:
                pass  # the worker's death was logged where it happened
        self._executor.shutdown(wait=False, cancel_futures=True)
        return finished

    def abort(self, reason: str) -> int:
        """Close, and fail every request still queued or in the running batch; returns how many there were."""
        self._closed = True
        self._wake.set()
        pending = {item.ticket for item in self._queue} | set(self._inflight)
        failed = 0
        for ticket in pending:
            if not ticket.future.done():
                ticket.future.set_exception(BatcherStopped(reason))
                failed += 1
        self._queue.clear()
        self.observer.on_queue_depth(0)
        return failed

    # -- requests ----------------------------------------------------------------------------------------
    def retry_after(self, images_ahead: int) -> int:
        """Whole seconds until `images_ahead` queued images have likely been inferred (at least 1)."""
        batches = math.ceil(images_ahead / self.max_batch)
        return max(1, math.ceil(batches * self.max_batch * self._seconds_per_image))

    def full(self) -> bool:
        """No room for even one more image."""
        return len(self._queue) + self._reserved >= self.max_queue

    def reserve(self, size: int) -> Reservation:
        """Admit a request's images before they are decoded, or raise QueueFull / BatcherStopped.

        Images being decoded count against `max_queue` with the queued ones, so a flood is refused before
        any upload is decoded, and 429s come back in the time it takes to read the headers.
        """
        if self._closed or not self.alive:
            raise BatcherStopped("not accepting work")
        ahead = len(self._queue) + self._reserved + size
        if ahead > self.max_queue:
            raise QueueFull(self.retry_after(ahead))
        self._reserved += size
        return Reservation(self, size)

    def submit(
        self,
        arrays: Sequence[np.ndarray],
        timeout: float,
        reservation: Reservation | None = None,
        trace: Any = None,
        features: bool = False,
    ) -> Ticket:
        """Queue a request's images at once (into its reservation, if it holds one), or raise QueueFull /
        BatcherStopped without queueing any. `trace`: the request span's context, when it is traced;
        `features`: the request needs the feature map too (ticket.feature_maps once answered)."""
        if reservation is not None:
            reservation.release()
        if self._closed or not self.alive:
            raise BatcherStopped("not accepting work")
        if reservation is None and len(self._queue) + self._reserved + len(arrays) > self.max_queue:
            raise QueueFull(self.retry_after(len(self._queue) + self._reserved + len(arrays)))
        loop = asyncio.get_running_loop()
        now = loop.time()
        ticket = Ticket(len(arrays), now, now + timeout, loop.create_future(), remaining=len(arrays), trace=trace,
                        features=features)  # fmt: skip
        self._queue.extend(_Item(ticket, i, a) for i, a in enumerate(arrays))
        self.observer.on_queue_depth(len(self._queue))
        self._wake.set()
        return ticket

    async def wait(self, ticket: Ticket) -> tuple[np.ndarray, np.ndarray]:
        """The request's (logits, embedding); DeadlineExceeded, InferenceFailed or BatcherStopped otherwise.

        If the caller is cancelled (client gone) or the deadline passes, its queued images are dropped.
        """
        timeout = ticket.deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(ticket.future, max(timeout, 0.0))
        except TimeoutError:
            self.cancel(ticket)
            raise DeadlineExceeded from None
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise
        assert ticket.logits is not None and ticket.embedding is not None
        return ticket.logits, ticket.embedding

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request at once: its queued images never reach the model."""
        if not ticket.future.done():
            ticket.future.cancel()
        self._queue = deque(item for item in self._queue if item.ticket is not ticket)
        self.observer.on_queue_depth(len(self._queue))

    # -- the worker --------------------------------------------------------------------------------------
    async def _guarded(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.critical("the batch worker died; readiness is now false", exc_info=True)
            self.error = exc
            self._fail_all(BatcherStopped("batch worker died"))
            for ticket in self._inflight:
                if not ticket.future.done():
                    ticket.future.set_exception(BatcherStopped("batch worker died"))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        idle = True  # the worker found nothing to do after its last batch (or has not run one yet)
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                idle = True
            if idle and self.max_delay > 0 and self._queue:
                # Only an idle worker waits, and only up to `max_delay` after the first image arrived.
                await self._fill(self._queue[0].ticket.submitted + self.max_delay)
            items = self._take(loop.time())
            if items:
                await self._run(items)
            idle = not self._queue

    async def _fill(self, until: float) -> None:
        """Idle worker, first image in: wait up to `until` for a full batch."""
        loop = asyncio.get_running_loop()
        while len(self._queue) < self.max_batch and not self._closed:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, now: float) -> list[_Item]:
        items: list[_Item] = []
        while self._queue and len(items) < self.max_batch:
            item = self._queue.popleft()
            ticket = item.ticket
            if ticket.future.done():
                continue  # cancelled, timed out or failed: its images are not worth a forward
            if now > ticket.deadline:
                ticket.future.set_exception(DeadlineExceeded())
                continue
            items.append(item)
        if self.cut_to and not self.pad_to and items:
            # Run the largest warmed shape the queue fills; the rest goes first into the next batch.
            keep = max((b for b in self.cut_to if b <= len(items)), default=len(items))
            self._queue.extendleft(reversed(items[keep:]))
            items = items[:keep]
        self.observer.on_queue_depth(len(self._queue))
        return items

    def _padded(self, n: int) -> int:
        return min((b for b in self.pad_to or () if b >= n), default=n)

    async def _run(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        padded = self._padded(len(items))
        tickets = list(dict.fromkeys(item.ticket for item in items))
        start = loop.time()
        for ticket in tickets:
            if ticket.queue_wait is None:
                ticket.queue_wait = start - ticket.submitted
                self.observer.on_queue_wait(ticket.queue_wait)
        self._running_since, self._inflight = start, tickets
        start_ns = time.time_ns() if self.tracing is not None else 0
        try:
            # Stacking runs on the inference thread too, inside the try: a batch that cannot be stacked (rows
            # of another shape) fails its own requests, and the worker goes on to the next.
            features = any(ticket.features for ticket in tickets)
            self._call = self._executor.submit(self._infer, [item.array for item in items], padded, features)
            logits, embedding, maps = await asyncio.wrap_future(self._call)
        except Exception:
            log.exception("inference failed on a batch of %d image(s); failing only its requests", len(items))
            for ticket in tickets:
                if not ticket.future.done():
                    ticket.future.set_exception(InferenceFailed())
            return
        finally:
            self._running_since = None
        seconds = loop.time() - start
        if self.tracing is not None:
            self._trace(tickets, start_ns, time.time_ns(), len(items), padded)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / padded
        self.observer.on_batch(len(items), padded, seconds)
        for ticket in tickets:
            ticket.inference_time += seconds
            ticket.batches += 1
        for i, item in enumerate(items):
            ticket = item.ticket
            if ticket.future.done():
                continue
            if ticket.logits is None:
                ticket.logits = np.empty((ticket.size, logits.shape[1]), dtype=np.float32)
                ticket.embedding = np.empty((ticket.size, embedding.shape[1]), dtype=np.float32)
            ticket.logits[item.index] = logits[i]
            ticket.embedding[item.index] = embedding[i]  # type: ignore[index]
            if ticket.features and maps is not None:
                if ticket.feature_maps is None:
                    ticket.feature_maps = np.empty((ticket.size, *maps.shape[1:]), dtype=np.float32)
                ticket.feature_maps[item.index] = maps[i]
            ticket.remaining -= 1
            if ticket.remaining == 0:
                ticket.future.set_result(None)
        self._inflight = []  # answered: nothing of this batch is left for a failure to reach

    def _trace(self, tickets: list[Ticket], start_ns: int, end_ns: int, images: int, padded: int) -> None:
        """The batch's span, linked to each traced request it served; each request learns its batch times."""
        assert self.tracing is not None
        traced = [t for t in tickets if t.trace is not None]
        if not traced:
            return
        attributes = {**self.labels, "resnest.batch.images": images, "resnest.batch.padded": padded,
                      "resnest.batch.requests": len(tickets)}  # fmt: skip
        span = self.tracing.batch([t.trace for t in traced], start_ns, end_ns, attributes)
        for ticket in traced:
            ticket.first_batch_ns = ticket.first_batch_ns or start_ns
            ticket.last_batch_ns = end_ns
            if span is not None:
                ticket.batch_spans.append(span)

    def _infer(
        self, rows: list[np.ndarray], padded: int, features: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """On the inference thread: the batch in the model's input dtype (uint8 stays uint8), padding rows zero;
        (logits, embedding, the feature map where `features` asks for it, else None).

        A model that lends `input_buffer(n)` (OrtModel with IO binding) holds itself for the block, so its
        reused host buffer of the shape (pinned on CUDA) is written once, where the copy to the device reads
        it, and run before any other batch can touch it. A batch that needs the feature map runs the model's
        plain path, which fetches it (rare: only /explain and OIP requests that name it ask).
        """
        dtype = np.dtype(np.uint8) if rows[0].dtype == np.uint8 else np.dtype(np.float32)
        if features:
            return self.model.infer_features(stack(rows, padded, rows[0].shape, dtype))  # type: ignore[attr-defined]
        lend = getattr(self.model, "input_buffer", None)
        with lend(padded) if lend is not None else contextlib.nullcontext() as buffer:
            return (*self.model.infer(stack(rows, padded, rows[0].shape, dtype, buffer)), None)

    def _fail_all(self, exc: Exception) -> None:
        for item in self._queue:
            if not item.ticket.future.done():
                item.ticket.future.set_exception(exc)
        self._queue.clear()
        self.observer.on_queue_depth(0)
