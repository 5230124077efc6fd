"""Pure-ASGI middleware: request ids and per-route metrics, upload limits enforced while streaming, and a
lingering close so that an answer given before the body was read reaches its client."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.admission import UploadBudget
from ..core.errors import ERRORS, ServiceError, error_payload
from ..core.logs import log_access, request_id_var
from ..core.metrics import Metrics
from ..core.responses import JSONResponse
from .routing import RouteMatch, RouteTable

log = logging.getLogger("service.web")

REQUEST_ID = "x-request-id"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# A Content-Length int() can read: ASCII digits (str.isdigit() accepts "²"), and not thousands of them.
_LENGTH = re.compile(r"[0-9]{1,15}")
# Probes and scrapes come every few seconds from every balancer and Prometheus: their successes are logged at
# debug, so the access log at info shows what clients asked for.
QUIET_OPERATIONS = frozenset({"live", "ready", "metrics"})
# What the request path leaves in scope["state"] for the access record (service/core/inference.py).
TIMING_KEYS = ("preprocess_ms", "queue_ms", "inference_ms")
# Set in the request's state when its body missed its deadline: the lingering close does not wait for it.
BODY_TIMED_OUT = "body_timed_out"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _close_delimiter(content_type: str) -> bytes | None:
    """`--boundary--`, the line that ends a multipart body (None without a boundary: the form parser refuses)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


def _declares_body(scope: Scope) -> bool:
    """Whether the request says a body follows (a non-zero Content-Length, or chunked)."""
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() not in ("", "0"))


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
        if scope["type"] != "http" or not _declares_body(scope):
            await self.app(scope, receive, send)
            return
        # A client waiting for 100 Continue that got a final answer sends no body: nothing to wait for.
        expects_continue = (_header(scope, b"expect") or "").lower() == "100-continue"
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


class RequestContextMiddleware:
    """Match the route, assign a request id (a client's own only if well-formed), count and time every request
    by route, log one access record for it, answer what escapes the app with a 500 that still carries the
    request id, and ask clients to reconnect elsewhere (Connection: close) while the server drains."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: RouteTable,
        draining: Callable[[], bool],
        model: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.app, self.metrics, self.routes, self.draining, self.model = app, metrics, routes, draining, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = _header(scope, REQUEST_ID.encode())
        request_id = offered if offered and _WELL_FORMED_ID.fullmatch(offered) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        route = self.routes.match(scope)
        state["request_id"], state["started"], state["route"] = request_id, time.perf_counter(), route
        status, received, started = 500, 0, False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_context(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID.encode(), request_id.encode()))
                if self.draining():
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.inflight.inc()
        token = request_id_var.set(request_id)  # for whatever is logged while this request is served
        try:
            await self.app(scope, counting_receive, send_with_context)
        except Exception:
            if started:
                raise  # the answer is half sent: the server can only close the connection
            # Here, not in the app's outermost handler, so the 500 carries the request id it is logged under.
            log.exception("unhandled error (request %s)", request_id)
            body = error_payload("internal_error", "internal error", request_id, scope["path"])
            await JSONResponse(body, status_code=500)(scope, receive, send_with_context)
        finally:
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - state["started"]
            self.metrics.requests.labels(route.label, str(status)).inc()
            self.metrics.latency.labels(route.label).observe(elapsed)
            self._log_access(scope, route, status, received, elapsed)
            request_id_var.reset(token)

    def _log_access(self, scope: Scope, route: RouteMatch, status: int, received: int, elapsed: float) -> None:
        """The request's access record; the inference figures are there when the request got that far."""
        state, client = scope["state"], scope.get("client")
        # raw_path keeps the percent-encoding: a decoded path could carry a newline into a text log.
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else scope["path"]
        fields: dict[str, object] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": path,
            "route": route.label,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "model": state.get("model") or self.model(),
            "model_version": state.get("model_version"),
            "images": state.get("images"),
            "bytes_received": received,
            **{key: state.get(key) for key in TIMING_KEYS},
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        quiet = route.operation in QUIET_OPERATIONS and status < 400
        log_access(logging.DEBUG if quiet else logging.INFO, fields)


class BodyDeadlineMiddleware:
    """A request body arrives in time or is answered 408 and its connection closed (nginx's client_body_timeout
    with Apache's MinRate): at most `timeout_s` between two reads, and `timeout_s` plus one second per
    `min_rate` bytes received in all. A silent client and one that trickles a few bytes a second are cut off
    alike, so neither can hold an upload's place for longer than that."""

    def __init__(self, app: ASGIApp, timeout_s: float, min_rate: int) -> None:
        self.app, self.timeout_s, self.min_rate = app, timeout_s, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _declares_body(scope):
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
                raise ServiceError(
                    "request_timeout",
                    f"the request body did not arrive in time (at most {self.timeout_s:g}s between reads and "
                    f"{self.min_rate} bytes a second on average); {received} bytes arrived",
                    headers={"connection": "close"},
                ) from None
            received += len(message.get("body", b""))
            ended = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class UploadLimitMiddleware:
    """On upload routes: 415 unless multipart/form-data, 413 as soon as the body passes `max_bytes`, 429 when
    `max_requests` uploads are already in progress, when the bytes they hold would pass `max_buffered`, or
    when the queue is full.

    A declared Content-Length over the limit is refused before a byte is read; every body is counted as it
    streams in, so an oversized upload is never buffered, in memory or on disk, and the budget holds the bytes
    that really arrived: a client that declares 20 MiB and sends nothing holds an upload's place (until its
    body deadline), not 20 MiB of the budget. A body that ends before its closing boundary is a 400
    (malformed_request). Uploads are parsed (spooled to disk past 1 MiB a part) before the batcher admits
    their images and held until their answer, so the bytes of all bodies in progress are what the temp-dir
    spool and memory must hold.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_requests: int = 1 << 30,
        overloaded: Callable[[Scope], int | None] = lambda scope: None,
        max_buffered: int = 1 << 62,
        budget: UploadBudget | None = None,
    ) -> None:
        self.app, self.max_bytes, self.overloaded = app, max_bytes, overloaded
        # Shared with the gRPC front when the app passes the service's own (ServiceState.uploads).
        self.budget = budget if budget is not None else UploadBudget(max_requests, max_buffered)

    @property
    def buffered(self) -> int:
        """Body bytes the uploads in progress hold (received so far)."""
        return self.budget.buffered

    def _refusal(self, scope: Scope, route: RouteMatch) -> tuple[str, str, dict[str, str]] | None:
        """What to answer before reading the body, or None to read it."""
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        length = _header(scope, b"content-length")
        if route.multipart and content_type != "multipart/form-data":
            return "unsupported_media_type", "send the images as multipart/form-data", {}
        if length is not None and (not _LENGTH.fullmatch(length) or int(length) > self.max_bytes):
            return "payload_too_large", f"the request body exceeds {self.max_bytes} bytes", {}
        if (retry_after := self.overloaded(scope)) is not None or not self.budget.has_room(1):
            # No room for even one image, for one more upload or for one more byte: refuse before reading.
            return "overloaded", ERRORS["overloaded"][1], {"retry-after": str(retry_after or 1)}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: RouteMatch | None = scope.get("state", {}).get("route")
        if scope["type"] != "http" or scope["method"] != "POST" or route is None or not route.upload:
            await self.app(scope, receive, send)
            return
        if (refusal := self._refusal(scope, route)) is not None:
            # Answered before the body is read; LingeringCloseMiddleware discards what the client still sends.
            code, message, headers = refusal
            body = error_payload(code, message, scope["state"].get("request_id"), scope["path"])
            await JSONResponse(body, status_code=ERRORS[code][0], headers=headers)(scope, receive, send)
            return
        held = 0  # bytes received, counted against max_buffered
        # python-multipart silently drops a part whose closing delimiter never arrives: a body cut short lost
        # its last image without an error (one of two images answered 200) or read as a missing field (422).
        # So the close delimiter must be seen before the body ends; it may straddle two chunks.
        close = _close_delimiter(_header(scope, b"content-type") or "") if route.multipart else None
        closed, tail = close is None, b""

        async def counting_receive() -> Message:
            nonlocal closed, tail, held
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                if held + len(chunk) > self.max_bytes:
                    raise ServiceError("payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
                grown = self.budget.grow(len(chunk))
                held += len(chunk)
                if not grown:
                    raise ServiceError("overloaded", headers={"retry-after": "1"})
                if not closed and close is not None:
                    keep = len(close) - 1
                    closed = close in chunk or close in tail + chunk[:keep]
                    tail = (tail + chunk[-keep:])[-keep:]
                if not closed and not message.get("more_body", False):
                    raise ServiceError("malformed_request", "the multipart body ends before its closing boundary")
            return message

        self.budget.enter(0)
        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.budget.leave(held)
