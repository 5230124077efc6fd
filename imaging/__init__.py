"""From an image file's bytes to the model's input tensor, exactly as the model card's preprocessing says.

Numpy and Pillow only: the export's parity check and int8 calibration, the service and the batch job all
decode and preprocess through these functions, so each gives the model the same pixels.
"""

from __future__ import annotations

from .formats import FORMATS, MEDIA_TYPES
from .transforms import ImageError, configure_pillow, decode, preprocess

__all__ = ["FORMATS", "MEDIA_TYPES", "ImageError", "configure_pillow", "decode", "preprocess"]
