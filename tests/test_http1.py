"""The load generator's lean HTTP/1.1 client (bench/http1.py): every way a server frames an answer, keep-alive
and its races, and the same answers from the service as httpx gets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from bench.forms import content_type, files, images
from bench.http1 import Connection, ResponseError, request_bytes, target_of
from tests.conftest import ServerProcess

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length framed, as the client sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + await reader.readexactly(length)


async def _serve(handler: Handler, exchange: Callable[[int], Awaitable[None]]) -> None:
    """Run `exchange(port)` against a loopback server that hands each connection to `handler`."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        await asyncio.wait_for(exchange(server.sockets[0].getsockname()[1]), 10)
    finally:
        server.close()


def test_request_bytes_frame_a_post_with_its_length_and_the_query_is_kept() -> None:
    raw = request_bytes("POST", target_of("/explain?pictures=false", {"top_k": 5}), "h:1", {"x-a": "b"}, b"abc")
    assert (
        raw == b"POST /explain?pictures=false&top_k=5 HTTP/1.1\r\nHost: h:1\r\nx-a: b\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert target_of("/classify", {}) == "/classify"


def test_content_length_chunked_and_to_the_end_of_the_connection() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    ]
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for answer in answers:
            await _read_request(reader)
            writer.write(answer)
            await writer.drain()
        writer.close()

    async def exchange(port: int) -> None:
        connection = Connection("127.0.0.1", port)
        got = [await connection.request(request_bytes("POST", "/", "x", {}, b"body")) for _ in answers]
        connection.close()
        assert [(r.status, r.body) for r in got] == [(200, b"hello"), (201, b"abcde"), (503, b"until the end")]
        assert got[1].headers["transfer-encoding"] == "chunked"

    asyncio.run(_serve(handler, exchange))
    assert connections == 1  # kept alive across the framed answers


def test_a_connection_the_server_closed_is_reopened_and_the_request_sent_once_more() -> None:
    served: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await _read_request(reader))
        # Answers once, then closes as an idle keep-alive connection's server may, without saying so.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def exchange(port: int) -> None:
        connection = Connection("127.0.0.1", port)
        for i in range(3):
            response = await connection.request(request_bytes("POST", f"/{i}", "x", {}, b"."))
            assert (response.status, response.body) == (200, b"ok")
            await asyncio.sleep(0.05)  # the server's close reaches the client while it is idle
        connection.close()

    asyncio.run(_serve(handler, exchange))
    assert [r.split(b" ")[1] for r in served] == [b"/0", b"/1", b"/2"]  # each sent and answered once


def test_what_is_not_http_is_an_error_not_an_answer() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    async def exchange(port: int) -> None:
        with pytest.raises(ResponseError):
            await Connection("127.0.0.1", port).request(request_bytes("GET", "/", "x", {}))

    asyncio.run(_serve(handler, exchange))


def test_a_server_that_never_answers_fails_the_request_on_a_fresh_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def exchange(port: int) -> None:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await Connection("127.0.0.1", port).request(request_bytes("POST", "/", "x", {}, b"."))

    asyncio.run(_serve(handler, exchange))


def test_the_service_answers_the_lean_client_as_it_answers_httpx(
    server_factory: Callable[[dict[str, str]], ServerProcess], tiny_onnx: Path, photos: list[tuple[str, bytes]]
) -> None:
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx)})
    host, port = server.wait_listening()
    blobs = [data for _, data in photos[:2]]
    raw = request_bytes("POST", "/classify?top_k=3", f"{host}:{port}", {"content-type": content_type()}, images(*blobs))

    async def lean() -> list[tuple[int, bytes]]:
        connection = Connection(host, port)
        try:  # twice on one connection: kept alive between them
            return [((r := await connection.request(raw)).status, r.body) for _ in range(2)]
        finally:
            connection.close()

    answers = asyncio.run(lean())
    expected = httpx.post(f"{server.url}/classify", files=files(*blobs), params={"top_k": 3}, timeout=30)
    assert expected.status_code == 200
    for status, body in answers:
        assert status == 200
        assert [r["predictions"] for r in json.loads(body)["results"]] == [
            r["predictions"] for r in expected.json()["results"]
        ]
