"""Answers given before the body was read reach their clients: no connection reset instead of a 413/415/429."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from bench.forms import content_type, opening
from service.http.middleware import LingeringCloseMiddleware
from tests.conftest import run, send_raw

MULTIPART = content_type()


def test_refusals_reach_connection_close_clients_that_sent_large_bodies(server_factory, tiny_onnx: Path) -> None:
    limit = 2**20
    server = server_factory({"RESNEST_MODEL_PATH": str(tiny_onnx), "RESNEST_MAX_UPLOAD_BYTES": str(limit)})
    # Far past the socket buffers: most of it is still unread when the answer goes out.
    body = opening() + b"\xff" * (3 * limit)
    cases = {
        "415": (f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n", body),
        "413 declared": (f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n", body),
        "413 streamed": (
            f"Content-Type: {MULTIPART}\r\nTransfer-Encoding: chunked\r\n",
            b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [body[i : i + 2**16] for i in range(0, len(body), 2**16)])
            + b"0\r\n\r\n",
        ),
    }
    seen: dict[str, list[str]] = {}
    for name, (headers, payload) in cases.items():
        head = f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n"
        seen[name] = [run(send_raw(server.port, head.encode() + payload)).status for _ in range(8)]
    print(f"\nrefusals to Connection: close clients with {len(body) >> 20} MiB bodies: {seen}")
    assert seen == {name: [int(name[:3])] * 8 for name in cases}


async def drive(
    app_status: int,
    chunks: list[bytes],
    headers: dict[str, str],
    seconds: float = 5.0,
    max_bytes: int = 1 << 30,
    stall: bool = False,
) -> tuple[list[Message], int, float]:
    """Run the middleware around an app that answers at once without reading; return what the server was sent,
    how many body chunks were consumed, and how long the exchange took."""
    consumed = 0

    async def receive() -> Message:
        nonlocal consumed
        if consumed == len(chunks):
            if stall:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}
        consumed += 1
        return {"type": "http.request", "body": chunks[consumed - 1], "more_body": consumed < len(chunks) or stall}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": app_status, "headers": []})
        await send({"type": "http.response.body", "body": b"refused"})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    started = time.monotonic()
    # The outer timeout only stops a hang (a middleware that ignored its limit would wait on a stalled client).
    await asyncio.wait_for(
        LingeringCloseMiddleware(app, seconds=seconds, max_bytes=max_bytes)(scope, receive, send), 60
    )
    return sent, consumed, time.monotonic() - started


def test_the_answer_goes_out_at_once_and_its_end_after_the_body() -> None:
    sent, consumed, _ = run(drive(415, [b"x" * 100] * 5, {"content-length": "500"}))
    assert consumed == 5
    assert [m.get("body") for m in sent] == [None, b"refused", b""]
    assert [m.get("more_body", False) for m in sent] == [False, True, False]


def test_discarding_stops_at_the_byte_limit() -> None:
    sent, consumed, _ = run(drive(413, [b"x" * 1000] * 50, {"content-length": "50000"}, max_bytes=10_000))
    assert consumed == 11  # the chunk that passes the limit is the last one read
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_discarding_stops_at_the_time_limit_when_the_client_stalls() -> None:
    # Two limits in one run: each exchange lasts at least its own limit, and the shorter one ends before the
    # longer limit would have, so it is the limit given that ends the wait (not a default, nor the client).
    short, long = 0.1, 0.5
    ends: dict[float, float] = {}
    for seconds in (short, long):
        sent, consumed, elapsed = run(drive(429, [b"x"], {"content-length": "10"}, seconds=seconds, stall=True))
        assert consumed == 1
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        ends[seconds] = elapsed
    assert short <= ends[short] < long <= ends[long], ends


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-length": "0"}, {"content-length": "500", "expect": "100-continue"}],
    ids=["no body", "empty body", "waiting for 100 Continue"],
)
def test_nothing_to_discard_ends_the_answer_at_once(headers: dict[str, str]) -> None:
    sent, consumed, _ = run(drive(415, [b"x" * 100] * 5, headers))
    assert consumed == 0
    assert [m.get("more_body", False) for m in sent] == [False, False]
