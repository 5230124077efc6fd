"""The uploads in progress across every protocol: how many, and the body bytes they hold in memory or spool.

HTTP counts a body as it arrives (service/web/middleware.py); gRPC counts a message once received whole. Both
draw on this one budget, so RESNEST_MAX_CONCURRENT_REQUESTS and RESNEST_MAX_BUFFERED_UPLOAD_BYTES bound the
server, not each protocol.
"""

from __future__ import annotations


class UploadBudget:
    """A count of uploads and of the bytes they hold, each against its limit."""

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
        """The upload was answered: its slot and its `nbytes` are free again."""
        self.active -= 1
        self.buffered -= nbytes
