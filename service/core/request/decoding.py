"""Stage 2, decoding: encoded image files to the model's input tensors, on the decode pool, off the event loop.

Decoding and preprocessing themselves are imaging's (the same functions the export's parity check used), so
a served model sees exactly the pixels it was proven on; a file that cannot become a tensor is that image's
4xx, named by its index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from imaging import MEDIA_TYPES, ImageError, preprocess
from modelcard import PreprocessConfig

from ..errors import ServiceError
from ..settings import Settings


def check_media_types(declared: Sequence[str | None]) -> None:
    """Refuse (415) an image whose declared media type is not one we decode, before any byte is read."""
    for i, media_type in enumerate(declared):
        kind = (media_type or "").split(";")[0].strip().lower()
        if kind not in MEDIA_TYPES:
            raise ServiceError("unsupported_media_type", f"image {i}: content type {kind!r} is not accepted")


async def decode_images(
    pool: Executor, settings: Settings, cfg: PreprocessConfig, blobs: Sequence[bytes]
) -> list[np.ndarray]:
    """Encoded image files -> the model's input tensors, in parallel on `pool`; any failure is that image's 4xx."""
    loop = asyncio.get_running_loop()
    args = (cfg, settings.max_image_pixels, settings.jpeg_draft, settings.resize_reducing_gap)
    jobs = [loop.run_in_executor(pool, preprocess, blob, *args) for blob in blobs]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, ImageError):
            raise ServiceError(result.code, f"image {i}: {result}")
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]
