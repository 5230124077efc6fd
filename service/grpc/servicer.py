"""inference.GRPCInferenceService over the service's shared core: the same registry, admission, batchers,
error table and protocol semantics (service/oip/protocol.py) as the HTTP routes, answered as gRPC statuses."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ..core.errors import ServiceError
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
    413: Code.INVALID_ARGUMENT,
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    499: Code.CANCELLED,
    500: Code.INTERNAL,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
# RPCs open without the API key, as their HTTP counterparts are: probes and the server's own metadata.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady", "ServerMetadata"})
QUIET_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
# The answer to a call that arrives once the server stops taking calls: nothing was done, retry elsewhere.
CLOSING_MESSAGE = "the server is shutting down and takes no new calls: send this one to another replica"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
Handler = Callable[[Message, grpc.aio.ServicerContext, SimpleNamespace], Awaitable[Message]]


def trailing_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """An error's code, and for overload the retry hint: Retry-After's seconds and gRPC's own pushback."""
    pairs = [("resnest-error-code", error.code)]
    retry_after = (error.headers or {}).get("retry-after")
    if retry_after is not None:
        pairs += [("retry-after", retry_after), ("grpc-retry-pushback-ms", str(int(float(retry_after) * 1000)))]
    return tuple(pairs)


def _version(text: str) -> int | None:
    """The protocol's string version: empty for the latest, else a positive integer."""
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ServiceError("invalid_request", f"model version {text!r} is not a positive integer")
    return int(text)


class InferenceServicer:
    """The RPCs of inference.GRPCInferenceService; `handler()` registers them with a grpc.aio server."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._key = state.settings.api_key.get_secret_value().encode() if state.settings.api_key else None
        # Set once the drain grace is over (GrpcFront.stop): new calls are refused before any work, with a
        # status clients retry elsewhere, while those in flight (counted here) finish.
        self.closing = False
        self.inflight = 0

    # -- registration, and what every RPC shares: key, request id, errors, metrics, access record --------
    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of the service as one generic handler (the messages come from our private pool)."""
        rpcs = {
            name: grpc.unary_unary_rpc_method_handler(
                self._wrap(name, getattr(self, name)),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, rpcs)

    def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        if self._key is None:
            return
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        given = metadata.get("authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(token, self._key):  # constant time: no timing oracle on the key
            raise ServiceError("unauthorized")

    def _wrap(self, name: str, fn: Handler) -> Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]:
        route = f"/{SERVICE}/{name}"
        metrics = self.state.metrics
        guarded = name not in OPEN_RPCS

        async def handle(request: Message, context: grpc.aio.ServicerContext) -> Message:
            offered = dict(context.invocation_metadata() or ()).get("x-request-id")
            request_id = offered if isinstance(offered, str) and _WELL_FORMED_ID.fullmatch(offered) else None
            record = SimpleNamespace(started=time.perf_counter(), request_id=request_id or uuid.uuid4().hex)
            token = request_id_var.set(record.request_id)
            code, error = Code.OK, None
            metrics.inflight.inc()
            self.inflight += 1
            try:
                if self.closing and name not in OPEN_RPCS:
                    raise ServiceError("draining", CLOSING_MESSAGE)
                if guarded:
                    self._check_key(context)
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
        return self.state.resolve(name or None, _version(version))

    # -- health and metadata -------------------------------------------------------------------------------
    async def ServerLive(self, request: Message, context: Any, record: SimpleNamespace) -> Message:
        return METHODS["ServerLive"][1](live=not self.state.worker_dead)

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
        # The message is already in memory (grpc reads it whole, within RESNEST_MAX_UPLOAD_BYTES): it counts
        # against the uploads' shared budget until answered, as an HTTP body does.
        record.bytes_received = size = request.ByteSize()
        if not state.uploads.has_room(size):
            raise ServiceError("overloaded", headers={"retry-after": "1"})
        remaining = context.time_remaining()
        call = Call(record.started, record, deadline=None if remaining is None else time.perf_counter() + remaining)
        state.uploads.enter(size)
        try:
            with served.use():
                loop = asyncio.get_running_loop()
                parsed, kind, data = await loop.run_in_executor(state.decode_pool, self._parse, request, served)
                tensors, out = await protocol.infer(call, state, served, parsed, kind, data)
        finally:
            state.uploads.leave(size)
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
