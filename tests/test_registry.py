"""The registry in-process, on fake models: reloads swap atomically, keep their metrics, and leave nothing
behind that a shutdown would miss; failed and oversized loads leave what was served untouched."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from service.core import limits
from service.core.errors import ServiceError
from service.core.metrics import Metrics
from service.core.repository import registry as registry_module
from service.core.repository.layout import ModelEntry
from service.core.repository.registry import Registry
from service.core.request.batching import BatcherStopped
from service.core.request.inference import ModelLoadError
from service.core.settings import Settings
from tests.conftest import run
from tests.fakes import FAKE_SIZE, FakeModel


def make(loader=None) -> tuple[Registry, Metrics, list[FakeModel]]:  # type: ignore[no-untyped-def]
    built: list[FakeModel] = []

    def fake_loader(settings: Settings, path: Path, shapes: list[int]) -> FakeModel:
        model = FakeModel()
        built.append(model)
        return model

    metrics = Metrics()
    settings = Settings(model_path=Path("m.onnx"), max_batch_size=2, decode_threads=1)
    return Registry(settings, metrics, loader or fake_loader), metrics, built


def entry(name: str = "m", versions: tuple[int, ...] = (1,)) -> ModelEntry:
    return ModelEntry(name, {v: Path(f"/nonexistent/{name}/{v}/model.onnx") for v in versions})


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_reload_keeps_the_served_versions_metrics_and_drops_nothing_else() -> None:
    async def main() -> None:
        reg, metrics, built = make()
        await reg.load(entry())
        first = reg.resolve("m")
        await reg.load(entry())  # reload: a new session for the same version
        second = reg.resolve("m")
        assert second is not first and first.unloading
        while reg.retiring:  # the replaced version drains in the background
            await asyncio.sleep(0.01)
        assert sample(metrics, "resnest_model_memory_bytes", model="m", version="1") is not None
        info = [s for s in metrics.model_info.collect()[0].samples if s.labels["model"] == "m"]
        assert len(info) == 1 and info[0].value == 1
        await reg.unload("m")
        assert sample(metrics, "resnest_model_memory_bytes", model="m", version="1") is None
        assert reg.names() == []
        assert len(built) == 2

    run(main())


def test_a_failed_load_leaves_the_served_version_and_its_metrics() -> None:
    async def main() -> None:
        calls = {"n": 0}

        def flaky(settings: Settings, path: Path, shapes: list[int]) -> FakeModel:
            calls["n"] += 1
            if calls["n"] > 1:
                raise RuntimeError("Load model from /secret/path/model.onnx failed: protobuf parsing failed")
            return FakeModel()

        reg, metrics, _ = make(flaky)
        await reg.load(entry())
        served = reg.resolve("m")
        with pytest.raises(ModelLoadError, match="protobuf parsing failed"):
            await reg.load(entry())
        assert reg.resolve("m") is served and served.ready
        assert sample(metrics, "resnest_model_memory_bytes", model="m", version="1") is not None
        assert [(r.name, r.version, r.state) for r in reg.index()] == [("m", "1", "READY")]

    run(main())


def test_a_load_that_would_not_fit_the_memory_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        reg, _, _ = make()
        await reg.load(entry("a"))
        monkeypatch.setattr(registry_module, "memory_limit_bytes", lambda: limits.rss_bytes() + 1)
        with pytest.raises(limits.LimitsError, match="exceeds the memory limit"):
            await reg.load(entry("b"))
        assert reg.names() == ["a"]

    run(main())


def test_shutdown_reaches_versions_a_reload_replaced_while_they_drain() -> None:
    async def main() -> None:
        reg, _, built = make()
        await reg.load(entry())
        old = reg.resolve("m")
        built[0].gate = threading.Event()  # the old version's next batch blocks inside the model
        image = np.zeros((3, FAKE_SIZE, FAKE_SIZE), dtype=np.float32)
        with old.use():
            ticket = old.batcher.submit([image], timeout=30)
            while not old.batcher.busy:
                await asyncio.sleep(0.005)
            await reg.load(entry())  # the old version now drains in the background, its request in flight
            assert old.batcher in reg.batchers() and old not in reg.all()
            assert old.batcher.abort("the shutdown deadline passed") == 1
            with pytest.raises(BatcherStopped, match="shutdown deadline"):
                await old.batcher.wait(ticket)
        built[0].gate.set()
        assert await reg.stop_all(timeout=5)

    run(main())


def test_resolve_errors_name_what_is_available() -> None:
    async def main() -> None:
        reg, _, _ = make()
        await reg.load(entry("a", (1, 2)))
        await reg.load(entry("b"))
        with pytest.raises(ServiceError, match=r"several models are served; name one with model= \(a, b\)"):
            reg.resolve(None)
        with pytest.raises(ServiceError, match="unknown model 'c'; available: a, b"):
            reg.resolve("c")
        assert reg.resolve("a").version == 2  # latest policy by default: the entry selects version 2 only
        with pytest.raises(ServiceError, match=r"has no version 1; available: \[2\]") as missing:
            reg.resolve("a", 1)
        assert missing.value.status == 404

    run(main())
