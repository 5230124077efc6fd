"""A lingering close: an answer given before the body was read reaches its client."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..scope import BODY_TIMED_OUT, declares_body, header


class LingeringCloseMiddleware:
    """Read and discard what is left of a request body after the answer, before the server may close.

    Refusals (415, 413, 429, 400) are answered before the body is read. A server that then closes the socket
    with unread bytes in it makes the kernel send a reset, and a client still uploading (or reading after it
    wrote everything) gets ECONNRESET instead of the answer: measured here, every Connection: close client
    that sent a 2 MB body to a 415. So the answer's last frame waits until the body has ended, bounded by
    `seconds` and `max_bytes` (beyond either the server closes anyway, as nginx's lingering_time does).
    """

    def __init__(self, app: ASGIApp, seconds: float, max_bytes: int) -> None:
        self.app, self.seconds, self.max_bytes = app, seconds, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not declares_body(scope):
            await self.app(scope, receive, send)
            return
        # A client waiting for 100 Continue that got a final answer sends no body: nothing to wait for.
        expects_continue = (header(scope, b"expect") or "").lower() == "100-continue"
        body_ended, receive_called = False, False
        held: Message | None = None

        async def tracking_receive() -> Message:
            nonlocal body_ended, receive_called
            receive_called = True
            message = await receive()
            body_ended = message["type"] == "http.disconnect" or not message.get("more_body", False)
            return message

        async def holding_send(message: Message) -> None:
            nonlocal held
            unread = not body_ended and not (expects_continue and not receive_called)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and unread:
                # Everything but the end of the response goes out now; the client has its answer at once.
                held = {"type": "http.response.body", "body": b"", "more_body": False}
                message = {**message, "more_body": True}
            await send(message)

        try:
            await self.app(scope, tracking_receive, holding_send)
        finally:
            if held is not None:
                # A body that missed its deadline (408) is not waited for again: its client is too slow by
                # definition, and the connection closes after the answer.
                if not scope.get("state", {}).get(BODY_TIMED_OUT):
                    await self._discard_rest(receive)
                await send(held)

    async def _discard_rest(self, receive: Receive) -> None:
        """Read the body to its end, a disconnect, `seconds` or `max_bytes`, whichever comes first."""
        loop = asyncio.get_running_loop()
        deadline, discarded = loop.time() + self.seconds, 0
        while discarded <= self.max_bytes and (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return
            discarded += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
