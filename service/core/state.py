"""What the running app knows about itself: its models, start-up, draining; readiness derives from it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .cache import ResponseCache
from .errors import ServiceError
from .metrics import Metrics
from .repository.registry import Registry, ServedModel
from .request.admission import UploadBudget
from .request.batching import Batcher
from .request.inference import InferenceModel
from .settings import Settings
from .tracing import Tracing


@dataclass
class ServiceState:
    """One per app."""

    settings: Settings
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    registry: Registry = field(init=False)
    tracing: Tracing = field(init=False)  # off (every hook a no-op) unless RESNEST_OTEL_ENDPOINT is set
    cache: ResponseCache | None = field(init=False)  # None unless RESNEST_CACHE_BYTES or RESNEST_CACHE_URL
    uploads: UploadBudget = field(init=False)  # every protocol's uploads in progress, against one budget
    started: bool = False  # every configured model loaded and warmed at start-up
    draining: bool = False
    shutdown_deadline: float | None = None  # time.monotonic() by which the process must have exited
    shutdown_timed_out: bool = False  # requests were answered 503 because the budget ran out

    def __post_init__(self) -> None:
        self.tracing = Tracing(self.settings.otel_endpoint)
        self.cache = ResponseCache.from_settings(self.settings, self.metrics)
        self.registry = Registry(self.settings, self.metrics, tracing=self.tracing, cache=self.cache)
        self.uploads = UploadBudget(self.settings.max_concurrent_requests, self.settings.max_buffered_upload_bytes)

    # -- the default model, for single-model callers and the operator's view ------------------------------
    def _default(self) -> ServedModel | None:
        name = self.registry.default_name()
        versions = self.registry.models.get(name) if name else None
        return versions[max(versions)] if versions else None

    @property
    def model(self) -> InferenceModel | None:
        served = self._default()
        return served.model if served else None

    @property
    def batcher(self) -> Batcher | None:
        served = self._default()
        return served.batcher if served else None

    def batchers(self) -> list[Batcher]:
        """Every batcher with work, versions a reload replaced and still draining included."""
        return self.registry.batchers()

    def resolve(self, name: str | None, version: int | None = None) -> ServedModel:
        """The model version a request is for; 503 while start-up is still loading models."""
        if not self.started:
            raise ServiceError("not_ready", "the model is still loading; retry shortly", {"retry-after": "1"})
        return self.registry.resolve(name, version)

    # -- readiness and liveness ----------------------------------------------------------------------------
    def not_ready_reasons(self) -> list[str]:
        """Why /readyz is 503; empty when the service should receive traffic."""
        reasons = []
        if self.draining:
            reasons.append("draining")
        if not self.started:
            reasons.append("warming up" if self.registry.building else "model not loaded")
        elif not self.registry.models:
            reasons.append("no model loaded")
        for served in self.registry.all():
            if served.unloading:
                continue
            label = "" if len(self.registry.all()) == 1 else f"{served.name} version {served.version}: "
            if not served.batcher.alive:
                reasons.append(f"{label}batch worker stopped")
            elif served.batcher.stalled_for() > self.settings.request_timeout_s:
                reasons.append(f"{label}inference stalled")
        return reasons

    def liveness_failure(self) -> str | None:
        """Why the process should be restarted (liveness fails), or None while it can serve: a batch worker
        that stopped on its own, or a model call stuck past RESNEST_STALL_TIMEOUT_S (a hung runtime that no
        request will ever get out of)."""
        if self.draining:
            return None
        for served in self.registry.all():
            if served.unloading:
                continue
            if not served.batcher.alive:
                return "the batch worker died"
            if served.batcher.stalled_for() > self.settings.stall_timeout_s:
                return f"inference has been stuck for more than {self.settings.stall_timeout_s:g}s"
        return None
