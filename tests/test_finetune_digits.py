"""End to end on trained weights: a ResNeSt trained here on real digits, exported by the CLI, served over HTTP.

Random weights hide whole classes of bugs (label order, channel order, normalisation, softmax over the wrong
axis): here the answers have to be right. resnest14d is trained on scikit-learn's handwritten digits
(`python -m bench.train_digits`, cached by its config hash in pytest's cache directory), its state_dict exported
with a labels file and preprocessing overrides, and the held-out scans uploaded as PNG and JPEG files to the
real server; every answer must equal PyTorch's on the same decoded pixels, through torchvision's transform.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import models
from bench import train_digits
from bench.forms import files
from modelcard import GENERIC_LABELS_WARNING, ModelCard
from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import ROOT, app_client, run
from tests.reference_transforms import eval_transform

LABELS = list(train_digits.LABELS)
CHUNK = 16  # images per request: the service's default RESNEST_MAX_IMAGES_PER_REQUEST


@dataclass(frozen=True)
class Exported:
    path: Path
    log: str

    @property
    def card(self) -> ModelCard:
        return ModelCard.from_metadata({p.key: p.value for p in onnx.load(str(self.path)).metadata_props})


@pytest.fixture(scope="session")
def digits_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> train_digits.DigitsModel:
    """The trained digits model: from pytest's on-disk cache when a run with this config built it before."""
    cfg = train_digits.TrainConfig()
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = Path(cache.mkdir("digits-model")) if cache is not None else tmp_path_factory.mktemp("digits-model")
    directory = root / cfg.key()
    if train_digits.load(directory) is None:
        started = time.perf_counter()
        command = [sys.executable, "-m", "bench.train_digits", "--out", str(directory)]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(f"\ntrained the digits model in {time.perf_counter() - started:.1f}s (with start-up): {proc.stdout}")
    found = train_digits.load(directory)
    assert found is not None and found.meta["key"] == cfg.key()
    print(f"\ndigits model {directory.name}: trained in {found.meta['train_seconds']}s, PyTorch held-out accuracy "
          f"{found.meta['heldout_accuracy']:.4f} on {found.meta['heldout_images']} images")  # fmt: skip
    return found


def export_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def digits_onnx(digits_model: train_digits.DigitsModel, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The checkpoint exported as a user would: state_dict, labels file, the preprocessing it was trained with."""
    out = tmp_path_factory.mktemp("digits-onnx") / "digits.onnx"
    proc = export_cli(*train_digits.export_args(digits_model, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Exported(out, proc.stderr)


@pytest.fixture(scope="module")
def torch_model(digits_model: train_digits.DigitsModel) -> torch.nn.Module:
    """The trained network as its user has it: the architecture plus torch.load of the saved state_dict."""
    model = models.ResNeSt(models.get_variant("resnest14d"), num_classes=10)
    model.load_state_dict(torch.load(digits_model.checkpoint, weights_only=True))
    return model.eval()


def encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "L").save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@torch.no_grad()
def pytorch_answers(model: torch.nn.Module, blobs: list[bytes], card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities, embeddings) of PyTorch on each file's decoded pixels, via torchvision's transform."""
    pre = card.preprocess
    inputs = torch.stack(
        [
            eval_transform(
                Image.open(io.BytesIO(blob)).convert("RGB"), pre.resize_size, pre.input_size, pre.interpolation,
                pre.mean, pre.std,
            ).tensor
            for blob in blobs
        ]
    )  # fmt: skip
    embedding = model.forward_embedding(inputs)
    return torch.softmax(model.fc(embedding).double(), dim=1).numpy(), embedding.numpy()


def classify_all(client: httpx.Client, blobs: list[bytes], fmt: str) -> list[list[dict[str, object]]]:
    answers = []
    for start in range(0, len(blobs), CHUNK):
        r = client.post("/classify?top_k=10", files=files(*blobs[start : start + CHUNK], kind=f"image/{fmt.lower()}"))
        assert r.status_code == 200, r.text
        answers += [result["predictions"] for result in r.json()["results"]]
    return answers


# --- export -------------------------------------------------------------------------------------------------------


def test_export_records_the_checkpoints_classes_labels_and_preprocessing(
    digits_model: train_digits.DigitsModel, digits_onnx: Exported
) -> None:
    card = digits_onnx.card
    assert card.num_classes == 10 and list(card.labels) == LABELS and card.labels_source == "file"
    assert card.export["labels_file"]["sha256"] == hashlib.sha256(digits_model.labels.read_bytes()).hexdigest()
    assert card.preprocess == digits_model.config.preprocess  # 32x32, crop_pct 1.0, bicubic, the digits' mean/std
    assert card.export["preprocess_overrides"] == {
        "input_size": 32, "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": [0.30, 0.25, 0.35], "std": [0.40, 0.45, 0.35],
    }  # fmt: skip
    assert card.weights["sha256"] == hashlib.sha256(digits_model.checkpoint.read_bytes()).hexdigest()
    assert card.warnings == () and "WARNING" not in digits_onnx.log
    assert card.parity["passed"] is True and card.parity["worst"]["top1_agreement"] == 1.0
    assert "10 classes, labels: file" in digits_onnx.log
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim[1:]] for o in onnx.load(
        str(digits_onnx.path)).graph.output}  # fmt: skip
    # 32 px: the last feature map is a single cell, still exact (its mean is the embedding).
    assert outputs == {"logits": [10], "embedding": [2048], "features": [2048, 1, 1]}


# --- serving ------------------------------------------------------------------------------------------------------


def test_served_predictions_equal_pytorch_image_by_image_on_png_and_jpeg_uploads(
    server_factory, digits_model: train_digits.DigitsModel, digits_onnx: Exported, torch_model: torch.nn.Module
) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(digits_onnx.path), "RESNEST_PROVIDERS": "cpu"})
    images, truth = digits_model.heldout()
    card = digits_onnx.card
    with httpx.Client(base_url=server.url, timeout=60) as client:
        info = client.get("/model").json()
        assert info["num_classes"] == 10 and info["labels"] == LABELS and info["labels_source"] == "file"
        assert info["top_k"] == {"default": 5, "max": 10} and info["warnings"] == [] and info["warning"] is None
        assert info["preprocess"]["crop_pct"] == 1.0 and info["preprocess"]["mean"] == [0.30, 0.25, 0.35]
        r = client.post("/classify?top_k=11", files=files(encode(images[0], "PNG"), kind="image/png"))
        assert r.status_code == 422 and "10 classes" in r.json()["error"]["message"]
        accuracy = {}
        for fmt in ("PNG", "JPEG"):
            blobs = [encode(image, fmt) for image in images]
            served = classify_all(client, blobs, fmt)
            probs, _ = pytorch_answers(torch_model, blobs, card)
            want = probs.argmax(1)
            worst, closest = 0.0, 1.0
            for i, predictions in enumerate(served):
                assert [p["label"] for p in predictions] == [LABELS[p["index"]] for p in predictions]  # type: ignore[index]
                assert predictions[0]["index"] == want[i], f"{fmt} image {i}: served {predictions[0]}, torch {want[i]}"
                assert predictions[0]["label"] == LABELS[want[i]]
                scores = np.zeros(10)
                for p in predictions:
                    scores[p["index"]] = p["score"]  # type: ignore[index]
                worst = max(worst, float(np.abs(scores - probs[i]).max()))
                closest = min(closest, float(np.sort(probs[i])[-1] - np.sort(probs[i])[-2]))
            assert worst <= 1e-4, f"{fmt}: served probabilities differ from PyTorch's by up to {worst:.2e}"
            accuracy[fmt] = float(np.mean([p[0]["index"] == t for p, t in zip(served, truth, strict=True)]))
            torch_acc = float(np.mean(want == truth))
            print(f"\n{fmt}: {len(blobs)} held-out uploads, served accuracy {accuracy[fmt]:.4f} (PyTorch on the "
                  f"same pixels {torch_acc:.4f}), max |served - torch| probability {worst:.2e}, "
                  f"closest top-2 gap {closest:.2e}")  # fmt: skip
    assert accuracy["PNG"] >= 0.9 and accuracy["JPEG"] >= 0.9, accuracy  # chance is 0.1


# --- a headless backbone and unnamed classes from the same checkpoint --------------------------------------------


def settings_for(path: Path) -> Settings:
    return Settings(model_path=str(path), providers="cpu", max_batch_size=4)  # type: ignore[arg-type]


def test_headless_export_serves_embeddings_and_refuses_classify(
    digits_model: train_digits.DigitsModel, torch_model: torch.nn.Module, tmp_path: Path
) -> None:
    out = tmp_path / "backbone.onnx"
    args = train_digits.export_args(digits_model, out)
    labels_at = args.index("--labels")
    del args[labels_at : labels_at + 2]
    proc = export_cli(*args, "--num-classes", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "leaving out the checkpoint's 10-class classifier" in proc.stderr
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["embedding"]
    card = Exported(out, proc.stderr).card
    assert card.num_classes == 0 and card.labels_source == "none" and card.parity["passed"] is True
    images, _ = digits_model.heldout()
    blobs = [encode(image, "PNG") for image in images[:6]]
    _, want = pytorch_answers(torch_model, blobs, card)
    app = create_app(settings_for(out))

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/embed", files=files(*blobs, kind="image/png"))
            assert r.status_code == 200, r.text
            got = np.asarray([item["embedding"] for item in r.json()["results"]])
            assert r.json()["dim"] == 2048
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
            r = await client.post("/classify", files=files(*blobs[:1], kind="image/png"))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "no_classifier" and "/embed" in r.json()["error"]["message"]
            info = (await client.get("/model")).json()
            assert info["num_classes"] == 0 and info["labels"] == [] and info["labels_source"] == "none"
            assert info["outputs"] == ["embedding"] and info["top_k"] is None and info["embedding_dim"] == 2048

    run(main())


def test_without_labels_a_fine_tuned_head_answers_generic_labels_and_warns_everywhere(
    digits_model: train_digits.DigitsModel, digits_onnx: Exported, tmp_path: Path
) -> None:
    out = tmp_path / "unnamed.onnx"
    args = train_digits.export_args(digits_model, out)
    labels_at = args.index("--labels")
    del args[labels_at : labels_at + 2]
    proc = export_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = GENERIC_LABELS_WARNING.format(n=10, last=9)
    assert "a 10-class head without --labels" in proc.stderr and f"WARNING: {warning}" in proc.stderr
    card = Exported(out, proc.stderr).card
    assert card.labels == tuple(f"class_{i}" for i in range(10)) and card.labels_source == "generic"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["resnest.warning"] == warning
    images, _ = digits_model.heldout()
    blobs = [encode(image, "PNG") for image in images[:8]]
    named, unnamed = create_app(settings_for(digits_onnx.path)), create_app(settings_for(out))

    async def main() -> None:
        async with app_client(unnamed) as client, app_client(named) as reference:
            info = (await client.get("/model")).json()
            assert info["labels_source"] == "generic" and info["warnings"] == [warning]
            assert info["warning"] == warning
            r = await client.post("/classify?top_k=1", files=files(*blobs, kind="image/png"))
            ref = await reference.post("/classify?top_k=1", files=files(*blobs, kind="image/png"))
            assert r.status_code == ref.status_code == 200
            for got, want in zip(r.json()["results"], ref.json()["results"], strict=True):
                (g,), (w,) = got["predictions"], want["predictions"]
                assert (g["index"], g["label"]) == (w["index"], f"class_{w['index']}")
                assert w["label"] == LABELS[w["index"]]

    run(main())


def test_the_training_command_left_what_later_work_needs(digits_model: train_digits.DigitsModel) -> None:
    meta = digits_model.meta
    assert meta["heldout_accuracy"] >= 0.9 and meta["heldout_images"] == 360
    assert digits_model.labels.read_text().splitlines() == LABELS
    images, labels = digits_model.heldout()
    assert images.shape == (360, 8, 8) and images.dtype == np.uint8 and sorted(set(labels.tolist())) == list(range(10))
    assert len(list((digits_model.directory / "heldout").glob("*.png"))) == 360
    assert json.loads((digits_model.directory / "train.json").read_text())["config"]["variant"] == "resnest14d"
