"""Which route a request is for, matched before its body is read: the route's template labels metrics and the
access record, its operation decides the key it needs (service/core/access.py), and its path parameters name
the model an upload is for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

# FastAPI's own documentation routes (/docs, /redoc, /openapi.json): plain Starlette routes, open to all.
DOCS = "docs"
# The operations whose bodies are uploads (admission, byte budget, deadline): multipart images, OIP tensors.
MULTIPART_UPLOADS = frozenset({"classify", "embed"})
TENSOR_UPLOADS = frozenset({"model_infer"})


@dataclass(frozen=True)
class RouteMatch:
    """The route a request matched: its metrics label, its operation (None: no route of ours) and parameters."""

    label: str
    operation: str | None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def multipart(self) -> bool:
        return self.operation in MULTIPART_UPLOADS

    @property
    def upload(self) -> bool:
        return self.operation in MULTIPART_UPLOADS or self.operation in TENSOR_UPLOADS


NO_ROUTE = RouteMatch("other", None)


def label(template: str) -> str:
    """A route template as a metrics label: the OIP's versioned routes count with their unversioned twins, and
    the model is `{model}` (one series per route, never per model name)."""
    return template.replace("/versions/{model_version}", "").replace("{model_name}", "{model}")


class RouteTable:
    """Every route of the app, in the order the router tries them."""

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self.routes = [r for r in routes if isinstance(r, Route)]

    def match(self, scope: Scope) -> RouteMatch:
        """The route whose path and method match; else the first whose path does (the router's 405); else none."""
        partial: RouteMatch | None = None
        for route in self.routes:
            found, child = route.matches(scope)
            if found is Match.NONE:
                continue
            # Our routes (FastAPI's APIRoute) are named by their operation; FastAPI's documentation routes are
            # plain Starlette ones.
            operation = route.name if isinstance(route, APIRoute) else DOCS
            matched = RouteMatch(label(route.path), operation, dict(child.get("path_params", {})))
            if found is Match.FULL:
                return matched
            partial = partial or matched
        return partial or NO_ROUTE
