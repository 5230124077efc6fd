"""Class activation maps, end to end: exact against the served logits, equal to PyTorch's on the same pixels and
checkpoint, peaked on the object a model learned, on /explain, over the OIP (HTTP and gRPC), and refused clearly
where a model cannot be explained.

The model here learned something real: resnest14d's backbone (seeded weights) with a two-class head fitted on
its own last feature map, cell by cell, to tell a bright square from the plain background it lies on (a linear
probe: the difference of the two classes' mean features). Its maps must then peak where the square is, which
random weights could not show.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as tg
from PIL import Image

import models
from bench.forms import files
from export.pipeline import export_model
from imaging import preprocess
from imaging.heatmaps import LEVELS
from modelcard import ModelCard, PreprocessConfig
from modelcard.cam import BIAS_KEY, SHAPE_KEY, WEIGHT_KEY, ClassifierHead
from service.http.app import create_app
from tests.conftest import ServerProcess, app_client, jpeg, run, settings
from tests.fakes import FakeModel

SIZE, CELL, SQUARE = 192, 32, 40  # a 6 x 6 map of 32-pixel cells; the square covers about two cells across
LABELS = ("bright square", "plain")
BACKGROUND, BRIGHT = (40, 40, 40), (250, 250, 250)


def scene(x: int, y: int, size: tuple[int, int] = (SIZE, SIZE), square: int = SQUARE) -> bytes:
    """A PNG of the plain background with the bright square's top-left corner at (x, y)."""
    img = Image.new("RGB", size, BACKGROUND)
    img.paste(BRIGHT, (x, y, x + square, y + square))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _cfg() -> PreprocessConfig:
    data = models.get_variant("resnest14d").data
    return PreprocessConfig(SIZE, SIZE, data.interpolation, data.mean, data.std)


def _cells(x: int, y: int) -> np.ndarray:
    """Which map cells the square covers by at least a quarter."""
    mask = np.zeros((SIZE // CELL, SIZE // CELL), dtype=bool)
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            rows = max(0, min(y + SQUARE, (i + 1) * CELL) - max(y, i * CELL))
            cols = max(0, min(x + SQUARE, (j + 1) * CELL) - max(x, j * CELL))
            mask[i, j] = rows * cols >= CELL * CELL / 4
    return mask


@torch.no_grad()
def probe_model() -> models.ResNeSt:
    """The backbone with a head fitted on its own features: bright-square cells against background cells."""
    model = models.create_model("resnest14d", seed=0, num_classes=2)
    rng = np.random.default_rng(0)
    spots = [(int(rng.integers(0, SIZE - SQUARE)), int(rng.integers(0, SIZE - SQUARE))) for _ in range(24)]
    batch = np.stack([preprocess(scene(x, y), _cfg(), 1 << 24) for x, y in spots])
    features = model.forward_features(torch.from_numpy(batch)).double().numpy()
    square, plain = [], []
    for (x, y), fmap in zip(spots, features, strict=True):
        mask = _cells(x, y)
        square.append(fmap[:, mask].T)
        plain.append(fmap[:, ~mask].T)
    on, off = np.concatenate(square).mean(0), np.concatenate(plain).mean(0)
    direction = (on - off) / np.linalg.norm(on - off)
    threshold = direction @ (on + off) / 2
    model.fc.weight.copy_(torch.from_numpy(np.stack([direction, -direction]) * 8.0))
    model.fc.bias.copy_(torch.tensor([-threshold * 8.0, threshold * 8.0]))
    return model


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[models.ResNeSt, Path]:
    """The probe model and its file, exported by the real pipeline (feature map parity included)."""
    model = probe_model()
    out = tmp_path_factory.mktemp("probe") / "probe.onnx"
    export_model(model, _cfg(), out, weights={"source": "probe", "sha256": "0" * 64}, labels=LABELS,
                 labels_source="file", compare_naive=False, log=lambda _: None)  # fmt: skip
    return model, out


def pixels_of(data: bytes) -> np.ndarray:
    """The model's input for a file, through the service's own preprocessing."""
    return preprocess(data, _cfg(), 1 << 24)


def png_levels(b64: str) -> np.ndarray:
    """A 16-bit grey PNG from the API as its grey levels, 0 to 65535."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int64)


def oip_logits(answer: dict[str, Any]) -> np.ndarray:
    out = {o["name"]: o for o in answer["outputs"]}["logits"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_export_records_the_feature_map_and_its_parity(probe: tuple[models.ResNeSt, Path]) -> None:
    model, path = probe
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    card = ModelCard.from_metadata(meta)
    assert card.outputs == ("logits", "embedding", "features") and card.feature_map == (2048, 6, 6)
    worst = card.parity["worst"]
    assert worst["max_rel_features"] <= 1e-4 and worst["max_rel_logits"] <= 1e-4, worst
    head = ClassifierHead.from_metadata(meta)
    assert head is not None
    # The record is the exported classifier itself, bit for bit.
    assert np.array_equal(head.weight, model.fc.weight.detach().numpy())
    assert np.array_equal(head.bias, model.fc.bias.detach().numpy())


def test_maps_are_exact_equal_pytorchs_and_peak_on_the_square(probe: tuple[models.ResNeSt, Path]) -> None:
    model, path = probe
    spots = [(8, 10), (140, 12), (20, 136), (120, 120), (76, 70)]
    blobs = [scene(x, y) for x, y in spots]
    bias = model.fc.bias.detach().double().numpy()
    weight = model.fc.weight.detach().double().numpy()

    async def main() -> None:
        async with app_client(create_app(settings(model_path=str(path)))) as client:
            r = await client.post("/explain", params=[("class", "0"), ("class", "plain")], files=files(*blobs))
            assert r.status_code == 200, r.text
            explained = r.json()["results"]
            classify = (await client.post("/classify", params={"top_k": 2}, files=files(*blobs))).json()["results"]
            tensors = np.stack([pixels_of(b) for b in blobs])
            body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(tensors.shape),
                                "data": tensors.ravel().tolist()}], "outputs": [{"name": "logits"}]}  # fmt: skip
            served = oip_logits((await client.post(f"/v2/models/{path.stem}/infer", json=body)).json())
        with torch.no_grad():
            reference = model.forward_features(torch.from_numpy(tensors)).double().numpy()
        for i, ((x, y), result) in enumerate(zip(spots, explained, strict=True)):
            scores = {p["index"]: p["score"] for p in classify[i]["predictions"]}
            assert [c["index"] for c in result["classes"]] == [0, 1] and result["classes"][1]["label"] == "plain"
            for c in result["classes"]:
                cam = np.asarray(c["map"]["values"], dtype=np.float64)
                assert cam.shape == (6, 6)
                # Exact: the map's mean plus the bias is the logit the service serves, to float32 rounding.
                assert abs(cam.mean() + bias[c["index"]] - served[i, c["index"]]) <= 1e-5 * abs(served[i, c["index"]])
                assert c["logit"] == pytest.approx(float(served[i, c["index"]]), rel=1e-6)
                assert c["score"] == pytest.approx(scores[c["index"]], rel=1e-6)
                # Equal to PyTorch's map on the same checkpoint and pixels.
                want = np.einsum("c,chw->hw", weight[c["index"]], reference[i])
                assert np.abs(cam - want).max() <= 1e-4 * np.abs(want).max()
            square = np.asarray(result["classes"][0]["map"]["values"])
            peak = np.unravel_index(square.argmax(), square.shape)
            assert _cells(x, y)[peak], f"square at {(x, y)}: map peaks at cell {peak}"
            # The other class's map is the mirror image: lowest where the square is.
            assert np.unravel_index(np.argmin(result["classes"][1]["map"]["values"]), square.shape) == peak

    run(main())


def test_maps_land_on_the_original_image_where_the_crop_came_from(probe: tuple[models.ResNeSt, Path]) -> None:
    _, path = probe
    # A wide image: resized to 192 high (256 wide) and cropped in the middle, so 32 columns on each side are never
    # seen; the square sits in the seen part, near its top-left corner.
    blob = scene(60, 20, size=(384, 288), square=60)

    async def main() -> None:
        async with app_client(create_app(settings(model_path=str(path)))) as client:
            r = await client.post("/explain", params={"class": "bright square"}, files=files(blob, kind="image/png"))
            assert r.status_code == 200, r.text
            (c,) = r.json()["results"][0]["classes"]
            png = await client.post("/explain", params={"class": "0", "format": "png", "max_side": 192},
                                    files=files(blob, kind="image/png"))  # fmt: skip
        image = c["image"]
        sizes = (image["width"], image["height"], image["original_width"], image["original_height"])
        assert sizes == (384, 288, 384, 288)
        assert image["crop_box"] == [48.0, 0.0, 336.0, 288.0]  # 32 resized columns = 48 original ones each side
        levels = png_levels(image["png"])
        assert levels.shape == (288, 384)
        assert levels[:, :48].max() == 0 and levels[:, 336:].max() == 0  # nothing outside what the model saw
        # The peak is on the square (60..120 x 20..80), give or take half a map cell: 16 crop pixels, 24 here.
        top, left = np.unravel_index(levels.argmax(), levels.shape)
        assert 20 - 24 <= top < 80 + 24 and 60 - 24 <= left < 120 + 24, (top, left)
        crop = png_levels(c["crop"]["png"])
        # On the crop: grey levels span the raw map's min..max, and the peak lies in the raw map's peak cell.
        raw = np.asarray(c["map"]["values"])
        assert crop.shape == (SIZE, SIZE) and crop.max() >= 0.95 * LEVELS and crop.min() <= 0.05 * LEVELS
        peak = tuple(int(v) // CELL for v in np.unravel_index(crop.argmax(), crop.shape))
        assert peak == np.unravel_index(raw.argmax(), raw.shape)
        overlay = Image.open(io.BytesIO(base64.b64decode(c["overlay"]["png"])))
        assert overlay.size == (384, 288) and overlay.mode == "RGB"
        # format=png: the overlay itself, scaled to max_side.
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (192, 144)

    run(main())


def test_requests_that_cannot_be_explained_are_4xx_that_say_why(probe: tuple[models.ResNeSt, Path],
                                                                tmp_path: Path) -> None:  # fmt: skip
    _, path = probe
    # A file exported before class activation maps: no features output, no classifier record.
    old = onnx.load(str(path))
    kept = [o for o in old.graph.output if o.name != "features"]
    del old.graph.output[:]
    old.graph.output.extend(kept)
    dropped = {"resnest.feature_map", WEIGHT_KEY, BIAS_KEY, SHAPE_KEY}
    props = [(p.key, p.value) for p in old.metadata_props if p.key not in dropped]
    del old.metadata_props[:]
    onnx.helper.set_model_props(old, dict(props))
    old_path = tmp_path / "old.onnx"
    onnx.save(old, str(old_path))
    blob = scene(10, 10)

    async def main() -> None:
        async with app_client(create_app(settings(model_path=str(old_path)))) as client:
            r = await client.post("/explain", files=files(blob))
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_feature_map"
            assert "export it again" in r.json()["error"]["message"]
            assert (await client.post("/classify", files=files(blob))).status_code == 200  # it still serves
            info = (await client.get("/model")).json()
            assert info["explainable"] is False and info["outputs"] == ["logits", "embedding"]
        async with app_client(create_app(settings(model_path=str(path)))) as client:
            for params, message in [
                ({"class": "cat"}, "neither a class index"),
                ({"class": "2"}, "neither a class index"),
                ({"format": "png", "top_k": 2}, "one image and one class"),
                ({"format": "gif"}, "format"),
                ({"max_side": 4096}, "max_side"),
            ]:
                r = await client.post("/explain", params=params, files=files(blob))
                assert r.status_code == 422 and message in r.text, (params, r.text)
            r = await client.post("/explain", params={"format": "png"}, files=files(blob, blob))
            assert r.status_code == 422
            # Pictures are bounded per request (9 images x 2 classes is 18 pairs); the raw maps alone are not.
            r = await client.post("/explain", params={"top_k": 2}, files=files(*[blob] * 9))
            assert r.status_code == 422 and "at most 16 image-class pairs" in r.text
            r = await client.post("/explain", params={"top_k": 2, "pictures": "false"}, files=files(*[blob] * 9))
            assert r.status_code == 200 and "overlay" not in r.json()["results"][8]["classes"][1]
            r = await client.post("/explain", files=files(b"not an image"))
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
            info = (await client.get("/model")).json()
            assert info["explainable"] is True and info["feature_map"] == [2048, 6, 6]

    run(main())


def test_a_fake_without_a_feature_map_is_refused_before_decoding() -> None:
    model = FakeModel()
    app = create_app(settings(), model=model)

    async def main() -> None:
        async with app_client(app) as client:
            warmed = len(model.batches)
            r = await client.post("/explain", files=files(jpeg()))
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_feature_map"
            assert len(model.batches) == warmed

    run(main())


def test_oip_clients_ask_for_the_feature_map_by_name_over_http_and_grpc(
    probe: tuple[models.ResNeSt, Path], server_factory: Any
) -> None:
    _, path = probe
    server: ServerProcess = server_factory({"RESNEST_MODEL_PATH": str(path)})
    blob = scene(100, 30)
    import httpx

    meta = httpx.get(f"{server.url}/v2/models/{path.stem}").json()
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["features"] == [-1, 2048, 6, 6]
    tensor = pixels_of(blob)[None]
    body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(tensor.shape),
                        "data": tensor.ravel().tolist()}]}  # fmt: skip
    plain = httpx.post(f"{server.url}/v2/models/{path.stem}/infer", json=body).json()
    # Not asked for, not sent: the default outputs leave the feature map out.
    assert [o["name"] for o in plain["outputs"]] == ["logits", "embedding", "probabilities"]
    asked = httpx.post(f"{server.url}/v2/models/{path.stem}/infer",
                       json={**body, "outputs": [{"name": "features"}, {"name": "embedding"}]}).json()  # fmt: skip
    out = {o["name"]: o for o in asked["outputs"]}
    assert out["features"]["shape"] == [1, 2048, 6, 6]
    features = np.asarray(out["features"]["data"], dtype=np.float32).reshape(1, 2048, 6, 6)
    embedding = np.asarray(out["embedding"]["data"], dtype=np.float32)
    assert np.abs(features.mean(axis=(2, 3))[0] - embedding).max() <= 1e-5 * np.abs(embedding).max()
    with tg.InferenceServerClient(server.grpc_target) as client:
        inp = tg.InferInput("image_bytes", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([blob], dtype=object).reshape(1, 1))
        result = client.infer(path.stem, [inp], outputs=[tg.InferRequestedOutput("features")])
        over_grpc = result.as_numpy("features")
    assert over_grpc.shape == (1, 2048, 6, 6) and over_grpc.dtype == np.float32
    np.testing.assert_allclose(over_grpc, features, rtol=1e-5, atol=1e-5 * np.abs(features).max())
