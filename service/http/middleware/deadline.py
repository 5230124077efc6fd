"""Request bodies arrive in time, or are answered 408 and their connection closed."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.errors import ServiceError
from ..errors import BodyRefused
from ..scope import BODY_TIMED_OUT, declares_body


class BodyDeadlineMiddleware:
    """nginx's client_body_timeout with Apache's MinRate: at most `timeout_s` between two reads, and `timeout_s`
    plus one second per `min_rate` bytes received in all. A silent client and one that trickles a few bytes a
    second are cut off alike, so neither can hold an upload's place for longer than that."""

    def __init__(self, app: ASGIApp, timeout_s: float, min_rate: int) -> None:
        self.app, self.timeout_s, self.min_rate = app, timeout_s, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not declares_body(scope):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started, received, ended = loop.time(), 0, False

        async def timed_receive() -> Message:
            nonlocal received, ended
            if ended:  # past the body: what is awaited now is a disconnect, which may take as long as it likes
                return await receive()
            left = min(self.timeout_s, started + self.timeout_s + received / self.min_rate - loop.time())
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                scope.setdefault("state", {})[BODY_TIMED_OUT] = True
                raise BodyRefused(
                    ServiceError(
                        "request_timeout",
                        f"the request body did not arrive in time (at most {self.timeout_s:g}s between reads and "
                        f"{self.min_rate} bytes a second on average); {received} bytes arrived",
                        headers={"connection": "close"},
                    )
                ) from None
            received += len(message.get("body", b""))
            ended = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
