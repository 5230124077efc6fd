"""Pure-ASGI middleware: request ids and per-route metrics, and upload limits enforced while streaming."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ERRORS, ServiceError, error_payload
from .metrics import Metrics
from .responses import JSONResponse

REQUEST_ID = "x-request-id"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ROUTES = frozenset({"/classify", "/embed", "/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
UPLOAD_ROUTES = frozenset({"/classify", "/embed"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _close_delimiter(content_type: str) -> bytes | None:
    """`--boundary--`, the line that ends a multipart body (None without a boundary: the form parser refuses)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


class RequestContextMiddleware:
    """Assign a request id (a client's own only if well-formed), count and time every request by route,
    and ask clients to reconnect elsewhere (Connection: close) while the server drains."""

    def __init__(self, app: ASGIApp, metrics: Metrics, draining: Callable[[], bool]) -> None:
        self.app, self.metrics, self.draining = app, metrics, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = _header(scope, REQUEST_ID.encode())
        request_id = offered if offered and _WELL_FORMED_ID.fullmatch(offered) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID.encode(), request_id.encode()))
                if self.draining():
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_context)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - state["started"])


class UploadLimitMiddleware:
    """On upload routes: 415 unless multipart/form-data, 413 as soon as the body passes `max_bytes`.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body is counted
    as it streams in, so an oversized upload is never buffered, in memory or on disk. A body that ends
    before its closing boundary is a 400 (malformed_request).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, overloaded: Callable[[], int | None] = lambda: None) -> None:
        self.app, self.max_bytes, self.overloaded = app, max_bytes, overloaded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in UPLOAD_ROUTES or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        length = _header(scope, b"content-length")
        refusal: tuple[str, str] | None = None
        headers: dict[str, str] = {}
        if content_type != "multipart/form-data":
            refusal = ("unsupported_media_type", "send the images as multipart/form-data")
        elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            refusal = ("payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
        elif (retry_after := self.overloaded()) is not None:
            # No room for even one image: refuse before reading (and holding) the upload.
            refusal = ("overloaded", ERRORS["overloaded"][1])
            headers["retry-after"] = str(retry_after)
        if refusal is not None:
            # Answered before the body is read; the server then discards or closes on the unread body.
            code, message = refusal
            body = error_payload(code, message, scope.get("state", {}).get("request_id"))
            await JSONResponse(body, status_code=ERRORS[code][0], headers=headers)(scope, receive, send)
            return
        received = 0
        # python-multipart silently drops a part whose closing delimiter never arrives: a body cut short lost
        # its last image without an error (one of two images answered 200) or read as a missing field (422).
        # So the close delimiter must be seen before the body ends; it may straddle two chunks.
        close = _close_delimiter(_header(scope, b"content-type") or "")
        closed, tail = close is None, b""

        async def counting_receive() -> Message:
            nonlocal received, closed, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > self.max_bytes:
                    raise ServiceError("payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
                if not closed and close is not None:
                    keep = len(close) - 1
                    closed = close in chunk or close in tail + chunk[:keep]
                    tail = (tail + chunk[-keep:])[-keep:]
                if not closed and not message.get("more_body", False):
                    raise ServiceError("malformed_request", "the multipart body ends before its closing boundary")
            return message

        await self.app(scope, counting_receive, send)
