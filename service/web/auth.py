"""The API key check every guarded route shares (the service's own API and the OIP routes alike)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..core.errors import ServiceError
from ..core.settings import Settings

bearer = HTTPBearer(auto_error=False, description="required only when RESNEST_API_KEY is set")


def key_check(settings: Settings) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer <RESNEST_API_KEY>`."""

    def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.api_key is None:
            return
        expected = settings.api_key.get_secret_value().encode()
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):  # constant time: no timing oracle on the key
            raise ServiceError("unauthorized", headers={"www-authenticate": "Bearer"})

    return require_key
