"""The benchmarks still run end to end (a few seconds each on the tiny model); they measure, these only check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_serving_benchmark_runs_every_part_and_writes_its_results(tiny_onnx: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.serving", "--model", str(tiny_onnx), "--concurrency", "1", "4", "--images", "1",
        "2", "--duration", "1", "--warmup", "0.5", "--ceiling-batches", "1", "2", "--ceiling-seconds", "0.3",
        "--soak-requests", "40", "--out", str(tmp_path), "--tag", "smoke",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "serving-smoke.json").read_text())
    for server in ("ours", "naive"):
        points = {(r["concurrency"], r["images_per_request"]) for r in result[server]}
        assert points == {(1, 1), (4, 1), (1, 2), (4, 2)}, server
        for row in result[server]:
            assert row["errors"] == 0 and row["images_per_s"] > 0, (server, row)
            assert row["p50_ms"] <= row["p99_ms"] and row["client_cpu_percent"] > 0
    assert all(r["mean_batch_size"] >= 1 for r in result["ours"])
    assert result["ceiling"]["images_per_s"] > 0 and result["preprocess"]["ms_per_image"] > 0
    assert result["soak"]["ok"] == 40
    table = (tmp_path / "serving-smoke.md").read_text()
    assert "| goal | measured | met |" in table and "peak throughput >= 0.9x ceiling" in table
    assert (tmp_path / "serving-smoke.png").stat().st_size > 10_000


def test_tuning_benchmark_measures_each_configuration(tiny_onnx: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.tuning", "--model", str(tiny_onnx), "--duration", "1", "--warmup", "0.3",
        "--only", "defaults", "max batch 4", "--out", str(tmp_path), "--tag", "smoke",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "tuning-smoke.json").read_text())
    assert [(c["name"], c["max_batch_size"]) for c in result["configs"]] == [("defaults", 8), ("max batch 4", 4)]
    for config in result["configs"]:
        assert [p["errors"] for p in config["points"]] == [0, 0, 0]
    assert (tmp_path / "tuning-smoke.md").read_text().count("\n| ") == 3  # header + two rows


def test_protocol_benchmark_measures_every_protocol_on_one_server(tiny_onnx: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench.protocols", "--model", str(tiny_onnx), "--concurrency", "1", "2", "--rounds",
        "1", "--duration", "1", "--warmup", "0.3", "--ceiling-seconds", "0.3", "--out", str(tmp_path), "--tag",
        "smoke",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "protocols-smoke.json").read_text())
    points = {(r["protocol"], r["concurrency"]) for r in result["rows"]}
    assert points == {(p, c) for p in ("multipart", "oip-json", "oip-binary", "grpc") for c in (1, 2)}
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 for r in result["rows"]), result["rows"]
    table = (tmp_path / "protocols-smoke.md").read_text()
    assert "multipart >= 0.97x gRPC img/s" in table and table.count(">= 0.95x the ceiling") == 4
