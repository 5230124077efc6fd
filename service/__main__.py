"""`python -m service` / `resnest-serve`: run the app under uvicorn with drain-on-SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .settings import Settings, describe_settings

log = logging.getLogger("service")
_LATE_REQUEST_WAIT_S = 0.3


class DrainingServer(uvicorn.Server):
    """uvicorn that answers SIGTERM the way load balancers need.

    First SIGTERM: /readyz turns 503 at once while requests are still served for `grace` seconds (time for
    the balancer to notice), then uvicorn stops accepting, finishes in-flight requests and the process exits
    0. A second SIGTERM or SIGINT skips the grace.
    """

    def __init__(self, config: uvicorn.Config, state: object, grace: float) -> None:
        super().__init__(config)
        self._state, self._grace = state, grace
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True  # type: ignore[attr-defined]
        if sig == signal.SIGTERM and self._timer is None and self._grace > 0:
            log.info("SIGTERM: draining, still serving for %.1fs", self._grace)
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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first, then give connections accepted an instant ago time to deliver their request:
        # uvicorn would otherwise close them unread, and their clients could not tell they were never served.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(_LATE_REQUEST_WAIT_S)
        await super().shutdown()

    def _exit(self) -> None:
        log.info("grace period over: closing listeners, finishing in-flight requests")
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resnest-serve",
        description="Serve a ResNeSt ONNX model over HTTP. Configuration comes from environment variables:",
        epilog=describe_settings(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except (ValidationError, ValueError) as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # Any client can send a malformed multipart body; the parser's warnings about it would flood the log.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        access_log=False,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.service, settings.drain_grace_s)
    server.run()
    # uvicorn leaves started == False when start-up (model load, warm-up) failed.
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
