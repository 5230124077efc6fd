"""Prometheus metrics, in a registry owned by one app (several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .request.batching import BatchObserver

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The service's counters, histograms and gauges (Triton-like names under `resnest_`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resnest_requests",
            "requests by route (HTTP route, or gRPC method) and status (HTTP status, or gRPC status code)",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "resnest_request_duration_seconds", "request latency by route", ["route"], buckets=_LATENCY, registry=r
        )
        self.images = Counter("resnest_images", "images inferred, by route", ["route"], registry=r)
        self.queue_wait = Histogram(
            "resnest_queue_wait_seconds", "submit -> first batch start, per request", buckets=_LATENCY, registry=r
        )
        self.inference = Histogram(
            "resnest_inference_duration_seconds", "model run time per batch", buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(
            "resnest_batch_size", "images per batch (before padding)", buckets=_BATCH, registry=r
        )
        self.padded = Counter("resnest_padded_images", "padding rows added to reach a fixed batch shape", registry=r)
        # The total is read from the batchers at scrape time (set_function): with several models, no batcher
        # may overwrite the others' share.
        self.queue_depth = Gauge("resnest_queue_depth", "images waiting for inference, all models", registry=r)
        self.model_queue_depth = Gauge(
            "resnest_model_queue_depth", "images waiting for inference, per model version", ["model", "version"],
            registry=r,
        )  # fmt: skip
        self.model_inflight = Gauge(
            "resnest_model_inflight_requests",
            "requests being answered by a model version (an unload waits for them)",
            ["model", "version"],
            registry=r,
        )
        self.inflight = Gauge("resnest_inflight_requests", "requests being handled", registry=r)
        self.ready = Gauge("resnest_ready", "1 when /readyz answers 200", registry=r)
        self.model_info = Gauge(
            "resnest_model_info",
            "each served model version (value 1)",
            ["model", "version", "variant", "precision", "provider", "weights"],
            registry=r,
        )
        self.model_memory = Gauge(
            "resnest_model_memory_bytes",
            "resident memory a model version added when it was loaded and warmed (session, weights, arenas)",
            ["model", "version"],
            registry=r,
        )

        # The response cache (service/core/cache.py), per image: Triton's cache counters under this prefix.
        self.cache_hits = Counter(
            "resnest_cache_hits", "images answered from the response cache", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "resnest_cache_misses", "images looked up in the response cache and not found", ["model"], registry=r
        )
        self.cache_errors = Counter(
            "resnest_cache_errors", "lookups or stores the shared cache failed or timed out on (the model answered)",
            registry=r,
        )  # fmt: skip
        self.cache_bytes = Gauge("resnest_cache_bytes", "bytes held by the in-process response cache", registry=r)

    def observer(self, model: str, version: str) -> BatchObserver:
        """Callbacks that feed one model version's batcher figures into these metrics."""

        def on_batch(images: int, padded: int, seconds: float) -> None:
            self.batch_size.observe(images)
            self.inference.observe(seconds)
            if padded > images:
                self.padded.inc(padded - images)

        return BatchObserver(
            on_batch=on_batch,
            on_queue_depth=self.model_queue_depth.labels(model, version).set,
            on_queue_wait=self.queue_wait.observe,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
