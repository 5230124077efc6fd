"""Structured logs: with RESNEST_LOG_FORMAT=json every line a real server writes is one JSON object, and each
request's access record carries the id, status and figures its client saw."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from service.core import logs
from tests.conftest import jpeg, wait_until

ACCESS_KEYS = {
    "request_id", "method", "path", "route", "status", "duration_ms", "model", "model_version", "images",
    "bytes_received",
    "preprocess_ms", "queue_ms", "inference_ms", "client",
}  # fmt: skip


def test_every_json_line_parses_and_carries_the_request_id_the_client_saw(server_factory, tiny_onnx: Path) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_LOG_FORMAT": "json"})
    image = ("images", ("a.jpg", jpeg(), "image/jpeg"))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answers = [
            client.post("/classify", files=[image, ("images", ("b.jpg", jpeg(color=(9, 9, 9)), "image/jpeg"))]),
            client.post("/embed", params={"normalize": "true"}, files=[image], headers={"x-request-id": "mine-1"}),
            client.post("/classify", files=[("images", ("n.txt", b"not an image", "text/plain"))]),
            client.post("/classify", params={"top_k": 0}, files=[image]),
            client.get("/model"),
            client.get("/"),
            client.get("/no/such/route"),
        ]
    assert [a.status_code for a in answers] == [200, 200, 415, 422, 200, 200, 404]
    assert answers[1].headers["x-request-id"] == "mine-1"
    # Each access record is written as its answer's last byte goes out: wait for them rather than race them.
    ids = [a.headers["x-request-id"] for a in answers]
    wait_until(lambda: all(f'"request_id":"{i}"' in server.log() for i in ids))

    records = [json.loads(line) for line in server.log().splitlines()]  # every line, or this raises
    assert all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["logger"] == "uvicorn" for r in records), "uvicorn's own records go through the same format"
    assert any("serving on CPU" in r["message"] or "serving on CUDA" in r["message"] for r in records)
    access = {r["request_id"]: r for r in records if r["logger"] == "service.access"}
    for answer in answers:
        record = access[answer.headers["x-request-id"]]
        assert record.keys() >= ACCESS_KEYS
        assert record["status"] == answer.status_code
        assert record["method"] == answer.request.method
        assert record["path"] == answer.request.url.raw_path.decode().split("?")[0]
        assert record["model"] == tiny_onnx.stem  # the served name: the model file's stem
        assert re.fullmatch(r"127\.0\.0\.1:\d+", record["client"])
        assert record["bytes_received"] == int(answer.request.headers.get("content-length", 0))
        assert record["duration_ms"] >= 0
        assert record["level"] == "INFO"

    classified, embedded, refused = (access[a.headers["x-request-id"]] for a in answers[:3])
    assert classified["route"] == "/classify" and classified["images"] == 2
    assert embedded["route"] == "/embed" and embedded["images"] == 1
    for record, answer in ((classified, answers[0]), (embedded, answers[1])):
        for key, header in (("preprocess_ms", "x-preprocess-time-ms"), ("queue_ms", "x-queue-time-ms"),
                            ("inference_ms", "x-inference-time-ms")):  # fmt: skip
            assert record[key] == pytest.approx(float(answer.headers[header]), abs=0.011)
        assert record["duration_ms"] >= record["inference_ms"]
    # Refused before any inference: the figures it never had are null, not zero.
    assert refused["inference_ms"] is None and refused["queue_ms"] is None
    assert access[answers[6].headers["x-request-id"]]["route"] == "other"


def test_probes_are_logged_at_debug_unless_they_fail(server_factory, tiny_onnx: Path) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_LOG_FORMAT": "json"})
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200
    failed = httpx.get(f"{server.url}/classify")  # a failing request after it: its record ends the wait
    assert failed.status_code == 405
    wait_until(lambda: failed.headers["x-request-id"] in server.log())
    records = [json.loads(line) for line in server.log().splitlines()]
    assert ready.headers["x-request-id"] not in {r.get("request_id") for r in records}


def _formatted(formatter: logging.Formatter, **fields: object) -> str:
    record = logging.makeLogRecord({"name": logs.ACCESS_LOGGER, "levelno": 20, "levelname": "INFO",
                                    "msg": "%s", "args": ("x",), **fields})  # fmt: skip
    return formatter.format(record)


def test_text_access_line_is_concise_and_leaves_out_what_does_not_apply() -> None:
    line = _formatted(
        logs.TextFormatter(), request_id="abc", method="POST", path="/classify", route="/classify", status=200,
        duration_ms=45.1, model="resnest50", images=2, bytes_received=81234, preprocess_ms=4.2, queue_ms=0.1,
        inference_ms=38.0, client="127.0.0.1:5000",
    )  # fmt: skip
    assert line.endswith(
        "INFO service.access: POST /classify 200 45.1ms images=2 bytes=81234 preprocess=4.2ms queue=0.1ms "
        "inference=38.0ms model=resnest50 client=127.0.0.1:5000 id=abc"
    )
    probe = _formatted(
        logs.TextFormatter(), request_id="d", method="GET", path="/healthz", route="/healthz", status=200,
        duration_ms=0.3, model="resnest50", images=None, bytes_received=0, preprocess_ms=None, queue_ms=None,
        inference_ms=None, client=None,
    )  # fmt: skip
    assert probe.endswith("service.access: GET /healthz 200 0.3ms id=d")


def test_json_record_is_one_line_with_the_traceback_and_the_current_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tests.logs.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = logs.request_id_var.set("req-7")
    try:
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("failed on %s", "this\nimage", extra={"images": 3})
    finally:
        logs.request_id_var.reset(token)
        logger.removeHandler(handler)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "failed on this\nimage" and entry["request_id"] == "req-7" and entry["images"] == 3
    assert entry["level"] == "ERROR" and "ValueError: two\nlines" in entry["exception"]
    assert entry["timestamp"].endswith("Z")
