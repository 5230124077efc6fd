"""The one error table: every failure a client can see, its HTTP status and its JSON body.

Bodies are always {"error": {"code", "message"}} (plus "request_id"); messages are written for the client
and never carry exception text, paths, versions or stack traces: those go to the log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .responses import JSONResponse

log = logging.getLogger("service.errors")

# code -> (status, default message)
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_image": (400, "the image could not be decoded"),
    "malformed_request": (400, "the request body is not valid multipart/form-data"),
    "invalid_request": (400, "the inference request is not valid"),
    "model_load_failed": (400, "the model could not be loaded; what was served before is unchanged"),
    "no_classifier": (400, "this model has no classifier (a headless backbone): it serves POST /embed only"),
    "unauthorized": (401, "a valid API key is required: Authorization: Bearer <key>"),
    "model_control_disabled": (
        403,
        "model control is off: the server loads its models at start-up (RESNEST_MODEL_CONTROL=true allows it)",
    ),
    "not_found": (404, "no such route"),
    "model_not_found": (404, "no such model or version"),
    "method_not_allowed": (405, "method not allowed on this route"),
    "payload_too_large": (413, "the request body exceeds the upload limit"),
    "image_too_large": (413, "the image exceeds the pixel limit"),
    "too_many_images": (413, "the request holds more images than allowed"),
    "unsupported_media_type": (415, "unsupported content type"),
    "request_timeout": (408, "the request body did not arrive in time"),
    "invalid_parameter": (422, "invalid request parameters"),
    "overloaded": (429, "the server is at capacity; retry later"),
    "client_closed_request": (499, "the client closed the connection before the answer was ready"),
    "internal_error": (500, "inference failed"),
    "not_ready": (503, "the model is not ready"),
    "draining": (503, "the server is shutting down"),
    "model_unavailable": (503, "the model is being unloaded"),
    "deadline_exceeded": (504, "the request did not finish within its deadline"),
}


class ServiceError(StarletteHTTPException):
    """A failure from the table. Subclassing HTTPException lets it cross FastAPI's body parsing unchanged."""

    def __init__(self, code: str, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        status, default = ERRORS[code]
        super().__init__(status_code=status, detail=message or default, headers=headers)
        self.code = code


# The Open Inference Protocol's routes answer errors in its own form, {"error": "<message>"}.
OIP_PREFIX = "/v2"


def error_payload(code: str, message: str, request_id: str | None, path: str = "") -> dict[str, object]:
    """The JSON body for `code`; on the OIP's routes, the protocol's {"error": message}."""
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return {"error": message}
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_response(request: Request, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response for `code` (status from the table)."""
    body = error_payload(code, message, getattr(request.state, "request_id", None), request.url.path)
    return JSONResponse(body, status_code=ERRORS[code][0], headers=headers)


def _client_message(error: dict[str, object]) -> str:
    """A validation message without Python type names ("Expected UploadFile, received: <class 'str'>")."""
    message = str(error.get("msg", ""))
    return "expected a file upload" if "UploadFile" in message else message.split(", received")[0]


_STATUS_CODES = {400: "malformed_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter"}  # fmt: skip


def install_handlers(app: FastAPI) -> None:
    """Route every error to a body from the table (what escapes them, RequestContextMiddleware answers 500)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.code, str(exc.detail), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "malformed_request" if exc.status_code < 500 else "internal_error")
        return error_response(request, code, ERRORS[code][1], exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {_client_message(e)}" for e in exc.errors()[:5]]
        return error_response(request, "invalid_parameter", "; ".join(problems) or ERRORS["invalid_parameter"][1])
