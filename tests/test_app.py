"""The app in-process: endpoints, error table, headers, metrics, readiness, auth; fake and real models."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.forms import files
from imaging.transforms import preprocess
from service.core.request.postprocess import softmax
from service.http.app import create_app
from tests.conftest import app_client, jpeg, run, settings
from tests.fakes import FakeModel, fake_outputs


def test_classify_and_embed_answer_per_image_with_timings() -> None:
    model = FakeModel()
    app = create_app(settings(), model=model)
    blobs = [jpeg(color=(250, 0, 0)), jpeg(color=(0, 0, 250)), jpeg(color=(0, 250, 0))]

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/classify?top_k=3", files=files(*blobs))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "fake" and len(body["results"]) == 3
            cfg = model.card.preprocess
            for blob, result in zip(blobs, body["results"], strict=True):
                logits, _ = fake_outputs(preprocess(blob, cfg, 10**8)[None])
                probs = softmax(logits)[0]
                want = np.argsort(-probs)[:3]
                assert [p["index"] for p in result["predictions"]] == want.tolist()
                assert result["predictions"][0]["label"] == model.card.labels[want[0]]
                assert result["predictions"][0]["score"] == pytest.approx(float(probs[want[0]]), rel=1e-5)
            for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms", "x-preprocess-time-ms"):
                assert header in r.headers
            r = await client.post("/embed?normalize=true", files=files(*blobs[:2]))
            assert r.status_code == 200
            body = r.json()
            assert body["dim"] == 16 and body["normalized"] is True
            norms = [np.linalg.norm(item["embedding"]) for item in body["results"]]
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
            r = await client.post("/embed", files=files(blobs[0]))
            raw = np.asarray(r.json()["results"][0]["embedding"])
            np.testing.assert_allclose(raw, fake_outputs(preprocess(blobs[0], cfg, 10**8)[None])[1][0], rtol=1e-5)

    run(main())


def test_default_top_k_and_limits() -> None:
    app = create_app(settings(top_k_default=2, top_k_max=7), model=FakeModel())

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/classify", files=files(jpeg()))
            assert len(r.json()["results"][0]["predictions"]) == 2
            for bad in ("0", "-1", "8", "10000", "abc"):
                r = await client.post(f"/classify?top_k={bad}", files=files(jpeg()))
                assert r.status_code == 422, bad
                assert r.json()["error"]["code"] == "invalid_parameter"

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
        ({"files": files(jpeg(), field="image")}, 422, "invalid_parameter"),
        ({"files": files(b"not an image at all")}, 400, "invalid_image"),
        ({"files": files(b"")}, 400, "invalid_image"),
        ({"files": files(jpeg(), kind="text/plain")}, 415, "unsupported_media_type"),
        (
            {"files": files(b"<svg xmlns='http://www.w3.org/2000/svg'/>", kind="image/svg+xml")},
            415,
            "unsupported_media_type",
        ),
        ({"files": files(*[jpeg()] * 5)}, 413, "too_many_images"),
    ],
)
def test_error_table(kwargs: dict[str, object], status: int, code: str) -> None:
    app = create_app(settings(max_images_per_request=4), model=FakeModel())

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/classify", **kwargs)  # type: ignore[arg-type]
            assert r.status_code == status, r.text
            body = r.json()
            assert body["error"]["code"] == code
            assert set(body) == {"error", "request_id"} and set(body["error"]) == {"code", "message"}
            assert "Traceback" not in r.text and "/work" not in r.text

    run(main())


def test_upload_limit_and_pixel_limit() -> None:
    app = create_app(settings(max_upload_bytes=4096, max_image_pixels=50 * 50), model=FakeModel())

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/classify", files=files(b"\xff" * 10_000))
            assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
            r = await client.post("/classify", files=files(jpeg(size=(60, 60))))
            assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large")
            assert (await client.post("/classify", files=files(jpeg(size=(40, 40))))).status_code == 200

    run(main())


def test_queue_full_is_429_with_retry_after_and_deadline_is_504() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    model.gate.set()  # open for warm-up; closed below to make inference hang
    app = create_app(settings(max_queue_size=4, max_images_per_request=4, request_timeout_s=1.0), model=model)

    async def main() -> None:
        async with app_client(app) as client:
            model.gate.clear()
            stuck = asyncio.ensure_future(client.post("/classify", files=files(jpeg())))
            await asyncio.sleep(0.2)
            filler = asyncio.ensure_future(client.post("/classify", files=files(*[jpeg()] * 4)))
            await asyncio.sleep(0.2)
            r = await client.post("/classify", files=files(jpeg()))
            assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
            for task in (stuck, filler):
                r = await task
                assert (r.status_code, r.json()["error"]["code"]) == (504, "deadline_exceeded")
            model.gate.set()
            assert (await client.post("/classify", files=files(jpeg()))).status_code == 200

    run(main())


def test_model_failure_is_500_for_that_request_only() -> None:
    model = FakeModel()
    app = create_app(settings(), model=model)

    def boom(batch: np.ndarray) -> None:
        model.fail = None
        raise RuntimeError("secret internal detail /opt/model.onnx")

    async def main() -> None:
        async with app_client(app) as client:
            model.fail = boom
            r = await client.post("/classify", files=files(jpeg()))
            assert (r.status_code, r.json()["error"]["code"]) == (500, "internal_error")
            assert "secret" not in r.text and "/opt" not in r.text
            assert (await client.post("/classify", files=files(jpeg()))).status_code == 200

    run(main())


def test_health_readiness_metrics_model_and_docs() -> None:
    model = FakeModel()
    app = create_app(settings(), model=model)
    state = app.state.service

    async def main() -> None:
        async with app_client(app) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/readyz")).status_code == 200
            await client.post("/classify", files=files(jpeg(), jpeg()))
            text = (await client.get("/metrics")).text
            assert 'resnest_requests_total{route="/classify",status="200"} 1.0' in text
            assert "resnest_batch_size_bucket" in text and "resnest_queue_depth 0.0" in text
            assert 'resnest_images_total{route="/classify"} 2.0' in text
            assert 'provider="FakeExecutionProvider"' in text and "resnest_ready 1.0" in text
            info = (await client.get("/model")).json()
            assert info["variant"] == "fake" and info["providers"] == ["FakeExecutionProvider"]
            assert info["weights"]["sha256"] == "random" and "RANDOM" in info["warning"]
            assert info["preprocess"]["interpolation"] == "bilinear" and info["num_classes"] == 1000
            assert (await client.get("/docs")).status_code == 200
            spec = (await client.get("/openapi.json")).json()
            assert {"/classify", "/embed", "/model", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
            state.draining = True
            r = await client.get("/readyz")
            assert r.status_code == 503 and "draining" in r.json()["reasons"]
            assert r.headers["connection"] == "close"
            # Still serving while draining: the load balancer needs time to notice.
            assert (await client.post("/classify", files=files(jpeg()))).status_code == 200
            state.draining = False

    run(main())


def test_not_ready_until_warm_and_warm_up_covers_every_batch_shape_the_batcher_makes() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    app = create_app(settings(max_batch_size=6), model=model)

    async def main() -> None:
        lifespan = app.router.lifespan_context(app)
        starting = asyncio.ensure_future(lifespan.__aenter__())
        while model.calls == 0:  # the first warm-up batch is inside the model, held by the gate
            await asyncio.sleep(0.005)
        assert app.state.service.not_ready_reasons() == ["warming up"]
        model.gate.set()
        await starting
        # The shapes the batcher can produce (powers of two, and the maximum), each once.
        assert model.batches == [1, 2, 4, 6]
        assert app.state.service.not_ready_reasons() == []
        await lifespan.__aexit__(None, None, None)

    run(main())


def test_api_key_guards_inference_routes_only() -> None:
    app = create_app(settings(api_key="s3cret-key"), model=FakeModel())

    async def main() -> None:
        async with app_client(app) as client:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0LWtleQ=="}):
                r = await client.post("/classify", files=files(jpeg()), headers=headers)
                assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            assert (await client.get("/model")).status_code == 401
            ok = {"authorization": "Bearer s3cret-key"}
            assert (await client.post("/classify", files=files(jpeg()), headers=ok)).status_code == 200
            assert (await client.post("/embed", files=files(jpeg()), headers=ok)).status_code == 200
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await client.get(path)).status_code == 200

    run(main())


def test_request_ids_are_echoed_only_when_well_formed() -> None:
    app = create_app(settings(), model=FakeModel())

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.get("/healthz", headers={"x-request-id": "abc-123.XYZ"})
            assert r.headers["x-request-id"] == "abc-123.XYZ"
            for bad in ("", "a" * 65, "has space", "<script>", "-leading-dash"):
                r = await client.get("/healthz", headers={"x-request-id": bad})
                assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32

    run(main())


def test_real_onnx_model_matches_single_image_inference(tiny_onnx: Path, photos: list[tuple[str, bytes]]) -> None:
    app = create_app(settings(model_path=str(tiny_onnx), max_batch_size=4, providers="cpu"))
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])

    async def main() -> None:
        async with app_client(app) as client:
            blobs = [data for _, data in photos[:5]]
            card = app.state.service.model.card
            r = await client.post("/classify?top_k=5", files=files(*blobs))
            e = await client.post("/embed", files=files(*blobs))
            assert r.status_code == 200 and e.status_code == 200
            for i, blob in enumerate(blobs):
                x = preprocess(blob, card.preprocess, 10**8)[None]
                logits, emb = session.run(["logits", "embedding"], {"images": x})
                probs = softmax(logits)[0]
                got = r.json()["results"][i]["predictions"]
                assert [p["index"] for p in got] == np.argsort(-probs)[:5].tolist()
                np.testing.assert_allclose([p["score"] for p in got], np.sort(probs)[::-1][:5], rtol=1e-4)
                np.testing.assert_allclose(e.json()["results"][i]["embedding"], emb[0], rtol=1e-4, atol=1e-5)

    run(main())


# --- the served model's own classes: fine-tuned heads and headless backbones ---------------------------------------


class FineTunedFake(FakeModel):
    """A fake with a head of its own: `classes` labels from a labels file, logits of that width."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        labels = tuple(f"kind {i}" for i in range(classes))
        self.card = dataclasses.replace(self.card, labels=labels, labels_source="file")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = super().infer(images)
        return np.ascontiguousarray(logits[:, : self.card.num_classes]), embedding


class HeadlessFake(FakeModel):
    """A fake backbone without a classifier: zero-width logits, as OrtModel answers for one."""

    def __init__(self) -> None:
        super().__init__()
        self.card = dataclasses.replace(self.card, labels=(), labels_source="none")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, embedding = super().infer(images)
        return np.zeros((len(images), 0), dtype=np.float32), embedding


def test_top_k_and_model_info_follow_a_fine_tuned_head() -> None:
    model = FineTunedFake(10)
    app = create_app(settings(), model=model)
    blob = jpeg(color=(10, 200, 30))

    async def main() -> None:
        async with app_client(app) as client:
            info = (await client.get("/model")).json()
            assert info["num_classes"] == 10 and info["labels"] == list(model.card.labels)
            assert info["labels_source"] == "file" and info["outputs"] == ["logits", "embedding"]
            assert info["top_k"] == {"default": 5, "max": 10}
            r = await client.post("/classify?top_k=11", files=files(blob))
            assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_parameter")
            assert r.json()["error"]["message"] == "query.top_k: 11 is more than the model's 10 classes"
            r = await client.post("/classify?top_k=10", files=files(blob))
            assert r.status_code == 200, r.text
            got = r.json()["results"][0]["predictions"]
            logits, _ = fake_outputs(preprocess(blob, model.card.preprocess, 10**8)[None])
            probs = softmax(np.ascontiguousarray(logits[:, :10]))[0]
            assert [p["index"] for p in got] == np.argsort(-probs, kind="stable").tolist()
            assert [p["label"] for p in got] == [f"kind {p['index']}" for p in got]
            assert sum(p["score"] for p in got) == pytest.approx(1.0, abs=1e-5)

    run(main())


def test_default_top_k_is_capped_at_a_small_heads_class_count() -> None:
    app = create_app(settings(top_k_default=5), model=FineTunedFake(3))

    async def main() -> None:
        async with app_client(app) as client:
            r = await client.post("/classify", files=files(jpeg(), jpeg(color=(0, 0, 200))))
            assert r.status_code == 200, r.text
            assert [len(item["predictions"]) for item in r.json()["results"]] == [3, 3]
            assert (await client.get("/model")).json()["top_k"] == {"default": 3, "max": 3}

    run(main())


def test_a_headless_model_embeds_and_answers_classify_with_a_clear_400() -> None:
    model = HeadlessFake()
    app = create_app(settings(), model=model)
    blobs = [jpeg(), jpeg(color=(0, 90, 200))]

    async def main() -> None:
        async with app_client(app) as client:
            warmed = len(model.batches)
            for query in ("", "?top_k=3"):
                r = await client.post(f"/classify{query}", files=files(*blobs))
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "no_classifier" and "POST /embed" in error["message"]
            assert len(model.batches) == warmed  # refused before any image reached the model
            r = await client.post("/embed", files=files(*blobs))
            assert r.status_code == 200 and r.json()["dim"] == 16
            want = fake_outputs(np.stack([preprocess(b, model.card.preprocess, 10**8) for b in blobs]))[1]
            np.testing.assert_allclose([item["embedding"] for item in r.json()["results"]], want, rtol=1e-5)
            info = (await client.get("/model")).json()
            assert info["num_classes"] == 0 and info["labels"] == [] and info["labels_source"] == "none"
            assert info["outputs"] == ["embedding"] and info["top_k"] is None

    run(main())
