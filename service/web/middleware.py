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
from ..core.state import OIP_INFER
from ..page import PATHS as PAGE_PATHS

REQUEST_ID = "x-request-id"
_WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ROUTES = frozenset(
    {"/classify", "/embed", "/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", *PAGE_PATHS}
)
# Probes and scrapes come every few seconds from every balancer and Prometheus: their successes are logged at
# debug, so the access log at info shows what clients asked for.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# What the request path leaves in scope["state"] for the access record (service/core/inference.py).
TIMING_KEYS = ("preprocess_ms", "queue_ms", "inference_ms")
UPLOAD_ROUTES = frozenset({"/classify", "/embed"})
# The Open Inference Protocol's routes, as metric labels: one per route template, not per model name.
_OIP_ROUTES = (
    (OIP_INFER, "/v2/models/{model}/infer"),
    (re.compile(r"^/v2/models/[^/]+(?:/versions/\d+)?/ready$"), "/v2/models/{model}/ready"),
    (re.compile(r"^/v2/models/[^/]+(?:/versions/\d+)?/config$"), "/v2/models/{model}/config"),
    (re.compile(r"^/v2/models/[^/]+(?:/versions/\d+)?$"), "/v2/models/{model}"),
    (re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$"), "/v2/repository/models/{model}/{action}"),
    (re.compile(r"^/v2(/health/live|/health/ready|/repository/index)?$"), None),
)


def route_label(path: str) -> str:
    """The route a path belongs to, for metrics and the access log ("other" for no route of ours)."""
    if path in ROUTES:
        return path
    for pattern, template in _OIP_ROUTES:
        if pattern.match(path):
            return template or path
    return "other"


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
    """Assign a request id (a client's own only if well-formed), count and time every request by route,
    log one access record for it, and ask clients to reconnect elsewhere (Connection: close) while the
    server drains."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        draining: Callable[[], bool],
        model: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.app, self.metrics, self.draining, self.model = app, metrics, draining, model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = _header(scope, REQUEST_ID.encode())
        request_id = offered if offered and _WELL_FORMED_ID.fullmatch(offered) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, time.perf_counter()
        route = route_label(scope["path"])
        status, received = 500, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

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
        token = request_id_var.set(request_id)  # for whatever is logged while this request is served
        try:
            await self.app(scope, counting_receive, send_with_context)
        finally:
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - state["started"]
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            self._log_access(scope, route, status, received, elapsed)
            request_id_var.reset(token)

    def _log_access(self, scope: Scope, route: str, status: int, received: int, elapsed: float) -> None:
        """The request's access record; the inference figures are there when the request got that far."""
        state, client = scope["state"], scope.get("client")
        # raw_path keeps the percent-encoding: a decoded path could carry a newline into a text log.
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else scope["path"]
        fields: dict[str, object] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "model": state.get("model") or self.model(),
            "model_version": state.get("model_version"),
            "images": state.get("images"),
            "bytes_received": received,
            **{key: state.get(key) for key in TIMING_KEYS},
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        quiet = route in QUIET_ROUTES and status < 400
        log_access(logging.DEBUG if quiet else logging.INFO, fields)


class UploadLimitMiddleware:
    """On upload routes: 415 unless multipart/form-data, 413 as soon as the body passes `max_bytes`, 429 when
    `max_requests` uploads are already in progress, when their bodies would pass `max_buffered` bytes, or
    when the queue is full.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body is counted
    as it streams in, so an oversized upload is never buffered, in memory or on disk. A body that ends
    before its closing boundary is a 400 (malformed_request). Uploads are parsed (spooled to disk past
    1 MiB a part) before the batcher admits their images and held until their answer, so the bytes of all
    bodies in progress are what the temp-dir spool and memory must hold: a declared body reserves its
    length before it is read, a chunked one counts as it arrives.
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
        """Body bytes the uploads in progress hold (declared, or received so far when chunked)."""
        return self.budget.buffered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        multipart = scope["path"] in UPLOAD_ROUTES
        if not multipart and not OIP_INFER.match(scope["path"]):  # an OIP request body: JSON and binary tensors
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        length = _header(scope, b"content-length")
        refusal: tuple[str, str] | None = None
        headers: dict[str, str] = {}
        if multipart and content_type != "multipart/form-data":
            refusal = ("unsupported_media_type", "send the images as multipart/form-data")
        elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            refusal = ("payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
        elif (retry_after := self.overloaded(scope)) is not None or not self.budget.has_room(int(length or 0)):
            # No room for even one image, for one more upload or for its body: refuse before reading (and
            # holding) the body.
            refusal = ("overloaded", ERRORS["overloaded"][1])
            headers["retry-after"] = str(retry_after or 1)
        if refusal is not None:
            # Answered before the body is read; LingeringCloseMiddleware discards what the client still sends.
            code, message = refusal
            body = error_payload(code, message, scope.get("state", {}).get("request_id"), scope["path"])
            await JSONResponse(body, status_code=ERRORS[code][0], headers=headers)(scope, receive, send)
            return
        received = 0
        held = int(length) if length is not None else 0  # bytes counted against max_buffered
        # python-multipart silently drops a part whose closing delimiter never arrives: a body cut short lost
        # its last image without an error (one of two images answered 200) or read as a missing field (422).
        # So the close delimiter must be seen before the body ends; it may straddle two chunks.
        close = _close_delimiter(_header(scope, b"content-type") or "") if multipart else None
        closed, tail = close is None, b""

        async def counting_receive() -> Message:
            nonlocal received, closed, tail, held
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > self.max_bytes:
                    raise ServiceError("payload_too_large", f"the request body exceeds {self.max_bytes} bytes")
                if received > held:  # chunked: nothing was reserved up front
                    grown = self.budget.grow(received - held)
                    held = received
                    if not grown:
                        raise ServiceError("overloaded", headers={"retry-after": "1"})
                if not closed and close is not None:
                    keep = len(close) - 1
                    closed = close in chunk or close in tail + chunk[:keep]
                    tail = (tail + chunk[-keep:])[-keep:]
                if not closed and not message.get("more_body", False):
                    raise ServiceError("malformed_request", "the multipart body ends before its closing boundary")
            return message

        self.budget.enter(held)
        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.budget.leave(held)
