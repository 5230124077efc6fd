"""service.preprocess against a torchvision-faithful reference: geometry, decoding, modes, limits and bad input."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from service.preprocess import ImageError, PreprocessConfig, crop_box, decode, preprocess, resized_size
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


def oriented_jpeg(orientation: int) -> bytes:
    """64x32 stored image: left half red, right half blue, a green 8x8 marker in the stored top-left corner."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    img.paste((0, 255, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


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


@pytest.mark.parametrize(
    ("fmt", "make"),
    [
        ("PNG", lambda: crafted_png(100_000, 100_000)),
        ("GIF", lambda: patched_gif(65535, 65535)),
        ("JPEG", lambda: patched_jpeg(60000, 60000)),
    ],
)
def test_pixel_limit_is_enforced_before_decode(fmt: str, make: Callable[[], bytes]) -> None:
    data = make()
    assert len(data) < 2000
    assert Image.open(io.BytesIO(data)).format == fmt
    images_before = pillow_images_created()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageError) as info:
            preprocess(data, cfg_for(), MAX_PIXELS)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\n{fmt} bomb: rejected in {elapsed * 1e3:.1f} ms, traced peak {peak / 1e6:.2f} MB")
    assert info.value.code == "image_too_large", str(info.value)
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert peak < 10e6, f"allocated {peak / 1e6:.1f} MB"
    assert pillow_images_created() == images_before, "Pillow allocated a pixel buffer"


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
