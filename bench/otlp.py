"""An OTLP trace receiver on loopback, over HTTP/protobuf or gRPC, that decodes what it gets with the protocol's
own protobuf messages (opentelemetry-proto): the collector that the tracing tests and the tracing benchmark
send spans to.

    with receiver("http") as sink:       # or "grpc"
        ... RESNEST_OTEL_ENDPOINT=sink.endpoint ...
        spans = sink.wait(lambda spans: ..., timeout=10)
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    """One received span, its ids as hex as W3C trace context writes them."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 is SERVER
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id) of each linked span
    status_code: int  # 0 unset, 1 ok, 2 error
    service_name: str


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    """The spans of one ExportTraceServiceRequest."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    return spans_of(request)


def spans_of(request: Any) -> list[Span]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        name=s.name, kind=s.kind, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        status_code=s.status.code, service_name=str(resource.get("service.name", "")),
                    )
                )  # fmt: skip
    return out


@dataclass
class Receiver:
    """What arrived so far, and where to send more."""

    endpoint: str
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, spans: list[Span]) -> None:
        with self.lock:
            self.spans.extend(spans)
            self.requests += 1

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def wait(self, done: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
        """The spans once `done` holds of them (polled; the timeout only stops a hang)."""
        deadline = time.monotonic() + timeout
        while not done(spans := self.snapshot()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the spans expected did not arrive in {timeout}s ({len(spans)} arrived)")
            time.sleep(0.05)
        return spans


@contextlib.contextmanager
def receiver(protocol: str = "http") -> Iterator[Receiver]:
    """A receiver on a free loopback port for the block: OTLP/HTTP (POST /v1/traces) or OTLP/gRPC."""
    if protocol == "grpc":
        import grpc

        class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                sink.add(spans_of(request))
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        sink = Receiver(f"http://127.0.0.1:{port}")
        server.start()
        try:
            yield sink
        finally:
            server.stop(grace=None)
        return

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding") == "gzip":  # OTEL_EXPORTER_OTLP_COMPRESSION=gzip
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            sink.add(decode(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = Receiver(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        httpd.shutdown()
        httpd.server_close()
