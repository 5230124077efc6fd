"""Limits that fit the deployment: bytes of uploads held at once, settings checked against each other and the
host, warm-up over the batch shapes the batcher really produces, and the decode memory the checks assume."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from bench.forms import content_type, sized
from service.core import limits
from service.core.lifecycle import new_state
from service.core.repository.config import Batching
from service.core.request.batching import Batcher
from service.core.settings import DECODE_BYTES_PER_PIXEL, Settings
from service.http.errors import BodyRefused
from service.http.middleware import UploadLimitMiddleware
from service.http.routing import RouteMatch
from tests.conftest import ROOT, run, until
from tests.fakes import FAKE_SIZE, FakeModel, fake_outputs


class _Upload:
    """One request through the middleware: its body arrives in `chunks` as the test releases them."""

    def __init__(self, middleware: UploadLimitMiddleware, body: bytes, chunked: bool, chunks: int = 4) -> None:
        headers = [(b"content-type", content_type().encode())]
        if not chunked:
            headers.append((b"content-length", str(len(body)).encode()))
        route = RouteMatch("/classify", "classify")  # as RequestContextMiddleware matches it
        self.scope = {
            "type": "http",
            "path": "/classify",
            "method": "POST",
            "headers": headers,
            "state": {"route": route},
        }
        step = -(-len(body) // chunks)
        self.parts = [body[i : i + step] for i in range(0, len(body), step)]
        self.release = asyncio.Event()  # the app holds the request (as a decode or a queue would) until set
        self.status: int | None = None
        self.middleware = middleware
        self.task = asyncio.ensure_future(middleware(self.scope, self._receive, self._send))

    async def _receive(self) -> dict[str, object]:
        part = self.parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(self.parts)}

    async def _send(self, message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])  # type: ignore[call-overload]


def _holding_app(uploads: list[_Upload]):  # type: ignore[no-untyped-def]
    """An app that reads the whole body, then holds the request until the test releases it; answers 200."""

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        upload = next(u for u in uploads if u.scope is scope)
        try:
            while (await receive()).get("more_body"):
                pass
        except BodyRefused as exc:  # as the app's error handlers answer it
            await send({"type": "http.response.start", "status": exc.error.status, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await upload.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_held_at_once_are_capped_by_bytes_and_the_cap_frees_as_they_end(chunked: bool) -> None:
    async def main() -> tuple[int | None, int | None, int | None]:
        uploads: list[_Upload] = []
        state = new_state(Settings(max_upload_bytes=8000, max_buffered_upload_bytes=10_000, grpc_enabled=False))
        middleware = UploadLimitMiddleware(_holding_app(uploads), state=state)
        first = _Upload(middleware, sized(6000), chunked)
        uploads.append(first)
        await until(lambda: state.uploads.buffered >= 6000)  # read whole and held
        second = _Upload(middleware, sized(6000), chunked)  # 12,000 bytes would be held: over the budget
        uploads.append(second)
        await second.task
        first.release.set()
        await first.task
        assert state.uploads.buffered == 0
        third = _Upload(middleware, sized(6000), chunked)  # the first one's bytes were freed by its answer
        uploads.append(third)
        third.release.set()
        await third.task
        return first.status, second.status, third.status

    assert run(main()) == (200, 429, 200)


def test_an_upload_limit_above_the_buffer_budget_is_refused_naming_both() -> None:
    with pytest.raises(ValidationError, match=r"max_upload_bytes .* exceeds max_buffered_upload_bytes"):
        Settings(max_upload_bytes=64 * 2**20, max_buffered_upload_bytes=32 * 2**20)


def test_a_shutdown_budget_without_room_for_in_flight_work_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"shutdown_timeout_s .* drain_grace_s"):
        Settings(drain_grace_s=10, shutdown_timeout_s=10.5)
    Settings(drain_grace_s=5, shutdown_timeout_s=6.4)  # 1.1 s left after the grace and the late-request wait


def test_spool_check_names_the_setting_and_the_space(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    free = 100 * 2**20
    monkeypatch.setattr(limits.shutil, "disk_usage", lambda _: type("Usage", (), {"free": free})())
    limits.check_spool(Settings(max_buffered_upload_bytes=free), str(tmp_path))
    with pytest.raises(limits.LimitsError, match=r"RESNEST_MAX_BUFFERED_UPLOAD_BYTES \(104857601\) exceeds"):
        limits.check_spool(Settings(max_buffered_upload_bytes=free + 1), str(tmp_path))


def test_memory_check_counts_decodes_queue_and_uploads_against_the_limit() -> None:
    settings = Settings(decode_threads=4, max_image_pixels=40_000_000)
    need = settings.host_memory_bytes(224)
    assert need >= 4 * 40_000_000 * DECODE_BYTES_PER_PIXEL
    queue = [Batching.defaults(settings).memory_bytes(224)]  # one model version batched by the settings
    assert settings.request_memory_bytes() + queue[0] == need
    limits.check_memory(settings, queue, limit=None, model_rss=2**30)  # no limit: nothing to check
    limits.check_memory(settings, queue, limit=need + 2**30, model_rss=2**30)
    with pytest.raises(limits.LimitsError, match="RESNEST_DECODE_THREADS"):
        limits.check_memory(settings, queue, limit=need + 2**30 - 1, model_rss=2**30)


def test_a_server_whose_spool_budget_exceeds_the_disk_refuses_to_start(server_factory, tiny_onnx: Path) -> None:
    huge = str(1 << 55)  # 32 PiB: more than any temp dir has free
    server = server_factory(
        {"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_MAX_BUFFERED_UPLOAD_BYTES": huge}, wait=False
    )
    code = server.proc.wait(timeout=120)
    log = server.log()
    assert code == 1, log
    assert f"RESNEST_MAX_BUFFERED_UPLOAD_BYTES ({huge}) exceeds the free space" in log


def test_warm_up_covers_logarithmically_many_shapes() -> None:
    assert Settings(max_batch_size=64).batch_shapes() == [1, 2, 4, 8, 16, 32, 64]
    assert Settings(max_batch_size=6).batch_shapes() == [1, 2, 4, 6]
    assert sum(Settings(max_batch_size=64).batch_shapes()) == 127  # images warmed, against 2,080 for 1..64


def test_without_padding_batches_are_cut_to_warmed_shapes_and_answers_stay_exact() -> None:
    async def main() -> tuple[list[int], list[np.ndarray]]:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = Batcher(model, max_batch=8, max_queue=64, cut_to=[1, 2, 4, 8])  # type: ignore[arg-type]
        batcher.start()
        rng = np.random.default_rng(1)
        arrays = [rng.standard_normal((3, FAKE_SIZE, FAKE_SIZE), dtype=np.float32) for _ in range(8)]
        first = batcher.submit(arrays[:1], timeout=30)
        while not batcher.busy:
            await asyncio.sleep(0.005)
        rest = [batcher.submit([a], timeout=30) for a in arrays[1:]]  # 7 queued behind the gated batch
        model.gate.set()
        outputs = [(await batcher.wait(t))[0] for t in (first, *rest)]
        await batcher.stop(5)
        return model.batches, [np.concatenate(outputs), np.concatenate([fake_outputs(a[None])[0] for a in arrays])]

    batches, (served, alone) = run(main())
    assert batches == [1, 4, 2, 1], batches  # 7 queued -> 4 + 2 + 1: only shapes warm-up ran
    np.testing.assert_allclose(served, alone, rtol=1e-5, atol=1e-5)


# Reads an image file, resets the kernel's peak-RSS mark, preprocesses the image and prints how far the
# peak rose above the resident memory before the decode (Linux: /proc/self/clear_refs, VmHWM).
DECODE_PROBE = """
import sys
from modelcard import PreprocessConfig
from imaging.transforms import preprocess
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
cfg = PreprocessConfig(224, 256, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
preprocess(data, cfg, 10**9)
print(status("VmHWM:") - before)
"""


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_one_decode_stays_within_the_memory_the_limit_checks_assume(mode: str, tmp_path: Path) -> None:
    # How far one 12-megapixel decode raises a process's peak memory: the start-up memory check counts
    # RESNEST_MAX_IMAGE_PIXELS x DECODE_BYTES_PER_PIXEL per decode thread.
    w, h = 4000, 3000
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8), mode)
    path = tmp_path / "big.png"
    img.save(path, compress_level=1)
    out = subprocess.run(
        [sys.executable, "-c", DECODE_PROBE, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    rise = int(out.stdout.split()[-1])
    per_pixel = rise / (w * h)
    print(f"\n{mode}: decode working memory {per_pixel:.2f} bytes/pixel (the checks assume {DECODE_BYTES_PER_PIXEL})")
    assert per_pixel <= DECODE_BYTES_PER_PIXEL
