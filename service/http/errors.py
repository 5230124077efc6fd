"""The error table's answers over HTTP: {"error": {"code", "message"}, "request_id"} with the row's status (on
the OIP's routes, the protocol's own {"error": "<message>"}), for the core's errors and FastAPI's own."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from ..core.errors import ServiceError
from .responses import JSONResponse

# The Open Inference Protocol's routes answer errors in its own form, {"error": "<message>"}.
OIP_PREFIX = "/v2"


class BodyRefused(StarletteHTTPException):
    """A ServiceError raised while the body is read (a limit, a deadline): FastAPI lets an HTTPException out
    of its body parsing as it is, where any other exception would become its own generic 400."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(status_code=error.status, detail=error.message, headers=error.headers or None)
        self.error = error


def error_payload(code: str, message: str, request_id: str | None, path: str = "") -> dict[str, object]:
    """The JSON body for `code`; on the OIP's routes, the protocol's {"error": message}."""
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return {"error": message}
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def answer(scope: Scope, error: ServiceError) -> JSONResponse:
    """The response for `error` to the request of `scope` (its request id and path decide the form)."""
    body = error_payload(error.code, error.message, scope.get("state", {}).get("request_id"), scope.get("path", ""))
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


def _client_message(error: dict[str, object]) -> str:
    """A validation message without Python type names ("Expected UploadFile, received: <class 'str'>")."""
    message = str(error.get("msg", ""))
    return "expected a file upload" if "UploadFile" in message else message.split(", received")[0]


# FastAPI's and Starlette's own refusals (no route, wrong method, an unparsable body), as the table's codes.
_STATUS_CODES = {400: "malformed_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter"}  # fmt: skip


def install_handlers(app: FastAPI) -> None:
    """Route every error to a body from the table (what escapes them, RequestContextMiddleware answers 500)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return answer(request.scope, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyRefused):
            return answer(request.scope, exc.error)
        code = _STATUS_CODES.get(exc.status_code, "malformed_request" if exc.status_code < 500 else "internal_error")
        return answer(request.scope, ServiceError(code, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {_client_message(e)}" for e in exc.errors()[:5]]
        return answer(request.scope, ServiceError("invalid_parameter", "; ".join(problems) or None))
