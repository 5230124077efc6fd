"""Start a peer from its own environment (bench/serving.py's server(): ready when its health route says so)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..serving import ROOT, free_port, server
from . import MODEL_NAME, NAMES

READY = {"bentoml": "/readyz", "litserve": "/health", "mlserver": f"/v2/models/{MODEL_NAME}/ready"}


@dataclass(frozen=True)
class Running:
    """A peer that answers: where to send requests, in which protocol, and the process to sample."""

    name: str
    protocol: str  # bench/loadgen.py's --protocol
    url: str
    grpc_target: str
    pid: int


def _command(name: str, venv: Path, model: Path, folder: Path, port: int, grpc_port: int) -> list[str]:
    """How the peer's own tooling starts it on `port` (MLServer: from settings files written into `folder`)."""
    if name == "bentoml":
        return [str(venv / "bin/bentoml"), "serve", "bench.peers.bentoml_service:ResNeSt", "--port", str(port),
                "--host", "127.0.0.1"]  # fmt: skip
    if name == "litserve":
        return [str(venv / "bin/python"), "-m", "bench.peers.litserve_app", str(port)]
    if name == "mlserver":
        (folder / "settings.json").write_text(json.dumps({
            "http_port": port, "grpc_port": grpc_port, "metrics_port": free_port(), "host": "127.0.0.1",
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


@contextlib.contextmanager
def serve(name: str, venvs: Path, model: Path, folder: Path) -> Iterator[Running]:
    """Start peer `name` from `venvs/<name>` on `model`, wait until it is ready, stop it afterwards."""
    port, grpc_port = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    model = model.resolve()
    command = _command(name, (venvs / name).resolve(), model, folder, port, grpc_port)
    env = {"PYTHONPATH": str(ROOT), "RESNEST_PEER_MODEL": str(model)}
    url = f"http://127.0.0.1:{port}"
    with server(command, env, url, ready=READY[name], log=folder / f"{name}.log") as proc:
        protocol = "grpc" if name == "mlserver" else "multipart"
        yield Running(name, protocol, url, f"127.0.0.1:{grpc_port}", proc.pid)
