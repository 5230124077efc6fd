"""What the HTTP front reads off an ASGI scope before the app runs: headers, whether a body follows, and the
per-request state the middleware and the routes share."""

from __future__ import annotations

from starlette.types import Scope

from ..core.logs import AccessRecord
from .routing import NO_ROUTE, RouteMatch

# Keys of scope["state"] (request.state in a route) that the middleware sets.
RECORD = "record"  # the request's AccessRecord (RequestContextMiddleware)
ROUTE = "route"  # the RouteMatch (RequestContextMiddleware)
BODY_TIMED_OUT = "body_timed_out"  # its body missed its deadline: the lingering close does not wait for it


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case), decoded as latin-1."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def declares_body(scope: Scope) -> bool:
    """Whether the request says a body follows (a non-zero Content-Length, or chunked)."""
    length = header(scope, b"content-length")
    return header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() not in ("", "0"))


def route_of(scope: Scope) -> RouteMatch:
    """The route RequestContextMiddleware matched (none outside it)."""
    return scope.get("state", {}).get(ROUTE, NO_ROUTE)  # type: ignore[no-any-return]


def record_of(scope: Scope) -> AccessRecord:
    """The request's access record, which RequestContextMiddleware made on arrival."""
    return scope["state"][RECORD]  # type: ignore[no-any-return]
