"""bench/gpu_run.sh: its CPU dry run (REQUIRE_CUDA=0) goes through every step and writes every result."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_run.sh"
# The fast dry run: the tests' small variant, two batch sizes, one repeat, two-second sweep points.
DRY_RUN = {
    "REQUIRE_CUDA": "0", "VARIANT": "resnest14d", "BATCHES": "1 2", "REPEATS": "1", "MAX_BATCH": "4",
    "SWEEP_CONCURRENCY": "1 4", "SWEEP_IMAGES": "1", "SWEEP_DURATION": "2", "SWEEP_WARMUP": "1",
    "CEILING_BATCHES": "1 2", "CEILING_SECONDS": "1", "DECODE_THREADS": "2",
}  # fmt: skip


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_the_cpu_dry_run_completes_and_writes_every_result(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("RESNEST_")}
    env |= DRY_RUN | {"RESULTS": str(tmp_path), "PYTHON": str(ROOT / ".venv" / "bin" / "python"), "WHEELS": "none"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for pattern in ("parity-fp32-*.json", "parity-fp16-*.json", "parity-fp16-uint8-*.json", "machine-*.txt",
                    "runtime-paths-*.json", "model-cpu.json", "model-uint8-cpu.md", "serving-gpu.json"):  # fmt: skip
        assert list(tmp_path.glob(pattern)), f"no {pattern} in {sorted(p.name for p in tmp_path.iterdir())}"
    (paths,) = tmp_path.glob("runtime-paths-*.json")
    report = json.loads(paths.read_text())["paths"]
    assert report["io_binding"]["max_abs_diff_vs_plain"] == 0.0
    graphs = report["io_binding+cuda_graphs"]["acceleration"]["cuda_graphs"]
    assert graphs["active"] is False and "CUDA EP is not active" in graphs["reason"]
    (u8,) = tmp_path.glob("parity-fp16-uint8-*.json")
    assert json.loads(u8.read_text())["input_format"]["passed"] is True
