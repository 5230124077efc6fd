"""The Open Inference Protocol over HTTP: JSON bodies and Triton's binary tensor extension.

Pure functions over bytes and arrays, so the wire format is tested apart from any route. A request body is
a JSON header, then (with `Inference-Header-Content-Length`) each binary input's bytes in input order; a
response is built the same way. BYTES elements in JSON are strings, and for encoded images (which are not
UTF-8) base64 strings.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

import numpy as np
import orjson

from ...core.oip.tensors import (
    BYTES,
    DTYPES,
    InferRequest,
    InputTensor,
    OutputTensor,
    ProtocolError,
    RequestedOutput,
    binary_elements,
    check_size,
    serialize_bytes,
)

# A byte count as a header carries it: ASCII digits, few enough for int() (str.isdigit() accepts "²").
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {shape} has a negative dimension")
    return tuple(shape)


def _flatten(name: str, data: Any, depth: int) -> list[Any]:
    """Row-major data may come flat or nested, at most `depth` lists deep (the tensor's rank less one);
    iterative, so a hostile nesting cannot exhaust the stack."""
    if not isinstance(data, list):
        return [data]
    level = data
    for _ in range(depth):
        if not level or not isinstance(level[0], list):
            break
        flat: list[Any] = []
        for item in level:
            if not isinstance(item, list):
                raise ProtocolError(f"input {name!r}: its nested data is ragged")
            flat.extend(item)
        level = flat
    if level and isinstance(level[0], list):
        raise ProtocolError(f"input {name!r}: its data is nested deeper than its shape")
    return level


def _json_elements(name: str, datatype: str, data: Any, shape: tuple[int, ...]) -> np.ndarray | list[bytes]:
    count = math.prod(shape)
    values = _flatten(name, data, max(len(shape) - 1, 0))
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: {len(values)} value(s) for a shape of {count} element(s)")
    if datatype == BYTES:
        try:
            return [base64.b64decode(v, validate=True) for v in values]
        except (binascii.Error, TypeError, ValueError):
            raise ProtocolError(f"input {name!r}: BYTES data in JSON must be base64 strings") from None
    try:
        return np.asarray(values, dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input {name!r}: its data is not all {datatype}") from None


def _output(spec: Any, binary_default: bool) -> RequestedOutput:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ProtocolError("each requested output needs a 'name'")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(f"output {spec['name']!r}: 'parameters' must be an object")
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ProtocolError(f"output {spec['name']!r}: 'classification' must be a non-negative integer")
    binary = params.get("binary_data", binary_default)
    if not isinstance(binary, bool):
        raise ProtocolError(f"output {spec['name']!r}: 'binary_data' must be true or false")
    return RequestedOutput(spec["name"], binary, k)


def parse_request(body: bytes, header_length: str | None, max_elements: int, max_batch: int) -> InferRequest:
    """An inference request body -> InferRequest, or ProtocolError naming what is wrong.

    Before any element is decoded or any array allocated, each input's declared size is bounded: at most
    `max_elements` elements, and at most `max_batch` rows (images) in its first dimension.
    """
    if header_length is not None:
        if not _BYTE_COUNT.fullmatch(header_length.strip()) or int(header_length) > len(body):
            raise ProtocolError("Inference-Header-Content-Length is not a length within the body", "malformed_request")
        split = int(header_length)
        # 0: the whole body is one raw tensor for a single-input model; this service's models take two
        # alternative inputs, so the header is required.
        if split == 0:
            raise ProtocolError("a raw binary body needs the JSON header: send Inference-Header-Content-Length > 0")
        head, binary = body[:split], memoryview(body)[split:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise ProtocolError("the request is not valid JSON", "malformed_request") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    binary_default = params.get("binary_data_output", False) is True
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    inputs, offset = [], 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each input needs a 'name'")
        name, datatype = spec["name"], spec.get("datatype")
        if datatype != BYTES and datatype not in DTYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        shape = _shape(spec, name)
        count = check_size(name, shape, max_elements, max_batch)
        in_params = spec.get("parameters") or {}
        size = in_params.get("binary_data_size") if isinstance(in_params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size runs past the end of the body")
            data = binary_elements(name, datatype, binary[offset : offset + size], count)
            offset += size
        elif "data" in spec:
            data = _json_elements(name, datatype, spec["data"], shape)
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
        if isinstance(data, np.ndarray):
            data = data.reshape(shape)
        inputs.append(InputTensor(name, datatype, shape, data))
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} byte(s) of binary data belong to no input")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = [_output(o, binary_default) for o in outputs]
    return InferRequest(request_id, inputs, outputs, binary_default, params)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    parameters: dict[str, str] | None = None,
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when nothing is binary) for an inference response; `parameters`:
    the response's own (whether the response cache answered)."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    tensors, chunks = [], []
    for out in outputs:
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.binary:
            raw = (
                serialize_bytes(out.data)  # type: ignore[arg-type]
                if out.datatype == BYTES
                else np.ascontiguousarray(out.data, dtype=np.dtype(DTYPES[out.datatype]).newbyteorder("<")).tobytes()
            )
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif out.datatype == BYTES:
            tensor["data"] = [e.decode("utf-8", "replace") for e in out.data]  # type: ignore[union-attr]
        else:
            tensor["data"] = np.asarray(out.data).reshape(-1)
        tensors.append(tensor)
    header["outputs"] = tensors
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
