"""The export pipeline: metadata, parity report, graph hygiene, fusion exactness, failure paths, fp16, checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.pipeline
import models
from export import graph, parity
from export.fuse import FusedResNeSt, FusedSplitAttn, TwoHeads, fuse
from export.labels import imagenet_labels
from export.pipeline import ExportError, ExportResult, export_model
from modelcard import RANDOM_WEIGHTS_WARNING, ModelCard, PreprocessConfig
from models.split_attn import SplitAttnConv2d
from models.variants import Variant

SIZE = 64
CPU = ["CPUExecutionProvider"]
# Ops that only glue split attention together (the convolutions, pools and the head are the same in both graphs).
GLUE_OPS = ("Add", "Mul", "Split", "Reshape", "Transpose", "Softmax", "Sigmoid", "ReduceSum", "Concat", "Slice",
            "Unsqueeze", "Squeeze", "Gather", "Expand", "Sub", "Div", "Exp")  # fmt: skip
# radix/cardinality coverage: R1K1, R2K2, R4K2, R1K4, R4K1, R2K1
FUSION_VARIANTS = [
    "resnest50_fast_1s1x64d", "resnest50_fast_2s2x40d", "resnest50_fast_4s2x40d",
    "resnest50_fast_1s4x24d", "resnest50_fast_4s1x64d", "resnest14d",
]  # fmt: skip


def tiny_cfg(model: models.ResNeSt) -> PreprocessConfig:
    return model.variant.data.with_overrides(input_size=SIZE)  # keeps the variant's crop_pct: 64 / 73


def small_export(tmp_path: Path, name: str = "m.onnx", precision: str = "fp32") -> ExportResult:
    """resnest14d (seed 0) at 64x64 through the real pipeline, without the naive trace."""
    model = models.create_model("resnest14d", seed=0)
    weights = {"source": "random", "sha256": "random", "seed": 0}
    return export_model(
        model, tiny_cfg(model), tmp_path / name, weights=weights, precision=precision, compare_naive=False,
        log=lambda _: None,
    )  # fmt: skip


def metadata(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(onnx metadata_props, ORT custom_metadata_map) of a model file."""
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    session = ort.InferenceSession(str(path), providers=CPU)
    return props, dict(session.get_modelmeta().custom_metadata_map)


def print_worst(title: str, worst: dict[str, float]) -> None:
    print(f"\n{title}: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))


def rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """max |a - b| relative to the scale (max |b|) of the reference b."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a64 - b64).max() / np.abs(b64).max())


# --- what the file carries ----------------------------------------------------------------------------------------


def test_metadata_parses_into_a_model_card(tiny_onnx: Path) -> None:
    props, ort_meta = metadata(tiny_onnx)
    assert props == ort_meta, "ONNX and ORT must read the same metadata"
    for meta in (props, ort_meta):
        card = ModelCard.from_metadata(meta)
        assert card.variant == "resnest14d"
        assert card.preprocess == PreprocessConfig(SIZE, 73, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert len(card.labels) == 1000 and card.labels[0] == "tench" and card.labels[999] == "toilet tissue"
        assert card.embedding_dim == 2048 and card.precision == "fp32"
        assert card.weights["sha256"] == "random" and card.random_weights
        assert meta["resnest.warning"] == RANDOM_WEIGHTS_WARNING == card.warning
        assert {"torch", "onnx", "onnxruntime", "opset"} <= set(card.export)
        assert card.export["torch"] == torch.__version__ and card.export["onnxruntime"] == ort.__version__
        assert card.export["onnx"] == onnx.__version__ and card.export["opset"] == 18
        assert card.parity["passed"] is True and card.parity["precision"] == "fp32"
        assert card.parity["thresholds"] == parity.FP32.__dict__
    model = onnx.load(str(tiny_onnx))
    assert card.export["nodes"] == dict(graph.op_histogram(model))
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in model.opset_import)


def test_parity_report_beside_the_model(tiny_onnx: Path) -> None:
    report = json.loads(tiny_onnx.with_suffix(".parity.json").read_text())
    assert report["passed"] is True and report["precision"] == "fp32" and report["photos"] == 8
    assert "CPUExecutionProvider" in report["providers"]
    cases = report["cases"]
    for provider in report["providers"]:
        covered = {(c["inputs"], c["batch"]) for c in cases if c["provider"] == provider}
        assert covered == {(kind, n) for kind in ("random", "photos") for n in (1, 3, 8)}, provider
    for case in cases:
        where = f"{case['provider']}/{case['inputs']}/batch {case['batch']}"
        assert case["failures"] == [], where
        assert case["max_rel_logits"] <= 1e-4, where
        assert case["top1_agreement"] == 1.0, where
        assert case["min_cosine_embedding"] >= 0.99999, where
    worst = {
        "max_rel_logits": max(c["max_rel_logits"] for c in cases),
        "max_rel_embedding": max(c["max_rel_embedding"] for c in cases),
        "max_abs_logits": max(c["max_abs_logits"] for c in cases),
        "min_top1_agreement": min(c["top1_agreement"] for c in cases),
        "min_cosine_embedding": min(c["min_cosine_embedding"] for c in cases),
    }
    print_worst("fp32 parity worst (tiny_onnx)", worst)
    assert worst["max_rel_logits"] == report["worst"]["max_rel_logits"]


# --- graph hygiene ------------------------------------------------------------------------------------------------


def dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_is_clean_and_batch_dynamic(tiny_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    assert graph.graph_problems(model) == []
    hist = graph.op_histogram(model)
    assert hist["Shape"] == 0 and hist["BatchNormalization"] == 0, hist
    assert hist["Conv"] == 27 and hist["Gemm"] == 1, hist  # the network is really there
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = dims(inp)
    assert isinstance(in_dims[0], str) and in_dims[0] and in_dims[1:] == [3, SIZE, SIZE]
    outputs = {o.name: dims(o) for o in model.graph.output}
    assert list(outputs) == ["logits", "embedding", "features"]
    assert isinstance(outputs["logits"][0], str) and outputs["logits"][1:] == [1000]
    assert isinstance(outputs["embedding"][0], str) and outputs["embedding"][1:] == [2048]
    # The last stage's map (stride 32) that class activation maps read; the embedding is its spatial mean.
    assert isinstance(outputs["features"][0], str) and outputs["features"][1:] == [2048, SIZE // 32, SIZE // 32]

    session = ort.InferenceSession(str(tiny_onnx), providers=CPU)
    reference = TwoHeads(models.create_model("resnest14d", seed=0), feature_map=True)
    rng = np.random.default_rng(7)
    for n in (1, 3, 8):
        batch = rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
        logits, embedding, features = session.run(["logits", "embedding", "features"], {"images": batch})
        assert logits.shape == (n, 1000) and embedding.shape == (n, 2048)
        with torch.no_grad():
            ref_logits, ref_emb, ref_features = reference(torch.from_numpy(batch))
        err = (rel_err(logits, ref_logits.numpy()), rel_err(embedding, ref_emb.numpy()),
               rel_err(features, ref_features.numpy()))  # fmt: skip
        print(f"\nORT vs torch at batch {n}: rel logits {err[0]:.2e}, embedding {err[1]:.2e}, features {err[2]:.2e}")
        assert max(err) <= 1e-4
        assert np.abs(features.mean(axis=(2, 3)) - embedding).max() <= 1e-5 * np.abs(embedding).max()


# --- fusion -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "50" in n else n for n in FUSION_VARIANTS])
@torch.no_grad()
def test_fusion_is_exact_for_every_radix_and_cardinality(name: str) -> None:
    model = models.create_model(name, seed=0)
    sa = next(m for m in model.modules() if isinstance(m, SplitAttnConv2d))
    print(f"\n{name}: radix {sa.radix}, cardinality {sa.fc1.groups}")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    fused = fuse(model)
    assert isinstance(fused, FusedResNeSt)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    # The fusion is an algebraic identity, so in float64 it must hold to rounding (~1e-13 here). float64 is the
    # real test: these seeded random weights make radix-4 models chaotic in float32 (attention logits in the
    # thousands, softmax over them near a hard argmax), so float32 runs of the SAME unfused model differ from its
    # float64 run by up to 1e-2 of the logit scale, and 1e-5 is then out of reach for any rewrite.
    model64 = copy.deepcopy(model).double()
    ref64_logits, ref64_emb = TwoHeads(model64)(x.double())
    fused64_logits, fused64_emb = fuse(model64)(x.double())
    exact = max(rel_err(fused64_logits, ref64_logits), rel_err(fused64_emb, ref64_emb))
    # float32: within 1e-5 where the model is well conditioned; otherwise within 10x float32's own noise floor on
    # this model (unfused float32 vs float64; a 10x margin because chaotic models vary with thread count), far below
    # the ~0.4 a wrong channel order gives (test_broken_fusion_fails_parity_and_writes_no_model).
    ref_logits, ref_emb = TwoHeads(model)(x)
    fused_logits, fused_emb = fused(x)
    fp32 = max(rel_err(fused_logits, ref_logits), rel_err(fused_emb, ref_emb))
    floor = max(rel_err(ref_logits, ref64_logits), rel_err(ref_emb, ref64_emb))
    print(f"fused vs unfused: float64 rel {exact:.2e}; float32 rel {fp32:.2e} (float32 noise floor {floor:.2e})")
    assert exact <= 1e-9
    assert fp32 <= max(1e-5, 10 * floor)


def tiny_radix4() -> models.ResNeSt:
    """A 4-block (resnest14d-depth) radix-4, cardinality-2 network: the 4s2x40d block at a tracing-friendly size."""
    variant = Variant("tiny_4s2x40d", (1, 1, 1, 1), 4, 2, 40, 32, True, PreprocessConfig(224, 256, "bicubic"), "test")
    return models.init_random(models.ResNeSt(variant), seed=0).eval()  # type: ignore[return-value]


@pytest.mark.parametrize("radix", [2, 4])
@torch.no_grad()
def test_fused_graph_has_less_glue(radix: int) -> None:
    model = models.create_model("resnest14d", seed=0) if radix == 2 else tiny_radix4()
    assert all(m.radix == radix for m in model.modules() if isinstance(m, SplitAttnConv2d))
    naive = graph.op_histogram(graph.trace_to_onnx(TwoHeads(model), SIZE, 18))
    final = graph.op_histogram(graph.trace_to_onnx(fuse(model), SIZE, 18))
    print(f"\nradix {radix}:\n" + graph.format_histogram({"naive": naive, "final": final}))
    glue_naive, glue_final = (sum(h[op] for op in GLUE_OPS) for h in (naive, final))
    print(f"glue ops: naive {glue_naive}, final {glue_final}; nodes: naive {naive.total()}, final {final.total()}")
    assert glue_final < glue_naive
    assert naive["Transpose"] > 0  # the rSoftMax axis swap is really there before fusion
    assert final["Shape"] == final["Transpose"] == final["BatchNormalization"] == 0, final
    assert final["Conv"] == naive["Conv"]


# --- a broken export is caught ------------------------------------------------------------------------------------


def test_broken_fusion_fails_parity_and_writes_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fuse = export.pipeline.fuse

    def broken_fuse(model: models.ResNeSt, feature_map: bool = False) -> FusedResNeSt:
        fused = real_fuse(model, feature_map)
        sa = next(m for m in fused.modules() if isinstance(m, FusedSplitAttn))
        order = torch.arange(sa.fc2.weight.shape[0]).flip(0)  # attention logits in the wrong channel order
        with torch.no_grad():
            sa.fc2.weight.copy_(sa.fc2.weight[order])
            sa.fc2.bias.copy_(sa.fc2.bias[order])
        return fused

    monkeypatch.setattr(export.pipeline, "fuse", broken_fuse)
    with pytest.raises(ExportError, match="parity") as info:
        small_export(tmp_path, "broken.onnx")
    assert not (tmp_path / "broken.onnx").exists()
    assert not list(tmp_path.glob("*.tmp")), "no half-written model may remain"
    assert not (tmp_path / "broken.parity.json").exists(), "a failed report must not pose as the model's"
    report = json.loads((tmp_path / "broken.parity-failed.json").read_text())
    failing = [c for c in report["cases"] if c["failures"]]
    print_worst("broken fusion worst", report["worst"])
    print(f"{len(failing)}/{len(report['cases'])} cases failing; error: {str(info.value).splitlines()[0]}")
    assert report["passed"] is False and failing
    assert report["worst"]["max_rel_logits"] > parity.FP32.max_rel_logits


# --- fp16 ---------------------------------------------------------------------------------------------------------


def test_fp16_export(tmp_path: Path) -> None:
    result = small_export(tmp_path, "fp16.onnx", precision="fp16")
    model = onnx.load(str(result.path))
    kinds = Counter(onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer)
    print(f"\nfp16 initializers by type: {dict(kinds)}")
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    assert kinds["FLOAT16"] > 50 and not [i.name for i in model.graph.initializer if i.data_type in floats]
    constants = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    assert not [t.name for t in constants if t.data_type in floats]
    assert [v.type.tensor_type.elem_type for v in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [v.type.tensor_type.elem_type for v in model.graph.output] == [onnx.TensorProto.FLOAT] * 3
    report = json.loads(result.report_path.read_text())
    print_worst("fp16 parity worst", report["worst"])
    assert report["passed"] is True and report["precision"] == "fp16"
    assert report["thresholds"] == parity.FP16.__dict__
    assert report["worst"]["max_rel_logits"] <= parity.FP16.max_rel_logits
    assert report["worst"]["min_cosine_embedding"] >= parity.FP16.min_cosine
    card = ModelCard.from_metadata(metadata(result.path)[0])
    assert card.precision == "fp16" and card.parity["passed"] is True
    session = ort.InferenceSession(str(result.path), providers=CPU)
    logits, embedding, _ = session.run(None, {"images": np.zeros((2, 3, SIZE, SIZE), np.float32)})
    assert logits.dtype == np.float32 and logits.shape == (2, 1000) and embedding.shape == (2, 2048)


# --- from a checkpoint --------------------------------------------------------------------------------------------


def test_export_from_checkpoint(tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.cli import main

    source = models.create_model("resnest14d", seed=3)
    staging = tmp_path / "staging.pth"
    torch.save(source.state_dict(), staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    checkpoint = staging.rename(tmp_path / f"resnest14d-{digest[:8]}.pth")
    out = tmp_path / "ckpt.onnx"
    grad = torch.is_grad_enabled()
    try:
        code = main(["--variant", "resnest14d", "--input-size", str(SIZE), "--checkpoint", str(checkpoint),
                     "--output", str(out), "--skip-naive"])  # fmt: skip
    finally:
        torch.set_grad_enabled(grad)  # main() switches autograd off process-wide
    err = capsys.readouterr().err
    assert code == 0, err
    assert "RANDOM WEIGHTS" not in err
    props, ort_meta = metadata(out)
    assert "resnest.warning" not in props and "resnest.warning" not in ort_meta
    card = ModelCard.from_metadata(props)
    assert card.weights["sha256"] == digest and card.weights["source"] == str(checkpoint)
    assert not card.random_weights and card.warning is None and card.parity["passed"] is True
    # The file computes the checkpoint's network (seed 3), not the seed-0 weights of tiny_onnx.
    batch = np.random.default_rng(8).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    logits = ort.InferenceSession(str(out), providers=CPU).run(["logits"], {"images": batch})[0]
    seed0 = ort.InferenceSession(str(tiny_onnx), providers=CPU).run(["logits"], {"images": batch})[0]
    with torch.no_grad():
        ref = TwoHeads(source)(torch.from_numpy(batch))[0].numpy()
    own, other = rel_err(logits, ref), rel_err(logits, seed0)
    print(f"\ncheckpoint export: rel logits vs its weights {own:.2e}, vs the seed-0 model {other:.2e}")
    assert own <= 1e-4 < other


def test_imagenet_labels() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) > 990
    assert labels[0] == "tench" and labels[999] == "toilet tissue"
    assert all(label and label == label.strip() for label in labels)
