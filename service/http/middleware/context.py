"""Every HTTP request's context: its route, its id, its metrics and its access record."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.errors import ServiceError
from ...core.logs import AccessRecord, request_id, request_id_var
from ...core.metrics import Metrics
from ...core.tracing import Tracing, http_attributes, http_outcome
from ..errors import answer
from ..routing import RouteTable
from ..scope import RECORD, ROUTE, header

log = logging.getLogger("service.http")

REQUEST_ID = "x-request-id"
# Probes and scrapes come every few seconds from every balancer and Prometheus: their successes are logged at
# debug, so the access log at info shows what clients asked for.
QUIET_OPERATIONS = frozenset({"live", "ready", "metrics"})


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
        tracing: Tracing | None = None,
    ) -> None:
        self.app, self.metrics, self.routes, self.draining, self.model = app, metrics, routes, draining, model
        self.tracing = tracing if tracing is not None and tracing.on else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.match(scope)
        client = scope.get("client")
        # raw_path keeps the percent-encoding: a decoded path could carry a newline into a text log.
        raw_path = scope.get("raw_path")
        record = AccessRecord(
            request_id=request_id(header(scope, REQUEST_ID.encode())),
            method=scope["method"],
            path=raw_path.decode("latin-1") if isinstance(raw_path, bytes) else scope["path"],
            route=route.label,
            client=f"{client[0]}:{client[1]}" if client else None,
            bytes_received=0,
        )
        state = scope.setdefault("state", {})
        state[RECORD], state[ROUTE], state["request_id"] = record, route, record.request_id
        if self.tracing is not None:
            # The caller's traceparent continues here; the span is named by the route's template, not the path.
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            name = f"{scope['method']} {route.label}" if route.operation is not None else scope["method"]
            attributes = http_attributes(scope["method"], route.label, record.path, record.client,
                                         scope.get("scheme", "http"))  # fmt: skip
            self.tracing.begin(record, carrier, name, attributes)
        started = False

        async def counting_receive() -> Message:
            message = await receive()
            record.bytes_received = (record.bytes_received or 0) + len(message.get("body", b""))
            return message

        async def send_with_context(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                record.status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID.encode(), record.request_id.encode()))
                if self.draining():
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.inflight.inc()
        token = request_id_var.set(record.request_id)  # for whatever is logged while this request is served
        try:
            await self.app(scope, counting_receive, send_with_context)
        except Exception:
            if started:
                raise  # the answer is half sent: the server can only close the connection
            # Here, not in the app's outermost handler, so the 500 carries the request id it is logged under.
            log.exception("unhandled error (request %s)", record.request_id)
            await answer(scope, ServiceError("internal_error", "internal error"))(scope, receive, send_with_context)
        finally:
            self.metrics.inflight.dec()
            status = record.status if record.status is not None else 500
            record.status = status
            self.metrics.requests.labels(route.label, str(status)).inc()
            self.metrics.latency.labels(route.label).observe(record.elapsed())
            if record.model is None:  # the request never reached a model: the default one serves the route
                record.model = self.model()
            if self.tracing is not None:
                self.tracing.end(record, *http_outcome(int(status)))
            record.emit(quiet=route.operation in QUIET_OPERATIONS and int(status) < 400)
            request_id_var.reset(token)
