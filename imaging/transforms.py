"""Image decoding and evaluation preprocessing, as pure functions over bytes and arrays.

The geometry follows torchvision's Resize(int) + CenterCrop on PIL images (shorter side to `resize_size`,
the longer side truncated, crop offsets rounded half-to-even), so the served model sees exactly what the
export's parity check and a torchvision evaluation pipeline feed it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelcard import PreprocessConfig

from .formats import FORMATS

ALLOWED_FORMATS = tuple(FORMATS)
_JPEG_FORMATS = ("JPEG", "MPO")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
# Wide grey modes become 8 bits a block of rows at a time: temporaries of a few MB whatever the image's size.
_BLOCK_PIXELS = 1 << 20
# Pillow's own decompression-bomb check, in force until configure_pillow() lifts it: an error beyond twice
# Image.MAX_IMAGE_PIXELS, a warning beyond it (an exception only where warnings are errors).
_PILLOW_LIMIT = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def configure_pillow() -> None:
    """Pillow's process-wide settings for serving; idempotent, and the service calls it once at start."""
    # The service enforces its own pixel limit (open_image) before decoding; Pillow's global bomb check would
    # otherwise fire first, with an answer that depends on a process-wide constant rather than on max_pixels.
    Image.MAX_IMAGE_PIXELS = None
    # Pillow warns about odd but decodable files (corrupt EXIF, oversized TIFF tags); they are served. One
    # filter for Pillow's modules, set once: warnings.catch_warnings() around each decode is not thread-safe
    # before Python 3.14 and the decode pool runs many at once. filterwarnings drops an identical filter
    # before it inserts one, so calling again adds nothing.
    warnings.filterwarnings("ignore", module=r"PIL\.")


class ImageError(ValueError):
    """An upload that cannot become a model input; `code` selects the HTTP answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _refused_as(message: str) -> Iterator[None]:
    """Any exception in the block as the upload's ImageError: a malformed file is the client's 4xx, not a 500."""
    # Pillow's plugins raise whatever their parsing trips over (struct.error, IndexError, TypeError, KeyError,
    # ZeroDivisionError, MemoryError for a header that claims a huge table...), so all of Exception is mapped;
    # an ImageError keeps the code already chosen, and KeyboardInterrupt/SystemExit are not Exceptions. The
    # messages are fixed: the cause stays in __cause__ for the logs, never in the answer.
    try:
        yield
    except ImageError:
        raise
    except _PILLOW_LIMIT as exc:
        raise ImageError("image_too_large", "the image has more pixels than the decoder accepts") from exc
    except MemoryError as exc:
        raise ImageError("invalid_image", "the image needs more memory to decode than it may use") from exc
    except Exception as exc:
        raise ImageError("invalid_image", message) from exc


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its header and enforce the pixel limit before any pixel is decoded."""
    if not data:
        raise ImageError("invalid_image", "the upload is empty")
    with _refused_as("the image header is corrupt"):
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("invalid_image", "the upload is not an image that can be decoded") from None
    if img.format not in ALLOWED_FORMATS:
        raise ImageError("unsupported_media_type", f"image format {img.format} is not accepted")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("invalid_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large", f"the image has {width}x{height} pixels, more than the limit of {max_pixels}"
        )
    return img


def _grey_to_uint8(img: Image.Image, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`convert` over a one-band image a block of rows at a time: only the uint8 result is full-size."""
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        block = img if bottom - top == height else img.crop((0, top, width, bottom))
        out[top:bottom] = convert(np.asarray(block))
    return out


@cache
def _grey_table(peak: int) -> np.ndarray:
    """uint8 for each 16-bit value: round(v * 255 / peak) clipped to 0..255, by the float64 formula once."""
    table = np.clip(np.arange(65536, dtype=np.float64) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
    table.flags.writeable = False  # shared by every decode thread
    return table


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; 16/32-bit grey is scaled, not clipped, and alpha is dropped."""
    if img.mode in (*_GREY16, "I"):
        table = _grey_table(65535 if img.mode in _GREY16 or img.getextrema()[1] > 255 else 255)
        # A lookup per pixel, not float64 arithmetic: the same bytes at a byte a pixel. 32-bit values outside
        # 0..65535 scale to what the table's ends give (0 and 255), so clip, then look up.
        return Image.fromarray(_grey_to_uint8(img, lambda block: table[np.clip(block, 0, 65535)])).convert("RGB")
    if img.mode == "F":
        grey = _grey_to_uint8(img, lambda block: np.clip(block, 0, 255).astype(np.uint8))
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency converts cleanly only through RGBA
    return img if img.mode == "RGB" else img.convert("RGB")


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `short`, the longer one is truncated."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_box(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop offsets (left, top), rounded half-to-even like Python's round()."""
    return round((width - size) / 2.0), round((height - size) / 2.0)


def decode(data: bytes, cfg: PreprocessConfig, max_pixels: int, draft: bool = False) -> Image.Image:
    """Bytes -> upright RGB image. With `draft`, large JPEGs are decoded at a reduced DCT scale."""
    img = open_image(data, max_pixels)
    # Resize(int) scales the shorter side to resize_size, so a thin strip grows: 16 x 1,000,000 pixels (a
    # 16 KB PNG) would become 256 x 16,000,000, 16 GB of RGB. The resized image obeys the pixel limit too.
    width, height = img.size
    new_w, new_h = resized_size(width, height, cfg.resize_size)
    if new_w * new_h > max(max_pixels, cfg.resize_size**2):
        raise ImageError(
            "image_too_large",
            f"the image's {width}x{height} pixels would resize to {new_w}x{new_h}, more than the limit of "
            f"{max_pixels}: its aspect ratio is too extreme",
        )
    with _refused_as("the image data is truncated or corrupt"):
        if draft and img.format in _JPEG_FORMATS:
            # Keep the shorter side >= resize_size so the resize still only shrinks.
            scale = cfg.resize_size / min(img.size)
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.seek(0)  # the first frame of an animation
        img.load()
        # In place: an image with nothing to turn (most) is not copied; one that is turned is replaced.
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def crop(img: Image.Image, cfg: PreprocessConfig, reducing_gap: float | None = None) -> Image.Image:
    """RGB image -> the resized, centre-cropped `input_size` square the model sees.

    Resize-then-crop, as the reference does: resizing only the crop window (PIL's `box`) is cheaper but
    moves a few pixels by one grey level, and the served inputs should be the reference's, bit for bit.
    `reducing_gap` (opt-in, it changes pixels): Pillow first shrinks by an integer factor with a box filter
    while the image stays at least that many times the target, then resamples exactly; far cheaper for
    large images.
    """
    new_w, new_h = resized_size(*img.size, cfg.resize_size)
    img = img.resize((new_w, new_h), _RESAMPLE[cfg.interpolation], reducing_gap=reducing_gap)
    left, top = crop_box(new_w, new_h, cfg.input_size)
    return img.crop((left, top, left + cfg.input_size, top + cfg.input_size))


def to_tensor(img: Image.Image, cfg: PreprocessConfig, reducing_gap: float | None = None) -> np.ndarray:
    """RGB image -> the model's input for one image.

    float32-nchw: normalised float32 (3, S, S). uint8-nhwc: the cropped RGB bytes (S, S, 3), a copy that
    owns its memory; the graph casts, normalises and transposes them.
    """
    img = crop(img, cfg, reducing_gap)
    if cfg.uint8_input:
        # np.array copies out of Pillow's buffer (np.asarray would keep the whole Image alive with it).
        return np.array(img, dtype=np.uint8)
    arr = np.asarray(img, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(cfg.mean, dtype=np.float32) / std
    return np.ascontiguousarray((arr * scale + offset).transpose(2, 0, 1))


def preprocess(
    data: bytes, cfg: PreprocessConfig, max_pixels: int, draft: bool = False, reducing_gap: float | None = None
) -> np.ndarray:
    """Upload bytes -> model input (float32 (3, S, S), or uint8 (S, S, 3) for a uint8-nhwc model), or ImageError."""
    img = decode(data, cfg, max_pixels, draft)
    with _refused_as("the image could not be resized"):
        return to_tensor(img, cfg, reducing_gap)
