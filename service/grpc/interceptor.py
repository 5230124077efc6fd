"""The keys over gRPC, checked on a call's metadata before its message is read (service/core/access.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from ..core.access import allowed
from ..core.errors import ServiceError
from ..core.settings import Settings
from .messages import SERVICE

# Each RPC's operation, which decides the key it needs, as HTTP's route names do.
OPERATIONS = {
    "ServerLive": "live", "ServerReady": "ready", "ModelReady": "model_ready", "ServerMetadata": "server_metadata",
    "ModelMetadata": "model_metadata", "ModelConfig": "model_config", "ModelInfer": "model_infer",
    "RepositoryIndex": "repository_index", "RepositoryModelLoad": "repository_load",
    "RepositoryModelUnload": "repository_unload",
}  # fmt: skip
HEALTH_SERVICE = "grpc.health.v1.Health"


def operation(method: str) -> str:
    """The operation of a gRPC method's full name ("/inference.GRPCInferenceService/ModelInfer")."""
    service, _, name = method.lstrip("/").partition("/")
    if service == SERVICE and name in OPERATIONS:
        return OPERATIONS[name]
    return "health" if service == HEALTH_SERVICE else method  # anything else needs the key (closed by default)


Refusal = Callable[[str, ServiceError], grpc.RpcMethodHandler]


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """A call without the key its operation needs is refused at once by `refuse`'s handler, which reads no
    message: it holds no place, byte or read."""

    def __init__(self, settings: Settings, refuse: Refusal) -> None:
        self.settings, self.refuse = settings, refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}  # type: ignore[attr-defined]
        method: str = details.method  # type: ignore[attr-defined]
        if allowed(self.settings, operation(method), metadata.get("authorization")):
            return await continuation(details)
        return self.refuse(method, ServiceError("unauthorized"))
