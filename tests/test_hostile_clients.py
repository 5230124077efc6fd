"""Hostile and careless clients: no lockout, no unbounded memory, no file outside the repository, no 5xx.

Each defect the hostile-client review found has its own test here, and one test runs the whole attack at once
against one server (bench/hostile.py's scenario) while keyed clients on HTTP and gRPC are served.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from bench.forms import content_type, images
from bench.hostile import Attack, _slow_head, scenario, trickled_body
from service.core.errors import ServiceError
from service.core.identifiers import parse_version
from service.core.metrics import Metrics
from service.core.repository.registry import Registry
from service.core.settings import Settings
from service.grpc.messages import METHODS
from service.http.app import create_app
from tests.conftest import ServerProcess, app_client, jpeg, run, settings, until
from tests.fakes import FakeModel

KEY = "hostile-key"
CONTROL = "hostile-control-key"


def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (30, 140, 200)).save(buf, "JPEG")
    return buf.getvalue()


async def answer_of(port: int, request: bytes, trickle: float | None = None, wait: float = 60) -> tuple[str, float]:
    """Send `request` (then a byte every `trickle` seconds, if given) and return the status line's code and
    the seconds until the server answered."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    read = asyncio.ensure_future(reader.read(4096))
    body = iter(trickled_body())
    while not read.done() and time.monotonic() - started < wait:
        if trickle:
            try:
                writer.write(bytes([next(body, 0xFF)]))
                await writer.drain()
            except ConnectionError:  # the server closed after its answer
                pass
        await asyncio.wait({read}, timeout=trickle or wait)
    writer.close()
    data = read.result() if read.done() else b""
    return (data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "none"), time.monotonic() - started


# -- HTTP: slow bodies, the key before the body, odd versions ------------------------------------------------


def test_silent_uploads_no_longer_lock_clients_out_and_are_cut_off_with_408(server_factory, tiny_onnx: Path) -> None:
    # The finding: 16 sockets that sent the headers of a 20 MiB upload and then nothing held the whole upload
    # budget (each reserved its declared length), and the next real uploads all got 429, for minutes.
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_BODY_TIMEOUT_S": "2"})
    body = images(photo())
    real = (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type()}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    async def main() -> tuple[list[str], list[tuple[str, float]]]:
        silent = [asyncio.ensure_future(answer_of(server.port, _slow_head(server.port, "none"))) for _ in range(16)]
        await asyncio.sleep(0.5)  # every silent upload is in, holding what it holds
        served = [(await answer_of(server.port, real))[0] for _ in range(5)]
        return served, await asyncio.gather(*silent)

    served, silent = run(main())
    print(f"\nwhile 16 uploads were silent: {served}; the silent ones: {sorted({s for s, _ in silent})}, "
          f"cut after {min(t for _, t in silent):.1f}-{max(t for _, t in silent):.1f} s")  # fmt: skip
    assert served == ["200"] * 5
    assert {s for s, _ in silent} == {"408"}
    # Cut off at the body deadline, not at some later sweep: well before the 60 s this test waits.
    assert max(t for _, t in silent) < 30


def test_a_trickling_upload_is_cut_off_like_a_silent_one(server_factory, tiny_onnx: Path) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_BODY_TIMEOUT_S": "1",
                             "RESNEST_BODY_MIN_RATE": "1024"})  # fmt: skip
    # A byte every 0.2 s: never 1 s between reads, but 5 bytes a second against a floor of 1024.
    status, seconds = run(answer_of(server.port, _slow_head(server.port, "none"), trickle=0.2))
    assert status == "408"
    assert seconds < 30  # a hang guard: the deadline is 1 s plus a few bytes' worth


def test_without_the_key_an_upload_is_refused_before_its_body(server_factory, tiny_onnx: Path) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_API_KEY": KEY})

    async def main() -> tuple[tuple[str, float], tuple[str, float]]:
        keyless = await answer_of(server.port, _slow_head(server.port, "wrong"), wait=20)
        # The same silent upload with the key is read (and waits for its body) rather than refused.
        keyed = await answer_of(server.port, _slow_head(server.port, KEY), wait=1.0)
        return keyless, keyed

    (keyless, _), (keyed, _) = run(main())
    assert keyless == "401"  # without a byte of the 20 MiB body sent
    assert keyed == "none"  # still waiting for its body: the key let it in


@pytest.mark.parametrize(
    "target",
    [
        "/classify?version=%C2%B2", f"/classify?version={'9' * 5000}", "/embed?version=%D9%A3",
        "/classify?version=1_0", "/classify?version=+5", "/classify?version=0",
    ],
)  # fmt: skip
def test_odd_versions_on_uploads_are_422_not_500(target: str) -> None:
    app = create_app(settings(), model=FakeModel())

    async def main() -> httpx.Response:
        async with app_client(app) as client:
            return await client.post(target, files={"images": ("a.jpg", jpeg(), "image/jpeg")})

    answer = run(main())
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_parameter"


def test_one_version_parser() -> None:
    assert [parse_version(v) for v in ("", None, "1", "42", "999999999")] == [None, None, 1, 42, 999999999]
    for odd in ("0", "01", "²", "٣", "1_0", "+5", " 5", "5 ", "1e3", "9" * 10, "9" * 5000, "-1", "x"):
        with pytest.raises(ServiceError) as refused:
            parse_version(odd)
        assert refused.value.code == "invalid_parameter" and len(refused.value.message) < 120


def test_an_error_that_escapes_the_app_is_a_500_carrying_the_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(settings(), model=FakeModel())
    state = app.state.service

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    async def main() -> httpx.Response:
        async with app_client(app) as client:
            monkeypatch.setattr(state, "resolve", broken)
            return await client.get("/model", headers={"x-request-id": "trace-me-1"})

    answer = run(main())
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "trace-me-1"
    assert answer.json() == {"error": {"code": "internal_error", "message": "internal error"},
                             "request_id": "trace-me-1"}  # fmt: skip


def test_a_stuck_runtime_fails_liveness_so_the_pod_is_restarted() -> None:
    model = FakeModel()
    app = create_app(settings(request_timeout_s=0.2, stall_timeout_s=0.5), model=model)

    async def main() -> tuple[int, int, int]:
        async with app_client(app) as client:
            before = (await client.get("/healthz")).status_code
            model.gate = threading.Event()
            stuck = asyncio.ensure_future(client.post("/classify", files={"images": ("a.jpg", jpeg(), "image/jpeg")}))
            await until(lambda: app.state.service.batcher.stalled_for() > 0.6)
            during = (await client.get("/healthz")).status_code
            model.gate.set()
            await stuck
            await until(lambda: app.state.service.batcher.stalled_for() == 0)
            return before, during, (await client.get("/healthz")).status_code

    assert run(main()) == (200, 503, 200)


# -- the repository: names checked before the filesystem, warm-up failures, metrics series -----------------------


def _repository(root: Path, tiny_onnx: Path, name: str) -> Path:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    return root / name


def test_model_control_never_reaches_outside_the_repository(tmp_path: Path, tiny_onnx: Path) -> None:
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    _repository(repo, tiny_onnx, "tiny")
    outside = _repository(elsewhere, tiny_onnx, "m")
    (repo / "link").symlink_to(outside, target_is_directory=True)  # a link that leads out counts as outside
    loaded: list[Path] = []

    def loader(s: Settings, path: Path, shapes: list[int]) -> FakeModel:
        loaded.append(path)
        return FakeModel()

    registry = Registry(settings(model_repository=repo), Metrics(), loader=loader)

    async def main() -> list[tuple[str, str]]:
        answers = []
        for name in (str(outside), "../elsewhere/m", "tiny/../../elsewhere/m", "link", "..", ".", "", "a\0b"):
            try:
                await registry.load_from_repository(name)
                answers.append((name, "loaded"))
            except ServiceError as exc:
                answers.append((name, exc.code))
        return answers

    answers = run(main())
    assert all(code == "model_not_found" for _, code in answers), answers
    assert loaded == [] and registry.names() == []


def test_a_model_that_fails_its_warm_up_is_a_load_failure_not_a_500(tmp_path: Path, tiny_onnx: Path) -> None:
    from service.core.oip import protocol

    repo = tmp_path / "repo"
    _repository(repo, tiny_onnx, "tiny")
    app = create_app(Settings(grpc_enabled=False, model_repository=repo, model_control=True, control_key=CONTROL))
    state = app.state.service

    def failing(s: Settings, path: Path, shapes: list[int]) -> FakeModel:
        model = FakeModel()

        def out_of_memory(batch: Any) -> None:
            if len(batch) == s.max_batch_size:
                raise RuntimeError("CUDA failure 2: out of memory")  # as ONNX Runtime raises it

        model.fail = out_of_memory
        return model

    async def main() -> str:
        async with app.router.lifespan_context(app):
            state.registry.loader = failing
            try:
                await protocol.load_model(state, "tiny")
            except ServiceError as exc:
                return exc.code
        return "loaded"

    assert run(main()) == "model_load_failed"


def test_an_unloaded_versions_series_stay_gone_when_its_last_request_ends() -> None:
    metrics = Metrics()
    registry = Registry(settings(), metrics)

    async def main() -> str:
        served = await registry.add("m", FakeModel())
        with served.use():  # a request still being answered while the model is unloaded
            unload = asyncio.ensure_future(registry.unload("m"))
            await asyncio.sleep(0.05)
        await unload
        return metrics.render().decode()

    text = run(main())
    assert 'resnest_model_inflight_requests{model="m"' not in text, text


# -- gRPC: the key on metadata, Watch streams apart from inference, control key -----------------------------------


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path):  # type: ignore[no-untyped-def]
    env = {"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_API_KEY": KEY, "RESNEST_MAX_CONCURRENT_REQUESTS": "4"}
    process = ServerProcess(env, tmp_path_factory.mktemp("hostile") / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def _infer_call(channel: grpc.aio.Channel) -> Any:
    request, response = METHODS["ModelInfer"]
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString,
                               response.FromString)  # fmt: skip


def _infer_request(model: str) -> Any:
    request = METHODS["ModelInfer"][0](model_name=model)
    tensor = request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(photo())
    return request


def test_watch_streams_no_longer_take_inferences_places(grpc_server: ServerProcess, tiny_onnx: Path) -> None:
    # The finding: Watch streams counted against maximum_concurrent_rpcs (2 x max concurrent requests, 8 here),
    # so 8 open streams made every ModelInfer fail with RESOURCE_EXHAUSTED.
    async def main() -> tuple[int, str]:
        async with grpc.aio.insecure_channel(grpc_server.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            streams = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(32)]
            first = await asyncio.gather(*(s.read() for s in streams))
            try:
                keyed = (("authorization", f"Bearer {KEY}"),)
                await _infer_call(channel)(_infer_request(tiny_onnx.stem), metadata=keyed, timeout=60)
                outcome = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            for s in streams:
                s.cancel()
            return len(first), outcome

    assert run(main()) == (32, "OK")


def test_a_wrong_key_is_refused_on_metadata_before_the_message_is_read(grpc_server: ServerProcess) -> None:
    import psutil

    process = psutil.Process(grpc_server.proc.pid)

    async def main() -> tuple[set[str], int]:
        before = peak = process.memory_info().rss
        options = [("grpc.max_send_message_length", -1)]
        async with grpc.aio.insecure_channel(grpc_server.grpc_target, options=options) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", lambda b: b, lambda b: b)

            async def one() -> str:
                try:
                    await call(b"\0" * (2**20 - 1024), metadata=(("authorization", "Bearer wrong"),), timeout=30)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            codes = await asyncio.gather(*(one() for _ in range(64)))
            peak = max(peak, process.memory_info().rss)
        return set(codes), peak - before

    codes, growth = run(main())
    print(f"\n64 wrong-key 1 MiB calls: {codes}, server RSS growth {growth / 2**20:.1f} MiB")
    assert codes == {"UNAUTHENTICATED"}
    # Read whole, 64 messages of 1 MiB would be 64 MiB; refused on their metadata, far less arrives.
    assert growth < 32 * 2**20


def test_model_control_needs_the_control_key_on_both_protocols(server_factory, tmp_path: Path, tiny_onnx: Path) -> None:
    repo = tmp_path / "repo"
    _repository(repo, tiny_onnx, "tiny")
    server = server_factory({"RESNEST_MODEL_REPOSITORY": str(repo), "RESNEST_MODEL_CONTROL": "true",
                             "RESNEST_API_KEY": KEY, "RESNEST_CONTROL_KEY": CONTROL})  # fmt: skip
    url = f"{server.url}/v2/repository/models/tiny/load"
    http = [httpx.post(url, headers={"authorization": f"Bearer {k}"}, timeout=60).status_code for k in (KEY, CONTROL)]
    request, response = METHODS["RepositoryModelLoad"]

    async def main() -> list[str]:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            load = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad",
                                       request.SerializeToString, response.FromString)  # fmt: skip
            codes = []
            for key, name in ((KEY, "tiny"), (CONTROL, "tiny"), (CONTROL, str(repo.parent / "elsewhere"))):
                try:
                    await load(request(model_name=name), metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
            return codes

    assert http == [401, 200]
    assert run(main()) == ["UNAUTHENTICATED", "OK", "NOT_FOUND"]


def test_control_key_settings_are_checked() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="control_key"):
        Settings(model_control=True, api_key=KEY)
    with pytest.raises(ValidationError, match="control_key equals api_key"):
        Settings(model_control=True, api_key=KEY, control_key=KEY)


# -- everything at once -----------------------------------------------------------------------------------------


def test_the_whole_attack_at_once_leaves_keyed_clients_served(server_factory, tiny_onnx: Path) -> None:
    env = {"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_API_KEY": KEY, "RESNEST_BODY_TIMEOUT_S": "3"}
    server = server_factory(env)
    budget = Settings().max_buffered_upload_bytes
    attack = Attack(duration_s=20.0)
    figures = scenario(server.url, server.grpc_target, KEY, server.proc.pid, tiny_onnx.stem, photo(), budget, attack)
    print(f"\n{figures}")
    assert figures.keyed_errors == {"http": [], "grpc": []}
    for name in ("http", "grpc"):
        assert figures.keyed_requests[name] > 0
        assert figures.attack_p50_ms[name] <= 2 * figures.quiet_p50_ms[name], figures
    assert figures.odd_5xx == [], figures.odd_statuses
    assert figures.rss_growth_mib * 2**20 <= budget
    assert set(figures.slow_uploads) <= {"408", "still open at the end"} and figures.slow_uploads.get("408", 0) > 0
    assert figures.watchers_open == attack.watchers
    assert set(figures.wrong_key_statuses) == {"UNAUTHENTICATED"}
