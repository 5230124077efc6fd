"""int8: the recipe, the image sets, the accuracy gate, the card, and the quantized graph the export writes.

The trained model's accuracy, through the CLI and the real server, is in test_quantize_digits.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

import models
from export import quantize as int8
from export.pipeline import ExportResult, export_model
from modelcard import PRECISIONS, ModelCard, ModelCardError, PreprocessConfig

SIZE = 64
CFG = PreprocessConfig(32, 32, "bilinear")


def png(value: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 128)).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- the image sets -----------------------------------------------------------------------------------------------


def test_calibration_dir_is_read_recursively_sorted_and_spread_evenly(tmp_path: Path) -> None:
    for cls in ("a", "b", "c"):
        for i in range(4):
            write(tmp_path / cls / f"{i}.png", png(10 * i + ord(cls)))
    write(tmp_path / "notes.txt", b"not an image")
    everything = int8.calibration_set(tmp_path, 100)
    assert everything.names == tuple(f"{c}/{i}.png" for c in "abc" for i in range(4))
    # A limit keeps files from every class folder, not the first folder's alone.
    spread = int8.calibration_set(tmp_path, 3)
    assert spread.names == ("a/0.png", "b/2.png", "c/3.png")  # indices 0, 6, 11 of 12
    assert int8.calibration_set(tmp_path, 3).digest() == spread.digest()  # reproducible
    assert spread.inputs(CFG).shape == (3, 3, 32, 32) and spread.inputs(CFG).dtype == np.float32


def test_default_calibration_is_the_bundled_photographs_and_heldout_shares_none_of_them() -> None:
    calibration = int8.calibration_set(None, 256)
    assert calibration.source == "bundled photographs" and len(calibration) == 8
    heldout = int8.heldout_set()
    assert len(heldout) == 60 and heldout.labels is None
    int8.check_unseen(heldout, calibration)  # raises on an overlap
    assert len(set(heldout.digests)) == 60  # six distinct views of each of ten photographs


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no JPEG or PNG files"),
        (lambda d: write(d / "x.png", b"\x89PNG\r\n\x1a\n broken"), "x.png: "),
    ],
)
def test_unusable_calibration_dirs_are_refused_naming_the_problem(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    setup(tmp_path)
    with pytest.raises(int8.QuantizeInputError, match=message):
        int8.calibration_set(tmp_path, 8).inputs(CFG)
    with pytest.raises(int8.QuantizeInputError, match="not a directory"):
        int8.calibration_set(tmp_path / "missing", 8)
    with pytest.raises(int8.QuantizeInputError, match="at least one image"):
        int8.calibration_set(tmp_path, 0)


def test_labelled_set_maps_folder_names_to_class_indices(tmp_path: Path) -> None:
    write(tmp_path / "dog" / "1.png", png(1))
    write(tmp_path / "cat" / "2.jpg", png(2))
    write(tmp_path / "cat" / "3.png", png(3))
    found = int8.labelled_set(tmp_path, ("cat", "dog", "eel"))
    assert found.names == ("cat/2.jpg", "cat/3.png", "dog/1.png") and found.labels == (0, 0, 1)
    write(tmp_path / "cow" / "4.png", png(4))
    with pytest.raises(int8.QuantizeInputError, match=r"folders \['cow'\] name no class"):
        int8.labelled_set(tmp_path, ("cat", "dog", "eel"))
    with pytest.raises(int8.QuantizeInputError, match="headless"):
        int8.labelled_set(tmp_path, ())


def test_heldout_images_that_calibration_saw_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "cal" / "a.png", png(7))
    write(tmp_path / "eval" / "cat" / "same-bytes-other-name.png", png(7))
    write(tmp_path / "eval" / "cat" / "new.png", png(8))
    with pytest.raises(int8.QuantizeInputError, match=r"1 image.* are also calibration images .*other-name"):
        int8.check_unseen(int8.labelled_set(tmp_path / "eval", ("cat",)), int8.calibration_set(tmp_path / "cal", 8))


def class_sorted(directory: Path, classes: str = "abcde", per_class: int = 10) -> list[str]:
    """A folder of one subfolder per class, every file distinct; its relative paths in sorted order."""
    for c, cls in enumerate(classes):
        for i in range(per_class):
            write(directory / cls / f"{i}.png", png(c * per_class + i))
    return [f"{cls}/{i}.png" for cls in classes for i in range(per_class)]


def test_a_calibration_folder_without_eval_holds_one_file_in_five_out_evenly(tmp_path: Path) -> None:
    names = class_sorted(tmp_path)  # 5 classes x 10 files, sorted by class
    calibration, heldout = int8.split_calibration(tmp_path, 256)
    # The middle file of each run of 5: two files of every class, whatever the folder's order.
    assert heldout.names == tuple(names[i] for i in (2, 7, 12, 17, 22, 27, 32, 37, 42, 47))
    assert {n.split("/")[0] for n in heldout.names} == set("abcde") == {n.split("/")[0] for n in calibration.names}
    assert set(heldout.names).isdisjoint(calibration.names) and len(heldout) + len(calibration) == 50
    assert set(heldout.digests).isdisjoint(calibration.digests)
    int8.check_unseen(heldout, calibration)
    assert heldout.labels is None and calibration.labels is None
    assert (
        heldout.source == f"{tmp_path} (held out: 10 of its 50 files, 1 in 5, evenly spread; not used for calibration)"
    )
    assert calibration.source == f"{tmp_path} (its 40 files not held out)"
    again = int8.split_calibration(tmp_path, 256)
    assert (again[0].digest(), again[1].digest()) == (calibration.digest(), heldout.digest())  # deterministic
    # --calibration-limit spreads over the calibration part alone; the held-out part does not move.
    limited, same = int8.split_calibration(tmp_path, 5)
    assert limited.names == ("a/0.png", "b/3.png", "c/5.png", "d/6.png", "e/9.png") and same.names == heldout.names
    with pytest.raises(int8.QuantizeInputError, match="at least one image"):
        int8.split_calibration(tmp_path, 0)


def test_heldout_positions_keep_8_to_256_files() -> None:
    assert int8.heldout_positions(16) == [1, 3, 5, 7, 9, 11, 13, 15]  # 8 held out, 8 calibrate
    assert int8.heldout_positions(100) == list(range(2, 100, 5))
    for count in (16, 17, 39, 41, 200, 1437, 1280, 50_000):
        positions = int8.heldout_positions(count)
        assert len(positions) == min(max(count // 5, 8), 256) and positions == sorted(set(positions))
        assert positions[0] >= 0 and positions[-1] < count


def test_a_heldout_copy_of_a_calibration_image_is_left_out(tmp_path: Path) -> None:
    class_sorted(tmp_path)
    write(tmp_path / "a" / "2.png", png(0))  # held out, with the bytes of a/0.png, which calibrates
    calibration, heldout = int8.split_calibration(tmp_path, 256)
    assert "a/2.png" not in heldout.names and len(heldout) == 9 and "a/0.png" in calibration.names
    assert heldout.source.endswith("; 1 with the bytes of a calibration image left out)")
    int8.check_unseen(heldout, calibration)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([png(i) for i in range(15)], r"15 image file\(s\) are too few .* or pass --eval"),
        ([png(7)] * 20, r"only 0 held-out file\(s\) differ from every calibration image .* or pass --eval"),
    ],
)
def test_a_calibration_folder_too_small_to_split_is_refused_naming_eval(
    tmp_path: Path, files: list[bytes], message: str
) -> None:
    for i, blob in enumerate(files):
        write(tmp_path / f"{i:02d}.png", blob)
    with pytest.raises(int8.QuantizeInputError, match=message):
        int8.split_calibration(tmp_path, 256)


# --- the figures and the gate -------------------------------------------------------------------------------------


def test_compare_figures_on_known_outputs() -> None:
    ref_logits = np.array([[4.0, 1.0, 0.0], [0.0, 1.0, 1.01], [3.0, 0.0, 2.9]])
    logits = ref_logits + np.array([[0.1, 0.0, 0.0], [0.0, 0.05, 0.0], [0.0, 0.0, 0.2]])  # 2 near ties flip
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = compare_with(ref_logits, emb, logits, emb * [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    assert got["top1_agreement"] == pytest.approx(1 / 3)
    assert got["confident_images"] == 1 and got["confident_top1_agreement"] == 1.0  # 3.0 gap > 0.05 x 4
    assert got["top5_overlap"] == 1.0  # three classes: top-3 sets are equal
    assert got["logit_rel_error_max"] == pytest.approx(0.2 / 4)
    assert got["embedding_cosine_min"] == pytest.approx(np.sqrt(0.5)) and got["images"] == 3


def compare_with(ref_logits, ref_emb, logits, emb):  # type: ignore[no-untyped-def]
    return int8.compare((ref_logits, ref_emb), (logits, emb), int8.TRAINED.confident_margin)


def report(drop: float = 0.0, cos_mean: float = 0.999, cos_min: float = 0.99, confident: float | None = 1.0) -> dict:  # type: ignore[type-arg]
    agreement = {"embedding_cosine_mean": cos_mean, "embedding_cosine_min": cos_min,
                 "confident_top1_agreement": confident, "confident_images": 10}  # fmt: skip
    return {"agreement": agreement, "accuracy": {"fp32": 0.99, "int8": 0.99 - drop, "drop": drop}}


def test_gate_thresholds_for_trained_weights() -> None:
    assert int8.failures(report(), int8.TRAINED) == []
    assert int8.failures(report(drop=0.01), int8.TRAINED) == []  # exactly 1 point is within
    (why,) = int8.failures(report(drop=0.0112), int8.TRAINED)
    assert why == "held-out accuracy fell from 0.9900 (fp32) to 0.9788 (int8): 1.12 points > 1"
    assert int8.failures(report(cos_mean=0.97), int8.TRAINED) == ["embedding cosine mean 0.9700 < 0.98"]
    assert int8.failures(report(cos_min=0.5), int8.TRAINED) == ["embedding cosine min 0.5000 < 0.9"]
    assert "images where fp32 is confident 0.9000 < 0.98" in int8.failures(report(confident=0.9), int8.TRAINED)[0]
    assert int8.failures(report(confident=None), int8.TRAINED) == []  # no confident image: nothing to flip


def test_random_weights_are_held_to_numerical_health_only() -> None:
    # resnest50's random weights under the default recipe: cosine 0.985 / 0.935, confident top-1 0.81.
    assert int8.failures(report(cos_mean=0.985, cos_min=0.935, confident=0.81), int8.RANDOM) == []
    # Calibrated on one grey image: 0.74 / 0.55.
    assert len(int8.failures(report(cos_mean=0.74, cos_min=0.55, confident=0.44), int8.RANDOM)) == 2


def test_recipe_names_what_it_does() -> None:
    recipe = int8.DEFAULT_RECIPE
    assert recipe.keep_float == ("classifier",) and recipe.reduce_range and recipe.per_channel
    assert recipe.to_dict() == {
        "format": "QDQ", "activations": "uint8 (asymmetric, per tensor)", "weights": "int8 (symmetric, per channel)",
        "calibration": "minmax", "per_channel": True, "reduce_range": True, "keep_float": ["classifier"],
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown float groups"):
        int8.Recipe(keep_float=("head",))
    with pytest.raises(ValueError, match="calibration 'kl'"):
        int8.Recipe(calibration="kl")


# --- the card -----------------------------------------------------------------------------------------------------


def card(precision: str, quantization: dict | None = None) -> ModelCard:  # type: ignore[type-arg]
    return ModelCard(
        variant="resnest14d", preprocess=CFG, labels=("a", "b"), labels_source="file", embedding_dim=8,
        precision=precision, weights={"sha256": "ab" * 32}, export={}, quantization=quantization or {},
    )  # fmt: skip


def test_card_carries_the_quantization_record_exactly_for_int8() -> None:
    assert PRECISIONS == ("fp32", "fp16", "int8")
    record = {"calibration": {"method": "minmax", "images": 8}, "float_nodes": {"node_linear": "Gemm"}}
    meta = card("int8", record).to_metadata()
    assert json.loads(meta["resnest.quantization"]) == record
    assert ModelCard.from_metadata(meta).quantization == record
    fp32 = card("fp32").to_metadata()
    assert "resnest.quantization" not in fp32 and ModelCard.from_metadata(fp32).quantization == {}
    with pytest.raises(ValueError, match="exactly when its precision is int8"):
        card("int8")
    with pytest.raises(ValueError, match="exactly when its precision is int8"):
        card("fp32", record)
    with pytest.raises(ValueError, match="precision 'int4' is not one of"):
        card("int4")
    del meta["resnest.quantization"]
    with pytest.raises(ModelCardError, match="int8"):
        ModelCard.from_metadata(meta)


# --- the quantized graph, on the tiny random-weights model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """resnest14d (seed 0) at 64x64 exported as int8 through the real pipeline, default calibration."""
    model = models.create_model("resnest14d", seed=0)
    out = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    return export_model(
        model, model.variant.data.with_overrides(input_size=SIZE), out, precision="int8", compare_naive=False,
        weights={"source": "random", "sha256": "random", "seed": 0}, log=lambda _: None,
    )  # fmt: skip


def test_int8_export_writes_a_qdq_graph_with_float_interface_and_its_record(tiny_int8: ExportResult) -> None:
    model = onnx.load(str(tiny_int8.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "Shape" not in ops
    assert [o.name for o in model.graph.output] == ["logits", "embedding", "features"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {i.name: (i.data_type, len(i.dims)) for i in model.graph.initializer}
    assert weights["fc.weight"][0] == onnx.TensorProto.FLOAT  # the classifier stays float (see Recipe)
    conv_weights = [n for n, (t, rank) in weights.items() if t == onnx.TensorProto.INT8 and rank == 4]
    assert len(conv_weights) == 27  # every convolution's, stem and gates included
    assert weights["stem.0.bias_quantized"][0] == onnx.TensorProto.INT32
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.precision == "int8" and card.random_weights
    q = card.quantization
    assert q["calibration"]["method"] == "minmax" and q["calibration"]["images"] == 8
    assert q["calibration"]["source"] == "bundled photographs" and len(q["calibration"]["sha256"]) == 64
    assert q["float_groups"] == ["classifier"] and q["recipe"]["reduce_range"] is True
    assert q["float_ops"] == {"ReduceMean": 1, "Reshape": 1, "Gemm": 1}  # the outputs' producers only
    assert q["accuracy"]["passed"] is True and q["accuracy"]["thresholds"]["weights"] == "random"
    assert card.parity["passed"] is True and card.parity["precision"] == "fp32"  # the graph before quantization
    assert card.export["nodes"]["QuantizeLinear"] > 0
    # The reports sit beside the model: parity of the fp32 graph, accuracy of int8 against it.
    accuracy = json.loads(tiny_int8.path.with_suffix(".accuracy.json").read_text())
    assert accuracy["passed"] is True and accuracy["heldout"]["images"] == 60 and "accuracy" not in accuracy
    assert q["accuracy"]["heldout"]["files"][:2] == ["brick.png#0", "brick.png#1"] == accuracy["heldout"]["files"][:2]
    assert accuracy["agreement"] == q["accuracy"]["agreement"]
    assert tiny_int8.path.with_suffix(".parity.json").is_file()
    fig = accuracy["agreement"]
    print(f"\ntiny int8 (random weights) vs fp32 on 60 held-out views: cosine mean {fig['embedding_cosine_mean']:.4f} "
          f"min {fig['embedding_cosine_min']:.4f}, top-1 {fig['top1_agreement']:.2f}")  # fmt: skip


def test_int8_graph_runs_on_the_cpu_ep_at_any_batch(tiny_int8: ExportResult) -> None:
    session = ort.InferenceSession(str(tiny_int8.path), providers=["CPUExecutionProvider"])
    batch = int8.heldout_set().inputs(models.get_variant("resnest14d").data.with_overrides(input_size=SIZE))[:5]
    logits, emb = session.run(["logits", "embedding"], {"images": batch})
    assert logits.shape == (5, 1000) and emb.shape == (5, 2048) and logits.dtype == np.float32
    one = session.run(None, {"images": batch[:1]})[0]
    np.testing.assert_allclose(one, logits[:1], rtol=1e-5, atol=1e-5)  # per-tensor scales: batch-independent


def test_quantization_is_reproducible(tmp_path: Path) -> None:
    model = models.create_model("resnest14d", seed=0)
    from export import graph
    from export.fuse import fuse

    fp32 = graph.trace_to_onnx(fuse(model), 32, 18)
    calibration = int8.calibration_set(None, 3).inputs(CFG)
    first, second = int8.quantize(fp32, calibration), int8.quantize(fp32, calibration)
    assert first.SerializeToString() == second.SerializeToString()
    # The groups the recipe can keep in float are found by the weights their nodes read.
    groups = int8.node_groups(fp32)
    assert len(groups["stem"]) == 3 and len(groups["classifier"]) == 1
    # resnest14d: four blocks, each gate fc1, fc2, the sigmoid (radix 2) and the Mul that applies it.
    assert len(groups["gates"]) == 16
    ops = {n.name: n.op_type for n in fp32.graph.node}
    assert sorted({ops[name] for name in groups["gates"]}) == ["Conv", "Mul", "Sigmoid"]
    stem_float = int8.quantize(fp32, calibration, int8.Recipe(keep_float=("classifier", "stem")))
    assert set(groups["stem"]) <= set(int8.float_nodes(stem_float))


def test_the_dockerfile_and_make_pass_int8_to_the_cli_which_accepts_it() -> None:
    from export.cli import parse_args

    args = parse_args(["--precision", "int8"])
    assert args.precision == "int8" and args.calibration is None  # the bundled photographs calibrate
    assert args.calibration_limit == 256 and args.calibration_method == "minmax" and args.eval is None
    root = Path(__file__).resolve().parents[1]
    dockerfile = (root / "Dockerfile").read_text()
    assert 'python -m export --variant "$VARIANT" --precision "$PRECISION"' in dockerfile
    assert "--calibration" not in dockerfile
    makefile = (root / "Makefile").read_text()
    assert "--precision $(PRECISION)" in makefile and "MODEL ?= artifacts/$(VARIANT)-$(PRECISION).onnx" in makefile
