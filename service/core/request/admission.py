"""Stage 1, admission: what is refused before any work, in the order a request meets it.

Before the body: a place among the uploads in progress and room in the model's queue (`before_body`); while
the body arrives, its bytes against the budget (`UploadBudget.grow`); before decoding, the image count and a
reservation in the queue for the request's images (`admit`). Both protocols draw on one UploadBudget, so
RESNEST_MAX_CONCURRENT_REQUESTS and RESNEST_MAX_BUFFERED_UPLOAD_BYTES bound the server, not each protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ServiceError
from .batching import BatcherStopped, QueueFull, Reservation

if TYPE_CHECKING:
    from ..repository.registry import Registry, ServedModel
    from ..settings import Settings


class UploadBudget:
    """A count of uploads in progress and of the body bytes they hold (received, in memory or spooled), each
    against its limit."""

    def __init__(self, max_requests: int = 1 << 30, max_bytes: int = 1 << 62) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.active = 0  # uploads between admission and their answer
        self.buffered = 0  # body bytes those uploads hold

    def has_room(self, nbytes: int = 0) -> bool:
        """Whether one more upload of `nbytes` fits both limits."""
        return self.active < self.max_requests and self.buffered + nbytes <= self.max_bytes

    def enter(self, nbytes: int = 0) -> None:
        """Count an admitted upload and the bytes it holds so far."""
        self.active += 1
        self.buffered += nbytes

    def grow(self, nbytes: int) -> bool:
        """More bytes of an admitted upload arrived; False when the budget is now exceeded."""
        self.buffered += nbytes
        return self.buffered <= self.max_bytes

    def leave(self, nbytes: int) -> None:
        """The upload was answered: its place and its `nbytes` are free again."""
        self.active -= 1
        self.buffered -= nbytes


def overloaded(retry_after: int = 1) -> ServiceError:
    """The 429 of every refusal for lack of room, with when to retry."""
    return ServiceError("overloaded", headers={"retry-after": str(retry_after)})


def before_body(
    settings: Settings, budget: UploadBudget, registry: Registry, model: str | None, version: int | None,
    declared: int | None,
) -> ServiceError | None:  # fmt: skip
    """The refusal of an upload that can be known from its headers alone, or None to start reading it: a
    declared length over the upload limit (413), no place among the uploads in progress or no byte of room,
    or no room for even one image in the queue of the model it names (429)."""
    if declared is not None and declared > settings.max_upload_bytes:
        return ServiceError("payload_too_large", f"the request body exceeds {settings.max_upload_bytes} bytes")
    if not budget.has_room(1):
        return overloaded()
    try:
        served = registry.resolve(model, version)
    except ServiceError:  # an unknown model or version: the request's own handler answers it, as usual
        return None
    if served.batcher.full():
        return overloaded(served.batcher.retry_after(served.batcher.depth))
    return None


def admit(settings: Settings, served: ServedModel, count: int, draining: bool) -> Reservation:
    """Before decoding: the image count, then room for all of them in the model's queue, held while they
    decode (a flood is refused in the time it takes to read the headers, not after decoding)."""
    if count == 0:
        raise ServiceError("invalid_parameter", "the request holds no image")
    if count > settings.max_images_per_request:
        raise ServiceError("too_many_images", f"at most {settings.max_images_per_request} images per request")
    try:
        return served.batcher.reserve(count)
    except QueueFull as exc:
        raise overloaded(exc.retry_after) from None
    except BatcherStopped:
        raise stopped(served, draining) from None


def stopped(served: ServedModel | None, draining: bool, reason: BatcherStopped | None = None) -> ServiceError:
    """The answer when the batcher refuses or drops work: shutting down, the model unloaded, or its worker gone."""
    if served is not None and served.unloading and not draining:
        return ServiceError("model_unavailable", f"model {served.name!r} version {served.version} was unloaded")
    if draining:
        message = f"the server is shutting down: {reason}" if reason and str(reason) else None
        return ServiceError("draining", message)
    return ServiceError("not_ready", "the batch worker stopped" if reason else None)
