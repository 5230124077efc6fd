"""Uploads over HTTP meet admission (service/core/request/admission.py) before and while their body is read."""

from __future__ import annotations

import re
from urllib.parse import parse_qs

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.errors import ServiceError
from ...core.identifiers import parse_version
from ...core.request.admission import before_body, overloaded
from ...core.state import ServiceState
from ..errors import BodyRefused, answer
from ..routing import RouteMatch
from ..scope import header, route_of

# A Content-Length int() can read: ASCII digits (str.isdigit() accepts "²"), and not thousands of them.
_LENGTH = re.compile(r"[0-9]{1,15}")


def _close_delimiter(content_type: str) -> bytes | None:
    """`--boundary--`, the line that ends a multipart body (None without a boundary: the form parser refuses)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


def _target(scope: Scope, route: RouteMatch) -> tuple[str | None, int | None]:
    """The model and version an upload names (the OIP path, or /classify's query), None where it names none or
    names one badly (its handler then answers that)."""
    if "model_name" in route.params:
        name, given = route.params["model_name"], route.params.get("model_version")
    else:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        name, given = query.get("model", [None])[0], query.get("version", [None])[0]
    try:
        return name, parse_version(given)
    except ServiceError:
        return name, None


class UploadLimitMiddleware:
    """On upload routes: 415 unless multipart/form-data; then admission's refusals before the body (413 for a
    declared length over the limit, 429 for no place, no byte of room or a full queue); then, as the body
    streams in, 413 past the upload limit and 429 past the byte budget, and 400 for a multipart body that
    ends before its closing boundary.

    Every body is counted as it arrives, so an oversized upload is never buffered, in memory or on disk, and
    the budget holds the bytes that really arrived: a client that declares 20 MiB and sends nothing holds an
    upload's place (until its body deadline), not 20 MiB of the budget. Uploads are parsed (spooled to disk
    past 1 MiB a part) before the batcher admits their images and held until their answer, so the bytes of
    all bodies in progress are what the temp-dir spool and memory must hold.
    """

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app, self.state = app, state
        self.budget = state.uploads  # shared with the gRPC front

    def _refusal(self, scope: Scope, route: RouteMatch) -> ServiceError | None:
        """What to answer before reading the body, or None to read it."""
        content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if route.multipart and content_type != "multipart/form-data":
            return ServiceError("unsupported_media_type", "send the images as multipart/form-data")
        length = header(scope, b"content-length")
        if length is not None and not _LENGTH.fullmatch(length):
            return ServiceError("payload_too_large", "the Content-Length is not a length this server accepts")
        state = self.state
        name, version = _target(scope, route)
        declared = int(length) if length is not None else None
        return before_body(state.settings, self.budget, state.registry, name, version, declared)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_of(scope)
        if scope["type"] != "http" or scope["method"] != "POST" or not route.upload:
            await self.app(scope, receive, send)
            return
        if (refusal := self._refusal(scope, route)) is not None:
            # Answered before the body is read; LingeringCloseMiddleware discards what the client still sends.
            await answer(scope, refusal)(scope, receive, send)
            return
        limit = self.state.settings.max_upload_bytes
        held = 0  # bytes received, counted against the budget
        # python-multipart silently drops a part whose closing delimiter never arrives: a body cut short lost
        # its last image without an error (one of two images answered 200) or read as a missing field (422).
        # So the close delimiter must be seen before the body ends; it may straddle two chunks.
        close = _close_delimiter(header(scope, b"content-type") or "") if route.multipart else None
        closed, tail = close is None, b""

        async def counting_receive() -> Message:
            nonlocal closed, tail, held
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                if held + len(chunk) > limit:
                    raise BodyRefused(ServiceError("payload_too_large", f"the request body exceeds {limit} bytes"))
                grown = self.budget.grow(len(chunk))
                held += len(chunk)
                if not grown:
                    raise BodyRefused(overloaded())
                if not closed and close is not None:
                    keep = len(close) - 1
                    closed = close in chunk or close in tail + chunk[:keep]
                    tail = (tail + chunk[-keep:])[-keep:]
                if not closed and not message.get("more_body", False):
                    raise BodyRefused(
                        ServiceError("malformed_request", "the multipart body ends before its closing boundary")
                    )
            return message

        self.budget.enter(0)
        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.budget.leave(held)
