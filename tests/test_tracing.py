"""Traces on the wire: a real server sends OTLP (HTTP/protobuf or gRPC) to a receiver that decodes the
protocol's own protobuf; each request continues the caller's W3C traceparent over multipart, OIP HTTP and OIP
gRPC, with one span per stage of the request path inside the request's span, a batch span linked both ways, and
the trace id in the JSON access record. Off, the SDK is not even imported."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from bench.forms import files
from bench.otlp import Span, receiver
from tests.conftest import ROOT, jpeg

STAGES = {"admission", "decode", "queue", "inference", "postprocess"}
CALLER_SPAN = "00f067aa0ba902b7"


def traceparent(trace_id: str) -> str:
    """A sampled W3C traceparent from a caller whose own span is CALLER_SPAN."""
    return f"00-{trace_id}-{CALLER_SPAN}-01"


def trace_env(endpoint: str, model: Path) -> dict[str, str]:
    return {
        "RESNEST_MODEL_PATH": str(model), "RESNEST_OTEL_ENDPOINT": endpoint, "RESNEST_LOG_FORMAT": "json",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export every 50 ms, so the test waits little
    }  # fmt: skip


def complete(trace_id: str):  # type: ignore[no-untyped-def]
    """Whether a trace's request span, its five stages and its batch span have all arrived."""

    def done(spans: list[Span]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        names = {s.name for s in mine}
        linked = {link for s in mine for link in s.links}
        return names >= STAGES and any((s.trace_id, s.span_id) in linked for s in spans)

    return done


def check_trace(spans: list[Span], trace_id: str, name: str, route_attributes: dict[str, object]) -> Span:
    """The request span continues the caller's, every stage is its child inside it, the batch links both ways."""
    mine = [s for s in spans if s.trace_id == trace_id]
    (server,) = [s for s in mine if s.parent_span_id == CALLER_SPAN]
    assert server.name == name and server.kind == 2  # SERVER
    assert server.service_name == "resnest-serve"
    for key, value in {**route_attributes, "resnest.model": "tiny", "resnest.model_version": 1,
                       "resnest.images": 1}.items():  # fmt: skip
        assert server.attributes.get(key) == value, (key, server.attributes)
    assert server.status_code != 2
    stages = {s.name: s for s in mine if s.parent_span_id == server.span_id}
    assert set(stages) == STAGES
    for stage in stages.values():
        assert server.start_ns <= stage.start_ns <= stage.end_ns <= server.end_ns, stage.name
    order = ["admission", "decode", "queue", "inference", "postprocess"]
    for before, after in itertools.pairwise(order):
        assert stages[before].end_ns <= stages[after].start_ns + 1_000_000, (before, after)  # within 1 ms
    (batch_link,) = stages["inference"].links
    (batch,) = [s for s in spans if (s.trace_id, s.span_id) == batch_link]
    assert batch.name == "batch" and batch.attributes["resnest.batch.images"] >= 1
    assert (trace_id, server.span_id) in batch.links
    assert batch.attributes["resnest.model"] == "tiny"
    return server


def access_records(log: str) -> list[dict[str, object]]:
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "service.access":
                records.append(entry)
    return records


def test_every_protocol_continues_the_callers_trace(server_factory, tiny_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    """Multipart, OIP HTTP and OIP gRPC, each with a known traceparent; checked as received over OTLP/HTTP."""
    image = jpeg((96, 72), (200, 30, 40))
    ids = {"multipart": "4bf92f3577b34da6a3ce929d0e0e4736", "oip-http": "5bf92f3577b34da6a3ce929d0e0e4736",
           "oip-grpc": "6bf92f3577b34da6a3ce929d0e0e4736"}  # fmt: skip
    with receiver("http") as sink:
        server = server_factory({**trace_env(sink.endpoint, tiny_onnx), "RESNEST_DEFAULT_MODEL": "tiny"})
        with httpx.Client(base_url=server.url, timeout=60) as http:
            answer = http.post("/classify", files=files(image), headers={"traceparent": traceparent(ids["multipart"])})
            assert answer.status_code == 200
            body = {"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES",
                                "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
            oip = http.post("/v2/models/tiny/infer", json=body, headers={"traceparent": traceparent(ids["oip-http"])})
            assert oip.status_code == 200
            untraced = http.post("/classify", files=files(image))  # a new trace of its own
            assert untraced.status_code == 200
        client = triton_grpc.InferenceServerClient(server.grpc_target)
        tensor = triton_grpc.InferInput("image_bytes", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_).reshape(1, 1))
        client.infer("tiny", [tensor], headers={"traceparent": traceparent(ids["oip-grpc"])})
        client.close()
        spans = sink.wait(lambda s: all(complete(t)(s) for t in ids.values()), timeout=30)

    multipart = {"http.request.method": "POST", "http.route": "/classify", "http.response.status_code": 200}
    check_trace(spans, ids["multipart"], "POST /classify", multipart)
    check_trace(spans, ids["oip-http"], "POST /v2/models/{model}/infer",
                {"http.route": "/v2/models/{model}/infer", "http.response.status_code": 200})  # fmt: skip
    check_trace(spans, ids["oip-grpc"], "inference.GRPCInferenceService/ModelInfer",
                {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
                 "rpc.grpc.status_code": 0})  # fmt: skip

    # Logs and traces join: each access record carries its request's trace id; the untraced request got its own.
    records = access_records(server.log())
    by_trace = {r.get("trace_id"): r for r in records}
    for trace_id in ids.values():
        assert trace_id in by_trace, trace_id
    assert by_trace[ids["multipart"]]["path"] == "/classify"
    new_roots = [s for s in spans if s.kind == 2 and not s.parent_span_id and s.name == "POST /classify"]
    assert len(new_roots) == 1 and new_roots[0].trace_id in by_trace


def test_spans_go_over_otlp_grpc_and_a_failed_request_is_an_error_span(server_factory, tiny_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the same spans arrive over gRPC; a 5xx-free 4xx is not an error, and
    the request span says what it answered."""
    trace_id = "7bf92f3577b34da6a3ce929d0e0e4736"
    bad = "8bf92f3577b34da6a3ce929d0e0e4736"
    with receiver("grpc") as sink:
        endpoint = sink.endpoint.removeprefix("http://")
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true",
               "OTEL_SERVICE_NAME": "resnest-eu-1"}  # fmt: skip
        server = server_factory({**trace_env(f"http://{endpoint}", tiny_onnx), **env})
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ok = http.post("/embed", files=files(jpeg()), headers={"traceparent": traceparent(trace_id)})
            assert ok.status_code == 200
            refused = http.post("/classify", files=[("images", ("x.jpg", b"not an image", "image/jpeg"))],
                                headers={"traceparent": traceparent(bad)})  # fmt: skip
            assert refused.status_code == 400
        spans = sink.wait(lambda s: complete(trace_id)(s) and any(x.trace_id == bad and x.kind == 2 for x in s),
                          timeout=30)  # fmt: skip
    (server_span,) = [s for s in spans if s.trace_id == trace_id and s.parent_span_id == CALLER_SPAN]
    assert server_span.name == "POST /embed" and server_span.service_name == "resnest-eu-1"
    (failed,) = [s for s in spans if s.trace_id == bad and s.parent_span_id == CALLER_SPAN]
    assert failed.attributes["http.response.status_code"] == 400 and failed.status_code != 2
    decode = [s for s in spans if s.trace_id == bad and s.name == "decode"]
    assert len(decode) == 1 and decode[0].status_code == 2  # the stage that refused it


def test_tracing_is_off_unless_configured_and_imports_nothing() -> None:
    """Without RESNEST_OTEL_ENDPOINT the service's state has no tracer and the SDK stays unimported."""
    script = (
        "import sys; from service.core.lifecycle import new_state; from service.core.settings import Settings; "
        "from service.http.app import create_app; s = Settings(model_path='x.onnx'); create_app(s); "
        "state = new_state(s); print(state.tracing.on, 'opentelemetry.sdk' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("disabled", ["true", "TRUE"])
def test_otel_sdk_disabled_wins(disabled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.tracing import Tracing

    monkeypatch.setenv("OTEL_SDK_DISABLED", disabled)
    assert not Tracing("http://127.0.0.1:9").on
