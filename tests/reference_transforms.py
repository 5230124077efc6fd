"""Mirrors torchvision's PIL eval transform in torch: torchvision cannot be installed beside the pinned CPU torch."""

# Compose([Resize(size, interpolation), CenterCrop(crop), ToTensor(), Normalize(mean, std)]) on a PIL image,
# following torchvision's PIL code path step by step:
# - Resize(int): `_compute_resized_output_size` (shorter side = size, longer = int(size * long / short)), then
#   `img.resize((w, h), resample)` (torchvision's `F_pil.resize`), skipped when the size is already right;
# - CenterCrop(int): offsets `int(round((h - th) / 2.0))`, `int(round((w - tw) / 2.0))`, then `img.crop(box)`;
# - ToTensor: `torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)`;
# - Normalize: `(t - mean[:, None, None]) / std[:, None, None]` in float32.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Reference:
    """The transform's output and the geometry it used, in the service's (width, height) / (left, top) order."""

    tensor: torch.Tensor
    resized_size: tuple[int, int]
    crop_box: tuple[int, int]


def compute_resized_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision `_compute_resized_output_size(image_size=(h, w), size=[size], max_size=None)` -> (h, w)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def resize(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """torchvision `F.resize(pil_img, size)` with an int size."""
    new_h, new_w = compute_resized_output_size(img.height, img.width, size)
    if (img.height, img.width) == (new_h, new_w):
        return img
    return img.resize((new_w, new_h), INTERPOLATION[interpolation])


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """torchvision `F.center_crop` offsets (top, left) for a square crop no larger than the image."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))  # noqa: RUF046 - torchvision's spelling


def center_crop(img: Image.Image, crop: int) -> Image.Image:
    """torchvision `F.center_crop(pil_img, crop)` for a crop that fits (the eval transform never pads)."""
    if crop > img.width or crop > img.height:
        raise ValueError("the reference covers crops that fit inside the resized image only")
    top, left = center_crop_offsets(img.height, img.width, crop)
    return img.crop((left, top, left + crop, top + crop))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision `F.to_tensor` of an 8-bit RGB PIL image: (3, H, W) float32 in [0, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"the reference takes RGB images, got {img.mode}")
    return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision `F.normalize`: per-channel (t - mean) / std in the tensor's dtype."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype)
    std_t = torch.as_tensor(std, dtype=tensor.dtype)
    return (tensor - mean_t[:, None, None]) / std_t[:, None, None]


def eval_transform(
    img: Image.Image, resize_size: int, crop: int, interpolation: str, mean: Sequence[float], std: Sequence[float]
) -> Reference:
    """Resize(resize_size) -> CenterCrop(crop) -> ToTensor -> Normalize, with the geometry it computed."""
    resized = resize(img, resize_size, interpolation)
    top, left = center_crop_offsets(resized.height, resized.width, crop)
    tensor = normalize(to_tensor(center_crop(resized, crop)), mean, std)
    return Reference(tensor, (resized.width, resized.height), (left, top))
