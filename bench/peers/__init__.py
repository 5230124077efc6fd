"""Peers measured beside this service on the same ONNX file: BentoML, LitServe and Seldon MLServer, each in a
virtual environment of its own (`make peers` builds them under .peers/ from requirements-<name>.txt), each
configured as its own documentation shows for adaptive batching of at most 8 images, and each decoding with
this project's preprocessing so every server feeds the model the same tensors.

| peer | protocol the load generator speaks | batching |
|---|---|---|
| bentoml | multipart POST /classify (`bentoml_service.py`) | batchable API, max 8, max_latency_ms 1000 (adaptive) |
| litserve | multipart POST /classify (`litserve_app.py`) | max_batch_size 8, batch_timeout 10 ms |
| mlserver | OIP gRPC ModelInfer (`mlserver_runtime.py`) | max_batch_size 8, max_batch_time 10 ms |
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("bentoml", "litserve", "mlserver")
MODEL_NAME = "resnest"


@dataclass(frozen=True)
class Running:
    """A peer that answers: where to send requests, in which protocol, and the process to sample."""

    name: str
    protocol: str  # bench/loadgen.py's --protocol
    url: str
    grpc_target: str
    pid: int


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(name: str, venv: Path, model: Path, folder: Path, port: int, grpc_port: int) -> list[str]:
    """How the peer's own tooling starts it on `port` (MLServer: from settings files written into `folder`)."""
    if name == "bentoml":
        return [str(venv / "bin/bentoml"), "serve", "bench.peers.bentoml_service:ResNeSt", "--port", str(port),
                "--host", "127.0.0.1"]  # fmt: skip
    if name == "litserve":
        return [str(venv / "bin/python"), "-m", "bench.peers.litserve_app", str(port)]
    if name == "mlserver":
        (folder / "settings.json").write_text(json.dumps({
            "http_port": port, "grpc_port": grpc_port, "metrics_port": _free_port(), "host": "127.0.0.1",
            # Inference in MLServer's main process: its worker processes fail to start under uvloop 0.23 ("no
            # current event loop"), and on two cores a second process would only compete for them anyway.
            "parallel_workers": 0,
        }))  # fmt: skip
        (folder / "model-settings.json").write_text(json.dumps({
            "name": MODEL_NAME, "implementation": "bench.peers.mlserver_runtime.ResNeStRuntime",
            "parameters": {"uri": str(model)}, "max_batch_size": 8, "max_batch_time": 0.01,
        }))  # fmt: skip
        return [str(venv / "bin/mlserver"), "start", str(folder)]
    raise ValueError(f"unknown peer {name!r}: one of {NAMES}")


def _ready(name: str, url: str) -> bool:
    path = {"bentoml": "/readyz", "litserve": "/health", "mlserver": f"/v2/models/{MODEL_NAME}/ready"}[name]
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + path, timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def serve(name: str, venvs: Path, model: Path, folder: Path) -> Iterator[Running]:
    """Start peer `name` from `venvs/<name>` on `model`, wait until it is ready, stop it afterwards."""
    port, grpc_port = _free_port(), _free_port()
    folder.mkdir(parents=True, exist_ok=True)
    model = model.resolve()
    command = _command(name, (venvs / name).resolve(), model, folder, port, grpc_port)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RESNEST_PEER_MODEL": str(model)}
    log_path = folder / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while not _ready(name, url):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after 180 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            protocol = "grpc" if name == "mlserver" else "multipart"
            yield Running(name, protocol, url, f"127.0.0.1:{grpc_port}", proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
