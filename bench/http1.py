"""A lean HTTP/1.1 client for the load generator: requests encoded once, sent over keep-alive connections.

The load generator shares the machine's cores with the server it measures, so every millisecond of client CPU
is one the server could not use. httpx parses and writes HTTP/1.1 in Python (h11) and builds a multipart body
per request; measured on one 2-core VM against one server, one client's round trip on the tiny model was
1.2-1.8 ms longer through httpx than through a socket writing the same bytes, more than the multipart route
itself costs over gRPC (whose client works in C). Load generators built for measuring servers (wrk,
perf_analyzer) likewise prepare their requests up front and parse only what they need of the answer: the
status, the body's length (Content-Length or chunked), and whether the connection stays open.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass

_MAX_HEAD = 64 * 1024  # bytes of status line and headers accepted in an answer


class ResponseError(Exception):
    """An answer that is not HTTP/1.1 this client can read."""


def request_bytes(method: str, target: str, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """One request as it goes on the wire: `target` is the path with its query, `body` sent with its length."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def target_of(path: str, params: dict[str, object]) -> str:
    """`path` with `params` added to the query it may already carry."""
    base, _, query = path.partition("?")
    pairs = [*urllib.parse.parse_qsl(query), *((k, str(v)) for k, v in params.items())]
    return f"{base}?{urllib.parse.urlencode(pairs)}" if pairs else base


@dataclass(frozen=True)
class Response:
    """What the load generator reads of an answer."""

    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class Connection:
    """One keep-alive connection, opened on first use and again after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> Response:
        """Send one encoded request and read its whole answer. A connection the server had closed while idle
        is reopened and the request sent once more (as browsers and httpx do for keep-alive races)."""
        fresh = self._writer is None
        if fresh:
            await self._open()
        try:
            return await self._exchange(raw)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            if fresh:
                raise
        except BaseException:  # an answer half read (or a cancelled wait) leaves the connection unusable
            self.close()
            raise
        await self._open()
        try:
            return await self._exchange(raw)
        except BaseException:
            self.close()
            raise

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=_MAX_HEAD)

    async def _exchange(self, raw: bytes) -> Response:
        assert self._reader is not None and self._writer is not None
        self._writer.write(raw)
        await self._writer.drain()
        reader = self._reader
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ResponseError(f"not an HTTP/1.x status line: {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:  # the body runs to the end of the connection
            body = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(int(parts[1]), headers, body)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        """A chunked body: size lines (hex, extensions ignored), chunks, then trailers up to an empty line."""
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
