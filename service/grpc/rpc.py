"""What every RPC of the gRPC front shares: its request id, access record and metrics, when (and whether)
its one request message is read, and its errors answered as gRPC statuses from the error table's rows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from ..core.errors import ServiceError
from ..core.logs import AccessRecord, request_id, request_id_var
from ..core.request.admission import overloaded
from ..core.request.path import Call
from ..core.state import ServiceState
from ..core.tracing import grpc_attributes, grpc_outcome

log = logging.getLogger("service.grpc")

QUIET_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
# Their requests carry nothing the answer depends on: answered without reading a byte of the message.
UNREAD_RPCS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
# Inference messages: read after admission, a few at a time, and counted against the upload budget.
UPLOAD_RPCS = frozenset({"ModelInfer"})


@dataclass
class Rpc:
    """One call as its handler sees it: its access record and the client's deadline (as the request path's
    Call), and the timings to send back as trailing metadata."""

    call: Call
    timings: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> AccessRecord:
        return self.call.record


Handler = Callable[[Message, grpc.aio.ServicerContext, Rpc], Awaitable[Message]]
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def status(error: ServiceError) -> grpc.StatusCode:
    """The error's gRPC status, from its row of the table."""
    return grpc.StatusCode[error.kind.grpc]


def trailing_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """An error's code, and for overload the retry hint: Retry-After's seconds and gRPC's own pushback."""
    pairs = [("resnest-error-code", error.code)]
    retry_after = error.headers.get("retry-after")
    if retry_after is not None:
        pairs += [("retry-after", retry_after), ("grpc-retry-pushback-ms", str(int(float(retry_after) * 1000)))]
    return tuple(pairs)


class Calls:
    """Wraps each RPC's handler in what every call shares; counts the calls in flight for the drain."""

    # The answer to a call that arrives once the server stops taking calls: nothing was done, retry elsewhere.
    CLOSING = "the server is shutting down and takes no new calls: send this one to another replica"

    def __init__(self, state: ServiceState, open_rpcs: frozenset[str]) -> None:
        self.state, self.open_rpcs = state, open_rpcs
        # Set once the drain grace is over (GrpcFront.stop): new calls are refused before any work, with a
        # status clients retry elsewhere, while those in flight (counted here) finish.
        self.closing = False
        self.inflight = 0
        # grpc reads a message whole, and a read cannot be counted as it arrives the way an HTTP body is:
        # messages are read a few at a time, as many as the upload budget holds at the largest size.
        self._reads = asyncio.Semaphore(state.settings.grpc_reads())

    def wrap(self, route: str, name: str, request_type: type[Message], fn: Handler, read: bool = True) -> Behaviour:
        """The grpc behaviour (stream-unary: the handler reads the one message itself) of RPC `name`."""
        metrics, tracing = self.state.metrics, self.state.tracing

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Message:
            metadata = dict(context.invocation_metadata() or ())
            offered = metadata.get("x-request-id")
            record = AccessRecord(request_id(offered), "gRPC", route, route, context.peer())
            remaining = context.time_remaining()
            rpc = Rpc(Call(record, deadline=None if remaining is None else time.perf_counter() + remaining))
            if tracing.on:  # the caller's traceparent, from the call's metadata
                tracing.begin(record, metadata, route.lstrip("/"), grpc_attributes(route))
            token = request_id_var.set(record.request_id)
            code, error = grpc.StatusCode.OK, None
            metrics.inflight.inc()
            self.inflight += 1
            try:
                if self.closing and name not in self.open_rpcs:
                    raise ServiceError("draining", self.CLOSING)
                if name in UPLOAD_RPCS and read:
                    async with self._upload(context, rpc, request_type) as request:
                        response = await fn(request, context, rpc)
                else:
                    request = await self._read(name, request_type, context) if read else request_type()
                    response = await fn(request, context, rpc)
                context.set_trailing_metadata((("x-request-id", record.request_id), *rpc.timings.items()))
                return response
            except ServiceError as exc:
                code, error = status(exc), exc
            except asyncio.CancelledError:
                # The client cancelled, its deadline passed, or the server is stopping: grpc answers it.
                code = grpc.StatusCode.DEADLINE_EXCEEDED if (context.time_remaining() or 1.0) <= 0 else (
                    grpc.StatusCode.CANCELLED)  # fmt: skip
                raise
            except Exception:
                log.exception("%s failed", route)
                code, error = grpc.StatusCode.INTERNAL, ServiceError("internal_error", "the server failed to answer")
            finally:
                metrics.inflight.dec()
                self.inflight -= 1
                record.status = code.name
                if record.span is not None:
                    tracing.end(record, *grpc_outcome(code.name), error.message if error is not None else "")
                metrics.requests.labels(route, code.name).inc()
                metrics.latency.labels(route).observe(record.elapsed())
                record.emit(quiet=name in QUIET_RPCS and code == grpc.StatusCode.OK)
                request_id_var.reset(token)
            await context.abort(code, error.message, (("x-request-id", record.request_id), *trailing_metadata(error)))
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return handle

    async def _read(
        self, name: str, request_type: type[Message], context: Any, timeout: float | None = None
    ) -> Message:
        """The call's one request message, read within `timeout` (default RESNEST_BODY_TIMEOUT_S, or the
        client's deadline when sooner); an RPC whose answer needs none of it reads nothing."""
        if name in UNREAD_RPCS:
            return request_type()
        if timeout is None:
            remaining = context.time_remaining()
            limit = self.state.settings.body_timeout_s
            timeout = limit if remaining is None else min(limit, remaining)
        try:
            message = await asyncio.wait_for(context.read(), max(timeout, 0.0))
        except TimeoutError:
            raise ServiceError("request_timeout", "the request message did not arrive in time") from None
        if message is grpc.aio.EOF:
            raise ServiceError("invalid_request", "the call carried no request message")
        return message  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def _upload(self, context: Any, rpc: Rpc, request_type: type[Message]) -> AsyncIterator[Message]:
        """An inference message, admitted as an HTTP upload is: a place among the uploads in progress before a
        byte is read, a turn among the reads in progress, then its size against the shared byte budget, all
        within the request's deadline; the place and the bytes are held until the answer."""
        uploads = self.state.uploads
        if not uploads.has_room(1):
            raise overloaded()
        left = rpc.call.timeout(self.state.settings.request_timeout_s)
        uploads.enter(0)
        held = 0
        try:
            try:
                async with asyncio.timeout(max(left, 0.0)), self._reads:
                    request = await self._read("ModelInfer", request_type, context, timeout=left)
            except TimeoutError:
                raise ServiceError("request_timeout", "the request message did not arrive in time") from None
            rpc.record.bytes_received = held = request.ByteSize()
            if not uploads.grow(held):
                raise overloaded()
            yield request
        finally:
            uploads.leave(held)
