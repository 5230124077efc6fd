"""grpc.health.v1: what load balancers and Kubernetes' gRPC probes ask. Service "" (or the OIP service's name)
is the server's readiness; a model's name is that model's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..core.state import ServiceState
from .messages import SERVICE

Status = health_pb2.HealthCheckResponse.ServingStatus
# How often Watch looks for a change of status (a stream per watcher; each look is a few attribute reads).
WATCH_INTERVAL_S = 0.5
# Watch streams open at once. They need no key and last as long as their clients like, so they have a cap of
# their own (beyond it: RESOURCE_EXHAUSTED), apart from inference: no number of watchers holds a call's place.
MAX_WATCH_STREAMS = 1024


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch over the service's own readiness, read when asked (nothing to keep in sync)."""

    def __init__(self, state: ServiceState, max_watchers: int = MAX_WATCH_STREAMS) -> None:
        self.state, self.max_watchers = state, max_watchers
        self.watchers = 0

    def status(self, service: str) -> Any:
        """SERVING or NOT_SERVING for a known service, SERVICE_UNKNOWN for any other name."""
        state = self.state
        if service in ("", SERVICE):
            return Status.NOT_SERVING if state.not_ready_reasons() else Status.SERVING
        versions = state.registry.models.get(service)
        if not versions:
            return Status.SERVICE_UNKNOWN
        ready = state.started and not state.draining and versions[max(versions)].ready
        return Status.SERVING if ready else Status.NOT_SERVING

    async def Check(self, request: Any, context: Any) -> Any:
        status = self.status(request.service)
        if status == Status.SERVICE_UNKNOWN:  # as the protocol asks: NOT_FOUND for a service it does not know
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        if self.watchers >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {self.max_watchers} Watch streams")
        self.watchers += 1
        try:
            async for response in self._watch(request.service):
                yield response
        finally:
            self.watchers -= 1

    async def _watch(self, service: str) -> AsyncIterator[Any]:
        last = None
        while True:  # until the client cancels, or the server drains
            # Read before the status: once draining is seen, the status read after it is NOT_SERVING, and that
            # is sent before the stream ends (the flag may turn while this generator waits at its yield).
            draining = self.state.draining
            status = self.status(service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if draining:
                # NOT_SERVING has been sent: end the stream, or the server's stop would wait out its whole
                # grace for a stream that never ends by itself.
                return
            await asyncio.sleep(WATCH_INTERVAL_S)
