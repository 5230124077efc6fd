"""`python -m export` as a user runs it: exit codes, the random-weights warning, the node table, fp16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from modelcard import RANDOM_WEIGHTS_WARNING, ModelCard

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--variant", "resnest14d", "--input-size", "64"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def node_table(stderr: str) -> dict[str, dict[str, int]]:
    """The node-type table the CLI logs: {column: {op: count}} (ops absent from a column count 0)."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["op"])
    columns = lines[start].split()[1:]
    table: dict[str, dict[str, int]] = {name: {} for name in columns}
    for line in lines[start + 1 :]:
        op, *counts = line.split()
        for name, count in zip(columns, counts, strict=True):
            table[name][op] = int(count)
        if op == "total":
            break
    return table


@pytest.mark.slow
def test_cli_exports_random_weights_with_a_loud_warning(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    proc = run_cli(*TINY, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNING: no --checkpoint given: exporting SEEDED RANDOM WEIGHTS (seed 0)" in proc.stderr
    assert proc.stderr.count(RANDOM_WEIGHTS_WARNING) >= 2  # in the banner and again after the export
    table = node_table(proc.stderr)
    print("\n" + "\n".join(f"{col}: {dict(ops)}" for col, ops in table.items()))
    assert list(table) == ["naive", "final"]
    naive, final = table["naive"], table["final"]
    assert final.get("Shape", 0) == 0 and final.get("BatchNormalization", 0) == 0
    assert naive["Transpose"] > 0 and final.get("Transpose", 0) == 0
    assert final["total"] < naive["total"] and final["Conv"] == naive["Conv"] == 27
    assert final["total"] == sum(count for op, count in final.items() if op != "total")
    assert out.is_file() and out.with_suffix(".parity.json").is_file()
    assert json.loads(out.with_suffix(".parity.json").read_text())["passed"] is True
    assert not list(tmp_path.glob("*.tmp"))
    card = ModelCard.from_metadata({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert card.random_weights and card.preprocess.input_size == 64 and card.preprocess.resize_size == 73
    assert card.export["nodes"] == {op: n for op, n in final.items() if op != "total" and n}


def test_cli_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    proc = run_cli(*TINY, "--checkpoint", "/nonexistent.pth", "--output", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: checkpoint not found: /nonexistent.pth" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not out.with_suffix(".parity.json").exists()


def test_cli_unknown_variant_exits_2() -> None:
    proc = run_cli("--variant", "nope")
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr and "resnest14d" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_fp16(tmp_path: Path) -> None:
    out = tmp_path / "m16.onnx"
    proc = run_cli(*TINY, "--precision", "fp16", "--skip-naive", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = node_table(proc.stderr)
    assert list(table) == ["final"]  # --skip-naive traces only the final graph
    model = onnx.load(str(out))
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.precision == "fp16" and card.parity["passed"] is True
    assert card.parity["thresholds"]["max_rel_logits"] == 3e-2
    kinds = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    worst = json.loads(out.with_suffix(".parity.json").read_text())["worst"]
    print(f"\nCLI fp16 parity worst: max_rel_logits {worst['max_rel_logits']:.3g}, "
          f"min_cosine {worst['min_cosine_embedding']:.6f}")  # fmt: skip
