"""Start-up says what serves and why, once, and nothing else of ONNX Runtime's or torch's: a real server's log
and the export CLI's stderr on this machine, and the CUDA probe's verdicts on made-up machines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import providers.probe as providers
from tests.conftest import ROOT, jpeg, wait_until

# Every line of a text-format log comes from the service's formatter: time, level, logger, message.
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# What ONNX Runtime and torch print when left alone on a machine without CUDA or torchvision.
THIRD_PARTY_NOISE = ("onnxruntime", "Failed to load", "[E:", "[W:", "torchvision", "Please follow")


def test_start_up_without_a_gpu_is_quiet_and_names_the_cpu_fallback_once(server_factory, tiny_onnx: Path) -> None:
    if providers.probe_cuda().available:
        pytest.skip("this machine has a usable GPU: there is no CPU fallback to report")
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_PROVIDERS": "auto"})
    r = httpx.post(f"{server.url}/classify", files={"images": ("a.jpg", jpeg(), "image/jpeg")}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/model").json()["providers"] == ["CPUExecutionProvider"]
    # The access line follows the answer: wait for it rather than race it.
    wait_until(lambda: f"id={r.headers['x-request-id']}" in server.log())
    lines = server.log().splitlines()
    assert lines
    strays = [line for line in lines if not TEXT_LINE.match(line)]
    assert not strays, f"lines from outside the service's logging: {strays}"
    assert not [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    assert not [line for line in lines if any(noise in line for noise in THIRD_PARTY_NOISE)]
    fallback = [line for line in lines if "serving on CPU" in line]
    assert len(fallback) == 1, fallback
    assert providers.probe_cuda().reason in fallback[0]
    # One access line for the request, carrying the id its client saw.
    access = [line for line in lines if " service.access: " in line and f"id={r.headers['x-request-id']}" in line]
    assert len(access) == 1 and "POST /classify 200" in access[0] and "images=1" in access[0]


def test_cpu_by_configuration_says_so(server_factory, tiny_onnx: Path) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_PROVIDERS": "cpu"})
    fallback = [line for line in server.log().splitlines() if "serving on CPU" in line]
    assert len(fallback) == 1 and "RESNEST_PROVIDERS=cpu" in fallback[0]


@pytest.mark.parametrize("env", [{"RESNEST_PROVIDERS": "cuda"}, {"RESNEST_REQUIRE_GPU": "true"}])
def test_a_required_gpu_that_cannot_start_fails_naming_what_is_missing(
    server_factory, tiny_onnx: Path, env: dict[str, str]
) -> None:
    probe = providers.probe_cuda()
    if probe.available:
        pytest.skip("this machine has a usable GPU")
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), **env}, wait=False)
    assert server.proc.wait(timeout=60) != 0
    log = server.log()
    assert "a GPU is required but the CUDA EP cannot start" in log
    assert probe.reason in log and probe.detail in log


def test_export_stderr_has_no_onnx_runtime_errors_or_torchvision_warnings(tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    args = ["--variant", "resnest14d", "--input-size", "64", "--skip-naive", "--output", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    noisy = [line for line in output.splitlines() if any(noise in line for noise in THIRD_PARTY_NOISE)]
    assert not noisy, noisy
    assert out.is_file()


@pytest.fixture
def fresh_probe():  # type: ignore[no-untyped-def]
    """probe_cuda() is cached per process; each made-up machine needs its own verdict."""
    providers.probe_cuda.cache_clear()
    yield providers.probe_cuda
    providers.probe_cuda.cache_clear()


def test_no_cuda_libraries_at_all(monkeypatch, fresh_probe, capfd) -> None:
    monkeypatch.setattr(providers, "_load", lambda name, dirs: None)
    probe = fresh_probe()
    assert not probe.available and probe.reason == "no CUDA libraries found"
    assert set(probe.missing) == set(providers.required_libraries())
    line = providers.describe(["CPUExecutionProvider"], probe)
    assert line.startswith("no CUDA libraries found: serving on CPU")
    assert capfd.readouterr() == ("", ""), "the probe prints nothing"


def test_some_libraries_missing_are_named(monkeypatch, fresh_probe) -> None:
    present = {"libcuda.so.1", "libcudart.so.13"}
    monkeypatch.setattr(providers, "_load", lambda name, dirs: object() if name in present else None)
    monkeypatch.setattr(providers, "_cuda_major", lambda: "13")
    probe = fresh_probe()
    assert not probe.available and probe.reason == "CUDA libraries missing"
    assert "libcudnn.so.9" in probe.detail and "libcudart.so.13" not in probe.detail


def test_libraries_without_a_gpu(monkeypatch, fresh_probe) -> None:
    monkeypatch.setattr(providers, "_load", lambda name, dirs: object())
    monkeypatch.setattr(providers, "_visible_gpus", lambda driver: (0, "the NVIDIA driver sees no GPU"))
    probe = fresh_probe()
    assert not probe.available and probe.reason == "the NVIDIA driver sees no GPU"


def test_a_cuda_ep_that_fails_despite_its_libraries_is_reported_as_such() -> None:
    line = providers.describe(["CPUExecutionProvider"], providers.CudaProbe(True, ""))
    assert "did not start although its libraries" in line and line.count("serving on CPU") == 1
    cuda = providers.describe(["CUDAExecutionProvider", "CPUExecutionProvider"], providers.CudaProbe(True, ""), 1)
    assert cuda.startswith("serving on CUDA (GPU 1)")
