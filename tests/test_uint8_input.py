"""Device-side preprocessing: the uint8-nhwc export, its parity with the float graph, and serving it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.cli import parse_args
from export.device_input import host_normalise
from imaging.transforms import preprocess
from modelcard import FLOAT32_NCHW, UINT8_NHWC, ModelCard
from service.core.request.batching import Batcher
from service.core.request.inference import ModelLoadError, OrtModel
from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import TINY_SIZE, app_client, export_tiny, run, settings

# The uint8 graph's prefix does the host's two float32 operations in the same order: on the CPU EP the
# float graph after it sees identical inputs. Measured max abs difference here: 0.0.
MAX_ABS = 1e-4


@pytest.fixture(scope="module")
def uint8_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's tiny model (same weights, same preprocessing), exported with uint8-nhwc input."""
    return export_tiny(tmp_path_factory.mktemp("uint8") / "tiny-u8.onnx", UINT8_NHWC)


def _settings(path: Path, **overrides: object) -> Settings:
    return settings(model_path=path, providers="cpu", **overrides)


def test_the_file_records_its_input_layout_and_the_graph_takes_bytes(uint8_onnx: Path) -> None:
    session = ort.InferenceSession(str(uint8_onnx), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    (inp,) = session.get_inputs()
    assert card.preprocess.input_format == UINT8_NHWC and card.export["input_format"] == UINT8_NHWC
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [TINY_SIZE, TINY_SIZE, 3]
    assert isinstance(inp.shape[0], str)  # the batch axis stays symbolic
    summary = card.parity["input_format"]
    assert summary["passed"] is True and summary["input_format"] == UINT8_NHWC
    report = json.loads(uint8_onnx.with_suffix(".parity.json").read_text())["input_format"]
    kinds = {(c["inputs"], c["batch"]) for c in report["cases"]}
    assert kinds == {(k, n) for k in ("photos", "random") for n in (1, 3, 8)}
    print(f"\nexport's uint8 vs float graph: {json.dumps(report['worst'])}")
    assert report["worst"]["max_abs_logits"] < MAX_ABS and report["worst"]["max_abs_embedding"] < MAX_ABS


def test_parity_with_the_float_graph_on_photographs_through_the_host_preprocessing(
    tiny_onnx: Path, uint8_onnx: Path, photos: list[tuple[str, bytes]]
) -> None:
    floats, bytes_ = OrtModel(_settings(tiny_onnx)), OrtModel(_settings(uint8_onnx))
    assert floats.card.preprocess.input_format == FLOAT32_NCHW
    x_float = np.stack([preprocess(data, floats.card.preprocess, 1 << 28) for _, data in photos])
    x_u8 = np.stack([preprocess(data, bytes_.card.preprocess, 1 << 28) for _, data in photos])
    assert x_u8.dtype == np.uint8 and x_u8.shape == (len(photos), TINY_SIZE, TINY_SIZE, 3)
    assert x_u8.nbytes * 4 == x_float.nbytes
    # The host's float path is exactly the uint8 crop normalised: only where that happens moved.
    np.testing.assert_array_equal(host_normalise(x_u8, floats.card.preprocess), x_float)
    (l_f, e_f), (l_u, e_u) = floats.infer(x_float), bytes_.infer(x_u8)
    logits_diff, emb_diff = float(np.abs(l_f - l_u).max()), float(np.abs(e_f - e_u).max())
    print(f"\nuint8 vs float on {len(photos)} photographs: max abs logits {logits_diff:.3g}, embedding {emb_diff:.3g}")
    assert logits_diff < MAX_ABS and emb_diff < MAX_ABS
    assert (l_f.argmax(1) == l_u.argmax(1)).all()


def test_the_service_answers_the_same_on_the_uint8_model(
    tiny_onnx: Path, uint8_onnx: Path, photos: list[tuple[str, bytes]]
) -> None:
    blobs = [("images", (name, data, "application/octet-stream")) for name, data in photos[:5]]

    async def answers(path: Path) -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
        app = create_app(_settings(path))
        async with app_client(app) as client:
            r = await client.post("/classify?top_k=5", files=blobs)
            e = await client.post("/embed", files=blobs)
            m = await client.get("/model")
            assert r.status_code == 200 and e.status_code == 200 and m.status_code == 200
            return r.json(), e.json(), m.json()

    (r_f, e_f, m_f), (r_u, e_u, m_u) = run(answers(tiny_onnx)), run(answers(uint8_onnx))
    assert m_u["preprocess"]["input_format"] == UINT8_NHWC and m_f["preprocess"]["input_format"] == FLOAT32_NCHW
    assert m_u["acceleration"]["input_format"] == UINT8_NHWC and m_u["acceleration"]["path"] in ("plain", "io_binding")
    for a, b in zip(r_f["results"], r_u["results"], strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        np.testing.assert_allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]],
                                   atol=1e-6)  # fmt: skip
    for a, b in zip(e_f["results"], e_u["results"], strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=MAX_ABS)


def test_a_card_that_does_not_match_the_graph_input_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    pre = json.loads(meta["resnest.preprocess"])
    meta["resnest.preprocess"] = json.dumps({**pre, "input_format": UINT8_NHWC})  # a float graph, a uint8 card
    onnx.helper.set_model_props(model, meta)
    path = tmp_path / "mismatch.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="input"):
        OrtModel(_settings(path))


def test_the_runtime_refuses_a_batch_of_the_other_layout(uint8_onnx: Path) -> None:
    model = OrtModel(_settings(uint8_onnx))
    with pytest.raises(ValueError, match="uint8"):
        model.infer(np.zeros((1, 3, TINY_SIZE, TINY_SIZE), dtype=np.float32))


def test_the_batcher_stacks_uint8_images_as_uint8(uint8_onnx: Path) -> None:
    seen: list[np.ndarray] = []
    model = OrtModel(_settings(uint8_onnx, io_binding=False))
    original = model.infer

    def spy(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen.append(batch)
        return original(batch)

    model.infer = spy  # type: ignore[method-assign]

    async def main() -> None:
        batcher = Batcher(model, max_batch=4, max_queue=8, pad_to=[4])
        batcher.start()
        image = np.full((TINY_SIZE, TINY_SIZE, 3), 7, dtype=np.uint8)
        ticket = batcher.submit([image, image], timeout=30.0)
        await ticket.future
        await batcher.stop(1.0)
        assert ticket.logits is not None and ticket.logits.shape == (2, model.card.num_classes)

    run(main())
    assert seen and seen[0].dtype == np.uint8 and seen[0].shape == (4, TINY_SIZE, TINY_SIZE, 3)
    assert (seen[0][2:] == 0).all()  # the padding rows


def test_the_cli_takes_the_input_format() -> None:
    assert parse_args([]).input_format == FLOAT32_NCHW
    assert parse_args(["--input-format", "uint8-nhwc"]).input_format == UINT8_NHWC
    with pytest.raises(SystemExit):
        parse_args(["--input-format", "uint8-nchw"])


def test_the_oip_images_input_follows_the_models_input_format(
    tiny_onnx: Path, uint8_onnx: Path, photos: list[tuple[str, bytes]]
) -> None:
    """A uint8-nhwc model's `images` input is UINT8 [N, S, S, 3] (metadata, config, inference); a float tensor
    sent to it is the client's 400, not a failed batch."""
    cfg = ModelCard.from_metadata(
        ort.InferenceSession(str(uint8_onnx), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    ).preprocess
    crops = np.stack([preprocess(data, cfg, 1 << 28) for _, data in photos[:2]])
    floats = host_normalise(crops, cfg)

    def body(name: str, datatype: str, array: np.ndarray) -> dict:  # type: ignore[type-arg]
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}
        return {"inputs": [tensor], "outputs": [{"name": "logits"}]}

    async def ask(path: Path, name: str, payload: dict) -> tuple[dict, dict, int, dict]:  # type: ignore[type-arg]
        app = create_app(_settings(path))
        async with app_client(app) as client:
            meta = (await client.get(f"/v2/models/{name}")).json()
            config = (await client.get(f"/v2/models/{name}/config")).json()
            answer = await client.post(f"/v2/models/{name}/infer", json=payload)
            return meta, config, answer.status_code, answer.json()

    meta, config, status, answer = run(ask(uint8_onnx, "tiny-u8", body("images", "UINT8", crops)))
    assert meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, TINY_SIZE, TINY_SIZE, 3]}
    assert config["input"][0]["data_type"] == "TYPE_UINT8" and config["input"][0]["format"] == "FORMAT_NHWC"
    assert status == 200, answer
    _, _, _, reference = run(ask(tiny_onnx, "tiny", body("images", "FP32", floats)))
    np.testing.assert_allclose(answer["outputs"][0]["data"], reference["outputs"][0]["data"], atol=MAX_ABS)
    _, _, status, refused = run(ask(uint8_onnx, "tiny-u8", body("images", "FP32", floats)))
    assert status == 400 and f"must be UINT8 [N, {TINY_SIZE}, {TINY_SIZE}, 3]" in refused["error"]
