"""The response cache: a repeated image is answered from memory (or a shared Redis) with the answer the model
gives, without running the model; what changes the model's outputs misses; a reload drops the model's entries;
Redis going away costs answers nothing."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.forms import files
from bench.serving import free_port
from service.http.app import create_app
from tests.conftest import app_client, jpeg, required_binary, run, settings, wait_until

A, B, C = jpeg((96, 72), (200, 30, 40)), jpeg((80, 120), (20, 160, 90)), jpeg((64, 64), (40, 40, 220))
CONTROL_KEY = "cache-control-key"


def batches_run(metrics_text: str) -> float:
    """Batches the model has run so far, from /metrics."""
    found = re.search(r"^resnest_batch_size_count (\S+)$", metrics_text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def counter(metrics_text: str, name: str) -> float:
    """The sum of a counter's series in /metrics."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics_text, re.MULTILINE))


def oip_bytes(blobs: list[bytes]) -> dict[str, Any]:
    """An OIP JSON request of encoded images (base64 BYTES, as the README shows)."""
    data = [base64.b64encode(b).decode() for b in blobs]
    return {"inputs": [{"name": "image_bytes", "shape": [len(blobs), 1], "datatype": "BYTES", "data": data}]}


def test_a_repeated_image_is_answered_from_memory_with_the_models_answer(tiny_onnx: Path) -> None:
    """Hit: the same JSON as the model's, no batch run, X-Cache and counters say so; one entry serves every
    route and protocol with any top_k; a new image, or a request mixing both, runs only what is new."""

    async def go() -> None:
        cached = create_app(settings(model_path=tiny_onnx, cache_bytes=2**20))
        plain = create_app(settings(model_path=tiny_onnx))
        async with app_client(cached) as client, app_client(plain) as reference:
            first = await client.post("/classify", files=files(A))
            assert first.status_code == 200 and first.headers["x-cache"] == "miss"
            ran = batches_run((await client.get("/metrics")).text)
            again = await client.post("/classify", files=files(A))
            assert again.status_code == 200 and again.headers["x-cache"] == "hit"
            assert again.json()["results"] == first.json()["results"]
            assert batches_run((await client.get("/metrics")).text) == ran  # the model never saw it
            assert "x-inference-time-ms" in again.headers

            # Top-k, normalisation and the protocol come after the cache: each answer equals the model's own.
            for path in ("/classify?top_k=3", "/embed", "/embed?normalize=true"):
                hit = await client.post(path, files=files(A))
                want = await reference.post(path, files=files(A))
                assert hit.headers["x-cache"] == "hit"
                assert hit.json()["results"] == want.json()["results"], path
            oip = await client.post("/v2/models/tiny/infer", json=oip_bytes([A]))
            want = await reference.post("/v2/models/tiny/infer", json=oip_bytes([A]))
            assert oip.json()["parameters"] == {"cache": "hit"} and oip.headers["x-cache"] == "hit"
            assert oip.json()["outputs"] == want.json()["outputs"]
            assert batches_run((await client.get("/metrics")).text) == ran

            # A new image misses; a request of a new and a known one runs the new one only, answers in order.
            mixed = await client.post("/classify", files=files(B, A))
            assert mixed.headers["x-cache"] == "miss"
            assert mixed.json()["results"] == (await reference.post("/classify", files=files(B, A))).json()["results"]
            metrics = (await client.get("/metrics")).text
            assert batches_run(metrics) == ran + 1
            assert counter(metrics, "resnest_cache_hits_total") == 6  # A five times alone, once beside B
            assert counter(metrics, "resnest_cache_misses_total") == 2  # A first, then B
            # Plain servers say nothing about a cache they do not have.
            assert "x-cache" not in (await reference.post("/classify", files=files(A))).headers

    run(go())


def test_the_cache_holds_at_most_its_bytes_least_recently_used_first(tiny_onnx: Path) -> None:
    """Room for two entries: a third evicts the one used longest ago, which then misses; the others hit."""

    async def go() -> None:
        # One entry: 1000 logits and 2048 embedding floats (tiny model) and its overhead, 12,392 bytes.
        app = create_app(settings(model_path=tiny_onnx, cache_bytes=26_000))
        async with app_client(app) as client:
            for image in (A, B):
                assert (await client.post("/embed", files=files(image))).headers["x-cache"] == "miss"
            assert (await client.post("/embed", files=files(A))).headers["x-cache"] == "hit"  # A is now newest
            assert (await client.post("/embed", files=files(C))).headers["x-cache"] == "miss"  # evicts B
            assert (await client.post("/embed", files=files(A))).headers["x-cache"] == "hit"
            assert (await client.post("/embed", files=files(B))).headers["x-cache"] == "miss"
            metrics = (await client.get("/metrics")).text
            held = float(re.search(r"^resnest_cache_bytes (\S+)$", metrics, re.MULTILINE).group(1))  # type: ignore[union-attr]
            assert held == 2 * 12_392

    run(go())


def test_a_client_tensor_is_keyed_by_its_values_and_a_reload_misses(tmp_path: Path, tiny_onnx: Path) -> None:
    """Preprocessed FP32 tensors hit only for the same values; loading the model again drops its entries."""
    root = tmp_path / "repo"
    (root / "tiny" / "1").mkdir(parents=True)
    shutil.copy(tiny_onnx, root / "tiny" / "1" / "model.onnx")
    tensor = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)

    def fp32(values: np.ndarray) -> dict[str, Any]:
        return {"inputs": [{"name": "images", "shape": list(values.shape), "datatype": "FP32",
                            "data": values.reshape(-1).tolist()}]}  # fmt: skip

    async def go() -> None:
        app = create_app(settings(model_repository=root, model_control=True, control_key=CONTROL_KEY,
                                  cache_bytes=2**20))  # fmt: skip
        async with app_client(app) as client:

            async def cache_of(body: dict[str, Any]) -> str:
                response = await client.post("/v2/models/tiny/infer", json=body)
                assert response.status_code == 200, response.text
                return response.json()["parameters"]["cache"]  # type: ignore[no-any-return]

            assert await cache_of(fp32(tensor)) == "miss"
            assert await cache_of(fp32(tensor)) == "hit"
            changed = tensor.copy()
            changed[0, 0, 0, 0] += 1e-3
            assert await cache_of(fp32(changed)) == "miss"
            assert await cache_of(oip_bytes([A])) == "miss"
            assert await cache_of(oip_bytes([A])) == "hit"
            load = await client.post("/v2/repository/models/tiny/load",
                                     headers={"Authorization": f"Bearer {CONTROL_KEY}"})  # fmt: skip
            assert load.status_code == 200, load.text
            assert await cache_of(fp32(tensor)) == "miss"  # the reloaded model's answers are not assumed
            assert await cache_of(oip_bytes([A])) == "miss"
            assert await cache_of(oip_bytes([A])) == "hit"

    run(go())


# -- Redis, shared by replicas ---------------------------------------------------------------------------------
def redis_binary() -> str:
    return required_binary("redis-server", ("/usr/bin/redis-server",), "redis", "redis-server")


@contextlib.contextmanager
def redis_server(port: int, folder: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis of our own on loopback, without persistence, stopped at the block's end."""
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _answers(port), timeout=20)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_keys(port: int) -> list[bytes]:
    import redis

    client = redis.Redis(port=port)
    try:
        return list(client.scan_iter(match="resnest:*"))
    finally:
        client.close()


def test_replicas_share_redis_and_answer_while_it_is_gone(server_factory, tmp_path: Path, tiny_onnx: Path) -> None:  # type: ignore[no-untyped-def]
    """Replica B hits what replica A stored, with A's answer; A's reload drops the keys for both; Redis killed
    in the middle of a load: every request is still answered (by the model) and the failures are counted;
    Redis back: hits again."""
    port = free_port()
    root = tmp_path / "repo"
    (root / "tiny" / "1").mkdir(parents=True)
    shutil.copy(tiny_onnx, root / "tiny" / "1" / "model.onnx")
    env = {
        "RESNEST_MODEL_REPOSITORY": str(root), "RESNEST_CACHE_URL": f"redis://127.0.0.1:{port}/0",
        "RESNEST_MODEL_CONTROL": "true", "RESNEST_CONTROL_KEY": CONTROL_KEY, "RESNEST_GRPC_ENABLED": "false",
    }  # fmt: skip
    with redis_server(port, tmp_path) as redis_proc:
        a, b = server_factory(env), server_factory(env)
        to_a, to_b = httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)
        stored = to_a.post("/classify", files=files(A, B))
        assert stored.status_code == 200 and stored.headers["x-cache"] == "miss"
        assert len(redis_keys(port)) == 2
        shared = to_b.post("/classify", files=files(A, B))
        assert shared.headers["x-cache"] == "hit"
        assert shared.json()["results"] == stored.json()["results"]
        assert counter(to_b.get("/metrics").text, "resnest_cache_hits_total") == 2

        # A reload on A drops the model's entries for every replica.
        load = to_a.post("/v2/repository/models/tiny/load", headers={"Authorization": f"Bearer {CONTROL_KEY}"})
        assert load.status_code == 200, load.text
        assert redis_keys(port) == []
        assert to_b.post("/classify", files=files(A)).headers["x-cache"] == "miss"

        # Three clients, eight requests each, on both replicas; Redis is killed once a few are answered.
        answered: list[int] = []

        def client(index: int) -> None:
            with httpx.Client(base_url=(a if index % 2 else b).url, timeout=60) as http:
                for i in range(8):
                    answered.append(http.post("/classify", files=files((A, B, C)[(i + index) % 3])).status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answered) >= 4, timeout=60)
        redis_proc.kill()
        for thread in threads:
            thread.join(timeout=120)
    assert answered == [200] * 24
    errors = counter(to_a.get("/metrics").text, "resnest_cache_errors_total")
    errors += counter(to_b.get("/metrics").text, "resnest_cache_errors_total")
    assert errors >= 1

    with redis_server(port, tmp_path):
        time.sleep(1.2)  # past the second for which a failure keeps the cache skipped
        assert to_a.post("/classify", files=files(C)).headers["x-cache"] == "miss"
        assert to_a.post("/classify", files=files(C)).headers["x-cache"] == "hit"
    to_a.close()
    to_b.close()
