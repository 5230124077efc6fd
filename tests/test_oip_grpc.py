"""The Open Inference Protocol over gRPC, driven by the real `tritonclient.grpc`: a real server process (the tiny
ResNeSt) answering exactly what /classify, /embed and the OIP HTTP route answer for the same images, Triton's
status codes, the API key, message limits and SIGTERM under load; and, in process over a fake model whose
batches can be held, overload, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.core.settings import Settings
from service.grpc.messages import METHODS, SERVICE
from service.grpc.rpc import Calls
from service.grpc.server import GrpcFront
from service.http.app import create_app
from tests.conftest import ServerProcess, jpeg, wait_until
from tests.fakes import FakeModel

PHOTOS = [jpeg((96, 72), (200, 30, 40)), jpeg((80, 120), (20, 160, 90)), jpeg((64, 64), (40, 40, 220))]
KEY = "grpc-key"
BEARER = [("authorization", f"Bearer {KEY}")]


def bytes_input(blobs: list[bytes]) -> tg.InferInput:
    tensor = tg.InferInput("image_bytes", [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=object).reshape(-1, 1))
    return tensor


def status_of(call: Any) -> tuple[grpc.StatusCode, dict[str, str]]:
    """A failed call's status and trailing metadata, from tritonclient's exception or a raw grpc error."""
    if isinstance(call, grpc.RpcError):
        return call.code(), dict(call.trailing_metadata() or ())  # type: ignore[attr-defined]
    raise AssertionError(f"not an RPC error: {call!r}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> Iterator[ServerProcess]:
    """One real server for the read-only checks: the API key set, small limits to reach them cheaply."""
    env = {
        "RESNEST_MODEL_PATH": str(tiny_onnx),
        "RESNEST_API_KEY": KEY,
        "RESNEST_MAX_IMAGES_PER_REQUEST": "8",
        "RESNEST_MAX_UPLOAD_BYTES": str(2**20),
    }
    process = ServerProcess(env, tmp_path_factory.mktemp("grpc") / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[tg.InferenceServerClient]:
    with tg.InferenceServerClient(server.grpc_target) as triton:
        yield triton


def test_health_metadata_and_config_over_grpc(server: ServerProcess, client: tg.InferenceServerClient) -> None:
    # Probes are open, as on HTTP; everything else needs the key.
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    with pytest.raises(InferenceServerException) as unknown_version:
        client.is_model_ready("tiny", "7")
    assert unknown_version.value.status() == "StatusCode.NOT_FOUND"
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "resnest-serve" and "classification" in meta["extensions"]
    model = client.get_model_metadata("tiny", headers=dict(BEARER), as_json=True)
    http_meta = httpx.get(f"{server.url}/v2/models/tiny", headers={"authorization": f"Bearer {KEY}"}).json()
    assert model["inputs"] == [{**t, "shape": [str(d) for d in t["shape"]]} for t in http_meta["inputs"]]
    assert [o["name"] for o in model["outputs"]] == ["logits", "embedding", "features", "probabilities"]
    config = client.get_model_config("tiny", headers=dict(BEARER), as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert config["input"][0] == {"name": "images", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                  "dims": ["3", "64", "64"]}  # fmt: skip
    assert config["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8]
    index = client.get_model_repository_index(headers=dict(BEARER), as_json=True)
    assert index["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    # grpc.health.v1, as Kubernetes' gRPC probe and balancers ask it.
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE, "tiny"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_answers_what_classify_embed_and_oip_http_answer(
    server: ServerProcess, client: tg.InferenceServerClient
) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    outputs = [
        tg.InferRequestedOutput("logits"),
        tg.InferRequestedOutput("embedding"),
        tg.InferRequestedOutput("probabilities", class_count=5),
    ]
    answer = client.infer("tiny", [bytes_input(PHOTOS)], outputs=outputs, request_id="r-1", headers=headers)
    assert answer.get_response().id == "r-1" and answer.get_response().model_version == "1"
    logits, embedding = answer.as_numpy("logits"), answer.as_numpy("embedding")
    top = answer.as_numpy("probabilities")
    assert logits.shape == (3, 1000) and embedding.shape == (3, 2048) and top.shape == (3, 5)

    files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(PHOTOS)]
    classified = httpx.post(f"{server.url}/classify?top_k=5", files=files, headers=headers, timeout=60).json()
    embedded = httpx.post(f"{server.url}/embed", files=files, headers=headers, timeout=60).json()
    # The same images through the same batcher and model: the same numbers, to float32 rounding.
    np.testing.assert_allclose(embedding, np.array([e["embedding"] for e in embedded["results"]]), rtol=0, atol=1e-6)
    for strings, result in zip(top, classified["results"], strict=True):
        parsed = [s.decode().split(":", 2) for s in strings]
        assert [int(i) for _, i, _ in parsed] == [p["index"] for p in result["predictions"]]
        assert [label for _, _, label in parsed] == [p["label"] for p in result["predictions"]]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], [p["score"] for p in result["predictions"]],
                                   atol=1e-6)  # fmt: skip

    # The OIP HTTP route, binary tensors, through tritonclient.http: identical logits and classification.
    with th.InferenceServerClient(server.url.removeprefix("http://")) as http_client:
        tensor = th.InferInput("image_bytes", [len(PHOTOS), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(PHOTOS, dtype=object).reshape(-1, 1), binary_data=True)
        http_outputs = [th.InferRequestedOutput("logits"), th.InferRequestedOutput("probabilities", class_count=5)]
        over_http = http_client.infer("tiny", [tensor], outputs=http_outputs, headers=dict(headers))
    np.testing.assert_allclose(over_http.as_numpy("logits"), logits, rtol=0, atol=1e-6)
    assert (over_http.as_numpy("probabilities") == top).all()

    # Client-preprocessed tensors: raw contents (what tritonclient sends) and typed contents agree.
    batch = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    tensor = tg.InferInput("images", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    raw = client.infer("tiny", [tensor], outputs=[tg.InferRequestedOutput("logits")], headers=headers)
    request = METHODS["ModelInfer"][0](model_name="tiny")
    spec = request.inputs.add(name="images", datatype="FP32", shape=list(batch.shape))
    spec.contents.fp32_contents.extend(batch.ravel().tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=METHODS["ModelInfer"][1].FromString)  # fmt: skip
        typed = infer(request, metadata=BEARER, timeout=60)
    typed_logits = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(2, 1000)
    np.testing.assert_array_equal(typed_logits, raw.as_numpy("logits"))


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("unknown_model", grpc.StatusCode.NOT_FOUND, "unknown model"),
        ("no_key", grpc.StatusCode.UNAUTHENTICATED, "API key"),
        ("wrong_key", grpc.StatusCode.UNAUTHENTICATED, "API key"),
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, "must be FP32 [N, 3, 64, 64]"),
        ("not_an_image", grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
        ("too_many", grpc.StatusCode.INVALID_ARGUMENT, "at most 8 images"),
        ("bad_version", grpc.StatusCode.INVALID_ARGUMENT, "is not a model version"),
        ("unknown_version", grpc.StatusCode.NOT_FOUND, "no version 3"),
        ("over_limit", grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ],
)
def test_failures_map_to_tritons_status_codes(
    client: tg.InferenceServerClient, case: str, code: grpc.StatusCode, needle: str
) -> None:
    model, version, headers = "tiny", "", {"authorization": f"Bearer {KEY}"}
    inputs = [bytes_input(PHOTOS[:1])]
    if case == "unknown_model":
        model = "nope"
    elif case == "no_key":
        headers = {}
    elif case == "wrong_key":
        headers = {"authorization": "Bearer nope"}
    elif case == "wrong_shape":
        inputs = [tg.InferInput("images", [1, 3, 8, 8], "FP32")]
        inputs[0].set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    elif case == "not_an_image":
        inputs = [bytes_input([b"not an image"])]
    elif case == "too_many":
        inputs = [bytes_input(PHOTOS[:1] * 9)]
    elif case == "bad_version":
        version = "x"
    elif case == "unknown_version":
        version = "3"
    elif case == "over_limit":  # RESNEST_MAX_UPLOAD_BYTES is 1 MiB here: gRPC's own message limit
        inputs = [bytes_input([b"\xff" * (2**20 + 1)])]
    with pytest.raises(InferenceServerException) as failure:
        client.infer(model, inputs, model_version=version, headers=headers)
    assert failure.value.status() == str(code), failure.value.message()
    assert needle in failure.value.message()


def test_sigterm_under_grpc_load_loses_no_accepted_call(tmp_path: Path, tiny_onnx: Path, server_factory: Any) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_DRAIN_GRACE_S": "1.5",
                             "RESNEST_SHUTDOWN_TIMEOUT_S": "20"})  # fmt: skip
    target = server.grpc_target
    outcomes: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    readiness: list[bool] = []

    def load() -> None:
        with tg.InferenceServerClient(target) as triton:
            for _ in range(500):  # bounded: the server stops long before
                if stop.is_set():
                    return
                try:
                    triton.infer("tiny", [bytes_input(PHOTOS[:2])], client_timeout=30)
                    outcome = "ok"
                except InferenceServerException as exc:
                    # Refused before any work, a status clients retry elsewhere: at the transport (the listener
                    # closed) or by the server once it takes no new calls. Anything else (a cancellation, a
                    # 503 for a call that was admitted and then dropped) would be a lost call.
                    unavailable = exc.status() == "StatusCode.UNAVAILABLE"
                    refused = unavailable and ("draining" not in exc.message() or Calls.CLOSING in exc.message())
                    outcome = "refused" if refused else f"lost: {exc.status()} {exc.message()}"
                with lock:
                    outcomes.append(outcome)
                if outcome != "ok":
                    return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: outcomes.count("ok") >= 8)
    before = len(outcomes)
    server.proc.send_signal(signal.SIGTERM)
    with tg.InferenceServerClient(target) as probe:
        wait_until(lambda: not probe.is_server_ready(), timeout=5)  # readiness false at once
        readiness.append(probe.is_server_live())
    for thread in threads:
        thread.join(timeout=60)
    stop.set()
    assert server.proc.wait(timeout=30) == 0, server.log()
    lost = [o for o in outcomes if o not in ("ok", "refused")]
    assert not lost, lost
    assert outcomes[before:].count("ok") > 0  # calls kept being served during the drain grace
    print(f"SIGTERM under gRPC load: {outcomes.count('ok')} served, {outcomes.count('refused')} refused after close")
    assert readiness == [True]


# -- in process: the gRPC front over a fake model whose batches the test holds -----------------------------
class InProcess:
    """The app's lifespan and its gRPC front on an event loop in a thread, as `python -m service` runs them."""

    def __init__(self, model: FakeModel, **settings: Any) -> None:
        self.model = model
        self.app = create_app(Settings(model_path=Path("fake.onnx"), **settings), model=model)  # type: ignore[arg-type]
        self.state = self.app.state.service
        self.loop = asyncio.new_event_loop()
        self.started, self.target = threading.Event(), ""
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.app.router.lifespan_context(self.app):
            front = GrpcFront(self.state, "127.0.0.1", 0)
            self.target = f"127.0.0.1:{await front.start()}"
            self.started.set()
            await self._stop.wait()
            await front.stop(grace=1.0)

    def __enter__(self) -> InProcess:
        self.thread.start()
        assert self.started.wait(timeout=60), "the in-process server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.model.gate is not None:
            self.model.gate.set()
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=30)


def fake_input(n: int = 1, value: float = 0.5) -> tg.InferInput:
    tensor = tg.InferInput("images", [n, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.full((n, 3, 32, 32), value, np.float32))
    return tensor


def async_call(client: tg.InferenceServerClient, tensor: tg.InferInput, **kwargs: Any) -> tuple[Any, list[Any]]:
    """Start an inference; (its call context, a list that gets its (result, error) when it ends)."""
    done: list[Any] = []
    context = client.async_infer("fake", [tensor], callback=lambda result, error: done.append((result, error)),
                                 **kwargs)  # fmt: skip
    return context, done


def test_overload_is_resource_exhausted_with_a_retry_hint_not_a_hang() -> None:
    model = FakeModel()
    with InProcess(model, max_batch_size=1, max_queue_size=2, max_images_per_request=1) as server:
        model.gate = threading.Event()  # after warm-up: from here every batch waits for the test
        with tg.InferenceServerClient(server.target) as client:
            warmed = model.calls
            # One inside the model first, then the queue filling behind it: sent together, the third could
            # meet the first still counted in the queue (admitted, not yet taken into a batch) and be refused.
            pending = [async_call(client, fake_input(value=0.0))]
            wait_until(lambda: model.calls > warmed)
            pending += [async_call(client, fake_input(value=0.1 * i)) for i in (1, 2)]
            wait_until(lambda: sum(s.batcher.depth for s in server.state.registry.all()) >= 2)
            started = time.perf_counter()
            with grpc.insecure_channel(server.target) as channel:
                infer = channel.unary_unary(
                    f"/{SERVICE}/ModelInfer",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=METHODS["ModelInfer"][1].FromString,
                )
                request = METHODS["ModelInfer"][0](model_name="fake")
                spec = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 32, 32])
                request.raw_input_contents.append(np.zeros((1, 3, 32, 32), "<f4").tobytes())
                with pytest.raises(grpc.RpcError) as refused:
                    infer(request, timeout=30)
            assert spec.name == "images"
            code, trailing = status_of(refused.value)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(trailing["retry-after"]) >= 1 and int(trailing["grpc-retry-pushback-ms"]) >= 1000
            assert trailing["resnest-error-code"] == "overloaded"
            # Refused at once, while the gate still holds every admitted call (it would hang otherwise).
            assert not any(done for _, done in pending) and time.perf_counter() - started < 30
            model.gate.set()
            wait_until(lambda: all(done for _, done in pending))
            assert all(error is None for _, done in pending for _, error in done)


def test_a_cancelled_or_expired_call_is_never_inferred() -> None:
    model = FakeModel()
    with InProcess(model, max_batch_size=1) as server:
        model.gate = threading.Event()  # after warm-up: from here every batch waits for the test
        with tg.InferenceServerClient(server.target) as client:
            warmed = model.calls
            blocker = async_call(client, fake_input(value=0.0))
            wait_until(lambda: model.calls > warmed)  # the blocker is inside the model
            cancelled = async_call(client, fake_input(value=1.0))
            expired = async_call(client, fake_input(value=2.0), client_timeout=3.0)
            # Both queue behind the blocker; on a loaded machine the expired one may run out of time before it
            # is queued (a fresh-clone run saw it once at 0.5 s): then it must never be inferred all the same.
            wait_until(lambda: sum(s.batcher.depth for s in server.state.registry.all()) == 2 or bool(expired[1]))
            cancelled[0].cancel()
            wait_until(lambda: bool(expired[1]) and bool(cancelled[1]))
            # The server dropped both from the queue (well before the fake model's gate would time out).
            wait_until(lambda: sum(s.batcher.depth for s in server.state.registry.all()) == 0, timeout=10)
            model.gate.set()
            wait_until(lambda: bool(blocker[1]))
            assert blocker[1][0][1] is None
            assert expired[1][0][1].status() == "StatusCode.DEADLINE_EXCEEDED"
            assert cancelled[1][0][1].status() == "StatusCode.CANCELLED"
            # Nothing but the blocker ever reached the model.
            assert model.calls == warmed + 1


def test_a_taken_grpc_port_fails_the_start_and_grpc_can_be_turned_off(
    server: ServerProcess, server_factory: Any, tiny_onnx: Path
) -> None:
    taken = server.grpc_target.rsplit(":", 1)[1]
    clash = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_GRPC_PORT": taken}, wait=False)
    assert clash.proc.wait(timeout=120) == 1, clash.log()  # start-up failed: the orchestrator restarts it
    assert f"gRPC could not bind 127.0.0.1:{taken}" in clash.log()
    off = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_GRPC_ENABLED": "false"})
    assert httpx.get(f"{off.url}/readyz", timeout=10).status_code == 200
    assert "grpc://" not in off.log()


def test_health_watch_reports_not_serving_when_draining_and_ends() -> None:
    """A watcher learns of the drain, and its stream ends so that the server's stop does not wait on it."""
    with InProcess(FakeModel()) as server, grpc.insecure_channel(server.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        server.loop.call_soon_threadsafe(setattr, server.state, "draining", True)
        rest = list(stream)  # ends by itself (within the 30 s timeout, which would raise DEADLINE_EXCEEDED)
        assert [m.status for m in rest] == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_health_watch_sends_not_serving_even_when_the_drain_starts_while_it_waits_at_a_yield() -> None:
    """The race the in-process test can hit: the flag turns between one message and the generator's resumption."""
    from types import SimpleNamespace

    from service.grpc.health import HealthServicer

    state = SimpleNamespace(draining=False, registry=SimpleNamespace(models={}))
    state.not_ready_reasons = lambda: ["draining"] if state.draining else []
    watch = HealthServicer(state).Watch(health_pb2.HealthCheckRequest(service=""), None)  # type: ignore[arg-type]

    async def drive() -> list[int]:
        first = await watch.__anext__()
        state.draining = True  # while the generator is suspended at its yield
        return [first.status] + [m.status async for m in watch]

    statuses = asyncio.run(drive())
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
