"""Hostile and unusual input against a real server: every case gets its documented answer and changes nothing.

The corpus is generated here (nothing binary is committed): broken, crafted and exotic images, decompression
bombs whose headers claim huge sizes, malformed multipart bodies, wrong content types and bad parameters. Each
case carries the (status, code) the error table in service/core/errors.py documents for it; none may be a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import io
import itertools
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from PIL import Image

from bench.forms import BOUNDARY, Part, content_type, multipart
from imaging.transforms import preprocess
from modelcard import ModelCard
from service.core.request.postprocess import softmax
from service.core.settings import Settings
from service.http.app import create_app
from tests.conftest import ROOT, ServerProcess, app_client, jpeg, run
from tests.fakes import FakeModel

MAX_PIXELS = 4_000_000
MAX_IMAGES = 4
MULTIPART = content_type()
SVG = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect width='10' height='10'/></svg>"


# --- building blocks ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic textured image: distinct seeds give distinct model inputs."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = (np.arange(w, dtype=np.uint16)[None, :, None] * 255 // max(w - 1, 1)).astype(np.uint8)
    return Image.fromarray(base // 2 + ramp // 2).convert(mode)


def image_part(data: bytes, ctype: str | None = "image/jpeg", filename: str = "upload.bin") -> bytes:
    return multipart([Part(data, filename=filename, ctype=ctype)])


# --- crafted headers: tiny files that claim enormous images --------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """IHDR (8-bit RGB) claiming width x height with a valid CRC, one tiny IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 7))
        + png_chunk(b"IEND", b"")
    )


def png_bomb_zlib(side: int = 20_000) -> bytes:
    """A fully valid 1-bit PNG: ~50 KB on the wire, 400 M pixels (1.2 GB as RGB) once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A real baseline JPEG whose SOF0 segment is patched to claim width x height."""
    data = bytearray(encode(noise((16, 16), 1), "JPEG"))
    pos = 2
    while data[pos + 1] != 0xC0:
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """GIF89a with a 65535x65535 logical screen and image descriptor, a 2-colour table and a tiny LZW stream."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x02\x02\x44\x01\x00" + b";"


def webp_bomb() -> bytes:
    """A lossy WebP whose VP8 key frame claims the largest size VP8 can express, 16383x16383."""
    data = bytearray(encode(noise((16, 16), 2), "WEBP", quality=50))
    start = data.find(b"\x9d\x01\x2a")
    data[start + 3 : start + 7] = struct.pack("<HH", 16383, 16383)
    return bytes(data)


def tiff_bomb() -> bytes:
    """A little-endian TIFF whose ImageWidth/ImageLength tags claim 100000x100000."""
    data = bytearray(encode(Image.new("L", (4, 4), 7), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):
            assert kind == 4, "LONG expected"
            data[entry + 8 : entry + 12] = struct.pack("<I", 100_000)
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(encode(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", 30_000, 30_000)
    return bytes(data)


BOMBS = {
    "PNG IHDR 100000x100000": png_bomb_header,
    "PNG zlib 20000x20000 1-bit": png_bomb_zlib,
    "JPEG SOF0 60000x60000": jpeg_bomb,
    "GIF 65535x65535": gif_bomb,
    "WebP VP8 16383x16383": webp_bomb,
    "TIFF 100000x100000": tiff_bomb,
    "BMP 30000x30000": bmp_bomb,
}


# --- valid but unusual images ------------------------------------------------------------------------------------


def animated_gif() -> bytes:
    frames = [noise((40, 30), 10 + i).convert("P") for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_png_with_transparency() -> bytes:
    img = noise((33, 21), 11).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def png16() -> bytes:
    arr = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 37 % 65536).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return encode(img, "PNG")


def jpeg_with_orientation() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise((50, 30), 12), "JPEG", exif=exif.tobytes())


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


PHOTO_JPEG = encode(noise((256, 192), 3), "JPEG", quality=90)
PHOTO_PNG = encode(noise((128, 96), 4), "PNG")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


# --- the corpus --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A request and the answer the error table documents for it (code None: 200)."""

    name: str
    status: int
    code: str | None
    body: bytes = b""
    ctype: str | None = MULTIPART
    path: str = "/classify"
    method: str = "POST"
    images: int = 1  # for 200s: results expected

    def send(self, client: httpx.Client) -> httpx.Response:
        headers = {"content-type": self.ctype} if self.ctype is not None else {}
        return client.request(self.method, self.path, content=self.body, headers=headers)


def ok(name: str, data: bytes, ctype: str = "image/jpeg", path: str = "/classify") -> Case:
    return Case(name, 200, None, image_part(data, ctype), path=path)


def bad(name: str, data: bytes, status: int, code: str, ctype: str | None = "image/jpeg", filename: str = "x") -> Case:
    return Case(name, status, code, image_part(data, ctype, filename))


def corpus() -> list[Case]:
    good = jpeg()
    cases = [
        # -- broken images: 400 invalid_image
        bad("empty upload", b"", 400, "invalid_image"),
        bad("random bytes", np.random.default_rng(0).bytes(4096), 400, "invalid_image"),
        bad("truncated JPEG", truncated(PHOTO_JPEG), 400, "invalid_image"),
        bad("truncated PNG", truncated(PHOTO_PNG), 400, "invalid_image", "image/png"),
        bad("JPEG header only", PHOTO_JPEG[:300], 400, "invalid_image"),
        bad("PNG signature only", b"\x89PNG\r\n\x1a\n", 400, "invalid_image", "image/png"),
        bad("text file named .jpg", b"just some text, honest\n" * 20, 400, "invalid_image", filename="notes.jpg"),
        bad("HTML as image/png", b"<html><script>alert(1)</script></html>", 400, "invalid_image", "image/png"),
        bad("SVG as application/octet-stream", SVG, 400, "invalid_image", "application/octet-stream"),
        bad("SVG without a part content type", SVG, 400, "invalid_image", None),
        # -- formats Pillow knows but the service refuses, and refused declared types: 415
        bad("SVG as image/svg+xml", SVG, 415, "unsupported_media_type", "image/svg+xml"),
        bad("JPEG declared text/plain", good, 415, "unsupported_media_type", "text/plain"),
        bad("ICO", encode(noise((32, 32), 5), "ICO"), 415, "unsupported_media_type", "image/x-icon"),
        bad(
            "ICO as octet-stream",
            encode(noise((32, 32), 5), "ICO"),
            415,
            "unsupported_media_type",
            "application/octet-stream",
        ),
        bad(
            "PPM as octet-stream",
            encode(noise((8, 8), 6), "PPM"),
            415,
            "unsupported_media_type",
            "application/octet-stream",
        ),
        bad(
            "EPS (would run Ghostscript) as octet-stream",
            EPS,
            415,
            "unsupported_media_type",
            "application/octet-stream",
        ),
        # -- valid images of every accepted kind: 200
        ok("animated GIF (first frame)", animated_gif(), "image/gif"),
        ok("CMYK JPEG", encode(noise((40, 30), 7, "CMYK"), "JPEG")),
        ok("16-bit PNG", png16(), "image/png"),
        ok("palette PNG with transparency", palette_png_with_transparency(), "image/png"),
        ok("LA PNG", encode(noise((20, 20), 8, "LA"), "PNG"), "image/png"),
        ok("greyscale JPEG", encode(noise((30, 40), 9, "L"), "JPEG")),
        ok("progressive JPEG", encode(noise((64, 48), 13), "JPEG", progressive=True)),
        ok("JPEG with EXIF orientation", jpeg_with_orientation()),
        ok("1x1 PNG", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), "image/png"),
        ok("1x1 JPEG", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "JPEG")),
        ok("WebP lossy", encode(noise((40, 30), 14), "WEBP", quality=80), "image/webp"),
        ok("WebP lossless RGBA", encode(noise((40, 30), 15, "RGBA"), "WEBP", lossless=True), "image/webp"),
        ok("TIFF", encode(noise((40, 30), 16), "TIFF"), "image/tiff"),
        ok("TIFF LZW", encode(noise((40, 30), 17), "TIFF", compression="tiff_lzw"), "image/tiff"),
        ok("BMP", encode(noise((40, 30), 18), "BMP"), "image/bmp"),
        ok("PNG declared image/jpeg", PHOTO_PNG, "image/jpeg"),
        ok("part type with parameters and capitals", good, "IMAGE/JPEG; charset=binary"),
        ok("JPEG on /embed", good, path="/embed?normalize=true"),
        Case("path-like filename", 200, None, multipart([Part(good, filename="../../etc/passwd")])),
        Case(
            "extra text field beside the image",
            200,
            None,
            multipart([Part(b"hello", name="note", filename=None), Part(good)]),
        ),
        # -- bombs: 413 image_too_large before any pixel is decoded
        *[
            bad(f"bomb: {name}", make(), 413, "image_too_large", "application/octet-stream")
            for name, make in BOMBS.items()
        ],
        # -- form shape
        Case("wrong field name 'image'", 422, "invalid_parameter", multipart([Part(good, name="image")])),
        Case("wrong field name 'file'", 422, "invalid_parameter", multipart([Part(good, name="file")])),
        Case(
            "no file parts: a text field only",
            422,
            "invalid_parameter",
            multipart([Part(b"hello", name="note", filename=None)]),
        ),
        Case(
            "'images' as a text field",
            422,
            "invalid_parameter",
            multipart([Part(b"not a file", filename=None, ctype=None)]),
        ),
        Case("file part without a filename", 422, "invalid_parameter", multipart([Part(good, filename=None)])),
        Case("too many files", 413, "too_many_images", multipart([Part(good)] * (MAX_IMAGES + 1))),
        Case("too many files, all empty", 413, "too_many_images", multipart([Part(b"")] * (MAX_IMAGES + 3))),
        # -- query parameters
        *[
            Case(f"top_k={v!r}", 422, "invalid_parameter", image_part(good), path=f"/classify?top_k={v}")
            for v in ("0", "-1", "10000", "abc", "1.5", "")
        ],
        Case("normalize='maybe'", 422, "invalid_parameter", image_part(good), path="/embed?normalize=maybe"),
        # -- malformed multipart: 400 malformed_request
        Case("bad boundary", 400, "malformed_request", multipart([Part(good)], boundary="another-boundary")),
        Case("missing final boundary", 400, "malformed_request", multipart([Part(good)], close=False)),
        Case(
            "missing final boundary, two images",
            400,
            "malformed_request",
            multipart([Part(good), Part(PHOTO_PNG, ctype="image/png")], close=False),
        ),
        Case("body cut inside a part", 400, "malformed_request", multipart([Part(PHOTO_JPEG)])[:-900]),
        Case(
            "part headers never end",
            400,
            "malformed_request",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"'.encode(),
        ),
        Case("empty body", 400, "malformed_request", b""),
        Case("garbage body", 400, "malformed_request", np.random.default_rng(1).bytes(3000)),
        Case("no boundary parameter", 400, "malformed_request", multipart([Part(good)]), ctype="multipart/form-data"),
        Case(
            "part without Content-Disposition",
            400,
            "malformed_request",
            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\nxx\r\n--{BOUNDARY}--\r\n".encode(),
        ),
        Case(
            "2000 form fields",
            400,
            "malformed_request",
            multipart([Part(b"x", name="f", filename=None, ctype=None)] * 2000 + [Part(good)]),
        ),
        Case(
            "2 MB text field",
            400,
            "malformed_request",
            multipart([Part(b"x" * 2_000_000, name="f", filename=None, ctype=None), Part(good)]),
        ),
        Case("100 KB part header", 400, "malformed_request", multipart([Part(good, filename="a" * 100_000)])),
        # -- wrong request content types: 415
        Case("application/json", 415, "unsupported_media_type", b'{"images": []}', ctype="application/json"),
        Case("text/plain", 415, "unsupported_media_type", b"images", ctype="text/plain"),
        Case(
            "form-urlencoded", 415, "unsupported_media_type", b"images=a.jpg", ctype="application/x-www-form-urlencoded"
        ),
        Case("no content type", 415, "unsupported_media_type", image_part(good), ctype=None),
        Case(
            "multipart/mixed",
            415,
            "unsupported_media_type",
            image_part(good),
            ctype=f"multipart/mixed; boundary={BOUNDARY}",
        ),
        Case("image/jpeg body", 415, "unsupported_media_type", good, ctype="image/jpeg"),
        # -- routes and methods
        Case("GET /classify", 405, "method_not_allowed", method="GET", ctype=None),
        Case("POST /nowhere", 404, "not_found", image_part(good), path="/nowhere"),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CORPUS = corpus()


# --- checks on every answer --------------------------------------------------------------------------------------


def _versions() -> list[str]:
    found = [sys.version.split()[0]]
    for dist in (
        "pillow",
        "numpy",
        "onnxruntime-gpu",
        "onnxruntime",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "pydantic-core",
        "python-multipart",
        "orjson",
        "prometheus-client",
        "httptools",
        "uvloop",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(importlib.metadata.version(dist))
    return found


LEAKS = ["/work", "/tmp", "/usr/", "/home", "site-packages", "Traceback", 'File "', "Error:", str(ROOT), *_versions()]


def assert_no_leak(r: httpx.Response, what: str) -> None:
    """Nothing about the server's internals: paths, versions, stack traces, exception names."""
    texts = [r.text, *(f"{k}: {v}" for k, v in r.headers.items())]
    for text in texts:
        for leak in LEAKS:
            assert leak not in text, f"{what}: {leak!r} leaked in {text[:300]!r}"
        assert not re.search(r"\b[A-Z][a-zA-Z]+(Error|Exception)\b", text), f"{what}: exception name in {text[:300]!r}"


def check(case: Case, r: httpx.Response) -> None:
    what = f"{case.name}: {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, what
    assert r.status_code == case.status, what
    rid = r.headers["x-request-id"]
    if case.code is None:
        body = r.json()
        assert len(body["results"]) == case.images, what
        return
    assert r.headers["content-type"].startswith("application/json"), what
    body = r.json()
    assert set(body) == {"error", "request_id"} and set(body["error"]) == {"code", "message"}, what
    assert body["error"]["code"] == case.code, what
    assert body["request_id"] == rid, what
    assert_no_leak(r, case.name)


# --- the server --------------------------------------------------------------------------------------------------


@dataclass
class Live:
    server: ServerProcess
    client: httpx.Client
    normal: list[tuple[str, bytes]] = field(default_factory=list)  # (path, body) of the reference requests
    before: list[object] = field(default_factory=list)  # their answers before any corpus case ran

    def normal_answers(self) -> list[object]:
        return [
            self.client.post(path, content=body, headers={"content-type": MULTIPART}).json()
            for path, body in self.normal
        ]


@pytest.fixture(scope="module")
def live(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One real server for the module; the reference answers are taken before anything hostile is sent."""
    env = {
        "RESNEST_MODEL_PATH": str(tiny_onnx),
        "RESNEST_PROVIDERS": "cpu",
        "RESNEST_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "RESNEST_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "RESNEST_MAX_BATCH_SIZE": "8",
        "RESNEST_MAX_QUEUE_DELAY_MS": "20",
        "RESNEST_DECODE_THREADS": "2",
    }
    server = ServerProcess(env, tmp_path_factory.mktemp("hardening") / "server.log")
    client = httpx.Client(timeout=30)
    try:
        server.wait_ready()
        client.base_url = httpx.URL(server.url)  # known once the server listens (it binds port 0)
        blobs = [Part(encode(noise((80, 60), 100 + i), "JPEG"), filename=f"n{i}.jpg") for i in range(3)]
        normal = [("/classify?top_k=5", multipart(blobs)), ("/embed?normalize=true", multipart(blobs))]
        state = Live(server, client, normal)
        state.before = state.normal_answers()
        yield state
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_case_gets_its_documented_answer(live: Live, case: Case) -> None:
    check(case, case.send(live.client))


def test_after_the_whole_corpus_the_server_answers_exactly_as_before(live: Live) -> None:
    # Run the whole corpus here too, so this holds whatever order (or subset) the tests run in.
    started = time.perf_counter()
    statuses = []
    for case in CORPUS:
        r = case.send(live.client)
        check(case, r)
        statuses.append(r.status_code)
    ready = live.client.get("/readyz")
    elapsed = time.perf_counter() - started
    tally = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"\ncorpus: {len(CORPUS)} cases in {elapsed:.2f}s, statuses {tally}")
    assert ready.status_code == 200, ready.text
    assert live.normal_answers() == live.before, "the same request must get the same answer after the corpus"
    assert live.server.proc.poll() is None
    assert "Traceback" not in live.server.log()


def test_closing_boundary_is_found_wherever_the_body_is_split() -> None:
    # In-process, so the body can be cut into ASGI messages at chosen offsets: the close delimiter may straddle
    # two messages, and an epilogue after it is allowed (RFC 2046); a body without it is malformed.
    app = create_app(Settings(model_path="unused.onnx", max_batch_size=4), model=FakeModel())  # type: ignore[arg-type]
    body = multipart([Part(jpeg(), filename="a.jpg"), Part(jpeg(color=(1, 2, 3)), filename="b.jpg")])
    close = body.rindex(f"--{BOUNDARY}--".encode())

    async def chunks(data: bytes, *cuts: int) -> AsyncIterator[bytes]:
        edges = [0, *cuts, len(data)]
        for a, b in itertools.pairwise(edges):
            yield data[a:b]

    async def main() -> None:
        async with app_client(app) as client:

            async def post(content: object, query: str = "?top_k=0") -> httpx.Response:
                # top_k=0 is refused (422) only after the whole body was parsed, so no inference is needed
                # to tell a complete body (422) from a cut one (400).
                return await client.post(f"/classify{query}", content=content, headers={"content-type": MULTIPART})

            for cut in range(close - 1, close + len(BOUNDARY) + 6):
                r = await post(chunks(body, cut))
                assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_parameter"), (cut, r.text)
            r = await post(chunks(body, close + 3, close + 9), query="")
            assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
            r = await post(body + b"an epilogue, ignored\r\n")
            assert r.status_code == 422, r.text
            for cut in (close, close + 5, len(body) - 3):
                r = await post(chunks(body[:cut], cut // 2))
                assert (r.status_code, r.json()["error"]["code"]) == (400, "malformed_request"), (cut, r.text)

    run(main())


def test_bad_image_in_a_multi_image_request_fails_alone_while_concurrent_requests_share_batches(
    live: Live, tiny_onnx: Path
) -> None:
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    good_requests: list[tuple[str, list[bytes]]] = []
    for i in range(24):
        blobs = [encode(noise((70 + i, 50 + j), 1000 + 10 * i + j), "JPEG") for j in range(1 + i % 3)]
        good_requests.append(("/classify?top_k=5" if i % 2 else "/embed", blobs))
    ok_img = encode(noise((60, 60), 7), "JPEG")
    bad_requests = [  # (parts, status, code, index named in the message)
        ([Part(ok_img), Part(truncated(PHOTO_JPEG)), Part(ok_img)], 400, "invalid_image", 1),
        ([Part(ok_img), Part(ok_img), Part(b"\x00" * 500)], 400, "invalid_image", 2),
        ([Part(jpeg_bomb()), Part(ok_img)], 413, "image_too_large", 0),
        ([Part(ok_img), Part(SVG, ctype="image/svg+xml")], 415, "unsupported_media_type", 1),
        ([Part(ok_img), Part(b"")], 400, "invalid_image", 1),
    ]

    def batch_figures() -> tuple[float, float]:
        """(images inferred, batches of more than one image) so far, from /metrics."""
        text = httpx.get(f"{live.server.url}/metrics").text
        figures = dict(re.findall(r'^(resnest_batch_size_(?:sum|count|bucket\{le="1.0"\})) ([0-9.e+]+)$', text, re.M))
        count, single = (
            float(figures["resnest_batch_size_count"]),
            float(figures['resnest_batch_size_bucket{le="1.0"}']),
        )
        return float(figures["resnest_batch_size_sum"]), count - single

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=live.server.url, timeout=60) as client:

            def post(path: str, parts: list[Part]) -> Awaitable[httpx.Response]:
                return client.post(path, content=multipart(parts), headers={"content-type": MULTIPART})

            coros = [
                post(path, [Part(b, filename=f"{k}.jpg") for k, b in enumerate(blobs)]) for path, blobs in good_requests
            ]
            bad_coros = [post("/classify", parts) for parts, *_ in bad_requests]
            # Interleave so the bad requests land in the middle of the good ones.
            mixed = coros[:12] + bad_coros + coros[12:]
            answers = await asyncio.gather(*mixed)
            bad_answers = answers[12 : 12 + len(bad_coros)]
            return answers[:12] + answers[12 + len(bad_coros) :], bad_answers

    inferred_before, multi_before = batch_figures()
    good_answers, bad_answers = run(main())
    inferred_after, multi_after = batch_figures()
    inferred, multi = inferred_after - inferred_before, multi_after - multi_before
    for (_, status, code, index), r in zip(bad_requests, bad_answers, strict=True):
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.json()["error"]["message"].startswith(f"image {index}:"), r.text
    for (path, blobs), r in zip(good_requests, good_answers, strict=True):
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["filename"] for x in results] == [f"{k}.jpg" for k in range(len(blobs))]
        for blob, result in zip(blobs, results, strict=True):
            x = preprocess(blob, card.preprocess, MAX_PIXELS)[None]
            logits, embedding = session.run(["logits", "embedding"], {"images": x})
            if path == "/embed":
                np.testing.assert_allclose(result["embedding"], embedding[0], rtol=1e-4, atol=1e-5)
            else:
                probs = softmax(logits)[0]
                got = result["predictions"]
                np.testing.assert_allclose([p["score"] for p in got], probs[[p["index"] for p in got]], rtol=1e-4)
                np.testing.assert_allclose([p["score"] for p in got], np.sort(probs)[::-1][:5], rtol=1e-4)
    good_images = sum(len(blobs) for _, blobs in good_requests)
    print(
        f"\n{len(good_requests)} good + {len(bad_requests)} bad concurrent requests: {inferred:.0f} images inferred "
        f"({good_images} good), {multi:.0f} batches of more than one image"
    )
    assert inferred == good_images, "no image of a refused request may reach the model"
    assert multi >= 1, "the concurrent requests must share batches"


def test_bombs_are_refused_before_decoding_in_bounded_time_and_memory(live: Live) -> None:
    proc = psutil.Process(live.server.proc.pid)
    bodies = {name: image_part(make(), "application/octet-stream") for name, make in BOMBS.items()}
    # The yardstick, measured on this server in this run: a small photo that is decoded and inferred. A bomb
    # refused from its header costs less than that; one decoded first costs seconds (hundreds of Mpixels).
    photo = image_part(PHOTO_JPEG)
    with httpx.Client(base_url=live.server.url, timeout=30) as client:
        client.post("/classify", content=bodies["JPEG SOF0 60000x60000"], headers={"content-type": MULTIPART})
        rss_before = proc.memory_info().rss
        worst: dict[str, float] = {}
        served: list[float] = []
        for _ in range(3):
            started = time.perf_counter()
            assert client.post("/classify", content=photo, headers={"content-type": MULTIPART}).status_code == 200
            served.append(time.perf_counter() - started)
            for name, body in bodies.items():
                started = time.perf_counter()
                r = client.post("/classify", content=body, headers={"content-type": MULTIPART})
                elapsed = time.perf_counter() - started
                assert (r.status_code, r.json()["error"]["code"]) == (413, "image_too_large"), f"{name}: {r.text}"
                worst[name] = max(worst.get(name, 0.0), elapsed)
        rss_after = proc.memory_info().rss

    async def burst(body_list: list[bytes]) -> tuple[list[int], float]:
        async with httpx.AsyncClient(base_url=live.server.url, timeout=30) as client:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *[client.post("/classify", content=body, headers={"content-type": MULTIPART}) for body in body_list]
            )
            return [a.status_code for a in answers], time.perf_counter() - started

    statuses, burst_s = run(burst(list(bodies.values()) * 4))
    rss_burst = proc.memory_info().rss
    served_statuses, served_burst_s = run(burst([photo] * len(statuses)))
    growth = (max(rss_after, rss_burst) - rss_before) / 2**20
    print("\nbombs (worst of 3, ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in worst.items()))
    print(
        f"bombs: {len(statuses)} concurrent in {burst_s * 1e3:.0f} ms, as many photos served in "
        f"{served_burst_s * 1e3:.0f} ms (one alone: at most {max(served) * 1e3:.1f} ms); server RSS "
        f"{rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} after 21 sequential, "
        f"{rss_burst / 2**20:.1f} after the burst (growth {growth:+.1f} MiB)"
    )
    assert statuses == [413] * len(statuses) and served_statuses == [200] * len(statuses)
    assert max(worst.values()) < 5 * max(served), "a bomb must be refused about as fast as a photo is served"
    assert burst_s < 3 * served_burst_s, "a burst of bombs must be refused faster than as many photos are served"
    assert growth < 16, f"RSS grew by {growth:.1f} MiB: a bomb was decoded"


class Listener:
    """A TCP listener on loopback that counts the connections it is offered (it must see none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_the_service_never_fetches_urls_on_behalf_of_clients(live: Live) -> None:
    listener = Listener()
    try:
        url = f"http://127.0.0.1:{listener.port}/cat.jpg"
        svg = f"<svg xmlns='http://www.w3.org/2000/svg' xmlns:xlink='http://www.w3.org/1999/xlink'><image href='{url}' xlink:href='{url}' width='9' height='9'/></svg>".encode()  # noqa: E501
        good = jpeg()
        attempts = [  # (path, parts, expected status)
            ("/classify", [Part(url.encode(), filename=None, ctype=None)], 422),
            ("/classify", [Part(url.encode(), name="url", filename=None, ctype=None), Part(good)], 200),
            ("/classify", [Part(url.encode(), name="image_url", filename=None, ctype=None)], 422),
            ("/classify", [Part(url.encode(), ctype="text/uri-list")], 415),
            ("/classify", [Part(url.encode(), ctype="image/jpeg")], 400),
            ("/classify", [Part(url.encode(), ctype="message/external-body; access-type=URL; URL=" + url)], 415),
            ("/classify", [Part(svg, ctype="application/octet-stream")], 400),
            ("/classify", [Part(svg, ctype="image/svg+xml")], 415),
            ("/classify", [Part(good, filename=url)], 200),
            (f"/classify?url={url}&image_url={url}", [Part(good)], 200),
            (f"/embed?url={url}", [Part(url.encode(), filename=None, ctype=None)], 422),
        ]
        with httpx.Client(base_url=live.server.url, timeout=30) as client:
            for path, parts, status in attempts:
                r = client.post(path, content=multipart(parts), headers={"content-type": MULTIPART})
                assert r.status_code == status, f"{path} {parts[0].data[:40]!r}: {r.text}"
                if status != 200:
                    assert_no_leak(r, path)
            r = client.post(
                "/classify", files={"images": ("a.jpg", good, "image/jpeg")}, headers={"referer": url, "link": url}
            )
            assert r.status_code == 200
        time.sleep(0.5)  # anything the server had started would have connected by now
        print(f"\nURL-fetch attempts: {len(attempts) + 1} requests, {listener.connections} connections to the listener")
        assert listener.connections == 0
    finally:
        listener.close()


WELL_FORMED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # as documented in service/core/logs.py


def raw_request(port: int, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Send bytes exactly as given and read the whole answer (the request says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return status, headers, body


def test_request_ids_are_echoed_only_when_well_formed_even_when_hostile(live: Live) -> None:
    # Header injection attempts, sent byte for byte (httpx refuses to send most of them, which is right for
    # a client, so they go over a raw socket). A value the HTTP parser rejects may be refused outright;
    # otherwise it must not come back, and nothing it carries may turn into a response header.
    values = [
        b"a\r\nx-injected: y",
        b"a\rx-injected: y",
        b"a\nx-injected: y",
        b"a\x00b",
        b"caf\xc3\xa9",
        b"caf\xe9",
        b"a" * 65,
        b"a b",
        b"a\tb",
        b"<script>",
        b"-x",
        b"../../etc",
        b"a;b",
        b"a,b",
        b"a\r\n x-injected: folded",
    ]
    seen: dict[bytes, str] = {}
    for value in values:
        request = (
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Request-Id: " + value + b"\r\n\r\n"
        )
        status, headers, _ = raw_request(live.server.port, request)
        code = status.split()[1]
        assert "x-injected" not in [k for k, _ in headers], (value, headers)
        ids = [v for k, v in headers if k == "x-request-id"]
        if code == "400":  # refused by the HTTP parser, before the app
            assert not ids, (value, headers)
        else:
            # Either a fresh id, or (where CRLF really ended the header on the wire) the well-formed part before it.
            assert code == "200" and len(ids) == 1, (value, status, headers)
            assert re.fullmatch(r"[0-9a-f]{32}", ids[0]) or value.startswith(ids[0].encode() + b"\r\n"), (value, ids)
            assert WELL_FORMED_ID.fullmatch(ids[0]), ids
        seen[value] = f"{code} {ids[0] if ids else '-'}"
    # The longest well-formed id is echoed; a duplicate header cannot smuggle a second one in.
    longest = b"a" * 64
    status, headers, _ = raw_request(
        live.server.port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-Id: "
        + longest
        + b"\r\nX-Request-Id: second\r\n\r\n",
    )
    assert [v for k, v in headers if k == "x-request-id"] == [longest.decode()]
    # And through httpx where it will send the value at all.
    for value in ("a\r\nx-injected: y", "a\nb"):
        try:
            r = httpx.get(f"{live.server.url}/healthz", headers={"x-request-id": value})
        except httpx.LocalProtocolError:
            continue
        assert "x-injected" not in r.headers and r.headers["x-request-id"] != value
    print("\nrequest-id injection: " + ", ".join(f"{v!r}->{s}" for v, s in seen.items()))
