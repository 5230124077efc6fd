"""inference.GRPCInferenceService over the service's shared core: the same registry, admission, batchers,
error table and protocol semantics (service/oip/protocol.py) as the HTTP routes, answered as gRPC statuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ..core.access import OPEN_OPERATIONS, allowed
from ..core.errors import ServiceError
from ..core.identifiers import parse_version
from ..core.inference import Call
from ..core.logs import log_access, request_id_var
from ..core.registry import ServedModel
from ..core.state import ServiceState
from ..oip import protocol
from ..oip.codec import InferRequest, ProtocolError
from . import codec
from .messages import METHODS, SERVICE, ModelConfigResponse, ModelMetadataResponse, RepositoryIndexResponse

log = logging.getLogger("service.grpc")
Code = grpc.StatusCode
# The error table's HTTP statuses as Triton's gRPC endpoint answers them: overload is RESOURCE_EXHAUSTED,
# bad input (413 and 415 included: the request, not the server, is at fault) INVALID_ARGUMENT.
STATUS: dict[int, grpc.StatusCode] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    408: Code.DEADLINE_EXCEEDED,
    413: Code.INVALID_ARGUMENT,
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    499: Code.CANCELLED,
    500: Code.INTERNAL,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
# Each RPC's operation, which decides the key it needs (service/core/access.py), as HTTP's route names do.
OPERATIONS = {
    "ServerLive": "live", "ServerReady": "ready", "ModelReady": "model_ready", "ServerMetadata": "server_metadata",
    "ModelMetadata": "model_metadata", "ModelConfig": "model_config", "ModelInfer": "model_infer",
    "RepositoryIndex": "repository_index", "RepositoryModelLoad": "repository_load",
    "RepositoryModelUnload": "repository_unload",
}  # fmt: skip
HEALTH_SERVICE = "grpc.health.v1.Health"
QUIET_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
# Their requests carry nothing the answer depends on: answered without reading a byte of the message.
UNREAD_RPCS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
# The answer to a call that arrives once the server stops taking calls: nothing was done, retry elsewhere.
CLOSING_MESSAGE = "the server is shutting down and takes no new calls: send this one to another replica"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
Handler = Callable[[Message, grpc.aio.ServicerContext, SimpleNamespace], Awaitable[Message]]
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def operation(method: str) -> str:
    """The operation of a gRPC method's full name ("/inference.GRPCInferenceService/ModelInfer")."""
    service, _, name = method.lstrip("/").partition("/")
    if service == SERVICE and name in OPERATIONS:
        return OPERATIONS[name]
    return "health" if service == HEALTH_SERVICE else method  # anything else needs the key (closed by default)


def trailing_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """An error's code, and for overload the retry hint: Retry-After's seconds and gRPC's own pushback."""
    pairs = [("resnest-error-code", error.code)]
    retry_after = (error.headers or {}).get("retry-after")
    if retry_after is not None:
        pairs += [("retry-after", retry_after), ("grpc-retry-pushback-ms", str(int(float(retry_after) * 1000)))]
    return tuple(pairs)


class InferenceServicer:
    """The RPCs of inference.GRPCInferenceService; `handler()` registers them with a grpc.aio server."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        # Set once the drain grace is over (GrpcFront.stop): new calls are refused before any work, with a
        # status clients retry elsewhere, while those in flight (counted here) finish.
        self.closing = False
        self.inflight = 0
        # grpc reads a message whole, and a read cannot be counted as it arrives the way an HTTP body is:
        # messages are read a few at a time, as many as the upload budget holds at the largest size.
        self._reads = asyncio.Semaphore(state.settings.grpc_reads())

    # -- registration, and what every RPC shares: request id, reading, errors, metrics, access record ----
    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of the service as one generic handler (the messages come from our private pool).

        Registered as stream-unary: on the wire a unary call is the same, and the handler, not grpc, decides
        when (and whether) the one request message is read: after the key (KeyInterceptor) and, for inference,
        after admission.
        """
        rpcs = {
            name: self._handler(name, self._wrap(name, getattr(self, name)), request, response)
            for name, (request, response) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, rpcs)

    @staticmethod
    def _handler(name: str, behaviour: Behaviour, request: type[Message], response: type[Message]) -> Any:
        return grpc.stream_unary_rpc_method_handler(
            behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )

    def refusal(self, method: str, error: ServiceError) -> grpc.RpcMethodHandler:
        """A handler that answers `error` without reading the message, with the access record and metrics of
        any call (for KeyInterceptor)."""
        name = method.rpartition("/")[2]

        async def refuse(request: Message, context: Any, record: SimpleNamespace) -> Message:
            raise error

        request, response = METHODS.get(name, (Message, Message))
        return self._handler(name, self._wrap(name, refuse, route=method, read=False), request, response)

    def _wrap(self, name: str, fn: Handler, route: str | None = None, read: bool = True) -> Behaviour:
        route = route or f"/{SERVICE}/{name}"
        metrics = self.state.metrics

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Message:
            offered = dict(context.invocation_metadata() or ()).get("x-request-id")
            request_id = offered if isinstance(offered, str) and _WELL_FORMED_ID.fullmatch(offered) else None
            record = SimpleNamespace(started=time.perf_counter(), request_id=request_id or uuid.uuid4().hex)
            token = request_id_var.set(record.request_id)
            code, error = Code.OK, None
            metrics.inflight.inc()
            self.inflight += 1
            try:
                if self.closing and OPERATIONS.get(name) not in OPEN_OPERATIONS:
                    raise ServiceError("draining", CLOSING_MESSAGE)
                if name == "ModelInfer" and read:
                    async with self._upload(context, record) as request:
                        response = await fn(request, context, record)
                else:
                    request = await self._read(name, context) if read else None
                    response = await fn(request, context, record)
                context.set_trailing_metadata((("x-request-id", record.request_id), *getattr(record, "timings", ())))
                return response
            except ServiceError as exc:
                code, error = STATUS.get(exc.status_code, Code.UNKNOWN), exc
            except asyncio.CancelledError:
                # The client cancelled, its deadline passed, or the server is stopping: grpc answers it.
                code = Code.DEADLINE_EXCEEDED if (context.time_remaining() or 1.0) <= 0 else Code.CANCELLED
                raise
            except Exception:
                log.exception("%s failed", route)
                code, error = Code.INTERNAL, ServiceError("internal_error", "the server failed to answer")
            finally:
                metrics.inflight.dec()
                self.inflight -= 1
                elapsed = time.perf_counter() - record.started
                metrics.requests.labels(route, code.name).inc()
                metrics.latency.labels(route).observe(elapsed)
                self._log(route, name, code, record, elapsed, context)
                request_id_var.reset(token)
            await context.abort(
                code, str(error.detail), (("x-request-id", record.request_id), *trailing_metadata(error))
            )
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return handle

    async def _read(self, name: str, context: Any, timeout: float | None = None) -> Message:
        """The call's one request message, read within `timeout` (default RESNEST_BODY_TIMEOUT_S, or the
        client's deadline when sooner); an RPC whose answer needs none of it reads nothing."""
        request_type = METHODS[name][0]
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
    async def _upload(self, context: Any, record: SimpleNamespace) -> AsyncIterator[Message]:
        """An inference message, admitted as an HTTP upload is: a place among the uploads in progress before a
        byte is read, a turn among the reads in progress, then its size against the shared byte budget, all
        within the request's deadline; the place and the bytes are held until the answer."""
        uploads = self.state.uploads
        if not uploads.has_room(1):
            raise ServiceError("overloaded", headers={"retry-after": "1"})
        remaining = context.time_remaining()
        record.deadline = None if remaining is None else time.perf_counter() + remaining
        left = Call(record.started, record, deadline=record.deadline).timeout(self.state.settings.request_timeout_s)
        uploads.enter(0)
        held = 0
        try:
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    async with self._reads:
                        request = await self._read("ModelInfer", context, timeout=left)
            except TimeoutError:
                raise ServiceError("request_timeout", "the request message did not arrive in time") from None
            record.bytes_received = held = request.ByteSize()
            if not uploads.grow(held):
                raise ServiceError("overloaded", headers={"retry-after": "1"})
            yield request
        finally:
            uploads.leave(held)

    @staticmethod
    def _log(
        route: str, name: str, code: grpc.StatusCode, record: SimpleNamespace, elapsed: float, context: Any
    ) -> None:
        fields: dict[str, object] = {
            "request_id": record.request_id,
            "method": "gRPC",
            "path": route,
            "route": route,
            "status": code.name,
            "duration_ms": round(elapsed * 1000, 2),
            "client": context.peer(),
        }
        for key in ("model", "model_version", "images", "bytes_received", "preprocess_ms", "queue_ms", "inference_ms"):
            if hasattr(record, key):
                fields[key] = getattr(record, key)
        quiet = name in QUIET_RPCS and code == Code.OK
        log_access(logging.DEBUG if quiet else logging.INFO, fields)

    def _resolve(self, name: str, version: str) -> ServedModel:
        return self.state.resolve(name or None, parse_version(version, "model_version"))

    # -- health and metadata -------------------------------------------------------------------------------
    async def ServerLive(self, request: Message, context: Any, record: SimpleNamespace) -> Message:
        return METHODS["ServerLive"][1](live=self.state.liveness_failure() is None)

    async def ServerReady(self, request: Message, context: Any, record: SimpleNamespace) -> Message:
        return METHODS["ServerReady"][1](ready=not self.state.not_ready_reasons())

    async def ModelReady(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        try:
            served = self._resolve(request.name, request.version)
        except ServiceError as exc:
            if exc.status_code != 503:  # unknown model or version: NOT_FOUND, as on HTTP
                raise
            return METHODS["ModelReady"][1](ready=False)  # still loading, or being unloaded
        return METHODS["ModelReady"][1](ready=served.ready)

    async def ServerMetadata(self, request: Message, context: Any, record: SimpleNamespace) -> Message:
        return json_format.ParseDict(protocol.server_metadata(), METHODS["ServerMetadata"][1]())

    async def ModelMetadata(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        served = self._resolve(request.name, request.version)
        return json_format.ParseDict(protocol.model_metadata(self.state, served), ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        served = self._resolve(request.name, request.version)
        return json_format.ParseDict({"config": protocol.model_config(self.state, served)}, ModelConfigResponse())

    # -- inference -----------------------------------------------------------------------------------------
    def _parse(self, request: Message, served: ServedModel) -> tuple[InferRequest, str, Any]:
        limit = self.state.settings.max_images_per_request
        size = served.model.card.preprocess.input_size
        try:
            parsed = codec.parse_request(request, limit * 3 * size * size, limit)
        except ProtocolError as exc:
            raise ServiceError(exc.code, str(exc)) from None
        kind, data = protocol.check_request(parsed, served)
        return parsed, kind, data

    async def ModelInfer(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        state = self.state
        served = self._resolve(request.model_name, request.model_version)
        call = Call(record.started, record, deadline=record.deadline)
        with served.use():
            loop = asyncio.get_running_loop()
            parsed, kind, data = await loop.run_in_executor(state.decode_pool, self._parse, request, served)
            tensors, out = await protocol.infer(call, state, served, parsed, kind, data)
        state.metrics.images.labels(f"/{SERVICE}/ModelInfer").inc(len(out.logits))
        record.timings = tuple(out.timing_headers().items())
        return codec.encode_response(served.name, str(served.version), parsed.id, tensors)

    # -- the model repository (Triton's explicit model control) ---------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        rows = [{**row, "version": str(row["version"])} for row in protocol.repository_index(self.state, request.ready)]
        return json_format.ParseDict({"models": rows}, RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        protocol.require_control(self.state)
        await protocol.load_model(self.state, request.model_name, len(request.parameters) > 0)
        return METHODS["RepositoryModelLoad"][1]()

    async def RepositoryModelUnload(self, request: Any, context: Any, record: SimpleNamespace) -> Message:
        protocol.require_control(self.state)
        await protocol.unload_model(self.state, request.model_name)
        return METHODS["RepositoryModelUnload"][1]()


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """The keys over gRPC, checked on the call's metadata before its message is read: a call without the key
    its operation needs is refused at once, holding no place, byte or read."""

    def __init__(self, servicer: InferenceServicer) -> None:
        self.servicer = servicer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}  # type: ignore[attr-defined]
        method: str = details.method  # type: ignore[attr-defined]
        if allowed(self.servicer.state.settings, operation(method), metadata.get("authorization")):
            return await continuation(details)
        return self.servicer.refusal(method, ServiceError("unauthorized"))
