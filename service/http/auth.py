"""The keys over HTTP: checked on the request's headers before a byte of its body is read (AuthMiddleware), and
described in the OpenAPI document by the routes' security schemes."""

from __future__ import annotations

from fastapi import Depends
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.access import Access, access, allowed
from ..core.errors import ServiceError
from ..core.settings import Settings
from .errors import answer
from .scope import header, route_of

# Documentation only (auto_error off, and AuthMiddleware has decided before a route runs): what the OpenAPI
# document shows as each route's security.
_api_key = HTTPBearer(auto_error=False, scheme_name="APIKey", description="RESNEST_API_KEY, where it is set")
_control_key = HTTPBearer(auto_error=False, scheme_name="ControlKey", description="RESNEST_CONTROL_KEY")
API_KEY = [Depends(_api_key)]
CONTROL_KEY = [Depends(_control_key)]
_REFUSALS = {
    Access.INFERENCE: "a valid API key is required: Authorization: Bearer <RESNEST_API_KEY>",
    Access.CONTROL: "loading and unloading models needs the control key: Authorization: Bearer <RESNEST_CONTROL_KEY>",
}


class AuthMiddleware:
    """401 before the body for a route whose operation needs a key the request does not carry."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(scope)
        if route.operation is None or allowed(self.settings, route.operation, header(scope, b"authorization")):
            await self.app(scope, receive, send)
            return
        # Answered before the body is read; LingeringCloseMiddleware discards what the client still sends.
        error = ServiceError("unauthorized", _REFUSALS[access(route.operation)], {"www-authenticate": "Bearer"})
        await answer(scope, error)(scope, receive, send)
