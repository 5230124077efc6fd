"""Shutdown within one budget: SIGTERM to exit in RESNEST_SHUTDOWN_TIMEOUT_S, stuck inference or not, and
every request still in flight at the deadline answered 503 rather than left hanging or reset."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.core.request.batching import Batcher, BatcherStopped
from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import ROOT, app_client, jpeg, run
from tests.fakes import FAKE_SIZE, FakeModel

# A model call that never returns once a real image arrives (warm-up feeds zeros), like a hung GPU kernel.
STUCK_INFERENCE = """
import threading
import service.core.request.inference as runtime
original = runtime.OrtModel.infer
def infer(self, images):
    if images.any():
        threading.Event().wait()
    return original(self, images)
runtime.OrtModel.infer = infer
"""
# A shutdown that blocks the event loop itself: only the watchdog thread can still end the process.
BLOCKED_LOOP = """
import time
import service.core.request.batching as batcher
async def stop(self, timeout):
    time.sleep(3600)
batcher.Batcher.stop = stop
"""
BUDGET_S, GRACE_S = 3.0, 0.5
# What the process may take past its budget to be reaped and noticed by this test (not the server's bound).
REAP_SLACK_S = 2.0


class PatchedServer:
    """`service.__main__.main()` in a subprocess, after `patch` ran in it; the port is read from its log."""

    def __init__(self, model: Path, patch: str, log_path: Path) -> None:
        env = {
            **os.environ,
            "RESNEST_MODEL_PATH": str(model),
            "RESNEST_HOST": "127.0.0.1",
            "RESNEST_PORT": "0",
            "RESNEST_GRPC_PORT": "0",
            "RESNEST_PROVIDERS": "cpu",
            "RESNEST_DRAIN_GRACE_S": str(GRACE_S),
            "RESNEST_SHUTDOWN_TIMEOUT_S": str(BUDGET_S),
        }
        code = f"{patch}\nfrom service.__main__ import main\nraise SystemExit(main())\n"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.url = self._wait_listening()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_listening(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log())
            if found:
                return found.group(1)
            time.sleep(0.05)
        raise TimeoutError(self.log())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def _wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _post_in_background(url: str, results: list[httpx.Response | BaseException]) -> threading.Thread:
    def post() -> None:
        try:
            files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
            results.append(httpx.post(f"{url}/classify", files=files, timeout=60))
        except BaseException as exc:  # the assertion below reports what the client saw
            results.append(exc)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _queue_holds_work(url: str) -> bool:
    """The upload has been admitted and sits in the batch (or queue) the stuck model never returns."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(r"^resnest_inflight_requests (\S+)", text, re.M)
    return found is not None and float(found.group(1)) >= 2  # the upload plus this scrape


def test_sigterm_with_a_stuck_inference_answers_503_and_exits_3_within_the_budget(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    server = PatchedServer(tiny_onnx, STUCK_INFERENCE, tmp_path / "stuck.log")
    try:
        results: list[httpx.Response | BaseException] = []
        client = _post_in_background(server.url, results)
        _wait_for(lambda: _queue_holds_work(server.url))
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=BUDGET_S + 60)
        took = time.monotonic() - sent
        client.join(timeout=30)
        log = server.log()
    finally:
        server.close()
    print(f"\nstuck inference: exit {code} after {took:.2f}s (budget {BUDGET_S}s); client got {results}")
    assert code == 3, log
    assert took < BUDGET_S + REAP_SLACK_S, log
    (answer,) = results
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "draining"
    assert "ERROR service: an inference call is still running after shutdown" in log


def test_a_shutdown_that_blocks_the_event_loop_is_ended_by_the_watchdog(tiny_onnx: Path, tmp_path: Path) -> None:
    server = PatchedServer(tiny_onnx, BLOCKED_LOOP, tmp_path / "blocked.log")
    try:
        assert (
            httpx.post(f"{server.url}/classify", files=[("images", ("a.jpg", jpeg(), "image/jpeg"))]).status_code == 200
        )
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=BUDGET_S + 60)
        took = time.monotonic() - sent
        log = server.log()
    finally:
        server.close()
    print(f"\nblocked loop: exit {code} after {took:.2f}s (budget {BUDGET_S}s)")
    assert code == 3, log
    assert BUDGET_S - 0.5 < took < BUDGET_S + REAP_SLACK_S, log
    assert "shutdown budget of 3.0s spent: exiting now (code 3)" in log


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((3, FAKE_SIZE, FAKE_SIZE), dtype=np.float32) for _ in range(n)]


def test_stop_past_its_timeout_fails_running_and_queued_requests_and_reports_it() -> None:
    async def main() -> None:
        model = FakeModel()
        model.gate = threading.Event()
        batcher = Batcher(model, max_batch=1, max_queue=8)  # type: ignore[arg-type]
        batcher.start()
        running = batcher.submit(_images(1), timeout=60)
        queued = batcher.submit(_images(1), timeout=60)
        while not batcher.busy:
            await asyncio.sleep(0.01)
        assert await batcher.stop(timeout=0.2) is False
        for ticket in (running, queued):
            with pytest.raises(BatcherStopped, match="shutdown timed out"):
                await batcher.wait(ticket)
        assert batcher.busy  # the model call itself is still on its thread: the caller must not join it
        model.gate.set()
        while batcher.busy:
            await asyncio.sleep(0.01)

    run(main())


def test_a_request_dropped_by_the_shutdown_is_told_draining_not_not_ready() -> None:
    model = FakeModel()
    settings = Settings(model_path=Path("unused.onnx"), max_batch_size=4, decode_threads=1)
    app = create_app(settings, model=model)
    state = app.state.service

    async def main() -> httpx.Response:
        async with app_client(app) as client:
            model.gate = threading.Event()  # after warm-up: the next batch blocks inside the model
            request = asyncio.ensure_future(
                client.post("/classify", files=[("images", ("a.jpg", jpeg(), "image/jpeg"))])
            )
            while not state.batcher.busy:
                await asyncio.sleep(0.01)
            state.draining = True
            assert state.batcher.abort("the shutdown deadline passed before this request was inferred") == 1
            answer = await request
            model.gate.set()
            return answer

    answer = run(main())
    assert answer.status_code == 503
    body = answer.json()["error"]
    assert body["code"] == "draining"
    assert "shutdown deadline passed" in body["message"]
