"""The image formats the service decodes: by Pillow's name, and by the media types clients declare for them."""

from __future__ import annotations

# Pillow's format name -> the media types a client may declare for it. MPO is a JPEG carrying extra images
# (phones, 3-D cameras): browsers show, and we decode, the first one; clients declare it as image/jpeg.
FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "MPO": (),
    "PNG": ("image/png",),
    "GIF": ("image/gif",),
    "WEBP": ("image/webp",),
    "BMP": ("image/bmp", "image/x-ms-bmp"),
    "TIFF": ("image/tiff",),
}
# A part that declares no type, or only "bytes", is decoded too: its header says what it is.
GENERIC_MEDIA_TYPES = ("application/octet-stream", "")
MEDIA_TYPES = frozenset({t for types in FORMATS.values() for t in types} | set(GENERIC_MEDIA_TYPES))
