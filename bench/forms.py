"""Multipart bodies byte for byte as clients send them: the one builder the benchmarks and tests share."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass

BOUNDARY = "resnest-b0undary"


def content_type(boundary: str = BOUNDARY) -> str:
    """The Content-Type header of a body built here."""
    return f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Part:
    """One multipart part; `filename=None` makes it a plain form field, `ctype=None` omits its Content-Type."""

    data: bytes
    name: str = "images"
    filename: str | None = "upload.bin"
    ctype: str | None = "image/jpeg"

    def head(self, boundary: str = BOUNDARY) -> bytes:
        """The part's opening boundary and headers, up to where its data starts."""
        disposition = f'Content-Disposition: form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        ctype = f"Content-Type: {self.ctype}\r\n" if self.ctype is not None else ""
        return f"--{boundary}\r\n{disposition}\r\n{ctype}\r\n".encode()


def multipart(parts: list[Part], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """The parts as one body; `close=False` leaves out the closing boundary."""
    out = bytearray()
    for part in parts:
        out += part.head(boundary) + part.data + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def images(*blobs: bytes, boundary: str = BOUNDARY) -> bytes:
    """JPEG uploads in the `images` field, named 0.jpg, 1.jpg, ..."""
    return multipart([Part(blob, filename=f"{i}.jpg") for i, blob in enumerate(blobs)], boundary)


def opening(boundary: str = BOUNDARY, ctype: str | None = None) -> bytes:
    """The head of one image part, for a body whose data is streamed, trickled or never sent after it."""
    return Part(b"", filename="a.jpg", ctype=ctype).head(boundary)


def sized(size: int, boundary: str = BOUNDARY) -> bytes:
    """One image part of filler bytes making a body of exactly `size` bytes, closing boundary included."""
    head, tail = opening(boundary), f"\r\n--{boundary}--\r\n".encode()
    return head + b"x" * (size - len(head) - len(tail)) + tail


Files = list[tuple[str, tuple[str, bytes, str]]]


def files(*blobs: bytes, field: str = "images", kind: str = "image/jpeg") -> Files:
    """The same uploads as httpx's `files=`, named 0.jpg, 1.jpg, ... after their media type."""
    suffix = mimetypes.guess_extension(kind) or ".bin"
    return [(field, (f"{i}{suffix}", blob, kind)) for i, blob in enumerate(blobs)]
