"""Fine-tuned and headless checkpoints without training: class counts, CLI errors, the runtime's load checks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageOps

import models
from export.cli import main as export_main
from export.pipeline import SINGLE_LOGIT
from imaging.transforms import preprocess
from modelcard import ModelCard, PreprocessConfig, generic_labels
from service.core.request.inference import ModelLoadError, OrtModel, warm_up
from service.core.settings import Settings
from tests.reference_transforms import eval_transform

NAME = "resnest14d"


@pytest.fixture(scope="module")
def seven_class(tmp_path_factory: pytest.TempPathFactory) -> tuple[models.ResNeSt, Path]:
    """A 7-class resnest14d (seeded random weights) and its state_dict saved as a fine-tuning user would."""
    model = models.init_random(models.ResNeSt(models.get_variant(NAME), num_classes=7), seed=5).eval()
    path = tmp_path_factory.mktemp("ckpt") / "finetuned.pth"
    torch.save(model.state_dict(), path)
    return model, path  # type: ignore[return-value]


@pytest.fixture(scope="module")
def headless_ckpt(seven_class: tuple[models.ResNeSt, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same backbone saved without its classifier (timm's num_classes=0 state_dict)."""
    state = {k: v for k, v in seven_class[0].state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    torch.save(state, path)
    return path


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# --- models: the class count comes from the checkpoint ------------------------------------------------------------


@torch.no_grad()
def test_create_model_takes_the_class_count_from_the_checkpoint(seven_class: tuple[models.ResNeSt, Path]) -> None:
    source, path = seven_class
    model = models.create_model(NAME, path)
    assert model.num_classes == 7 and model.checkpoint.num_classes == 7
    assert model(X).shape == (2, 7) and torch.equal(model(X), source(X))
    assert models.create_model(NAME, path, num_classes=7).num_classes == 7


def test_a_class_count_that_differs_from_the_checkpoint_names_both(seven_class: tuple[models.ResNeSt, Path]) -> None:
    with pytest.raises(models.ClassCountMismatch, match=r"num_classes=5 .* classifier has 7 classes") as info:
        models.create_model(NAME, seven_class[1], num_classes=5)
    assert (info.value.asked, info.value.found) == (5, 7) and "fc.weight [7, 2048]" in str(info.value)


@torch.no_grad()
def test_num_classes_zero_keeps_only_the_backbone(seven_class: tuple[models.ResNeSt, Path]) -> None:
    source, path = seven_class
    model = models.create_model(NAME, path, num_classes=0)
    assert model.num_classes == 0 and model.checkpoint.num_classes == 7
    assert not [k for k in model.state_dict() if k.startswith("fc.")]
    assert torch.equal(model(X), source.forward_embedding(X))  # forward() of a headless model embeds


def test_a_headless_checkpoint_loads_as_a_backbone_and_refuses_a_head(headless_ckpt: Path) -> None:
    model = models.create_model(NAME, headless_ckpt)
    assert model.num_classes == 0 and isinstance(model.fc, torch.nn.Identity)
    with pytest.raises(models.ClassCountMismatch, match="no classifier"):
        models.create_model(NAME, headless_ckpt, num_classes=10)


def test_a_fine_tuned_checkpoint_in_the_wrong_variant_names_the_right_one(
    seven_class: tuple[models.ResNeSt, Path],
) -> None:
    with pytest.raises(models.CheckpointMismatch, match="These weights fit: resnest14d"):
        models.create_model("resnest26d", seven_class[1])


@torch.no_grad()
def test_reset_classifier_starts_a_fine_tune(seven_class: tuple[models.ResNeSt, Path]) -> None:
    model = models.create_model(NAME, seven_class[1])
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(X).shape == (2, 3)
    model.reset_classifier(0)
    assert model(X).shape == (2, 2048)
    with pytest.raises(ValueError, match="num_classes must be 0"):
        models.ResNeSt(models.get_variant(NAME), num_classes=-1)


# --- the export CLI refuses what it cannot serve, with exit status 2 ----------------------------------------------


def labels_file(tmp_path: Path, n: int, name: str = "labels.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"label {i}\n" for i in range(n)))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-classes", "5"], "error: --num-classes 5 does not match the checkpoint: the checkpoint's classifier "
                                 "has 7 classes (fc.weight [7, 2048])"),
        (["--labels", "{six}"], "holds 6 labels but the model has 7 classes"),
        (["--labels", "{eight}"], "holds 8 labels but the model has 7 classes"),
        (["--num-classes", "0", "--labels", "{seven}"], "the model is headless (no classifier)"),
        (["--labels", "{blank}"], "line 2: empty label"),
        (["--labels", "{missing}"], "cannot read labels file"),
        (["--num-classes", "-2"], "--num-classes must be 0 (headless) or positive, got -2"),
        (["--input-size", "64", "--resize-size", "32"], "input_size 64 is larger than resize_size 32"),
        (["--crop-pct", "1.5"], "crop_pct must be in (0, 1]"),
        (["--mean", "0.5", "0.5"], "--mean takes 3 values (R G B) or 1 for all channels, got 2"),
        (["--std", "0.5", "0", "0.5"], "std must be positive"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_classes_labels_and_preprocessing_with_exit_2(
    seven_class: tuple[models.ResNeSt, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    files = {"six": labels_file(tmp_path, 6, "six.txt"), "seven": labels_file(tmp_path, 7, "seven.txt"),
             "eight": labels_file(tmp_path, 8, "eight.txt"), "missing": tmp_path / "nope.txt"}  # fmt: skip
    (tmp_path / "blank.txt").write_text("a\n\nc\n")
    files["blank"] = tmp_path / "blank.txt"
    out = tmp_path / "m.onnx"
    args = ["--variant", NAME, "--checkpoint", str(seven_class[1]), "--output", str(out)]
    code = export_main([*args, *(a.format(**files) for a in extra)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and not out.exists()


def test_cli_refuses_a_headless_checkpoint_asked_for_classes(
    headless_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = export_main(["--variant", NAME, "--checkpoint", str(headless_ckpt), "--num-classes", "10",
                        "--output", str(tmp_path / "m.onnx")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--num-classes 10 does not match the checkpoint: the checkpoint has no classifier" in err


def test_cli_refuses_a_single_logit_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = export_main(["--variant", NAME, "--num-classes", "1", "--output", str(tmp_path / "m.onnx")])
    assert code == 2 and SINGLE_LOGIT in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--crop-pct", "0.9", "--resize-size", "40"], ["--interpolation", "nearest"]])
def test_cli_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        export_main(["--variant", NAME, *argv])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


# --- the service refuses a model file whose card does not fit its graph --------------------------------------------

SIZE, DIM = 8, 16


def handmade_onnx(path: Path, logits: int | None, labels: tuple[str, ...], source: str = "file") -> Path:
    """A tiny valid model (mean-pool, then matmuls) with a card, to test load checks without an export."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_emb"], ["embedding"]),
    ]
    inits = [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(rng.standard_normal((3, DIM)).astype(np.float32), "w_emb")]  # fmt: skip
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])]
    if logits is not None:
        nodes.append(helper.make_node("MatMul", ["embedding", "w_fc"], ["logits"]))
        inits.append(numpy_helper.from_array(rng.standard_normal((DIM, logits)).astype(np.float32), "w_fc"))
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", logits]))
    graph = helper.make_graph(
        nodes, "handmade", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        outputs, inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    card = ModelCard(
        variant=NAME, preprocess=PreprocessConfig(SIZE, SIZE, "bilinear"), labels=labels, labels_source=source,
        embedding_dim=DIM, precision="fp32", weights={"source": "x.pth", "sha256": "ab" * 32}, export={},
    )  # fmt: skip
    helper.set_model_props(model, card.to_metadata())
    onnx.save(model, str(path))
    return path


def load(path: Path) -> OrtModel:
    return OrtModel(Settings(model_path=path, providers="cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize("labels", [9, 11])
def test_a_model_whose_labels_do_not_match_its_logits_is_refused_at_load(tmp_path: Path, labels: int) -> None:
    path = handmade_onnx(tmp_path / "m.onnx", logits=10, labels=generic_labels(labels), source="generic")
    with pytest.raises(ModelLoadError, match=f"carries {labels} labels but its logits output has 10 classes"):
        load(path)


def test_a_card_and_graph_that_disagree_on_having_a_classifier_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"headless backbone with outputs \['embedding'\], got \['logits'"):
        load(handmade_onnx(tmp_path / "a.onnx", logits=10, labels=(), source="none"))
    with pytest.raises(ModelLoadError, match=r"3-class classifier with outputs \['logits', 'embedding'\]"):
        load(handmade_onnx(tmp_path / "b.onnx", logits=None, labels=("a", "b", "c")))


def test_headless_and_classifier_models_answer_the_batchers_shape(tmp_path: Path) -> None:
    images = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    headless = load(handmade_onnx(tmp_path / "h.onnx", logits=None, labels=(), source="none"))
    logits, embedding = headless.infer(images)
    assert logits.shape == (3, 0) and logits.dtype == np.float32 and embedding.shape == (3, DIM)
    warm_up(headless, [1, 2])
    classifier = load(handmade_onnx(tmp_path / "c.onnx", logits=4, labels=("a", "b", "c", "d")))
    logits, embedding = classifier.infer(images)
    assert logits.shape == (3, 4) and embedding.shape == (3, DIM)
    np.testing.assert_allclose(embedding, headless.infer(images)[1], rtol=1e-6)  # same seeded weights


# --- overridden preprocessing is still torchvision's eval transform -----------------------------------------------


def grey_scan() -> bytes:
    """An 8x8 grey PNG like the digits: the service must replicate it to RGB before normalising per channel."""
    img = Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * 4), "L")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "overrides",
    [
        {"input_size": 32, "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.3, 0.25, 0.35),
         "std": (0.4, 0.45, 0.35)},
        {"input_size": 96, "resize_size": 120, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        {"input_size": 48},
    ],
)  # fmt: skip
def test_overridden_preprocessing_matches_torchvision(
    photos: list[tuple[str, bytes]], overrides: dict[str, object]
) -> None:
    cfg = models.get_variant(NAME).data.with_overrides(**overrides)  # type: ignore[arg-type]
    for name, data in [*photos, ("grey 8x8 scan", grey_scan())]:
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        want = eval_transform(img, cfg.resize_size, cfg.input_size, cfg.interpolation, cfg.mean, cfg.std).tensor
        got = preprocess(data, cfg, 10**8)
        assert got.shape == (3, cfg.input_size, cfg.input_size), name
        assert float(np.abs(got - want.numpy()).max()) <= 1e-5, f"{name} at {cfg}"
