"""The Open Inference Protocol's tensors apart from any wire: datatypes, a parsed request and the outputs to
send, the binary form of BYTES elements (a 4-byte little-endian length, then the bytes: Triton's binary
extension over HTTP and raw contents over gRPC alike), and the size bounds checked before anything is
allocated. Each transport's codec (service/http/oip/codec.py, service/grpc/codec.py) produces and consumes
these.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# OIP datatype -> numpy dtype (BYTES: a list of bytes objects instead of an array).
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
BYTES = "BYTES"
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request the protocol cannot carry out; `code` selects the answer from the service's error table."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class InputTensor:
    """One decoded input: an array for numeric types, a list of bytes for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: as binary or JSON, and optionally as the top `classification`."""

    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """A parsed inference request."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output, in `binary_default` form
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One output to send: numeric array, or BYTES elements."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool


def serialize_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in the binary extension's form: each a 4-byte little-endian length, then the bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(buffer: bytes | memoryview, count: int | None = None) -> list[bytes]:
    """The inverse of serialize_bytes; every byte must belong to an element."""
    view, out, offset = memoryview(buffer), [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ProtocolError("a BYTES element's length prefix is cut short")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError("a BYTES element is longer than the data sent for it")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(out) != count:
        raise ProtocolError(f"the BYTES data holds {len(out)} element(s), its shape says {count}")
    return out


def check_size(name: str, shape: tuple[int, ...], max_elements: int, max_batch: int) -> int:
    """An input's element count, refused before anything is allocated when it passes either bound."""
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError(
            f"input {name!r}: {count} elements, more than the limit of {max_elements}", "payload_too_large"
        )
    if shape and shape[0] > max_batch:
        raise ProtocolError(f"input {name!r}: at most {max_batch} images per request", "too_many_images")
    return count


def binary_elements(name: str, datatype: str, chunk: memoryview, count: int) -> np.ndarray | list[bytes]:
    if datatype == BYTES:
        return deserialize_bytes(chunk, count)
    dtype = np.dtype(DTYPES[datatype])
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: {len(chunk)} bytes of binary data for {count} {datatype} element(s) "
            f"({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
