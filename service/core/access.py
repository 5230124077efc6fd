"""Who may call what: each operation of the service is open, needs the API key, or needs the control key.

Both fronts name their routes and RPCs after these operations and check the key here, on the request's headers
or metadata, before a byte of its body or message is read: a client without the key never holds an upload's
place, bytes or time.
"""

from __future__ import annotations

import hmac
from enum import Enum

from pydantic import SecretStr

from .settings import Settings


class Access(Enum):
    """What a call needs: nothing, RESNEST_API_KEY, or RESNEST_CONTROL_KEY."""

    OPEN = "open"
    INFERENCE = "inference"
    CONTROL = "control"


# Probes, scrapes, the server's own metadata, the docs and the page: what balancers, Prometheus, Kubernetes
# and a person's browser reach without a key (Triton and KServe leave the same calls open).
OPEN_OPERATIONS = frozenset(
    {"live", "ready", "model_ready", "server_metadata", "metrics", "health", "docs", "page"}
)  # fmt: skip
# Loading and unloading models changes what every client is served: the operator's key, not the clients'.
CONTROL_OPERATIONS = frozenset({"repository_load", "repository_unload"})


def access(operation: str) -> Access:
    """What `operation` needs; anything not listed as open or control needs the API key (closed by default)."""
    if operation in OPEN_OPERATIONS:
        return Access.OPEN
    if operation in CONTROL_OPERATIONS:
        return Access.CONTROL
    return Access.INFERENCE


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive), else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def allowed(settings: Settings, operation: str, authorization: str | None) -> bool:
    """Whether a call of `operation` carrying `authorization` may proceed."""
    needs = access(operation)
    if needs is Access.OPEN:
        return True
    expected: SecretStr | None = settings.control_key if needs is Access.CONTROL else settings.api_key
    if expected is None:
        # No key: inference is open, and control is off (the settings refuse control without its key), so
        # its routes answer model_control_disabled rather than a 401 that asks for a key nobody can have.
        return True
    token = bearer_token(authorization)
    # Constant time: no timing oracle on the key.
    return token is not None and hmac.compare_digest(token.encode(), expected.get_secret_value().encode())
