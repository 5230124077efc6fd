"""Evaluation preprocessing as data: what a model expects its images to look like.

Resize the shorter side to `resize_size`, centre-crop `input_size`, scale to [0, 1], normalise per RGB
channel. crop_pct (input_size / resize_size) is the other way to state the resize, as timm does; it is
derived here and nowhere else.

`input_format` says where the last steps run. "float32-nchw" (every file written before the field existed):
the host scales, normalises and transposes, and the graph takes float32 [N, 3, S, S]. "uint8-nhwc": the host
stops at the decoded, resized and cropped RGB bytes, uint8 [N, S, S, 3], and the graph's first nodes cast,
normalise and transpose them on the device (a quarter of the bytes to copy, no float work on the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The resampling filters the service implements (Pillow's, as torchvision's PIL path uses them).
INTERPOLATIONS = ("bilinear", "bicubic")
# What the graph's input holds: normalised float32 planes, or the cropped RGB bytes (normalised in the graph).
FLOAT32_NCHW, UINT8_NHWC = "float32-nchw", "uint8-nhwc"
INPUT_FORMATS = (FLOAT32_NCHW, UINT8_NHWC)

Triple = tuple[float, float, float]


def _triple(name: str, values: Any) -> Triple:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
    return out  # type: ignore[return-value]


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PreprocessConfig:
    """A square crop of `input_size` from a `resize_size` shorter side, normalised by `mean` and `std`."""

    input_size: int
    resize_size: int
    interpolation: str
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    input_format: str = FLOAT32_NCHW

    def __post_init__(self) -> None:
        size, resize = _size("input_size", self.input_size), _size("resize_size", self.resize_size)
        if size > resize:
            raise ValueError(f"input_size {size} is larger than resize_size {resize}: the crop would not fit")
        if self.interpolation not in INTERPOLATIONS:
            supported = ", ".join(INTERPOLATIONS)
            raise ValueError(f"unsupported interpolation {self.interpolation!r}; supported: {supported}")
        # Normalised to float tuples, so configs read back from JSON compare equal to the ones written.
        object.__setattr__(self, "mean", _triple("mean", self.mean))
        std = _triple("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        object.__setattr__(self, "std", std)
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"unsupported input_format {self.input_format!r}; supported: {', '.join(INPUT_FORMATS)}")

    @property
    def uint8_input(self) -> bool:
        """Whether the graph takes the cropped RGB bytes (uint8 NHWC) and normalises them itself."""
        return self.input_format == UINT8_NHWC

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image as the graph takes it, batch axis left out: (3, S, S) or (S, S, 3)."""
        size = self.input_size
        return (size, size, 3) if self.uint8_input else (3, size, size)

    @property
    def input_dtype(self) -> str:
        """The graph input's numpy dtype name: "float32" or "uint8"."""
        return "uint8" if self.uint8_input else "float32"

    @property
    def crop_pct(self) -> float:
        """The share of the resized shorter side that the crop keeps."""
        return self.input_size / self.resize_size

    @staticmethod
    def resize_for(input_size: int, crop_pct: float) -> int:
        """timm's resize for a crop_pct: floor(input_size / crop_pct)."""
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        # The epsilon keeps a crop_pct computed as a ratio of integers (224/256) from flooring to one below.
        return math.floor(input_size / crop_pct + 1e-6)

    @classmethod
    def from_crop_pct(
        cls,
        input_size: int,
        crop_pct: float,
        interpolation: str,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
    ) -> PreprocessConfig:
        """The config timm describes by (input_size, crop_pct)."""
        return cls(input_size, cls.resize_for(input_size, crop_pct), interpolation, mean, std)

    def with_overrides(
        self,
        *,
        input_size: int | None = None,
        resize_size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
    ) -> PreprocessConfig:
        """This config with some fields replaced, like timm's pretrained_cfg_overlay.

        The resize comes from `resize_size` or `crop_pct` (not both); a new input size alone keeps this
        config's crop_pct.
        """
        if resize_size is not None and crop_pct is not None:
            raise ValueError("give resize_size or crop_pct, not both: each determines the other")
        size = self.input_size if input_size is None else input_size
        if resize_size is not None:
            resize = resize_size
        elif crop_pct is not None:
            resize = self.resize_for(size, crop_pct)
        elif size == self.input_size:
            resize = self.resize_size
        else:
            resize = self.resize_for(size, self.crop_pct)
        return replace(
            self,
            input_size=size,
            resize_size=resize,
            interpolation=self.interpolation if interpolation is None else interpolation,
            mean=self.mean if mean is None else mean,
            std=self.std if std is None else std,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; crop_pct is informative (resize_size is what is applied)."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "crop_pct": round(self.crop_pct, 4),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            # Older readers ignore the key; files without it are float32-nchw (from_dict).
            "input_format": self.input_format,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """Inverse of to_dict (crop_pct, being derived, is ignored; no input_format: float32-nchw)."""
        fmt = data.get("input_format", FLOAT32_NCHW)
        return cls(data["input_size"], data["resize_size"], data["interpolation"], data["mean"], data["std"], fmt)
