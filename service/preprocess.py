"""Image decoding and evaluation preprocessing, as pure functions over bytes and arrays.

The geometry follows torchvision's Resize(int) + CenterCrop on PIL images (shorter side to `resize_size`,
the longer side truncated, crop offsets rounded half-to-even), so the served model sees exactly what the
export's parity check and a torchvision evaluation pipeline feed it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The service enforces its own pixel limit before decoding; PIL's global bomb check would fire first, as a
# warning or an error that depends on a process-wide constant rather than on the configuration.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns about odd but decodable files (corrupt EXIF, oversized TIFF tags); they are served. One filter
# for Pillow's modules, set once: warnings.catch_warnings() around each decode is not thread-safe before
# Python 3.14 and the decode pool runs many at once.
warnings.filterwarnings("ignore", module=r"PIL\.")

ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# MPO: a JPEG carrying extra images (phones, 3-D cameras); browsers show, and we decode, the first one.
_JPEG_FORMATS = ("JPEG", "MPO")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects: a square crop of `input_size` from a `resize_size` shorter side."""

    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if not 0 < self.input_size <= self.resize_size:
            raise ValueError("need 0 < input_size <= resize_size")


class ImageError(ValueError):
    """An upload that cannot become a model input; `code` selects the HTTP answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image from its header and enforce the pixel limit before any pixel is decoded."""
    if not data:
        raise ImageError("invalid_image", "the upload is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("invalid_image", "the upload is not an image that can be decoded") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("invalid_image", "the image header is corrupt") from exc
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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; 16/32-bit grey is scaled, not clipped, and alpha is dropped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8)).convert("RGB")
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
    try:
        img = open_image(data, max_pixels)
    except Warning as exc:  # only where warnings are made errors (python -W error): refuse, never crash
        raise ImageError("invalid_image", "the image data is corrupt") from exc
    try:
        if draft and img.format in _JPEG_FORMATS:
            # Keep the shorter side >= resize_size so the resize still only shrinks.
            scale = cfg.resize_size / min(img.size)
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.seek(0)  # the first frame of an animation
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Warning) as exc:
        raise ImageError("invalid_image", "the image data is truncated or corrupt") from exc


def to_tensor(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> normalised float32 (3, input_size, input_size).

    Resize-then-crop, as the reference does: resizing only the crop window (PIL's `box`) is cheaper but
    moves a few pixels by one grey level, and the served inputs should be the reference's, bit for bit.
    """
    new_w, new_h = resized_size(*img.size, cfg.resize_size)
    img = img.resize((new_w, new_h), _RESAMPLE[cfg.interpolation])
    left, top = crop_box(new_w, new_h, cfg.input_size)
    img = img.crop((left, top, left + cfg.input_size, top + cfg.input_size))
    arr = np.asarray(img, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(cfg.mean, dtype=np.float32) / std
    return np.ascontiguousarray((arr * scale + offset).transpose(2, 0, 1))


def preprocess(data: bytes, cfg: PreprocessConfig, max_pixels: int, draft: bool = False) -> np.ndarray:
    """Upload bytes -> model input (3, S, S) float32, or ImageError."""
    return to_tensor(decode(data, cfg, max_pixels, draft), cfg)
