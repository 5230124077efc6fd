"""Class activation maps for a request: which classes to explain, the exact maps from the feature map and the
classifier's rows (modelcard.cam), and their pictures (imaging.heatmaps), rendered on the decode pool.

Every front that explains shares this: the maps come out of the same request path as /classify's logits
(admission, decoding, batching), with the batch fetching the feature map only because this request asked.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from imaging import decode
from imaging.heatmaps import crop_region, fit, grey_png, map_on_image, normalised, overlay_png, upsample
from modelcard import ModelCard
from modelcard.cam import ClassifierHead, class_maps
from modelcard.outputs import softmax

from ..errors import ServiceError
from ..settings import Settings


def requested_classes(asked: Sequence[str], card: ModelCard) -> list[int]:
    """Class indices from `class=` values, each a class index or an exact label; 422 naming an unknown one."""
    by_label = {label: i for i, label in enumerate(card.labels)}
    out: list[int] = []
    for value in asked:
        text = value.strip()
        if text.isdigit() and int(text) < card.num_classes and text not in by_label:
            index = int(text)
        elif text in by_label:
            index = by_label[text]
        else:
            raise ServiceError(
                "invalid_parameter",
                f"query.class: {value!r} is neither a class index (0 to {card.num_classes - 1}) nor one of the "
                "model's labels (GET /model lists them)",
            )
        if index not in out:
            out.append(index)
    return out


def check_explainable(card: ModelCard, head: ClassifierHead | None) -> ClassifierHead:
    """The model's classifier rows, or the 400 that says why this model cannot be explained."""
    if not card.has_classifier:
        raise ServiceError("no_classifier")
    if card.feature_map is None or head is None:
        raise ServiceError("no_feature_map")
    return head


def chosen_classes(logits: np.ndarray, asked: list[int], k: int) -> list[list[int]]:
    """Per image, the classes to explain: those asked for, in that order, or its k most probable."""
    if asked:
        return [asked for _ in range(len(logits))]
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].tolist()


def explain_image(
    data: bytes,
    features: np.ndarray,
    logits: np.ndarray,
    classes: list[int],
    card: ModelCard,
    head: ClassifierHead,
    settings: Settings,
    max_side: int,
    pictures: bool = True,
) -> list[dict[str, Any]]:
    """One image's explanations, one per class: score, logit, the raw map, and (with `pictures`) the map on the
    crop and on the image as 16-bit grey PNGs plus the heatmap overlay, base64. Runs on the decode pool."""
    maps = class_maps(features, head, classes)
    probs = softmax(logits[None, :])[0]
    cfg = card.preprocess
    out: list[dict[str, Any]] = []
    image = None
    if pictures:
        image = decode(data, cfg, settings.max_image_pixels)  # the upright original, as preprocessing saw it
        width, height = image.size
        region = crop_region(width, height, cfg)
        factor = fit(width, height, max_side)
        shown_w, shown_h = max(1, round(width * factor)), max(1, round(height * factor))
        shown = image.resize((shown_w, shown_h)) if factor < 1 else image
        shown_region = region.scaled(factor)
    for cls, cam in zip(classes, maps, strict=True):
        low, high = float(cam.min()), float(cam.max())
        entry: dict[str, Any] = {
            "index": cls,
            "label": card.labels[cls],
            "score": float(probs[cls]),
            "logit": float(logits[cls]),
            "map": {"height": int(cam.shape[0]), "width": int(cam.shape[1]), "min": low, "max": high, "values": cam},
        }
        if image is not None:
            size = cfg.input_size
            on_image = map_on_image(cam, shown_w, shown_h, shown_region)
            unit_image = normalised(np.nan_to_num(on_image, nan=low), low, high)
            entry["crop"] = {"width": size, "height": size,
                             "png": _b64(grey_png(normalised(upsample(cam, size, size), low, high)))}  # fmt: skip
            entry["image"] = {"width": shown_w, "height": shown_h, "original_width": width,
                              "original_height": height, "crop_box": shown_region.as_list(),
                              "png": _b64(grey_png(unit_image))}  # fmt: skip
            entry["overlay"] = {"width": shown_w, "height": shown_h, "media_type": "image/png",
                                "png": _b64(overlay_png(shown, unit_image, shown_region))}  # fmt: skip
        out.append(entry)
    return out


def overlay_only(
    data: bytes, features: np.ndarray, cls: int, card: ModelCard, head: ClassifierHead, settings: Settings,
    max_side: int,
) -> bytes:  # fmt: skip
    """The heatmap overlay of one image and one class as PNG bytes (format=png). Runs on the decode pool."""
    cam = class_maps(features, head, [cls])[0]
    image = decode(data, card.preprocess, settings.max_image_pixels)
    width, height = image.size
    factor = fit(width, height, max_side)
    shown_w, shown_h = max(1, round(width * factor)), max(1, round(height * factor))
    shown = image.resize((shown_w, shown_h)) if factor < 1 else image
    region = crop_region(width, height, card.preprocess).scaled(factor)
    low, high = float(cam.min()), float(cam.max())
    unit = normalised(np.nan_to_num(map_on_image(cam, shown_w, shown_h, region), nan=low), low, high)
    return overlay_png(shown, unit, region)


async def explain_all(
    pool: Executor, blobs: Sequence[bytes], features: np.ndarray, logits: np.ndarray, classes: list[list[int]],
    card: ModelCard, head: ClassifierHead, settings: Settings, max_side: int, pictures: bool,
) -> list[list[dict[str, Any]]]:  # fmt: skip
    """Every image's explanations, rendered in parallel on `pool`."""
    loop = asyncio.get_running_loop()
    jobs = [
        loop.run_in_executor(pool, explain_image, data, fmap, row, cls, card, head, settings, max_side, pictures)
        for data, fmap, row, cls in zip(blobs, features, logits, classes, strict=True)
    ]
    return list(await asyncio.gather(*jobs))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
