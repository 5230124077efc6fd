"""The gRPC front: a grpc.aio server on the service's event loop, beside uvicorn, over the same ServiceState."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2_grpc

from ..core.settings import LATE_REQUEST_WAIT_S
from ..core.state import ServiceState
from .health import HealthServicer
from .interceptor import KeyInterceptor
from .servicer import InferenceServicer

log = logging.getLogger("service.grpc")


class GrpcFront:
    """Start, report the bound port, and stop with a grace for the calls in flight."""

    def __init__(self, state: ServiceState, host: str, port: int) -> None:
        settings = state.settings
        self.state, self.host, self.port = state, host, port
        self.servicer = InferenceServicer(state)
        # No maximum_concurrent_rpcs: it counts every call alike, so open health streams would refuse inference.
        # Inference calls hold places in the shared upload budget (taken before their message is read), Watch
        # streams have their own cap, and the other calls are answered at once.
        self.server = grpc.aio.server(
            options=[
                # A message is read whole: the upload limit bounds it, as an HTTP body.
                ("grpc.max_receive_message_length", settings.max_upload_bytes),
                ("grpc.max_send_message_length", -1),
                # grpc sets SO_REUSEPORT by default: a second server on the same port would share it silently.
                ("grpc.so_reuseport", 0),
                # BDP probing grows each stream's receive window, so calls refused on their metadata (no key)
                # still had their bytes buffered by the transport (bench/hostile.py's wrong-key clients show
                # the server's growth); without it a large call on loopback was no slower.
                ("grpc.http2.bdp_probe", 0),
            ],
            interceptors=[KeyInterceptor(settings, self.servicer.refusal)],
        )
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(state), self.server)

    async def start(self) -> int:
        """Bind and start serving; the port bound (RESNEST_GRPC_PORT=0 binds any free one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            bound = self.server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as exc:  # grpc raises where older releases returned 0
            raise OSError(f"gRPC could not bind {host}:{self.port}: {exc}") from None
        if bound == 0:
            raise OSError(f"gRPC could not bind {host}:{self.port}")
        self.port = bound
        await self.server.start()
        log.info("listening on grpc://%s:%d", host, self.port)
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new calls at once; calls in flight get `grace` seconds to finish, then are cancelled.

        grpc's own shutdown cancels (CANCELLED, which clients do not retry) a call that reaches the server in
        the instant it shuts down. So the servicer first answers new calls itself, UNAVAILABLE before any
        work, until those in flight are done and clients racing the close have had their answer; only then
        does grpc shut down, with nothing left to cancel.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace, 0.0)
        self.servicer.calls.closing = True
        await asyncio.sleep(min(LATE_REQUEST_WAIT_S, max(grace, 0.0)))
        while self.servicer.calls.inflight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self.server.stop(max(deadline - loop.time(), 0.0))
