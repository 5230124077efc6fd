"""The one error table: every failure a client can see, with its HTTP status and its gRPC status.

The core raises ServiceError with a code from the table; each front answers it in its own form from the same
row (service/http/errors.py, service/grpc/servicer.py). Messages are written for the client and never carry
exception text, paths, versions or stack traces: those go to the log.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorKind:
    """One row: the HTTP status, the gRPC status (its StatusCode name, as Triton's endpoint maps it), and the
    message when the raiser gives none."""

    http: int
    grpc: str
    message: str


# Bad input, 413 and 415 included, is INVALID_ARGUMENT (the request, not the server, is at fault); overload is
# RESOURCE_EXHAUSTED, which gRPC clients retry with the pushback the gRPC front adds.
ERRORS: dict[str, ErrorKind] = {
    "invalid_image": ErrorKind(400, "INVALID_ARGUMENT", "the image could not be decoded"),
    "malformed_request": ErrorKind(400, "INVALID_ARGUMENT", "the request body is not valid multipart/form-data"),
    "invalid_request": ErrorKind(400, "INVALID_ARGUMENT", "the inference request is not valid"),
    "model_load_failed": ErrorKind(
        400, "INVALID_ARGUMENT", "the model could not be loaded; what was served before is unchanged"
    ),
    "no_classifier": ErrorKind(
        400, "INVALID_ARGUMENT", "this model has no classifier (a headless backbone): it serves POST /embed only"
    ),
    "no_feature_map": ErrorKind(
        400,
        "INVALID_ARGUMENT",
        "this model file has no feature map output (it was exported before class activation maps): export it "
        "again with this project's `python -m export` to explain its answers",
    ),
    "unauthorized": ErrorKind(401, "UNAUTHENTICATED", "a valid API key is required: Authorization: Bearer <key>"),
    "model_control_disabled": ErrorKind(
        403,
        "PERMISSION_DENIED",
        "model control is off: the server loads its models at start-up (RESNEST_MODEL_CONTROL=true allows it)",
    ),
    "not_found": ErrorKind(404, "NOT_FOUND", "no such route"),
    "model_not_found": ErrorKind(404, "NOT_FOUND", "no such model or version"),
    "method_not_allowed": ErrorKind(405, "UNIMPLEMENTED", "method not allowed on this route"),
    "request_timeout": ErrorKind(408, "DEADLINE_EXCEEDED", "the request body did not arrive in time"),
    "payload_too_large": ErrorKind(413, "INVALID_ARGUMENT", "the request body exceeds the upload limit"),
    "image_too_large": ErrorKind(413, "INVALID_ARGUMENT", "the image exceeds the pixel limit"),
    "too_many_images": ErrorKind(413, "INVALID_ARGUMENT", "the request holds more images than allowed"),
    "unsupported_media_type": ErrorKind(415, "INVALID_ARGUMENT", "unsupported content type"),
    "invalid_parameter": ErrorKind(422, "INVALID_ARGUMENT", "invalid request parameters"),
    "overloaded": ErrorKind(429, "RESOURCE_EXHAUSTED", "the server is at capacity; retry later"),
    "client_closed_request": ErrorKind(
        499, "CANCELLED", "the client closed the connection before the answer was ready"
    ),
    "internal_error": ErrorKind(500, "INTERNAL", "inference failed"),
    "not_ready": ErrorKind(503, "UNAVAILABLE", "the model is not ready"),
    "draining": ErrorKind(503, "UNAVAILABLE", "the server is shutting down"),
    "model_unavailable": ErrorKind(503, "UNAVAILABLE", "the model is being unloaded"),
    "deadline_exceeded": ErrorKind(504, "DEADLINE_EXCEEDED", "the request did not finish within its deadline"),
}


class ServiceError(Exception):
    """A failure from the table: its `code`, the client's `message`, and `headers` the answer carries
    (Retry-After for overload: HTTP sends it as a header, gRPC as trailing metadata)."""

    def __init__(self, code: str, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.kind = ERRORS[code]
        self.code, self.message, self.headers = code, message or self.kind.message, dict(headers or {})
        super().__init__(self.message)

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self.kind.http
