"""The README's measured figures are what bench/results/*.json give (bench/figures.py writes and checks them)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from bench import figures
from tests.conftest import ROOT

README, RESULTS = ROOT / "README.md", ROOT / "bench/results"

MACHINE = {
    "date": "2030-01-02T03:04:05+00:00",
    "cpu": "Test CPU",
    "cpu_flags": ["avx2", "avx512f", "fma"],
    "cores": 4,
    "gpu": None,
    "onnxruntime": "9.9.9",
    "torch": "8.8.8",
}


def test_readme_figures_match_the_results() -> None:
    assert figures.check(README, RESULTS) == [], "run `python -m bench.figures` and commit the README"


def test_every_results_file_with_a_renderer_has_a_block() -> None:
    names = {m["name"] for m in figures.BLOCK.finditer(README.read_text())}
    assert names == set(figures.RENDERERS)
    assert all((RESULTS / f"{name}.json").is_file() for name in names)


def test_model_renderer_formats_a_made_up_result() -> None:
    result = {
        "repeats": 3,
        "machine": MACHINE,
        "images_per_second": {
            "torch eager (CPU)": {"1": 10.0, "8": 12.04},
            "ORT CPU, clean graph": {"1": 25.0, "8": 30.06},
        },
        "nodes": {"clean": 123},
        "shape_ops": {"clean": 0},
    }
    text = figures.render_model(result)
    assert "| ORT, this project's graph (123 nodes, 0 Shape) | 25.0 (2.50x) | 30.1 (2.50x) |" in text.splitlines()
    assert "| PyTorch eager | 10.0 | 12.0 |" in text.splitlines()
    machine = text.splitlines()[0]
    assert machine == (
        "Machine: Test CPU (avx2, avx512f; no VNNI), 4 cores, no GPU; onnxruntime 9.9.9, torch 8.8.8; 2030-01-02."
    )


def test_serving_renderer_says_when_a_goal_is_missed() -> None:
    def row(c: int, m: int, ips: float, p50: float, p99: float) -> dict[str, float]:
        return {
            "concurrency": c, "images_per_request": m, "images_per_s": ips, "p50_ms": p50, "p99_ms": p99,
            "errors": 0, "mean_batch_size": min(c * m, 8), "server_cpu_percent": 390.0, "server_rss_mib": 500.0,
        }  # fmt: skip

    result = {
        "machine": MACHINE,
        "ceiling": {"images_per_s": 100.0, "best_batch": 8, "single_image_ms": 10.0, "images_per_s_by_batch": {}},
        "preprocess": {"ms_per_image": 2.0},
        "ours": [row(1, 1, 50.0, 30.0, 40.0), row(64, 1, 80.0, 800.0, 900.0)],
    }
    lines = figures.render_serving(result).splitlines()
    assert "| 64 x 1 | 80.0 | 800 / 900 |" in lines
    assert any(
        line.startswith("- Peak 80.0 img/s = 0.80x the ceiling: the 0.9x goal is **not met**.") for line in lines
    )
    latency = "- At one client, p50 30.0 ms = 2.50x single-image inference + preprocessing (12.0 ms): the 1.15x goal"
    assert f"{latency} is **not met**." in lines


def test_tuning_cells_are_changes_against_the_mean_of_the_default_rows() -> None:
    def config(name: str, *ips: float) -> dict[str, object]:
        points = [{"concurrency": c, "images_per_request": m, "images_per_s": v, "p50_ms": 1000 / v}
                  for (c, m), v in zip([(1, 1), (16, 1)], ips, strict=True)]  # fmt: skip
        return {"name": name, "points": points}

    result = {
        "machine": MACHINE,
        "configs": [
            config("defaults", 20.0, 40.0),
            config("1 decode thread", 10.0, 30.0),
            config("defaults (again)", 20.0, 40.0),
        ],
    }
    lines = figures.render_tuning(result).splitlines()
    assert "| 1 decode thread (default 2) | -50% | -25% | decoding must overlap inference |" in lines
    assert "- Worse than the defaults beyond the noise at every point: 1 decode thread (-25% to -50%)." in lines


def test_an_edited_figure_makes_the_check_fail_and_a_rewrite_restores_it(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    shutil.copyfile(README, copy)
    text = copy.read_text()
    block = re.search(r"<!-- figures: model-cpu -->\n(.*?)<!-- /figures -->", text, re.DOTALL)
    assert block is not None
    edited = re.sub(r"\| PyTorch eager \| (\d+)\.(\d)", r"| PyTorch eager | \g<1>.\g<2>9", block.group(1), count=1)
    assert edited != block.group(1)
    copy.write_text(text.replace(block.group(1), edited))
    assert figures.check(copy, RESULTS) == ["model-cpu"]
    assert figures.main(["--check", "--readme", str(copy), "--results", str(RESULTS)]) == 1
    assert figures.write(copy, RESULTS) == ["model-cpu"]
    assert figures.check(copy, RESULTS) == []
    assert copy.read_text() == text


def test_a_missing_block_fails_the_check(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    text = README.read_text()
    copy.write_text(re.sub(r"<!-- figures: hostile-cpu -->\n.*?<!-- /figures -->\n", "", text, flags=re.DOTALL))
    assert figures.check(copy, RESULTS) == ["hostile-cpu (no block in the README)"]
