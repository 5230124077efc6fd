"""Logging for the service: text for people or one JSON object per line for log pipelines, one access record
per request (the same fields whichever protocol carried it), and uvicorn's loggers routed through the same
handler."""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Literal, TextIO

import orjson

ACCESS_LOGGER = "service.access"
# The request being served, for every record logged while it is (the access record, a handler's error).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A client's own request id is echoed only when it is this (no spaces, no markup, nothing a log would misread).
WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Attributes every LogRecord has; anything else on a record came in through `extra=` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# AccessRecord's attributes that are not logged: a clock reading and the open span.
_UNLOGGED = frozenset({"started", "span"})
# uvicorn's own extras: the same message with ANSI colours, which a pipeline has no use for.
_DROPPED_EXTRAS = frozenset({"color_message"})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k not in _DROPPED_EXTRAS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, RFC 3339), level, logger, message, request_id when a request
    is being served, the record's extra fields, and the exception's traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        timestamp = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "timestamp": timestamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := request_id_var.get()) is not None:
            entry["request_id"] = request_id
        entry.update(_fields(record))  # the access record carries its request_id as a field
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            entry["stack"] = record.stack_info
        # orjson escapes newlines inside strings, so an entry is always exactly one line; default=str keeps
        # a field of an unexpected type from losing the whole record.
        return orjson.dumps(entry, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class TextFormatter(logging.Formatter):
    """The classic `time LEVEL logger: message` line; the access record's message is its fields in one line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER and hasattr(record, "status"):
            record = logging.makeLogRecord({**vars(record), "msg": access_line(_fields(record)), "args": None})
        return super().format(record)


def access_line(fields: dict[str, Any]) -> str:
    """`POST /classify 200 45.1ms images=2 bytes=81234 preprocess=4.2ms queue=0.1ms inference=38.0ms
    model=resnest50 client=127.0.0.1:51234 id=3f2a...`: one line for a person, without what does not apply."""
    parts = [f"{fields.get('method')} {fields.get('path')} {fields.get('status')} {fields.get('duration_ms')}ms"]
    uploads = fields.get("images") is not None
    for key, name, unit in (
        ("images", "images", ""),
        ("bytes_received", "bytes", ""),
        ("preprocess_ms", "preprocess", "ms"),
        ("queue_ms", "queue", "ms"),
        ("inference_ms", "inference", "ms"),
        ("model", "model", ""),
        ("cache", "cache", ""),
        ("client", "client", ""),
        ("request_id", "id", ""),
        ("trace_id", "trace", ""),
    ):
        value = fields.get(key)
        if value is None or (key == "bytes_received" and not value) or (key == "model" and not uploads):
            continue
        parts.append(f"{name}={value}{unit}")
    return " ".join(parts)


def _uvicorn_name(record: logging.LogRecord) -> bool:
    """uvicorn logs everything but access lines as "uvicorn.error" (start-up, shutdown, info alike): named
    "uvicorn" here, so that a filter on the name does not read "Application startup complete." as an error."""
    if record.name == "uvicorn.error":
        record.name = "uvicorn"
    return True


def configure(level: str, fmt: Literal["text", "json"], stream: TextIO = sys.stderr) -> None:
    """One handler on the root logger for the service, uvicorn and third-party libraries alike."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_uvicorn_name)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn is started with log_config=None, so it installs no handlers of its own: its records
    # ("Started server process", errors in the ASGI app) propagate here and get the same format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Python warnings (a library's DeprecationWarning at run time) become records too: in JSON mode a raw
    # warning line on stderr would be the one line a pipeline cannot parse.
    logging.captureWarnings(True)
    # Any client can send a malformed multipart body; the parser's warnings about it would flood the log.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def log_access(level: int, fields: dict[str, Any]) -> None:
    """Emit the access record of one request: request_id, method, path, route, status, duration_ms and
    what is known of model, images, bytes_received, preprocess_ms, queue_ms, inference_ms, client."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if logger.isEnabledFor(level):
        logger.log(level, "%s %s %s", fields.get("method"), fields.get("path"), fields.get("status"), extra=fields)


def request_id(offered: object) -> str:
    """The client's request id (HTTP X-Request-ID, gRPC x-request-id metadata) when well-formed, else a new one."""
    return offered if isinstance(offered, str) and WELL_FORMED_ID.fullmatch(offered) else uuid.uuid4().hex


@dataclass
class AccessRecord:
    """One request's access record: what the front knows on arrival, what the request path adds (model,
    images, timings) and, at the end, its status; `emit` logs it."""

    request_id: str
    method: str  # the HTTP method, or "gRPC"
    path: str  # as sent (percent-encoding kept), or the RPC's full name
    route: str  # the route template or RPC: one value per route, for filtering
    client: str | None
    started: float = field(default_factory=time.perf_counter)
    status: int | str | None = None  # the HTTP status, or the gRPC status code's name
    model: str | None = None
    model_version: int | None = None
    images: int | None = None
    bytes_received: int | None = None
    preprocess_ms: float | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None
    cache: str | None = None  # "hit" (every image answered from the response cache), "miss", None: no cache
    trace_id: str | None = None  # the request's trace when tracing is on: logs and traces join on it
    # The request's open server span (service/core/tracing.py); not a field of the logged record.
    span: Any = field(default=None, repr=False, compare=False)

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.perf_counter() - self.started

    def emit(self, quiet: bool = False) -> None:
        """Log the record, at debug when `quiet` (a probe's success) and at info otherwise."""
        # Not asdict: it would deep-copy the span.
        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name not in _UNLOGGED}
        client = fields.pop("client")
        # The order of the lines this record always wrote: who and what, the outcome, then the model's part.
        ordered = {k: fields.pop(k) for k in ("request_id", "method", "path", "route", "status")}
        ordered["duration_ms"] = round(self.elapsed() * 1000, 2)
        log_access(logging.DEBUG if quiet else logging.INFO, {**ordered, **fields, "client": client})
