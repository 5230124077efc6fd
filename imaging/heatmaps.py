"""Class activation maps as pictures: a map upsampled to the crop the model saw and to the upright original
image (where that crop lies in it), encoded as 16-bit grey PNGs, and a heatmap over the image as an RGB PNG.

Numpy and Pillow only. The geometry is the preprocessing's own (transforms.resized_size, crop_box), so a map
lands on the pixels the model was given.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from modelcard import PreprocessConfig

from .transforms import crop_box, resized_size

# Grey levels of the 16-bit map PNGs: 0 is the map's minimum, 65535 its maximum.
LEVELS = 65535


@dataclass(frozen=True)
class Region:
    """Where the model's crop lies in the upright original image, in its pixels (floats: the resize scales)."""

    left: float
    top: float
    right: float
    bottom: float

    def scaled(self, factor: float) -> Region:
        return Region(self.left * factor, self.top * factor, self.right * factor, self.bottom * factor)

    def as_list(self) -> list[float]:
        return [round(v, 3) for v in (self.left, self.top, self.right, self.bottom)]


def crop_region(width: int, height: int, cfg: PreprocessConfig) -> Region:
    """The part of a width x height upright image that preprocessing resizes and crops into the model's input."""
    new_w, new_h = resized_size(width, height, cfg.resize_size)
    left, top = crop_box(new_w, new_h, cfg.input_size)
    sx, sy = width / new_w, height / new_h
    size = cfg.input_size
    return Region(left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def upsample(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (h, w) map resized bilinearly to (height, width), float32 (each map cell's value at its centre)."""
    image = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))  # mode F
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def normalised(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` scaled so `low` is 0 and `high` is 1 (a flat map is all 0), clipped to [0, 1]."""
    span = high - low
    if not np.isfinite(span) or span <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / span, 0.0, 1.0).astype(np.float32)


def grey_png(unit: np.ndarray) -> bytes:
    """A [0, 1] map as a 16-bit greyscale PNG."""
    levels = np.round(unit * LEVELS).astype(np.uint16)
    return _png(Image.fromarray(levels))


def jet(unit: np.ndarray) -> np.ndarray:
    """The classic jet colour map of a [0, 1] map: (h, w, 3) float32 RGB in [0, 1], blue low, red high."""
    x = unit[..., None] * 4.0
    centres = np.asarray([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(x - centres), 0.0, 1.0).astype(np.float32)


# The jet map of each 8-bit level, for the overlay: one table lookup per pixel instead of float arithmetic.
_JET_LUT = np.round(jet(np.linspace(0.0, 1.0, 256, dtype=np.float32)) * 255).astype(np.uint16)


def fit(width: int, height: int, max_side: int) -> float:
    """The factor that scales width x height down to fit max_side (1.0 when it already fits)."""
    return min(1.0, max_side / max(width, height))


def overlay_png(image: Image.Image, unit_on_image: np.ndarray, region: Region) -> bytes:
    """The heatmap blended half and half over the (already scaled) RGB image inside the model's crop; outside
    it, the image dimmed by half, since the model never saw that part. Integer arithmetic on 8-bit pixels."""
    rgb = np.asarray(image, dtype=np.uint16)
    heat = _JET_LUT[np.round(unit_on_image * 255).astype(np.uint8)]
    out = rgb >> 1
    top, bottom, left, right = _pixels(region)
    inside = (slice(max(0, top), bottom), slice(max(0, left), right))
    out[inside] = (rgb[inside] + heat[inside]) >> 1
    return _png(Image.fromarray(out.astype(np.uint8)))


def map_on_image(cam: np.ndarray, width: int, height: int, region: Region) -> np.ndarray:
    """A (h, w) map placed on a width x height canvas: upsampled over `region`, NaN where the model saw nothing."""
    canvas = np.full((height, width), np.nan, dtype=np.float32)
    top, bottom, left, right = _pixels(region)
    top, bottom, left, right = max(0, top), min(height, bottom), max(0, left), min(width, right)
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = upsample(cam, right - left, bottom - top)
    return canvas


def _pixels(region: Region) -> tuple[int, int, int, int]:
    """The region's (top, bottom, left, right) rounded to whole pixels, for slicing."""
    return round(region.top), round(region.bottom), round(region.left), round(region.right)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # speed over size: a map PNG is small either way
    return out.getvalue()
