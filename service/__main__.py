"""`python -m service` / `resnest-serve`: run the app under uvicorn with drain-on-SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .core import logs
from .core.settings import LATE_REQUEST_WAIT_S, Settings, describe_settings
from .core.state import ServiceState
from .grpc.server import GrpcFront
from .http.app import create_app

log = logging.getLogger("service")

# Exit codes, so an orchestrator's record tells the outcomes apart.
EXIT_OK, EXIT_START_FAILED, EXIT_BAD_CONFIG, EXIT_SHUTDOWN_TIMEOUT = 0, 1, 2, 3
# Before the shutdown deadline, requests still in flight are answered 503 and their connections closed.
ANSWER_RESERVE_S = 0.5


class DrainingServer(uvicorn.Server):
    """uvicorn that answers SIGTERM the way load balancers and the kubelet need, within one budget.

    First SIGTERM: /readyz turns 503 at once while requests are still served for `drain_grace_s` (time for
    the balancer to notice), then the listener closes and in-flight requests finish. The whole stop, from
    the signal to the process's exit, takes at most `shutdown_timeout_s`: past it what is still in flight
    is answered 503, and a watchdog ends the process with EXIT_SHUTDOWN_TIMEOUT even if an inference call
    never returns. A second SIGTERM or SIGINT skips the grace, not the budget.
    """

    def __init__(self, config: uvicorn.Config, state: ServiceState, settings: Settings) -> None:
        super().__init__(config)
        self._state, self._grace, self._budget = state, settings.drain_grace_s, settings.shutdown_timeout_s
        self._timer: threading.Timer | None = None
        self._settings = settings
        self.grpc: GrpcFront | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._state
        if state.shutdown_deadline is None:
            state.shutdown_deadline = time.monotonic() + self._budget
            threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()
        state.draining = True
        if sig == signal.SIGTERM and self._timer is None and self._grace > 0:
            log.info("SIGTERM: draining, still serving for %.1fs; exiting within %.1fs", self._grace, self._budget)
            self._timer = threading.Timer(self._grace, self._exit)
            self._timer.daemon = True
            self._timer.start()
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        # Not super().handle_exit: uvicorn would re-raise the signal after shutdown and the exit code would
        # no longer be 0.
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            # The real port (RESNEST_PORT=0 binds any free one): tests and scripts read it from this line.
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
            if self._settings.grpc_enabled:
                # Started once the models are loaded (the lifespan ran): the same state, on the same loop.
                front = GrpcFront(self._state, self._settings.host, self._settings.grpc_port)
                try:
                    await front.start()
                except OSError as exc:
                    log.error("%s", exc)
                    self.started = False  # main() reports a failed start-up
                    self.should_exit = True
                    return
                self.grpc = front

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self._state
        if state.shutdown_deadline is None:  # asked to stop without a signal: the budget starts now
            state.shutdown_deadline = time.monotonic() + self._budget - self._grace
        # Stop accepting first, then give connections accepted an instant ago time to deliver their request:
        # uvicorn would otherwise close them unread, and their clients could not tell they were never served.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(LATE_REQUEST_WAIT_S)
        loop = asyncio.get_running_loop()
        abort_in = state.shutdown_deadline - ANSWER_RESERVE_S - time.monotonic()
        abort = loop.call_later(max(abort_in, 0.0), self._abort_inflight)
        # uvicorn cancels what is still running at this timeout: after the aborted requests had their 503.
        self.config.timeout_graceful_shutdown = max(abort_in + ANSWER_RESERVE_S / 2, 0.0)  # type: ignore[assignment]
        try:
            if self.grpc is not None:
                # gRPC refuses new calls from now on, and its calls in flight finish (or get their 503's
                # UNAVAILABLE) before the lifespan stops the batchers; HTTP keeps being served meanwhile.
                await self.grpc.stop(grace=abort_in + ANSWER_RESERVE_S / 2)
            await super().shutdown()
        finally:
            abort.cancel()

    def _abort_inflight(self) -> None:
        """The budget is nearly spent: answer every request still waiting for inference with 503."""
        batchers = self._state.batchers()
        failed = sum(b.abort("the shutdown deadline passed before this request was inferred") for b in batchers)
        if failed or any(b.busy for b in batchers):
            self._state.shutdown_timed_out = True
            log.error("shutdown budget of %.1fs nearly spent: answered %d request(s) 503", self._budget, failed)

    def _watchdog(self) -> None:
        """Exit at the deadline whatever the process is doing (a stuck ONNX Runtime call, a blocked loop)."""
        deadline = self._state.shutdown_deadline
        assert deadline is not None
        time.sleep(max(deadline - time.monotonic(), 0.0))
        log.critical("shutdown budget of %.1fs spent: exiting now (code %d)", self._budget, EXIT_SHUTDOWN_TIMEOUT)
        _exit_now(EXIT_SHUTDOWN_TIMEOUT)

    def _exit(self) -> None:
        log.info("grace period over: closing listeners, finishing in-flight requests")
        self.should_exit = True


def _exit_now(code: int) -> None:
    """Leave at once: joining the inference thread would wait for a call that may never return."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resnest-serve",
        description="Serve ResNeSt ONNX models over HTTP and gRPC. Configuration comes from environment variables:",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except (ValidationError, ValueError) as exc:
        # The settings did not parse, so the format is read as given: a JSON pipeline still gets JSON.
        fmt = "json" if os.environ.get("RESNEST_LOG_FORMAT", "").strip().lower() == "json" else "text"
        logs.configure("error", fmt)
        log.error("invalid configuration:\n%s", exc)
        return EXIT_BAD_CONFIG
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=None,  # set when the shutdown starts, from what is left of the budget
        # uvicorn's own handlers stay off: its loggers go through logs.configure's handler and format, and
        # RequestContextMiddleware writes the access log (request id, model, images, timings).
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    state: ServiceState = app.state.service
    server = DrainingServer(config, state, settings)
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        # uvicorn exits with its own code when start-up (model load, warm-up, binding the port) fails.
        return EXIT_START_FAILED
    # uvicorn leaves started == False when start-up (model load, warm-up) failed.
    if not server.started:
        return EXIT_START_FAILED
    if any(batcher.busy for batcher in state.batchers()):
        log.error("an inference call is still running after shutdown: exiting without waiting for it")
        _exit_now(EXIT_SHUTDOWN_TIMEOUT)
    if state.shutdown_timed_out:
        log.error("shutdown timed out: requests still in flight were answered 503")
        return EXIT_SHUTDOWN_TIMEOUT
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
