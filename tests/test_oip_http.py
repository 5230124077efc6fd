"""A model repository served over the Open Inference Protocol, driven by the real `tritonclient.http`: two
models (the 1000-class tiny ResNeSt in two versions, the 10-class digits model), metadata, configuration,
readiness, inference with BYTES and FP32 inputs in JSON and binary, classification, and explicit model control
under load. Every answer is checked against /classify and /embed for the same images."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bench.forms import files
from imaging.transforms import preprocess
from modelcard import PreprocessConfig
from tests.conftest import jpeg
from tests.test_finetune_digits import digits_model, digits_onnx  # noqa: F401 - fixtures used below

PHOTOS = [jpeg((96, 72), (200, 30, 40)), jpeg((80, 120), (20, 160, 90)), jpeg((64, 64), (40, 40, 220))]


@pytest.fixture
def repository(tmp_path: Path, tiny_onnx: Path, digits_onnx) -> Path:  # type: ignore[no-untyped-def]  # noqa: F811
    """<repo>/tiny/{1,2} (all versions served) and <repo>/digits/1 (latest, the default policy)."""
    root = tmp_path / "repo"
    for version in (1, 2):
        (root / "tiny" / str(version)).mkdir(parents=True)
        shutil.copy(tiny_onnx, root / "tiny" / str(version) / "model.onnx")
    (root / "tiny" / "config.pbtxt").write_text('name: "tiny"\nversion_policy: { all { } }\n')
    (root / "digits" / "1").mkdir(parents=True)
    shutil.copy(digits_onnx.path, root / "digits" / "1" / "model.onnx")
    return root


KEY = "repository-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


CONTROL_KEY = "repository-control-key"


def auth() -> dict[str, str]:
    """The key as headers; a fresh dict each call, since tritonclient adds its own headers to the one given."""
    return dict(AUTH)


def control() -> dict[str, str]:
    """The control key as headers: loading and unloading need it, not the API key."""
    return {"Authorization": f"Bearer {CONTROL_KEY}"}


@pytest.fixture
def server(server_factory, repository: Path):  # type: ignore[no-untyped-def]
    """Model control on (it needs the control key): loads and unloads carry it, every other call AUTH."""
    return server_factory(
        {
            "RESNEST_MODEL_REPOSITORY": str(repository),
            "RESNEST_MAX_IMAGES_PER_REQUEST": "8",
            "RESNEST_MODEL_CONTROL": "true",
            "RESNEST_API_KEY": KEY,
            "RESNEST_CONTROL_KEY": CONTROL_KEY,
        }
    )


def client_for(server) -> triton.InferenceServerClient:  # type: ignore[no-untyped-def]
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120)


def http_for(server) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(base_url=server.url, timeout=120, headers=auth())


def bytes_input(blobs: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(blobs), 1], "BYTES")
    # JSON cannot carry raw image bytes: there the elements are base64 (README, OIP section).
    values = blobs if binary else [base64.b64encode(b) for b in blobs]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(-1, 1), binary_data=binary)
    return tensor


def text(element: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def test_metadata_config_and_readiness_describe_each_model(server) -> None:  # type: ignore[no-untyped-def]
    client = client_for(server)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(meta["extensions"])
    tiny = client.get_model_metadata("tiny", headers=auth())
    assert tiny["versions"] == ["1", "2"] and tiny["platform"] == "onnx_onnxv1"
    assert {t["name"]: t["shape"] for t in tiny["inputs"]} == {"images": [-1, 3, 64, 64], "image_bytes": [-1, 1]}
    assert {t["name"]: t["shape"] for t in tiny["outputs"]} == {
        "logits": [-1, 1000], "embedding": [-1, 2048], "features": [-1, 2048, 2, 2], "probabilities": [-1, 1000]
    }  # fmt: skip
    digits = client.get_model_metadata("digits", "1", headers=auth())
    assert {t["name"]: t["shape"] for t in digits["outputs"]}["logits"] == [-1, 10]
    config = client.get_model_config("tiny", headers=auth())
    assert config["max_batch_size"] == 8 and config["version_policy"] == {"all": {}}
    assert config["input"][0] == {"name": "images", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                  "dims": [3, 64, 64]}  # fmt: skip
    assert config["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8]
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("digits")
    assert not client.is_model_ready("nope")
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=auth())}
    assert index == {("tiny", "1"): "READY", ("tiny", "2"): "READY", ("digits", "1"): "READY"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_and_fp32_inputs_answer_what_classify_and_embed_answer(server, binary: bool) -> None:  # type: ignore[no-untyped-def]
    client = client_for(server)
    with http_for(server) as http:
        for model, k in (("tiny", 5), ("digits", 3)):
            ref = http.post("/classify", params={"model": model, "top_k": k}, files=files(*PHOTOS)).json()
            ref_emb = http.post("/embed", params={"model": model}, files=files(*PHOTOS)).json()
            card = http.get("/model", params={"model": model}).json()
            want_strings = [
                [f"{p['score']:f}:{p['index']}:{p['label']}" for p in r["predictions"]] for r in ref["results"]
            ]
            want_emb = np.array([r["embedding"] for r in ref_emb["results"]], dtype=np.float32)
            outputs = [
                triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=k),
                triton.InferRequestedOutput("embedding", binary_data=binary),
                triton.InferRequestedOutput("logits", binary_data=binary),
            ]
            # The service decodes the files...
            by_bytes = client.infer(
                model, [bytes_input(PHOTOS, binary)], outputs=outputs, request_id="r1", headers=auth()
            )
            # ...or the client preprocesses them itself, as the model card says.
            cfg = PreprocessConfig.from_dict(card["preprocess"])
            batch = np.stack([preprocess(b, cfg, 40_000_000) for b in PHOTOS])
            tensor = triton.InferInput("images", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            by_tensor = client.infer(model, [tensor], outputs=outputs, headers=auth())
            for result in (by_bytes, by_tensor):
                strings = [[text(s) for s in row] for row in result.as_numpy("probabilities")]
                assert strings == want_strings, model
                np.testing.assert_allclose(result.as_numpy("embedding"), want_emb, rtol=1e-5, atol=1e-5)
                assert result.as_numpy("logits").shape == (len(PHOTOS), card["num_classes"])
            assert by_bytes.get_response()["id"] == "r1"
            assert by_bytes.get_response()["model_name"] == model


def test_classification_on_logits_ranks_like_classify_with_the_logit_values(server) -> None:  # type: ignore[no-untyped-def]
    client = client_for(server)
    out = [triton.InferRequestedOutput("logits", class_count=3), triton.InferRequestedOutput("probabilities")]
    result = client.infer("digits", [bytes_input(PHOTOS[:1], True)], outputs=out, headers=auth())
    (row,) = result.as_numpy("logits")
    with http_for(server) as http:
        ref = http.post("/classify", params={"model": "digits", "top_k": 3}, files=files(*PHOTOS[:1]))
    ranks = [(p["index"], p["label"]) for p in ref.json()["results"][0]["predictions"]]
    parsed = [text(s).split(":") for s in row]
    assert [(int(i), label) for _, i, label in parsed] == ranks
    scores = [float(v) for v, _, _ in parsed]
    assert scores == sorted(scores, reverse=True)
    # Triton's classification reports the output's own values: these are logits, not probabilities.
    assert result.as_numpy("probabilities")[0].max() <= 1.0 < max(abs(s) for s in scores) or scores[0] != 1.0


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/infer", {"inputs": []}, 404, "unknown model 'nope'; available: digits, tiny"),
        ("/v2/models/tiny/versions/7/infer", {"inputs": []}, 404, "has no version 7"),
        ("/v2/models/tiny/infer", {"inputs": []}, 400, "non-empty 'inputs'"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400,
         "unknown input 'x'"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "images", "shape": [1, 3, 2, 2], "datatype": "FP32",
                                               "data": [0.0] * 12}]}, 400, "must be FP32 [N, 3, 64, 64]"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                               "data": [base64.b64encode(b"not an image").decode()]}]}, 400,
         "image 0: the upload is not an image"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "image_bytes", "shape": [9], "datatype": "BYTES",
                                               "data": [base64.b64encode(PHOTOS[0]).decode()] * 9}]}, 413,
         "at most 8 images per request"),
        ("/v2/models/tiny/infer", {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                               "data": [base64.b64encode(PHOTOS[0]).decode()]}],
                                   "outputs": [{"name": "scores"}]}, 400, "unknown output(s) ['scores']"),
        ("/v2/models/tiny/infer", b'{"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": '
         + b"[" * 900 + b"1.0" + b"]" * 900 + b"}]}", 400, "nested deeper than its shape"),
        ("/v2/repository/models/tiny/load", b"{" + b" " * 70_000 + b"}", 413, "at most 65536 bytes"),
    ],
)  # fmt: skip
def test_errors_use_the_protocols_form_and_the_error_tables_status(
    server,
    path: str,
    body: dict | bytes,
    status: int,
    message: str,  # type: ignore[no-untyped-def, type-arg]
) -> None:
    headers = control() if path.startswith("/v2/repository/models/") else auth()
    with http_for(server) as http:
        answer = (
            http.post(path, json=body, headers=headers)
            if isinstance(body, dict)
            else http.post(path, content=body, headers=headers)
        )
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert isinstance(error, str) and message in error


def test_a_body_over_the_upload_limit_is_413_before_it_is_read(server_factory, repository: Path) -> None:
    server = server_factory({"RESNEST_MODEL_REPOSITORY": str(repository), "RESNEST_MAX_UPLOAD_BYTES": "4096"})
    answer = httpx.post(f"{server.url}/v2/models/tiny/infer", content=b"{" + b" " * 8000 + b"}")
    assert answer.status_code == 413 and "exceeds 4096 bytes" in answer.json()["error"]


def test_load_and_unload_under_load_lose_no_request_of_the_other_model(server, repository: Path) -> None:  # type: ignore[no-untyped-def]
    client = client_for(server)
    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        with http_for(server) as http:
            deadline = time.monotonic() + 300  # bounded even if the test body fails before setting `stop`
            while not stop.is_set() and time.monotonic() < deadline:
                answer = http.post("/classify", params={"model": "tiny", "version": 2}, files=files(*PHOTOS[:2]))
                statuses.append(answer.status_code)

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        client.unload_model("digits", headers=control())
        assert not client.is_model_ready("digits")
        with http_for(server) as http:
            gone = http.post("/classify", params={"model": "digits"}, files=files(*PHOTOS[:1]))
        assert gone.status_code == 404 and "available: tiny" in gone.json()["error"]["message"]
        # A load that fails (a corrupt file) leaves what was served untouched: tiny keeps version 2 serving.
        good = (repository / "tiny" / "2" / "model.onnx").read_bytes()
        (repository / "tiny" / "2" / "model.onnx").write_bytes(b"not an onnx file")
        with pytest.raises(InferenceServerException, match="failed to load 'tiny'") as failed:
            client.load_model("tiny", headers=control())
        assert str(repository) not in str(failed.value), "the cause is for the server log, not the client"
        assert "loading model 'tiny' failed" in server.log()
        (repository / "tiny" / "2" / "model.onnx").write_bytes(good)
        index = {(m["name"], m["version"]): m for m in client.get_model_repository_index(headers=auth())}
        assert index[("tiny", "2")]["state"] == "READY"
        assert index[("digits", "1")]["state"] == "UNAVAILABLE"
        client.load_model("digits", headers=control())
        assert client.is_model_ready("digits")
        before = len(statuses)
        client.load_model(
            "tiny", headers=control()
        )  # a reload under load: the new session takes over, the old one drains
        while len(statuses) < before + 10:  # the new session answers too
            assert worker.is_alive()
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(timeout=120)
    print(f"\ntiny under load during unload/failed load/load/reload: {len(statuses)} requests, {set(statuses)}")
    assert statuses and set(statuses) == {200}
    with http_for(server) as http:
        back = http.post("/classify", params={"model": "digits"}, files=files(*PHOTOS[:1]))
    assert back.status_code == 200


def test_an_unload_finishes_the_requests_in_flight(server) -> None:  # type: ignore[no-untyped-def]
    client = client_for(server)
    # Large photos, so decoding keeps a request in flight long enough to be seen there (tens of ms).
    big = [jpeg((1600, 1200), (30 * i, 90, 200 - 20 * i), quality=95) for i in range(8)]
    held = 'resnest_model_inflight_requests{model="digits",version="1"} 1.0'
    for _ in range(30):  # bounded: a request that finishes before it is seen in flight is simply tried again
        results: list[int] = []

        def request(results: list[int] = results) -> None:
            with http_for(server) as http:
                results.append(http.post("/classify", params={"model": "digits"}, files=files(*big)).status_code)

        requester = threading.Thread(target=request)
        requester.start()
        while requester.is_alive() and held not in httpx.get(f"{server.url}/metrics").text:
            time.sleep(0.001)
        if requester.is_alive():  # it has resolved the model and is being answered: unload now
            client.unload_model("digits", headers=control())
            requester.join(timeout=120)
            assert results == [200]
            return
        requester.join()
        assert results == [200]
    pytest.fail("no request was seen in flight in 30 tries")


def test_model_control_is_off_unless_configured(server_factory, repository: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory({"RESNEST_MODEL_REPOSITORY": str(repository)})
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    for call in (client.load_model, client.unload_model):  # this server has no key
        with pytest.raises(InferenceServerException, match="model control is off") as refused:
            call("tiny")
        assert refused.value.status() == "403"
    assert client.is_model_ready("tiny")
