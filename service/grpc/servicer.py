"""inference.GRPCInferenceService over the service's shared core: the same registry, admission, batchers,
error table and protocol semantics (service/core/oip/protocol.py) as the HTTP routes; rpc.py answers them
as gRPC statuses."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ..core.access import OPEN_OPERATIONS
from ..core.errors import ServiceError
from ..core.identifiers import parse_version
from ..core.oip import protocol
from ..core.repository.registry import ServedModel
from ..core.state import ServiceState
from . import codec
from .interceptor import OPERATIONS
from .messages import METHODS, SERVICE, ModelConfigResponse, ModelMetadataResponse, RepositoryIndexResponse
from .rpc import Behaviour, Calls, Rpc


def _handler(behaviour: Behaviour, request: type[Message], response: type[Message]) -> grpc.RpcMethodHandler:
    """Registered as stream-unary: on the wire a unary call is the same, and the handler, not grpc, decides
    when (and whether) the one request message is read: after the key (KeyInterceptor) and, for inference,
    after admission."""
    return grpc.stream_unary_rpc_method_handler(
        behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString
    )


class InferenceServicer:
    """The RPCs of inference.GRPCInferenceService; `handler()` registers them with a grpc.aio server."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.calls = Calls(state, frozenset(n for n, op in OPERATIONS.items() if op in OPEN_OPERATIONS))

    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC of the service as one generic handler (the messages come from our private pool)."""
        rpcs = {
            name: _handler(self.calls.wrap(f"/{SERVICE}/{name}", name, request, getattr(self, name)), request, response)
            for name, (request, response) in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, rpcs)

    def refusal(self, method: str, error: ServiceError) -> grpc.RpcMethodHandler:
        """A handler that answers `error` without reading the message, with the access record and metrics of
        any call (for KeyInterceptor)."""
        name = method.rpartition("/")[2]

        async def refuse(request: Message, context: Any, rpc: Rpc) -> Message:
            raise error

        request, response = METHODS.get(name, (Message, Message))
        return _handler(self.calls.wrap(method, name, request, refuse, read=False), request, response)

    def _resolve(self, name: str, version: str) -> ServedModel:
        return self.state.resolve(name or None, parse_version(version, "model_version"))

    # -- health and metadata -------------------------------------------------------------------------------
    async def ServerLive(self, request: Message, context: Any, rpc: Rpc) -> Message:
        return METHODS["ServerLive"][1](live=self.state.liveness_failure() is None)

    async def ServerReady(self, request: Message, context: Any, rpc: Rpc) -> Message:
        return METHODS["ServerReady"][1](ready=not self.state.not_ready_reasons())

    async def ModelReady(self, request: Any, context: Any, rpc: Rpc) -> Message:
        try:
            served = self._resolve(request.name, request.version)
        except ServiceError as exc:
            if exc.status != 503:  # unknown model or version: NOT_FOUND, as on HTTP
                raise
            return METHODS["ModelReady"][1](ready=False)  # still loading, or being unloaded
        return METHODS["ModelReady"][1](ready=served.ready)

    async def ServerMetadata(self, request: Message, context: Any, rpc: Rpc) -> Message:
        return json_format.ParseDict(protocol.server_metadata(), METHODS["ServerMetadata"][1]())

    async def ModelMetadata(self, request: Any, context: Any, rpc: Rpc) -> Message:
        served = self._resolve(request.name, request.version)
        return json_format.ParseDict(protocol.model_metadata(self.state, served), ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any, rpc: Rpc) -> Message:
        served = self._resolve(request.name, request.version)
        return json_format.ParseDict({"config": protocol.model_config(self.state, served)}, ModelConfigResponse())

    # -- inference -----------------------------------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any, rpc: Rpc) -> Message:
        state = self.state
        served = self._resolve(request.model_name, request.model_version)
        limit = state.settings.max_images_per_request
        with served.use():
            loop = asyncio.get_running_loop()
            parse = partial(codec.parse_request, request)
            parsed, kind, data = await loop.run_in_executor(state.decode_pool, protocol.read_request, parse, served,
                                                            limit)  # fmt: skip
            tensors, out = await protocol.infer(rpc.call, state, served, parsed, kind, data)
        state.metrics.images.labels(f"/{SERVICE}/ModelInfer").inc(len(out.logits))
        rpc.timings = out.timings()
        return codec.encode_response(served.name, str(served.version), parsed.id, tensors, out.parameters())

    # -- the model repository (Triton's explicit model control) ---------------------------------------------
    async def RepositoryIndex(self, request: Any, context: Any, rpc: Rpc) -> Message:
        rows = [{**row, "version": str(row["version"])} for row in protocol.repository_index(self.state, request.ready)]
        return json_format.ParseDict({"models": rows}, RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any, context: Any, rpc: Rpc) -> Message:
        protocol.require_control(self.state)
        await protocol.load_model(self.state, request.model_name, len(request.parameters) > 0)
        return METHODS["RepositoryModelLoad"][1]()

    async def RepositoryModelUnload(self, request: Any, context: Any, rpc: Rpc) -> Message:
        protocol.require_control(self.state)
        await protocol.unload_model(self.state, request.model_name)
        return METHODS["RepositoryModelUnload"][1]()
