"""modelcard: the preprocessing config, labels files, the card's metadata form, and its import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelcard import (
    GENERIC_LABELS_WARNING,
    RANDOM_WEIGHTS_WARNING,
    LabelsError,
    ModelCard,
    ModelCardError,
    PreprocessConfig,
    check_labels,
    generic_labels,
    output_names,
    parse_labels,
    read_labels,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def card(labels: tuple[str, ...] = ("cat", "dog", "eel"), source: str = "file", sha256: str = "ab" * 32) -> ModelCard:
    return ModelCard(
        variant="resnest14d",
        preprocess=PreprocessConfig(32, 32, "bicubic", (0.3, 0.25, 0.35), (0.4, 0.45, 0.35)),
        labels=labels,
        labels_source=source,
        embedding_dim=2048,
        precision="fp32",
        weights={"source": "ckpt.pth", "sha256": sha256},
        export={"opset": 18},
        parity={"passed": True},
    )


# --- preprocessing ------------------------------------------------------------------------------------------------


def test_crop_pct_is_derived_and_round_trips_through_timm_floor() -> None:
    assert PreprocessConfig(224, 256, "bilinear").crop_pct == 0.875
    assert PreprocessConfig.from_crop_pct(224, 0.875, "bilinear").resize_size == 256
    assert PreprocessConfig.from_crop_pct(320, 0.909, "bicubic").resize_size == 352  # timm's resnest200e
    assert PreprocessConfig.from_crop_pct(416, 0.928, "bicubic").resize_size == 448  # timm's resnest269e
    # A crop_pct computed as a ratio of integers must not floor to one pixel less (287.99999... -> 287).
    for size, resize in ((224, 256), (256, 288), (320, 352), (416, 448), (64, 73)):
        assert PreprocessConfig.from_crop_pct(size, size / resize, "bilinear").resize_size == resize


def test_overrides_follow_timm_pretrained_cfg_overlay() -> None:
    base = PreprocessConfig(224, 256, "bilinear")
    assert base.with_overrides() == base
    assert base.with_overrides(input_size=64).resize_size == 73  # a new size alone keeps crop_pct: floor(73.14)
    assert base.with_overrides(input_size=32, crop_pct=1.0) == PreprocessConfig(32, 32, "bilinear")
    assert base.with_overrides(input_size=32, resize_size=40).resize_size == 40
    custom = base.with_overrides(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (custom.input_size, custom.resize_size, custom.interpolation) == (224, 256, "bicubic")
    assert custom.mean == (0.5, 0.5, 0.5) and custom.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="not both"):
        base.with_overrides(resize_size=256, crop_pct=0.875)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 300, "resize_size": 256}, "larger than resize_size"),
        ({"input_size": 0, "resize_size": 256}, "positive integer"),
        ({"input_size": 224.0, "resize_size": 256}, "positive integer"),
        ({"interpolation": "nearest"}, "unsupported interpolation 'nearest'"),
        ({"interpolation": "BILINEAR"}, "unsupported interpolation"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
        ({"mean": (0.5, float("nan"), 0.5)}, "mean must be 3 finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"input_size": 224, "resize_size": 256, "interpolation": "bilinear",
                                 "mean": MEAN, "std": STD, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        PreprocessConfig.from_crop_pct(224, 1.2, "bilinear")


def test_dict_form_round_trips_with_lists_from_json() -> None:
    cfg = PreprocessConfig(32, 36, "bicubic", (0.3, 0.25, 0.35), (0.4, 0.45, 0.35))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["crop_pct"] == 0.8889 and data["mean"] == [0.3, 0.25, 0.35]
    assert PreprocessConfig.from_dict(data) == cfg


# --- labels -------------------------------------------------------------------------------------------------------


def test_labels_file_one_per_line_with_windows_endings_bom_and_trailing_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffzero\r\n one \r\ntwo words\r\n\r\n\n".encode())
    assert read_labels(path) == ("zero", "one", "two words")


def test_labels_as_json_list(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    (tmp_path / "labels.txt").write_text('  ["x", "y"]\n')
    assert read_labels(tmp_path / "labels.json") == ("a", "b", "c")
    assert read_labels(tmp_path / "labels.txt") == ("x", "y")  # content that starts with '[' is JSON


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("labels.txt", "zero\n\ntwo\n", "line 2: empty label"),
        ("labels.txt", "", "no labels"),
        ("labels.txt", '["a", 3]', "item 1: a label must be a string, got 3"),
        ("labels.json", '{"0": "a"}', "must hold a list of strings, got dict"),
        ("labels.txt", '["a", "b"', "not valid JSON"),
        ("labels.txt", '["a", "b\\u0007"]', "control character"),
    ],
)
def test_malformed_labels_files_name_the_problem(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LabelsError, match=message):
        read_labels(path)


def test_unreadable_labels_files(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LabelsError, match="not UTF-8"):
        read_labels(tmp_path / "latin1.txt")


def test_label_count_must_equal_the_class_count() -> None:
    assert check_labels(["a", "b"], 2) == ("a", "b")
    with pytest.raises(LabelsError, match="holds 3 labels but the model has 10 classes"):
        check_labels(["a", "b", "c"], 10)
    assert parse_labels("a\nb\n", "x") == ("a", "b")
    assert generic_labels(3) == ("class_0", "class_1", "class_2")


# --- the card -----------------------------------------------------------------------------------------------------


def test_fine_tuned_card_round_trips_through_metadata() -> None:
    original = card()
    meta = original.to_metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["resnest.num_classes"] == "3" and meta["resnest.labels_source"] == "file"
    assert "resnest.warning" not in meta
    back = ModelCard.from_metadata(meta)
    assert back == original
    assert back.num_classes == 3 and back.has_classifier and back.outputs == ("logits", "embedding")
    assert back.warnings == () and back.warning is None


def test_headless_card_has_no_labels_and_only_the_embedding_output() -> None:
    headless = card(labels=(), source="none")
    back = ModelCard.from_metadata(headless.to_metadata())
    assert back.num_classes == 0 and not back.has_classifier
    assert back.outputs == ("embedding",) == output_names(False)
    with pytest.raises(ValueError, match="exactly when it has a classifier"):
        card(labels=(), source="file")
    with pytest.raises(ValueError, match="exactly when it has a classifier"):
        card(labels=("a",), source="none")


def test_generic_labels_and_random_weights_both_warn() -> None:
    generic = card(labels=generic_labels(10), source="generic", sha256="random")
    assert generic.warnings == (RANDOM_WEIGHTS_WARNING, GENERIC_LABELS_WARNING.format(n=10, last=9))
    assert "class_0 ... class_9" in generic.warnings[1] and "--labels" in generic.warnings[1]
    meta = generic.to_metadata()
    assert meta["resnest.warning"] == generic.warning == " ".join(generic.warnings)
    assert ModelCard.from_metadata(meta).warnings == generic.warnings


def test_metadata_from_before_num_classes_reads_as_imagenet() -> None:
    meta = card(labels=tuple(f"l{i}" for i in range(1000)), source="imagenet").to_metadata()
    del meta["resnest.num_classes"], meta["resnest.labels_source"]
    old = ModelCard.from_metadata(meta)
    assert old.num_classes == 1000 and old.labels_source == "imagenet"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resnest.num_classes": "4"}, "holds 3 labels but the model has 4 classes"),
        ({"resnest.labels": '["a", ""]', "resnest.num_classes": "2"}, "label 1: empty label"),
        ({"resnest.labels": '"abc"'}, "must be a JSON list"),
        ({"resnest.labels_source": "guess"}, "labels_source 'guess'"),
        ({"resnest.preprocess": '{"input_size": 32}'}, "incomplete or malformed"),
        ({"resnest.format_version": "0"}, "format '0' is not '1'"),
    ],
)
def test_inconsistent_metadata_is_refused(change: dict[str, str], message: str) -> None:
    meta = {**card().to_metadata(), **change}
    with pytest.raises(ModelCardError, match=message):
        ModelCard.from_metadata(meta)


def test_modelcard_imports_neither_torch_nor_onnxruntime_nor_numpy() -> None:
    code = (
        "import sys, modelcard; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnxruntime', 'onnx', 'numpy', 'models', 'export', 'service')); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_input_format_defaults_to_float_for_files_written_before_it_and_round_trips() -> None:
    from modelcard import FLOAT32_NCHW, UINT8_NHWC

    old = card().to_metadata()
    pre = json.loads(old["resnest.preprocess"])
    del pre["input_format"]  # what every file exported before the field existed holds
    old["resnest.preprocess"] = json.dumps(pre)
    read = ModelCard.from_metadata(old).preprocess
    assert read.input_format == FLOAT32_NCHW and read.input_shape == (3, 32, 32) and read.input_dtype == "float32"
    u8 = PreprocessConfig(32, 32, "bicubic", input_format=UINT8_NHWC)
    assert u8.uint8_input and u8.input_shape == (32, 32, 3) and u8.input_dtype == "uint8"
    assert PreprocessConfig.from_dict(json.loads(json.dumps(u8.to_dict()))) == u8
    assert u8.with_overrides(input_size=24).input_format == UINT8_NHWC
    with pytest.raises(ValueError, match="input_format"):
        PreprocessConfig(32, 32, "bicubic", input_format="uint8-nchw")
