"""The models being served: one session, batcher and inference thread per model version, loaded and unloaded
while the server runs (Triton's explicit model control).

A load builds every version its policy selects off to the side and swaps them in only when all are warmed,
so a failed load leaves what was served untouched. An unload (or the old versions a reload replaces) stops
taking requests at once, lets those in flight finish, then stops its batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Gauge

from ..cache import ResponseCache
from ..errors import ServiceError
from ..identifiers import is_model_name
from ..limits import check_memory, memory_limit_bytes, rss_bytes
from ..metrics import Metrics
from ..request.batching import Batcher
from ..request.inference import InferenceModel, ModelLoadError, OrtModel, warm_up
from ..settings import Settings
from ..tracing import Tracing
from .config import Batching, ConfigError, ModelConfig, VersionPolicy
from .layout import ModelEntry, RepositoryError, model_folder, read_model, scan

log = logging.getLogger("service.registry")

# (settings, the model file, the batch shapes it will be given) -> the model, not yet warmed.
Loader = Callable[[Settings, Path, list[int]], InferenceModel]


def load_onnx(settings: Settings, path: Path, shapes: list[int]) -> InferenceModel:
    """The production loader: an ONNX Runtime session over `path` with the service's settings."""
    return OrtModel(settings.model_copy(update={"model_path": path}), shapes)


@dataclass(eq=False)
class ServedModel:
    """One version of one model, warmed and with its own batcher."""

    name: str
    version: int
    model: InferenceModel
    batcher: Batcher
    batching: Batching  # what the batcher was built with (the model's config.pbtxt over the settings)
    source: str
    memory_bytes: int
    loaded_at: float = field(default_factory=time.time)
    unloading: bool = False
    inflight: int = 0  # requests that resolved to this version and have not been answered
    # The same count in /metrics: this version's own series, held rather than looked up by its labels, so a
    # request that ends after an unload removed the series cannot bring it back (at -1).
    inflight_series: Gauge | None = None

    @property
    def ready(self) -> bool:
        return not self.unloading and self.batcher.alive

    @contextlib.contextmanager
    def use(self) -> Iterator[ServedModel]:
        """Count a request against this version for as long as it is being answered (unload waits on it)."""
        self.inflight += 1
        if self.inflight_series is not None:
            self.inflight_series.inc()
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight_series is not None:
                self.inflight_series.dec()


@dataclass
class IndexEntry:
    """A row of the repository index: what exists, in which state, and why when it is not served."""

    name: str
    version: str
    state: str
    reason: str = ""


class Registry:
    """Every served model by name and version; the single place requests resolve a model."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        loader: Loader = load_onnx,
        tracing: Tracing | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings, self.metrics, self.loader = settings, metrics, loader
        self.tracing, self.cache = tracing, cache
        self.models: dict[str, dict[int, ServedModel]] = {}
        self.failures: dict[str, str] = {}  # why a model's last load failed
        self.policies: dict[str, VersionPolicy] = {}  # the version policy each served model was loaded with
        self._lock = asyncio.Lock()  # one load or unload at a time: memory is measured per load
        self._retiring: set[asyncio.Task[None]] = set()
        self.retiring: set[ServedModel] = set()  # replaced versions still finishing their requests
        metrics.queue_depth.set_function(lambda: sum(batcher.depth for batcher in self.batchers()))
        self.building = False  # a model is being loaded or warmed right now

    # -- lookup ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.models)

    def all(self) -> list[ServedModel]:
        """Every version being served (not those a reload replaced and that are still draining)."""
        return [served for versions in self.models.values() for served in versions.values()]

    def batchers(self) -> list[Batcher]:
        """Every batcher with work: served versions and replaced ones still draining (shutdown covers both)."""
        return [s.batcher for s in self.all()] + [s.batcher for s in self.retiring]

    def default_name(self) -> str | None:
        """The model a request that names none gets: the configured default, else the only one."""
        if self.settings.default_model:
            return self.settings.default_model
        return self.names()[0] if len(self.models) == 1 else None

    def resolve(self, name: str | None, version: int | None = None) -> ServedModel:
        """The version a request is for, or the error table's answer (404 unknown, 503 unloading)."""
        available = ", ".join(self.names()) or "none"
        if name is None:
            name = self.default_name()
            if name is None:
                raise ServiceError(
                    "invalid_parameter", f"several models are served; name one with model= ({available})"
                )
        versions = self.models.get(name)
        if not versions:
            shown = repr(name) if is_model_name(name) or len(name) <= 64 else f"{name[:64]!r}..."
            raise ServiceError("model_not_found", f"unknown model {shown}; available: {available}")
        if version is None:
            version = max(versions)
        served = versions.get(version)
        if served is None:
            raise ServiceError(
                "model_not_found", f"model {name!r} has no version {version}; available: {sorted(versions)}"
            )
        if served.unloading:
            raise ServiceError("model_unavailable", f"model {name!r} version {version} is being unloaded")
        return served

    # -- loading -----------------------------------------------------------------------------------------
    async def _build(
        self, name: str, version: int, model: InferenceModel | None, path: Path | None, config: ModelConfig
    ) -> ServedModel:
        self.building = True
        try:
            return await self._build_now(name, version, model, path, config)
        finally:
            self.building = False

    async def _build_now(
        self, name: str, version: int, model: InferenceModel | None, path: Path | None, config: ModelConfig
    ) -> ServedModel:
        settings = self.settings
        try:
            batching = config.batching(settings)
        except ConfigError as exc:
            raise ModelLoadError(f"model {name!r}: config.pbtxt: {exc}") from None
        shapes = batching.shapes()
        before = rss_bytes()
        if model is None:
            assert path is not None
            try:
                model = await asyncio.to_thread(self.loader, settings, path, shapes)
            except ModelLoadError:
                raise
            except Exception as exc:  # ONNX Runtime's own errors: a corrupt or foreign file
                raise ModelLoadError(f"model {name!r} version {version}: {exc}") from exc
        if model.card.parity.get("passed") is False:
            raise ModelLoadError(f"model {name!r} version {version}: the file's parity report failed")
        log.info("warming up %s version %d: batch sizes %s", name, version, shapes)
        try:
            await asyncio.to_thread(warm_up, model, shapes)
        except Exception as exc:  # the runtime's own errors (a CUDA out-of-memory at the largest batch, say)
            raise ModelLoadError(f"model {name!r} version {version} failed its warm-up: {exc}") from exc
        batcher = Batcher(
            model,
            max_batch=batching.max_batch_size,
            max_queue=batching.max_queue_size,
            max_delay=batching.max_queue_delay_ms / 1000,
            pad_to=shapes if batching.pad else None,
            cut_to=shapes,
            observer=self.metrics.observer(name, str(version)),
            tracing=self.tracing if self.tracing is not None and self.tracing.on else None,
            labels={"resnest.model": name, "resnest.model_version": version},
        )
        batcher.start()
        memory = max(rss_bytes() - before, 0)
        served = ServedModel(name, version, model, batcher, batching, str(path) if path else "in-process", memory)
        served.inflight_series = self.metrics.model_inflight.labels(name, str(version))
        card = model.card
        if card.warning:
            log.warning("%s (model %s version %d)", card.warning, name, version)
        log.info("loaded %s version %d (%s, %s) on %s: %.0f MiB", name, version, card.variant, card.precision,
                 model.providers, memory / 2**20)  # fmt: skip
        return served

    def _info_labels(self, served: ServedModel) -> tuple[str, ...]:
        card = served.model.card
        return (served.name, str(served.version), card.variant, card.precision, served.model.providers[0],
                card.weights.get("sha256", "?")[:16])  # fmt: skip

    async def _swap_in(self, name: str, built: list[ServedModel]) -> None:
        """Serve `built` under `name`; the versions it replaces drain in the background, and their answers
        leave the response cache."""
        old = self.models.get(name, {})
        self.models[name] = {s.version: s for s in built}
        for served in old.values():
            self._retire(served)
        for served in built:  # after the old ones' series are gone: they may share these labels
            self.metrics.model_memory.labels(served.name, str(served.version)).set(served.memory_bytes)
            self.metrics.model_info.labels(*self._info_labels(served)).set(1)
        await self._uncache(name, old.keys())

    async def _uncache(self, name: str, versions: Iterable[int]) -> None:
        """Drop these versions' entries from the response cache (a reload or unload: answers may change)."""
        if self.cache is not None:
            for version in versions:
                await self.cache.drop(name, version)

    def _check_memory(self, built: list[ServedModel]) -> None:
        """What is served plus what was just built, and the request path's worst case, within the limit."""
        queues = [s.batching.memory_bytes(s.model.card.preprocess.input_size) for s in self.all() + built]
        check_memory(self.settings, queues, memory_limit_bytes(), rss_bytes())

    async def add(self, name: str, model: InferenceModel, version: int = 1) -> ServedModel:
        """Serve an already-built model (tests, the one-file shortcut with an injected model)."""
        async with self._lock:
            served = await self._build(name, version, model, None, ModelConfig())
            await self._swap_in(name, [served])
            return served

    async def load(self, entry: ModelEntry) -> list[ServedModel]:
        """Serve the versions `entry` selects, replacing what was served under its name only on success."""
        async with self._lock:
            built: list[ServedModel] = []
            try:
                for version in entry.selected:
                    built.append(await self._build(entry.name, version, None, entry.files[version], entry.config))
                self._check_memory(built)  # a load that would not fit is refused, not left to the OOM killer
            except Exception as exc:
                for served in built:
                    await served.batcher.stop(0)
                    self._forget(served)  # its series, unless the version it would have replaced owns them
                self.failures[entry.name] = str(exc)
                raise
            self.failures.pop(entry.name, None)
            self.policies[entry.name] = entry.config.version_policy
            await self._swap_in(entry.name, built)
            return built

    async def load_path(self, name: str, path: Path) -> ServedModel:
        """The one-file shortcut (RESNEST_MODEL_PATH): `path` served as version 1 of `name`."""
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (build it with `python -m export`)")
        (served,) = await self.load(ModelEntry(name, {1: path}))
        return served

    async def load_from_repository(self, name: str) -> list[ServedModel]:
        """(Re)load one model folder of RESNEST_MODEL_REPOSITORY."""
        root = self.settings.model_repository
        if root is None:
            raise ServiceError("invalid_parameter", "no model repository is configured (RESNEST_MODEL_REPOSITORY)")
        folder = model_folder(root, name)
        if folder is None:
            # The same answer whatever is on disk outside the repository: no oracle on which directories exist.
            raise ServiceError("model_not_found", f"the repository has no model {name!r}")
        try:
            entry = read_model(folder)
        except RepositoryError as exc:
            self.failures[name] = str(exc)
            raise ModelLoadError(str(exc)) from exc
        return await self.load(entry)

    # -- unloading ---------------------------------------------------------------------------------------
    def _forget(self, served: ServedModel) -> None:
        """Drop a version's series from /metrics, unless a newer build of the same version serves now."""
        current = self.models.get(served.name, {}).get(served.version)
        if current is not None and current is not served:
            if self._info_labels(current) != self._info_labels(served):  # another file under the same version
                with contextlib.suppress(KeyError):
                    self.metrics.model_info.remove(*self._info_labels(served))
            return
        for gauge, labels in (
            (self.metrics.model_memory, (served.name, str(served.version))),
            (self.metrics.model_info, self._info_labels(served)),
            (self.metrics.model_queue_depth, (served.name, str(served.version))),
            (self.metrics.model_inflight, (served.name, str(served.version))),
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    async def _drain(self, served: ServedModel) -> None:
        """Refuse new requests at once, let those in flight finish (up to their deadline), stop the batcher."""
        served.unloading = True
        deadline = time.monotonic() + self.settings.request_timeout_s + 1.0
        while served.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await served.batcher.stop(timeout=max(deadline - time.monotonic(), 0.0))
        self._forget(served)
        log.info("unloaded %s version %d", served.name, served.version)

    def _retire(self, served: ServedModel) -> None:
        """Drain a replaced version in the background; the new one is already taking requests."""
        served.unloading = True
        self.retiring.add(served)
        task = asyncio.get_running_loop().create_task(self._drain(served))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        task.add_done_callback(lambda _: self.retiring.discard(served))

    async def unload(self, name: str) -> None:
        """Stop serving every version of `name` once its requests in flight are answered."""
        async with self._lock:
            versions = self.models.get(name)
            if not versions:
                raise ServiceError("model_not_found", f"unknown model {name!r}; available: {', '.join(self.names())}")
            for served in versions.values():
                served.unloading = True
            await asyncio.gather(*(self._drain(s) for s in versions.values()))
            del self.models[name]
            await self._uncache(name, versions.keys())
            self.policies.pop(name, None)

    # -- the repository index ----------------------------------------------------------------------------
    def index(self) -> list[IndexEntry]:
        """Every model on disk and in memory: READY, UNLOADING, UNAVAILABLE (with the reason)."""
        rows: dict[tuple[str, str], IndexEntry] = {}
        root = self.settings.model_repository
        try:
            found = scan(root) if root is not None else {}
        except RepositoryError:
            log.error("the model repository %s cannot be read", root)
            found = {}
        for name, entry in found.items():
            if isinstance(entry, RepositoryError):
                rows[(name, "")] = IndexEntry(name, "", "UNAVAILABLE", str(entry))
                continue
            for version in sorted(entry.files):
                chosen = version in entry.selected
                reason = "the last load failed (see the server log)" if name in self.failures else ""
                reason = reason if chosen else "not selected by the version policy"
                rows[(name, str(version))] = IndexEntry(name, str(version), "UNAVAILABLE", reason)
        for served in self.all():
            state = "UNLOADING" if served.unloading else "READY" if served.ready else "UNAVAILABLE"
            rows[(served.name, str(served.version))] = IndexEntry(served.name, str(served.version), state)
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], int(k[1] or 0)))]

    async def stop_all(self, timeout: float) -> bool:
        """Stop every batcher, draining replaced versions included, within `timeout`; whether all finished."""
        results = await asyncio.gather(*(batcher.stop(timeout) for batcher in self.batchers()))
        return all(results)
