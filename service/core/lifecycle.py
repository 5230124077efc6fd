"""The service's life apart from any protocol: its state made, every configured model loaded and warmed and
the host's limits checked before it reports ready, and a stop that drains the batchers within the budget."""

from __future__ import annotations

import logging
import time

from .limits import check_memory, check_spool, memory_limit_bytes, rss_bytes
from .metrics import Metrics
from .repository.layout import RepositoryError, scan
from .request.inference import InferenceModel, ModelLoadError
from .settings import Settings
from .state import ServiceState
from .threads import named_pool

log = logging.getLogger("service")


def new_state(settings: Settings) -> ServiceState:
    """The state one server's fronts share: metrics, the decode pool, the registry, the upload budget."""
    pool = named_pool(settings.decode_threads, "decode")
    return ServiceState(settings=settings, metrics=Metrics(), decode_pool=pool)


async def start(state: ServiceState, model: InferenceModel | None = None) -> None:
    """Load every configured model (a repository's, the one file, or an injected `model`), then check limits;
    any failure aborts the start: a process that cannot serve should not run."""
    settings = state.settings
    registry = state.registry
    check_spool(settings)
    if model is not None:
        await registry.add(settings.single_model_name(), model)
    elif settings.model_repository is not None:
        entries = scan(settings.model_repository)
        broken = {name: str(e) for name, e in entries.items() if isinstance(e, RepositoryError)}
        if broken:  # as Triton's strict start: an operator learns of a broken model now, not from clients
            raise ModelLoadError("; ".join(f"{name}: {why}" for name, why in broken.items()))
        if not entries:
            raise ModelLoadError(f"the model repository {settings.model_repository} holds no model folder")
        for entry in entries.values():
            await registry.load(entry)  # type: ignore[arg-type]
    else:
        await registry.load_path(settings.single_model_name(), settings.model_path)
    if settings.default_model and settings.default_model not in registry.models:
        raise ModelLoadError(f"RESNEST_DEFAULT_MODEL {settings.default_model!r} is not among {registry.names()}")
    # After warm-up the models' memory (weights, arenas sized by the largest batch) is what it will stay at.
    queues = [s.batching.memory_bytes(s.model.card.preprocess.input_size) for s in registry.all()]
    check_memory(settings, queues, memory_limit_bytes(), rss_bytes())
    state.started = True
    for served in registry.all():
        log.info("ready: %s version %d (%s) on %s, max batch %d", served.name, served.version,
                 served.model.card.variant, served.model.providers, served.batching.max_batch_size)  # fmt: skip


async def stop(state: ServiceState) -> None:
    """Refuse new work and finish what is queued within what is left of the shutdown budget."""
    state.draining = True
    deadline = state.shutdown_deadline
    left = state.settings.shutdown_timeout_s if deadline is None else deadline - time.monotonic()
    # Keep a moment of the budget for the 503s of whatever stop() has to give up on.
    if not await state.registry.stop_all(timeout=left - 0.1):
        state.shutdown_timed_out = True
    state.decode_pool.shutdown(wait=False, cancel_futures=True)
    if state.cache is not None:
        await state.cache.close()
    state.tracing.shutdown()  # the last spans go out before the process does
    log.info("stopped")
