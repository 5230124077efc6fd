"""The HTTP front's pure-ASGI middleware, outermost first as a request meets it: the lingering close
(lingering.py), the request's context (context.py), the key (service/http/auth.py), the body's deadline
(deadline.py) and the upload limits (uploads.py)."""

from __future__ import annotations

from .context import RequestContextMiddleware
from .deadline import BodyDeadlineMiddleware
from .lingering import LingeringCloseMiddleware
from .uploads import UploadLimitMiddleware

__all__ = ["BodyDeadlineMiddleware", "LingeringCloseMiddleware", "RequestContextMiddleware", "UploadLimitMiddleware"]
