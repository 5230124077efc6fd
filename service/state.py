"""What the running app knows about itself: model, batcher, warm-up, draining; readiness derives from it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .batcher import Batcher
from .metrics import Metrics
from .runtime import InferenceModel
from .settings import Settings


@dataclass
class ServiceState:
    """One per app."""

    settings: Settings
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    model: InferenceModel | None = None
    batcher: Batcher | None = None
    warmed: bool = False
    draining: bool = False
    shutdown_deadline: float | None = None  # time.monotonic() by which the process must have exited
    shutdown_timed_out: bool = False  # requests were answered 503 because the budget ran out

    def not_ready_reasons(self) -> list[str]:
        """Why /readyz is 503; empty when the service should receive traffic."""
        reasons = []
        if self.draining:
            reasons.append("draining")
        if self.model is None:
            reasons.append("model not loaded")
        elif not self.warmed:
            reasons.append("warming up")
        if self.batcher is not None and not self.batcher.alive:
            reasons.append("batch worker stopped")
        elif self.batcher is not None and self.batcher.stalled_for() > self.settings.request_timeout_s:
            reasons.append("inference stalled")
        return reasons

    def overloaded(self) -> int | None:
        """Retry-After seconds when the queue has no room for even one image, else None."""
        batcher = self.batcher
        if batcher is None or not batcher.full():
            return None
        return batcher.retry_after(batcher.depth)

    @property
    def worker_dead(self) -> bool:
        """The batch worker ran and stopped on its own: the process can no longer serve."""
        return self.batcher is not None and not self.batcher.alive and not self.draining
