"""imaging.transforms against a torchvision-faithful reference: geometry, decoding, modes, limits and bad input."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps, PngImagePlugin

import imaging.transforms
from imaging.transforms import ImageError, configure_pillow, crop_box, decode, preprocess, resized_size, to_rgb
from modelcard import PreprocessConfig
from tests.reference_transforms import eval_transform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000  # the service's default limit
# Same PIL decode and the same `Image.resize` call on the same pixels give identical uint8 crops; what remains
# is the float32 rounding of the normalisation (x * 1/(255 std) - mean/std here, (x/255 - mean)/std in the
# reference): a few ulps of values below 2.7, i.e. ~1e-6. One grey level is 1/(255 * 0.229) = 0.017, so any
# pixel that differs by a single level fails this bound.
TOL = 1e-5
CONFIGS = [(224, 256), (320, 352)]
INTERPOLATIONS = ["bilinear", "bicubic"]
# Pillow's own Image.MAX_IMAGE_PIXELS, in force in any process that has not called configure_pillow().
PILLOW_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
REPO = Path(__file__).resolve().parents[1]


def cfg_for(input_size: int = 224, resize: int = 256, interpolation: str = "bilinear") -> PreprocessConfig:
    return PreprocessConfig(input_size, resize, interpolation, MEAN, STD)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def reference(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The reference pipeline on the same bytes: PIL open, EXIF upright, RGB, then the torchvision transform."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    ref = eval_transform(img, cfg.resize_size, cfg.input_size, cfg.interpolation, cfg.mean, cfg.std)
    return ref.tensor.numpy(), ref.resized_size, ref.crop_box


def compare_with_reference(data: bytes, cfg: PreprocessConfig, name: str) -> float:
    """Assert geometry and pixels match the reference; return the max abs difference."""
    expected, ref_resized, ref_box = reference(data, cfg)
    width, height = decode(data, cfg, MAX_PIXELS).size
    new_w, new_h = resized_size(width, height, cfg.resize_size)
    assert (new_w, new_h) == ref_resized, f"{name}: resized to {(new_w, new_h)}, reference {ref_resized}"
    assert crop_box(new_w, new_h, cfg.input_size) == ref_box, f"{name}: crop offsets differ from the reference"
    out = preprocess(data, cfg, MAX_PIXELS)
    assert out.shape == (3, cfg.input_size, cfg.input_size) and out.dtype == np.float32
    diff = float(np.abs(out - expected).max())
    assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL} after normalisation"
    return diff


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(("input_size", "resize"), CONFIGS)
def test_photos_match_reference(
    photos: list[tuple[str, bytes]], input_size: int, resize: int, interpolation: str
) -> None:
    cfg = cfg_for(input_size, resize, interpolation)
    diffs = {name: compare_with_reference(data, cfg, name) for name, data in photos}
    figures = ", ".join(f"{name} {d:.2e}" for name, d in diffs.items())
    print(f"\n{input_size}/{resize} {interpolation}: max abs diff per photo: {figures}")
    assert len(diffs) == 8


def test_reference_geometry_rounds_like_torchvision() -> None:
    # Odd margins: (256 - 224) / 2 is exact, (341 - 224) / 2 = 58.5 rounds half-to-even to 58; long side truncates.
    assert resized_size(451, 300, 256) == (384, 256)  # 256 * 451 / 300 = 384.85 -> 384
    assert resized_size(300, 451, 256) == (256, 384)
    assert crop_box(341, 256, 224) == (58, 16)
    assert crop_box(343, 256, 224) == (60, 16)  # 59.5 -> 60
    _, resized, box = reference(encode(Image.new("RGB", (451, 300)), "PNG"), cfg_for())
    assert resized == (384, 256) and box == (80, 16)


# --- EXIF orientation ---------------------------------------------------------------------------------------------


def oriented_file(orientation: int, fmt: str, mode: str = "RGB", **params: object) -> bytes:
    """64x32 stored image: left half red, right half blue, a green 8x8 marker in the stored top-left corner."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    img.paste((0, 255, 0), (0, 0, 8, 8))
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(img, fmt, exif=exif, **params)


def oriented_jpeg(orientation: int) -> bytes:
    return oriented_file(orientation, "JPEG", quality=95)


def near(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 24) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.mark.parametrize(
    ("orientation", "marker", "top", "bottom"),
    [
        (6, (28, 4), RED, BLUE),  # rotate 90 degrees clockwise: stored top-left -> displayed top-right
        (8, (4, 60), BLUE, RED),  # rotate 90 degrees counter-clockwise: stored top-left -> displayed bottom-left
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, marker: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    data = oriented_jpeg(orientation)
    assert Image.open(io.BytesIO(data)).size == (64, 32)
    img = decode(data, cfg_for(), MAX_PIXELS)
    assert img.size == (32, 64), "width and height must swap"
    assert near(img.getpixel(marker), GREEN), f"marker at {marker}: {img.getpixel(marker)}"
    assert near(img.getpixel((16, 24)), top) and near(img.getpixel((16, 48)), bottom)
    compare_with_reference(data, cfg_for(), f"orientation {orientation}")


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [("PNG", "RGB", {}), ("PNG", "P", {}), ("WEBP", "RGB", {"lossless": True}), ("TIFF", "RGB", {})],
)
def test_exif_orientation_in_other_formats(fmt: str, mode: str, params: dict[str, object]) -> None:
    # decode turns the image in place (no copy when there is nothing to turn): the result must still be the
    # reference's, which turns a copy, for every format that carries EXIF and for palette images.
    data = oriented_file(6, fmt, mode, **params)
    assert Image.open(io.BytesIO(data)).mode == mode
    img = decode(data, cfg_for(), MAX_PIXELS)
    assert img.size == (32, 64) and near(img.getpixel((28, 4)), GREEN), img.getpixel((28, 4))
    compare_with_reference(data, cfg_for(), f"{fmt} {mode} orientation 6")


def test_decode_makes_no_copy_of_an_upright_image() -> None:
    data = encode(Image.new("RGB", (64, 48), (10, 20, 30)), "PNG")
    before = pillow_images_created()
    Image.open(io.BytesIO(data)).load()
    by_the_decoder = pillow_images_created() - before
    before = pillow_images_created()
    decode(data, cfg_for(), MAX_PIXELS)
    # exif_transpose without in_place copied every image, turned or not: one pixel buffer more than the decoder's.
    assert pillow_images_created() - before == by_the_decoder


# --- modes --------------------------------------------------------------------------------------------------------


def palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    img.putpixel((0, 0), 0)
    data = encode(img, "PNG", transparency=bytes([0, 128]))  # partial per-entry alpha: tRNS stays bytes
    # Meaningful: Pillow's direct P -> RGB conversion warns for this file.
    with pytest.warns(UserWarning, match="Transparency"):
        Image.open(io.BytesIO(data)).convert("RGB")
    return data


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def grey16_png() -> bytes:
    data = encode(Image.fromarray(np.array([[65535, 32768, 0, 1000]] * 4, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return data


def one_bit_png() -> bytes:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((1, 1), 1)
    return encode(img, "PNG")


MODE_CASES: dict[str, tuple[Callable[[], bytes], dict[tuple[int, int], tuple[int, int, int]], int]] = {
    # name: (bytes, {(x, y): expected RGB}, tolerance)
    "L": (lambda: encode(Image.new("L", (8, 8), 100), "PNG"), {(3, 3): (100, 100, 100)}, 0),
    "LA": (lambda: encode(Image.new("LA", (8, 8), (100, 50)), "PNG"), {(3, 3): (100, 100, 100)}, 0),
    "P+transparency": (palette_with_transparency, {(0, 0): (0, 0, 0), (3, 3): (10, 200, 30)}, 0),
    "RGBA": (lambda: encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG"), {(3, 3): (10, 20, 30)}, 0),
    "CMYK JPEG": (cmyk_jpeg, {(8, 8): (255, 0, 0)}, 8),
    # 65535 -> 255, 32768 -> 128 (scaled, not clipped to 255), 1000 -> 4
    "I;16 PNG": (grey16_png, {(0, 0): (255,) * 3, (1, 0): (128,) * 3, (2, 0): (0,) * 3, (3, 0): (4,) * 3}, 0),
    "1-bit": (one_bit_png, {(0, 0): (0, 0, 0), (1, 1): (255, 255, 255)}, 0),
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_modes_convert_to_rgb(mode: str) -> None:
    make, expected, tol = MODE_CASES[mode]
    data = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = decode(data, cfg_for(), MAX_PIXELS)
        out = preprocess(data, cfg_for(), MAX_PIXELS)
    assert not caught, [str(w.message) for w in caught]
    assert img.mode == "RGB" and out.shape == (3, 224, 224)
    for xy, rgb in expected.items():
        assert near(img.getpixel(xy), rgb, tol), f"{mode} at {xy}: {img.getpixel(xy)}, expected {rgb}"


def test_grey16_mid_value_reaches_the_model_unclipped() -> None:
    data = encode(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), "PNG")
    out = preprocess(data, cfg_for(), MAX_PIXELS)
    expected = (128 / 255 - np.asarray(MEAN)) / np.asarray(STD)
    assert np.abs(out.reshape(3, -1).mean(1) - expected).max() < 1e-5, out.reshape(3, -1).mean(1)


def legacy_grey(img: Image.Image) -> np.ndarray:
    """The whole-image float64 formulas to_rgb used before it worked in blocks: the values it must still give."""
    if img.mode == "F":
        return np.clip(np.asarray(img), 0, 255).astype(np.uint8)
    arr = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


ALL_16_BIT = np.arange(65536, dtype=np.uint16).reshape(256, 256)


def int32_image(low: int, high: int, extremes: list[int]) -> Image.Image:
    values = np.arange(low, high, dtype=np.int64)
    values[: len(extremes)] = extremes
    return Image.fromarray(values.astype(np.int32).reshape(-1, 256))


def float_image() -> Image.Image:
    values = np.linspace(-20.0, 300.0, 256 * 63, dtype=np.float32)
    edges = [np.inf, -np.inf, -0.5, 0.0, 0.5, 254.5, 254.999, 255.0, 255.5, 1e30, -1e30, 3.4e38, 1e-30, 127.5]
    return Image.fromarray(np.concatenate([values, np.array(edges + [0.0] * 242, np.float32)]).reshape(64, 256))


GREY_CASES: dict[str, tuple[str, Callable[[], Image.Image]]] = {
    # name: (mode, image)
    "I;16, every value": ("I;16", lambda: Image.fromarray(ALL_16_BIT)),
    "I;16B, every value": ("I;16B", lambda: Image.frombytes("I;16B", (256, 256), ALL_16_BIT.astype(">u2").tobytes())),
    # Peak 65535: every 16-bit value, then 32-bit ones beyond both ends of it.
    "I above 255": ("I", lambda: int32_image(-1024, 66560, [-(2**31), -70000, -257, -1, 65536, 70000, 2**31 - 1])),
    # Peak 255: values scale by one, negative ones clip to 0.
    "I at most 255": ("I", lambda: int32_image(-512, 256, [-(2**31), -70000])),
    "F": ("F", float_image),
}


@pytest.mark.parametrize("block_pixels", [None, 1000])
@pytest.mark.parametrize("case", list(GREY_CASES))
def test_wide_grey_gives_the_float64_formulas_values(
    monkeypatch: pytest.MonkeyPatch, case: str, block_pixels: int | None
) -> None:
    mode, make = GREY_CASES[case]
    img = make()
    assert img.mode == mode
    if block_pixels is not None:  # 3 rows a block at width 256: many blocks and a shorter last one
        monkeypatch.setattr(imaging.transforms, "_BLOCK_PIXELS", block_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "overflow in cast" for +-inf and 1e30 in F
        expected = legacy_grey(img)
    out = np.asarray(to_rgb(img))
    assert out.shape == (*expected.shape, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def wide_grey_file(mode: str, width: int, height: int) -> bytes:
    """A width x height image in `mode` (I;16 as PNG, I and F as TIFF), a gradient over the whole 16-bit range."""
    ramp = np.arange(width, dtype=np.uint32)[None, :] * 16 + np.arange(height, dtype=np.uint32)[:, None] * 5
    grey = (ramp % 65536).astype(np.uint16)
    if mode == "I;16":
        return encode(Image.fromarray(grey), "PNG", compress_level=1)
    return encode(Image.fromarray(grey.astype(np.int32) if mode == "I" else grey.astype(np.float32) / 200), "TIFF")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_grey_decode_memory_is_bounded_per_pixel(mode: str) -> None:
    width, height = 4000, 3000
    data = wide_grey_file(mode, width, height)
    assert Image.open(io.BytesIO(data)).mode == mode
    tracemalloc.start()
    try:
        preprocess(data, cfg_for(), MAX_PIXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_pixel = peak / (width * height)
    print(f"\n{mode} {width}x{height}: traced peak {peak / 1e6:.1f} MB, {per_pixel:.2f} bytes/pixel")
    # The uint8 grey (1 byte/pixel) and a few MB of row blocks. A whole-image float64 copy alone is 8 bytes/pixel
    # (the old path peaked at 24 for I;16 and I, at 8 for F's float32 copies). Pillow's own buffers (the decoded
    # image, the RGB one) are not traced by tracemalloc; they are the same either way.
    assert per_pixel < 3, f"{per_pixel:.2f} bytes/pixel"


# --- pixel limit before decode ------------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def crafted_png(width: int, height: int, raw: bytes = b"\x00\x80\x80\x80") -> bytes:
    """PNG signature, IHDR (8-bit RGB) claiming width x height, one small IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def patched_gif(width: int, height: int) -> bytes:
    """A real 4x4 GIF whose logical screen and first image descriptor claim width x height."""
    data = bytearray(encode(Image.new("P", (4, 4), 0), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    pos = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[pos] == 0x21:  # extension blocks: introducer, label, sub-blocks until a zero length
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C, "image descriptor expected"
    data[pos + 5 : pos + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def patched_jpeg(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 segment claims width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 120, 150)), "JPEG"))
    pos = 2  # after SOI: walk the marker segments to SOF0
    while data[pos + 1] != 0xC0:
        assert data[pos] == 0xFF
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    data[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def pillow_images_created() -> int:
    """Pillow's count of core images (pixel buffers) created so far: its allocations are invisible to tracemalloc."""
    return int(Image.core.get_stats()["new_count"])


def fastest_of(run: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of a few runs, in seconds: a busy CPU only ever adds time."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize(
    ("fmt", "make"),
    [
        ("PNG", lambda: crafted_png(100_000, 100_000)),
        ("GIF", lambda: patched_gif(65535, 65535)),
        ("JPEG", lambda: patched_jpeg(60000, 60000)),
    ],
)
def test_pixel_limit_is_enforced_before_decode(
    monkeypatch: pytest.MonkeyPatch, fmt: str, make: Callable[[], bytes]
) -> None:
    # As the service runs, with Pillow's own check lifted by configure_pillow(): max_pixels alone refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = make()
    assert len(data) < 2000
    assert Image.open(io.BytesIO(data)).format == fmt
    images_before = pillow_images_created()
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            preprocess(data, cfg_for(), MAX_PIXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.code == "image_too_large", str(info.value)
    assert peak < 10e6, f"allocated {peak / 1e6:.1f} MB"
    assert pillow_images_created() == images_before, "Pillow allocated a pixel buffer"

    def refuse() -> None:
        with pytest.raises(ImageError):
            preprocess(data, cfg_for(), MAX_PIXELS)

    # Timed against an ordinary small image on the same CPU in the same run, so a slower machine slows both:
    # refusing the header takes well under a tenth of it; decoding even a 4000x4000 part of the bomb, 1000x.
    small = encode(Image.new("RGB", (512, 384), (90, 120, 150)), "PNG")
    refused = fastest_of(refuse)
    ordinary = fastest_of(lambda: preprocess(small, cfg_for(), MAX_PIXELS))
    print(f"\n{fmt} bomb: refused in {refused * 1e3:.2f} ms, a 512x384 PNG takes {ordinary * 1e3:.2f} ms")
    assert refused < ordinary, f"refusing took {refused * 1e3:.2f} ms, the small image {ordinary * 1e3:.2f} ms"


def test_crafted_headers_are_valid_images_when_small() -> None:
    # The crafting itself is sound: the same constructions at a small size decode (and do allocate in Pillow).
    raw = (b"\x00" + b"\x80" * 6) * 2
    images_before = pillow_images_created()
    assert preprocess(crafted_png(2, 2, raw), cfg_for(), MAX_PIXELS).shape == (3, 224, 224)
    assert pillow_images_created() > images_before
    assert decode(crafted_png(2, 2, raw), cfg_for(), MAX_PIXELS).getpixel((1, 1)) == (128, 128, 128)
    assert decode(patched_gif(4, 4), cfg_for(), MAX_PIXELS).size == (4, 4)
    assert near(decode(patched_jpeg(16, 16), cfg_for(), MAX_PIXELS).getpixel((8, 8)), (90, 120, 150), 4)


def test_pixel_limit_boundary() -> None:
    raw = (b"\x00" + b"\x80" * 6) * 2
    assert preprocess(crafted_png(2, 2, raw), cfg_for(), max_pixels=4).shape == (3, 224, 224)
    with pytest.raises(ImageError) as info:
        preprocess(crafted_png(2, 2, raw), cfg_for(), max_pixels=3)
    assert info.value.code == "image_too_large"


# --- Pillow's process-wide settings -------------------------------------------------------------------------


def test_import_changes_no_process_wide_state() -> None:
    # In a fresh interpreter: this one's state depends on which tests ran first (create_app configures Pillow).
    code = """if True:
        import json, warnings
        import numpy, PIL.Image, PIL.ImageOps
        def state():
            return [PIL.Image.MAX_IMAGE_PIXELS, [repr(f) for f in warnings.filters]]
        before = state()
        import imaging.transforms
        imported = state()
        imaging.transforms.configure_pillow()
        configured = state()
        imaging.transforms.configure_pillow()
        print(json.dumps({"before": before, "imported": imported, "configured": configured, "again": state()}))
    """
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    states = json.loads(run.stdout)
    assert states["before"][0] == PILLOW_MAX_IMAGE_PIXELS
    assert states["imported"] == states["before"], "importing imaging.transforms changed Pillow or warnings"
    max_pixels, filters = states["configured"]
    assert max_pixels is None and len(filters) == len(states["before"][1]) + 1
    assert states["again"] == states["configured"], "a second configure_pillow() changed something"


@pytest.mark.parametrize(
    "make",
    [lambda: crafted_png(100_000, 100_000), lambda: patched_gif(65535, 65535), lambda: patched_jpeg(60000, 60000)],
)
@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 10**12])
def test_pillow_limit_where_not_configured_is_image_too_large(
    monkeypatch: pytest.MonkeyPatch, make: Callable[[], bytes], max_pixels: int
) -> None:
    # Without configure_pillow(), Pillow refuses beyond 2 * MAX_IMAGE_PIXELS (179 MP) inside Image.open, before
    # open_image counts pixels: the same image_too_large (never a 500), whatever max_pixels allows.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_IMAGE_PIXELS)
    data = make()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with pytest.raises(ImageError) as info:
        preprocess(data, cfg_for(), max_pixels)
    assert info.value.code == "image_too_large", str(info.value)


def hundred_megapixel_png() -> bytes:
    """A real 10000x10000 1-bit PNG of 30 KB: past Pillow's default warning limit, short of its error limit."""
    width = height = 10_000
    half = b"\x00" + b"\xff" * (width // 16) + b"\x00" * (width // 16)  # filter byte, then 8 pixels a byte
    stripes = b"\x00" + b"\x0f" * (width // 8)
    raw = b"".join(half if (y // 1000) % 2 else stripes for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def test_100_megapixels_decode_the_same_with_and_without_configure_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    data, cfg, limit = hundred_megapixel_png(), cfg_for(), 200_000_000
    assert PILLOW_MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * PILLOW_MAX_IMAGE_PIXELS < limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_IMAGE_PIXELS)  # as imported: not configured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unconfigured = preprocess(data, cfg, limit)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught), "Pillow's check engaged"
    with warnings.catch_warnings(record=True) as caught:  # also undoes configure_pillow()'s filter afterwards
        warnings.simplefilter("always")
        configure_pillow()
        assert Image.MAX_IMAGE_PIXELS is None
        configured = preprocess(data, cfg, limit)
    assert not caught, [str(w.message) for w in caught]
    np.testing.assert_array_equal(configured, unconfigured)
    assert abs(float(configured.std())) > 0.1, "the stripes reach the model"
    # Where warnings are errors (python -W error) and Pillow is not configured, its warning refuses the image
    # before max_pixels is consulted; the answer is image_too_large, not a 500 and not "corrupt".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_IMAGE_PIXELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as info:
            preprocess(data, cfg, limit)
    assert info.value.code == "image_too_large", str(info.value)


# --- any failure to decode is the upload's ImageError --------------------------------------------------------


def exif_with_text_under(tag: int) -> bytes:
    """EXIF with Orientation 6 and the text "cam" stored under `tag`, a tag whose values are numbers."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "cam"
    blob = bytearray(exif.tobytes())
    first_entry = 6 + 8 + 2  # b"Exif\0\0", the TIFF header, the entry count; entries sorted, Make (0x010F) first
    assert blob[first_entry : first_entry + 2] == struct.pack(">H", ExifTags.Base.Make)
    blob[first_entry : first_entry + 2] = struct.pack(">H", tag)
    return bytes(blob)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    ("tag", "pillow_raises"), [(ExifTags.Base.ImageWidth, struct.error), (ExifTags.Base.XResolution, TypeError)]
)
def test_real_files_with_malformed_exif_are_invalid_image(fmt: str, tag: int, pillow_raises: type[Exception]) -> None:
    # Found by flipping bytes of small files: Pillow reads the text, then fails to write the EXIF back once it has
    # removed the orientation, with neither OSError nor ValueError.
    data = encode(Image.new("RGB", (16, 12), (90, 120, 150)), fmt, exif=exif_with_text_under(tag))
    with pytest.raises(pillow_raises):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    with pytest.raises(ImageError) as info:
        preprocess(data, cfg_for(), MAX_PIXELS)
    assert info.value.code == "invalid_image", str(info.value)


def tiff_with_strip_offsets_of_type(field_type: int) -> bytes:
    """A real little-endian TIFF whose StripOffsets entry claims another field type (5: RATIONAL)."""
    data = bytearray(encode(Image.new("RGB", (16, 12), (90, 120, 150)), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2 : entry + 4] = struct.pack("<H", field_type)
            return bytes(data)
    raise AssertionError("no StripOffsets entry")


def test_real_tiff_with_mistyped_strip_offsets_is_invalid_image() -> None:
    data = tiff_with_strip_offsets_of_type(5)
    img = Image.open(io.BytesIO(data))
    with pytest.raises(TypeError):  # Pillow seeks to an IFDRational
        img.load()
    with pytest.raises(ImageError) as info:
        preprocess(data, cfg_for(), MAX_PIXELS)
    assert info.value.code == "invalid_image", str(info.value)


LEAKY = "/srv/resnest/secret.py line 7"


def raising(exc_type: type[BaseException]) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc_type(LEAKY)

    return fail


# Where, from bytes to tensor, Pillow's code runs: each stage patched to raise.
STAGES: dict[str, tuple[object, str]] = {
    "plugin open": (PngImagePlugin.PngImageFile, "_open"),
    "pixel decode": (PngImagePlugin.PngImageFile, "load"),
    "EXIF orientation": (ImageOps, "exif_transpose"),
    "mode conversion": (Image.Image, "convert"),
    "resize": (Image.Image, "resize"),
    "crop": (Image.Image, "crop"),
}


@pytest.mark.parametrize(
    "exc_type", [struct.error, IndexError, TypeError, KeyError, ZeroDivisionError, MemoryError, RuntimeError]
)
@pytest.mark.parametrize("stage", list(STAGES))
def test_any_exception_while_decoding_is_invalid_image(
    monkeypatch: pytest.MonkeyPatch, stage: str, exc_type: type[Exception]
) -> None:
    data = encode(Image.new("L", (16, 12), 100), "PNG")  # L: to_rgb converts, so every stage runs
    assert preprocess(data, cfg_for(), MAX_PIXELS).shape == (3, 224, 224)
    monkeypatch.setattr(*STAGES[stage], raising(exc_type))
    with pytest.raises(ImageError) as info:
        preprocess(data, cfg_for(), MAX_PIXELS)
    assert info.value.code == "invalid_image"
    message = str(info.value)
    assert "secret" not in message and exc_type.__name__ not in message and "Traceback" not in message, message


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("stage", ["pixel decode", "resize"])
def test_interrupts_are_not_turned_into_image_errors(
    monkeypatch: pytest.MonkeyPatch, stage: str, exc_type: type[BaseException]
) -> None:
    monkeypatch.setattr(*STAGES[stage], raising(exc_type))
    with pytest.raises(exc_type):
        preprocess(encode(Image.new("L", (16, 12), 100), "PNG"), cfg_for(), MAX_PIXELS)


@pytest.mark.parametrize("code", ["unsupported_media_type", "image_too_large"])
@pytest.mark.parametrize("stage", ["pixel decode", "resize"])
def test_image_error_codes_already_chosen_are_kept(monkeypatch: pytest.MonkeyPatch, stage: str, code: str) -> None:
    chosen = ImageError(code, "chosen")
    monkeypatch.setattr(*STAGES[stage], lambda *args, **kwargs: (_ for _ in ()).throw(chosen))
    with pytest.raises(ImageError) as info:
        preprocess(encode(Image.new("L", (16, 12), 100), "PNG"), cfg_for(), MAX_PIXELS)
    assert info.value is chosen and info.value.__cause__ is None


# --- corrupt, unsupported and unusual inputs ----------------------------------------------------------------------


def photo_bytes(photos: list[tuple[str, bytes]], name: str) -> bytes:
    return dict(photos)[name]


def test_corrupt_inputs_are_invalid_image(photos: list[tuple[str, bytes]]) -> None:
    jpg = photo_bytes(photos, "rocket.jpg")
    png = photo_bytes(photos, "coffee.png")
    cases = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "truncated JPEG": jpg[: len(jpg) // 2],
        "truncated PNG": png[: len(png) // 2],
    }
    for name, data in cases.items():
        with pytest.raises(ImageError) as info:
            preprocess(data, cfg_for(), MAX_PIXELS)
        assert info.value.code == "invalid_image", f"{name}: {info.value.code} {info.value}"


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_formats_pillow_reads_but_the_service_refuses(fmt: str) -> None:
    data = encode(Image.new("RGB", (32, 32), (10, 20, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow would decode it
    with pytest.raises(ImageError) as info:
        preprocess(data, cfg_for(), MAX_PIXELS)
    assert info.value.code == "unsupported_media_type"


def test_jpeg_with_mpf_second_image_is_accepted() -> None:
    first = Image.new("RGB", (64, 48), (200, 10, 10))
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48), (10, 200, 10))])
    assert data[:2] == b"\xff\xd8"
    out = preprocess(data, cfg_for(), MAX_PIXELS)
    np.testing.assert_array_equal(out, preprocess(encode(first, "JPEG"), cfg_for(), MAX_PIXELS))


def four_blocks(colors: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.new("RGB", (40, 30))
    for i, color in enumerate(colors):
        img.paste(color, ((i % 2) * 20, (i // 2) * 15, (i % 2) * 20 + 20, (i // 2) * 15 + 15))
    return img


def test_animated_gif_uses_the_first_frame() -> None:
    first = four_blocks([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
    second = four_blocks([(0, 0, 0), (255, 255, 255), (128, 0, 128), (0, 128, 128)])
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = preprocess(data, cfg_for(), MAX_PIXELS)
    np.testing.assert_array_equal(out, preprocess(encode(first, "GIF"), cfg_for(), MAX_PIXELS))
    assert np.abs(out - preprocess(encode(second, "GIF"), cfg_for(), MAX_PIXELS)).max() > 1.0


@pytest.mark.parametrize(("fmt", "params"), [("WEBP", {"quality": 90}), ("TIFF", {})])
def test_webp_and_tiff_photos_match_reference(
    photos: list[tuple[str, bytes]], fmt: str, params: dict[str, object]
) -> None:
    img = Image.open(io.BytesIO(photo_bytes(photos, "chelsea.png"))).convert("RGB")
    data = encode(img, fmt, **params)
    assert Image.open(io.BytesIO(data)).format == fmt
    for interpolation in INTERPOLATIONS:
        diff = compare_with_reference(data, cfg_for(interpolation=interpolation), f"{fmt} {interpolation}")
        print(f"\n{fmt} {interpolation}: max abs diff {diff:.2e}")


def test_one_pixel_image() -> None:
    out = preprocess(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), cfg_for(), MAX_PIXELS)
    assert out.shape == (3, 224, 224)
    expected = (np.array([10, 20, 30]) / 255 - np.asarray(MEAN)) / np.asarray(STD)
    assert np.abs(out - expected[:, None, None]).max() < 1e-5


# --- JPEG draft decoding ------------------------------------------------------------------------------------------


def test_jpeg_draft_is_close_to_full_decode(photos: list[tuple[str, bytes]]) -> None:
    big = Image.open(io.BytesIO(photo_bytes(photos, "chelsea.png"))).convert("RGB")
    data = encode(big.resize((2000, 1500), Image.Resampling.BICUBIC), "JPEG", quality=90)
    cfg = cfg_for()
    # Draft must really engage (DCT scale 1/4) and keep the shorter side >= resize_size (resize only shrinks).
    assert decode(data, cfg, MAX_PIXELS, draft=True).size == (500, 375)
    full = preprocess(data, cfg, MAX_PIXELS)
    draft = preprocess(data, cfg, MAX_PIXELS, draft=True)
    diff = np.abs(draft - full)
    print(f"\ndraft vs full decode (2000x1500 JPEG): max abs {diff.max():.3f}, mean abs {diff.mean():.4f}")
    assert draft.shape == full.shape
    assert diff.mean() < 0.05, f"mean abs diff {diff.mean():.4f}"


def test_jpeg_draft_leaves_small_jpegs_alone(photos: list[tuple[str, bytes]]) -> None:
    data = photo_bytes(photos, "rocket.jpg")  # 640x427: no DCT scale keeps the shorter side >= 256
    cfg = cfg_for()
    np.testing.assert_array_equal(preprocess(data, cfg, MAX_PIXELS, draft=True), preprocess(data, cfg, MAX_PIXELS))


# --- reducing_gap and the uint8 (device-normalised) output ---------------------------------------------------------


def test_reducing_gap_is_opt_in_and_close_to_the_exact_resize(photos: list[tuple[str, bytes]]) -> None:
    big = Image.open(io.BytesIO(photo_bytes(photos, "chelsea.png"))).convert("RGB")
    data = encode(big.resize((2000, 1500), Image.Resampling.BICUBIC), "JPEG", quality=90)
    cfg = cfg_for()
    full = preprocess(data, cfg, MAX_PIXELS)
    np.testing.assert_array_equal(preprocess(data, cfg, MAX_PIXELS, reducing_gap=None), full)  # unset: exact
    gapped = preprocess(data, cfg, MAX_PIXELS, reducing_gap=2.0)
    diff = np.abs(gapped - full)
    print(f"\nreducing_gap 2.0 vs exact resize (2000x1500 JPEG): max abs {diff.max():.3f}, mean abs {diff.mean():.4f}")
    assert gapped.shape == full.shape and 0 < diff.mean() < 0.05


def test_uint8_output_is_the_crop_the_float_path_normalises(photos: list[tuple[str, bytes]]) -> None:
    from modelcard import UINT8_NHWC

    cfg = cfg_for()
    u8_cfg = PreprocessConfig(cfg.input_size, cfg.resize_size, cfg.interpolation, cfg.mean, cfg.std, UINT8_NHWC)
    for _, data in photos:
        crop = preprocess(data, u8_cfg, MAX_PIXELS)
        assert crop.dtype == np.uint8 and crop.shape == (cfg.input_size, cfg.input_size, 3) and crop.flags.owndata
        std = np.asarray(cfg.std, dtype=np.float32)
        again = crop.astype(np.float32) * (1.0 / (255.0 * std)) - np.asarray(cfg.mean, dtype=np.float32) / std
        np.testing.assert_array_equal(again.transpose(2, 0, 1), preprocess(data, cfg, MAX_PIXELS))


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_size", "resize", "interpolation"),
    [(224, 256, "nearest"), (224, 256, "BILINEAR"), (300, 256, "bilinear"), (0, 256, "bilinear")],
)
def test_config_validation(input_size: int, resize: int, interpolation: str) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(input_size, resize, interpolation, MEAN, STD)


def test_config_accepts_equal_sizes() -> None:
    assert PreprocessConfig(224, 224, "bicubic", MEAN, STD).resize_size == 224


def test_a_thin_strip_that_would_grow_past_the_pixel_limit_is_refused_before_decoding() -> None:
    # 16 x 1,000,000 pixels is within 40 MP, but resizing its shorter side to 256 would make 4 G pixels.
    buf = io.BytesIO()
    Image.new("L", (16, 1_000_000)).save(buf, "PNG")
    with pytest.raises(ImageError, match="would resize to 256x16000000") as exc:
        preprocess(buf.getvalue(), cfg_for(), MAX_PIXELS)
    assert exc.value.code == "image_too_large"
    wide = io.BytesIO()
    Image.new("RGB", (2000, 300)).save(wide, "PNG")  # 6.7:1, resized 1706x256: served
    assert preprocess(wide.getvalue(), cfg_for(), MAX_PIXELS).shape == (3, 224, 224)
