"""Triton's repository layout and version policies, read from disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.repository.config import ModelConfig, VersionPolicy
from service.core.repository.layout import RepositoryError, read_model, scan


def lay_out(root: Path, model: str, versions: list[int], config: str | None = None) -> Path:
    folder = root / model
    for v in versions:
        (folder / str(v)).mkdir(parents=True)
        (folder / str(v) / "model.onnx").write_bytes(b"onnx")
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    return folder


@pytest.mark.parametrize(
    ("config", "selected"),
    [
        (None, [3]),
        ('name: "m"\nplatform: "onnxruntime_onnx"\n', [3]),
        ("version_policy: { all { }}", [1, 2, 3]),
        ("version_policy: { latest: { num_versions: 2 } }  # two newest", [2, 3]),
        ("version_policy { specific { versions: [1, 3] } }", [1, 3]),
        ("version_policy: { specific: { versions: 2 } }".replace("2", "[2]"), [2]),
    ],
)
def test_version_policy_selects_versions_like_triton(tmp_path: Path, config: str | None, selected: list[int]) -> None:
    entry = read_model(lay_out(tmp_path, "m", [1, 2, 3], config))
    assert entry.selected == selected
    assert sorted(entry.files) == [1, 2, 3]


def test_folders_that_cannot_be_served_say_why_and_do_not_hide_the_others(tmp_path: Path) -> None:
    lay_out(tmp_path, "good", [1, 10, 2])
    lay_out(tmp_path, "empty", [])
    (tmp_path / "empty").mkdir(exist_ok=True)
    lay_out(tmp_path, "picky", [1], "version_policy: { specific: { versions: [4] } }")
    lay_out(tmp_path, "odd", [1], "version_policy: { newest {} }")
    (tmp_path / "good" / "notes").mkdir()  # not a version folder: ignored
    found = scan(tmp_path)
    good = found["good"]
    assert not isinstance(good, RepositoryError) and good.selected == [10]  # numeric order, not text order
    assert "no version folder" in str(found["empty"])
    assert "selects none of the versions [1]" in str(found["picky"])
    assert "unsupported version_policy" in str(found["odd"])


def test_policy_describes_itself_as_triton_config_json() -> None:
    assert VersionPolicy().describe() == {"latest": {"num_versions": 1}}
    assert ModelConfig.parse("version_policy: { specific { versions: [2,5] } }").version_policy.describe() == {
        "specific": {"versions": [2, 5]}
    }


def test_a_missing_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not a directory"):
        scan(tmp_path / "nope")
