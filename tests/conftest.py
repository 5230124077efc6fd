"""Shared fixtures: a tiny real ONNX ResNeSt exported once per session, photographs, app clients."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from modelcard import FLOAT32_NCHW
from service.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TINY_VARIANT, TINY_SIZE = "resnest14d", 64


def export_tiny(out: Path, input_format: str = FLOAT32_NCHW) -> Path:
    """resnest14d at 64x64 with seeded random weights, through the real export pipeline (parity included)."""
    import models
    from export.pipeline import export_model
    from imaging.transforms import PreprocessConfig

    model = models.create_model(TINY_VARIANT, seed=0)
    data = model.variant.data
    cfg = PreprocessConfig(TINY_SIZE, 73, data.interpolation, data.mean, data.std)
    export_model(model, cfg, out, weights={"source": "random", "sha256": "random", "seed": 0},
                 compare_naive=False, log=lambda _: None, input_format=input_format)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with float32 NCHW input, exported once per session."""
    return export_tiny(tmp_path_factory.mktemp("model") / "tiny.onnx")


def required_binary(name: str, places: tuple[str, ...], make_target: str, package: str) -> str:
    """A Debian package's program the suite needs: on PATH or in `places`; missing is a failure, not a skip
    (CI must run its tests, and `make test` installs it through `make_target`)."""
    path = shutil.which(name) or next((p for p in places if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make {make_target}` (Debian's {package} package)", pytrace=False)
    return path


def settings(**overrides: Any) -> Settings:
    """Settings for an in-process app: batches of 4, no gRPC port; `overrides` on top."""
    source = {} if "model_repository" in overrides else {"model_path": "unused.onnx"}
    return Settings(**{**source, "max_batch_size": 4, "grpc_enabled": False, **overrides})


@pytest.fixture(scope="session")
def photos() -> list[tuple[str, bytes]]:
    """The bundled photographs (name, bytes)."""
    from export.photos import sample_photos

    return sample_photos()


def jpeg(size: tuple[int, int] = (96, 72), color: tuple[int, int, int] = (200, 30, 40), quality: int = 90) -> bytes:
    """A small solid-colour JPEG with a gradient, so distinct colours give distinct model inputs."""
    img = Image.new("RGB", size, color)
    for x in range(size[0]):
        img.putpixel((x, x * size[1] // size[0]), (x % 256, 255 - x % 256, 128))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def run(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion (the suite has no asyncio plugin)."""
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def app_client(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    """An httpx client wired to the ASGI app in-process, with its lifespan run around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the event loop until `condition` holds; the timeout only stops a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> None:
    """Block until `condition` holds (for code outside an event loop); the timeout only stops a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)


# What service/__main__.py logs once uvicorn has bound its socket: the real port, also for RESNEST_PORT=0.
LISTENING = re.compile(r"listening on http://(?P<host>\[[^\]]+\]|[^\s:/]+):(?P<port>\d+)")
GRPC_LISTENING = re.compile(r"listening on grpc://(?P<host>\[[^\]]+\]|[^\s:/]+):(?P<port>\d+)")


class ServerProcess:
    """`python -m service` in a subprocess, stopped (and reaped) by the fixture.

    It binds port 0 (any free port, chosen by the kernel: no window in which another process can take it) and
    `.port`/`.url` come from the `listening on` line of its log, which needs log level info or lower.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        full_env = {**os.environ, "RESNEST_HOST": "127.0.0.1", "RESNEST_PORT": "0", "RESNEST_GRPC_PORT": "0", **env}
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._address: tuple[str, int] | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def port(self) -> int:
        """The port the server bound (waits for it to start listening)."""
        return self.wait_listening()[1]

    @property
    def url(self) -> str:
        host, port = self.wait_listening()
        return f"http://{host}:{port}"

    def wait_listening(self, timeout: float = 120.0) -> tuple[str, int]:
        """(host, port) from the server's log once it listens; start-up (model load, warm-up) comes first."""
        deadline = time.monotonic() + timeout
        while self._address is None:
            if found := LISTENING.search(self.log()):
                self._address = (found["host"], int(found["port"]))
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not listening after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self._address

    @property
    def grpc_target(self) -> str:
        """host:port of the server's gRPC front, from its `listening on grpc://` log line."""
        self.wait_listening()
        deadline = time.monotonic() + 30
        while (found := GRPC_LISTENING.search(self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server's gRPC front never listened:\n{self.log()}")
            time.sleep(0.05)
        return f"{found['host']}:{found['port']}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        self.wait_listening(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=30)
        self._log.close()
        return code


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start real servers: factory(env) -> ServerProcess (ready); all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(env: dict[str, str], wait: bool = True) -> ServerProcess:
        server = ServerProcess(env, tmp_path / f"server{len(started)}.log")
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class RawAnswer:
    status: int | str  # an int, or the name of the transport error
    seconds: float
    headers: dict[str, str]
    body: bytes


def parse_answer(data: bytes, seconds: float) -> RawAnswer:
    """A raw HTTP/1.1 answer as read off the socket -> status, headers and body."""
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return RawAnswer("empty answer", seconds, {}, b"")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return RawAnswer(int(status_line.split()[1]), seconds, headers, body)


async def send_raw(port: int, request: bytes) -> RawAnswer:
    """Send bytes on a fresh connection, written whole before reading as most clients do, and read the whole
    answer (the server closes: Connection: close)."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return RawAnswer(type(exc).__name__, time.perf_counter() - started, {}, b"")
    return parse_answer(data, time.perf_counter() - started)
