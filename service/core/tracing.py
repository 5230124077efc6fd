"""OpenTelemetry traces of the request path, off unless RESNEST_OTEL_ENDPOINT is set.

On, each request gets one server span that continues the caller's W3C `traceparent` (an HTTP header or gRPC
metadata), with a child span per stage of the request path (admission, decode, queue, inference, postprocess)
and, per batch, one span linked to every request it served (and each request's inference span linked back to
it). Spans go out over OTLP (HTTP/protobuf, or gRPC where OTEL_EXPORTER_OTLP_PROTOCOL=grpc) from a background
batch processor; the standard OTEL_* variables (service name, resource, sampler, propagators, headers, batch
sizes) are honoured by the SDK itself. Off, nothing of OpenTelemetry's SDK is imported, every hook returns at
its first test, and a request carries no span.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext, Tracer

    from .logs import AccessRecord

log = logging.getLogger("service.tracing")

SERVICE_NAME = "resnest-serve"
# gRPC status codes whose server spans are errors (OpenTelemetry's RPC semantic conventions): the server's
# fault or its unavailability, not a client's bad argument.
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}  # fmt: skip


def _exporter(endpoint: str) -> Any:
    """The OTLP span exporter for `endpoint`: gRPC where OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says grpc, else
    HTTP/protobuf, whose traces path (/v1/traces) is added to a base URL as OTEL_EXPORTER_OTLP_ENDPOINT's is."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if (protocol or "http/protobuf") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=url)


class Tracing:
    """The service's tracer (None when off) and the hooks the fronts and the request path call."""

    def __init__(self, endpoint: str | None) -> None:
        self.tracer: Tracer | None = None
        self._provider: Any = None
        disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if endpoint is None or disabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win over this default; the
        # provider reads OTEL_TRACES_SAMPLER (default: follow the caller's sampled flag, sample new roots).
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self.tracer = self._provider.get_tracer("service", "0.1.0")
        log.info("tracing on: OTLP spans to %s", endpoint)

    @property
    def on(self) -> bool:
        return self.tracer is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop (at the service's stop)."""
        if self._provider is not None:
            self._provider.shutdown()

    # -- the request span ----------------------------------------------------------------------------------
    def begin(self, record: AccessRecord, carrier: Mapping[str, str], name: str, attributes: dict[str, Any]) -> None:
        """Open the request's server span as a child of the caller's context in `carrier` (headers or
        metadata, lower-case keys), and put the trace id in its access record."""
        if self.tracer is None:
            return
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, format_trace_id

        # propagate.extract uses OTEL_PROPAGATORS (default: W3C trace context and baggage).
        parent = propagate.extract(carrier)
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        record.span = span
        context = span.get_span_context()
        if context.is_valid:
            record.trace_id = format_trace_id(context.trace_id)

    def end(self, record: AccessRecord, attributes: dict[str, Any], error: bool, message: str = "") -> None:
        """Close the request's span with its outcome and what the request path learnt (model, images)."""
        span = record.span
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        if record.model is not None:
            attributes["resnest.model"] = record.model
        if record.model_version is not None:
            attributes["resnest.model_version"] = record.model_version
        if record.images is not None:
            attributes["resnest.images"] = record.images
        if record.cache is not None:
            attributes["resnest.cache"] = record.cache
        span.set_attributes(attributes)
        if error:
            span.set_status(Status(StatusCode.ERROR, message or None))
        span.end()
        record.span = None

    # -- stages ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, record: AccessRecord, name: str, **attributes: Any) -> Iterator[None]:
        """A child span of the request's for the block (nothing when the request has no span)."""
        span = record.span
        if span is None:
            yield
            return
        child = self._child(span, name, time.time_ns(), attributes)
        try:
            yield
        except BaseException as exc:
            from opentelemetry.trace import Status, StatusCode

            child.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            child.end()

    def span_between(self, record: AccessRecord, name: str, start_ns: int, end_ns: int,
                     links: list[SpanContext] | None = None, **attributes: Any) -> None:  # fmt: skip
        """A child span of the request's that already happened (queue wait, inference), from its timestamps."""
        span = record.span
        if span is None or not start_ns:
            return
        self._child(span, name, start_ns, attributes, links).end(end_time=max(end_ns, start_ns))

    @staticmethod
    def context_of(record: AccessRecord) -> SpanContext | None:
        """The request span's context, for the batch that serves it to link to (None: not traced or sampled)."""
        span = record.span
        if span is None:
            return None
        context = span.get_span_context()
        return context if context.trace_flags.sampled else None

    def _child(self, parent: Span, name: str, start_ns: int, attributes: dict[str, Any],
               links: list[SpanContext] | None = None) -> Span:  # fmt: skip
        from opentelemetry.trace import Link, set_span_in_context

        assert self.tracer is not None  # a request has a span only when tracing is on
        return self.tracer.start_span(
            name, context=set_span_in_context(parent), attributes=attributes or None,
            links=[Link(c) for c in links or ()], start_time=start_ns,
        )  # fmt: skip

    def batch(self, requests: list[SpanContext], start_ns: int, end_ns: int, attributes: dict[str, Any]) -> Any:
        """One batch's span, a root of its own linked to each sampled request it served; its context back."""
        if self.tracer is None or not requests:
            return None
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind

        span = self.tracer.start_span(
            "batch", context=Context(), kind=SpanKind.INTERNAL, attributes=attributes,
            links=[Link(c) for c in requests], start_time=start_ns,
        )  # fmt: skip
        span.end(end_time=end_ns)
        return span.get_span_context()


def http_attributes(method: str, route: str, path: str, client: str | None, scheme: str) -> dict[str, Any]:
    """An HTTP server span's attributes, as OpenTelemetry's HTTP semantic conventions name them."""
    attributes: dict[str, Any] = {"http.request.method": method, "http.route": route, "url.path": path,
                                  "url.scheme": scheme}  # fmt: skip
    if client:
        host, _, port = client.rpartition(":")
        attributes["client.address"] = host
        if port.isdigit():
            attributes["client.port"] = int(port)
    return attributes


def http_outcome(status: int) -> tuple[dict[str, Any], bool]:
    """The response status as an attribute, and whether the span is an error (a 5xx, for a server)."""
    return {"http.response.status_code": status}, status >= 500


def grpc_attributes(full_method: str) -> dict[str, Any]:
    """A gRPC server span's attributes (RPC semantic conventions): system, service and method."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def grpc_outcome(code: str) -> tuple[dict[str, Any], bool]:
    """The status code as an attribute, and whether the span is an error for a server."""
    return {"rpc.grpc.status_code": GRPC_CODES.get(code, 2)}, code in GRPC_SERVER_ERRORS
