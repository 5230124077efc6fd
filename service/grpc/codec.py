"""Tensors of the Open Inference Protocol over gRPC: ModelInferRequest -> InferRequest, outputs -> response.

The counterpart of service/http/oip/codec.py for HTTP, producing the same InferRequest, so both transports share
the checks and the inference that follow. Inputs come as `raw_input_contents` (one little-endian buffer per
input, BYTES elements length-prefixed; what tritonclient sends) or as typed `contents`; outputs always go back
as `raw_output_contents`, as Triton's server sends them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import Message

from ..core.oip.tensors import (
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
from .messages import ModelInferResponse

# Which typed-contents field carries each datatype (FP16 and BF16 have none: the protocol sends them raw).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}


def parameter(params: Any, key: str) -> Any:
    """The value of an InferParameter map entry, whichever of its kinds is set; None when absent."""
    if key not in params:
        return None
    entry = params[key]
    kind = entry.WhichOneof("parameter_choice")
    return getattr(entry, kind) if kind else None


def _typed_elements(name: str, datatype: str, contents: Any, count: int) -> np.ndarray | list[bytes]:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise ProtocolError(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise ProtocolError(f"input {name!r}: {len(values)} value(s) in contents for a shape of {count} element(s)")
    if datatype == BYTES:
        return list(values)
    try:
        return np.asarray(values, dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"input {name!r}: its contents do not fit {datatype}") from None


def _classification(name: str, params: Any) -> int:
    k = parameter(params, "classification")
    if k is None:
        return 0
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ProtocolError(f"output {name!r}: 'classification' must be a non-negative integer")
    return k


def parse_request(request: Message, max_elements: int, max_batch: int) -> InferRequest:
    """A ModelInferRequest -> InferRequest, bounded like an HTTP body before any array is made."""
    raw = request.raw_input_contents  # type: ignore[attr-defined]
    specs = request.inputs  # type: ignore[attr-defined]
    if not specs:
        raise ProtocolError("the request needs at least one input")
    if raw and len(raw) != len(specs):
        raise ProtocolError(f"raw_input_contents holds {len(raw)} entries for {len(specs)} input(s)")
    inputs = []
    for i, spec in enumerate(specs):
        name, datatype, shape = spec.name, spec.datatype, tuple(spec.shape)
        if datatype != BYTES and datatype not in DTYPES:
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
        count = check_size(name, shape, max_elements, max_batch)
        if raw:
            data = binary_elements(name, datatype, memoryview(raw[i]), count)
        else:
            data = _typed_elements(name, datatype, spec.contents, count)
        if isinstance(data, np.ndarray):
            data = data.reshape(shape)
        inputs.append(InputTensor(name, datatype, shape, data))
    outputs = [RequestedOutput(o.name, True, _classification(o.name, o.parameters)) for o in request.outputs]  # type: ignore[attr-defined]
    return InferRequest(request.id or None, inputs, outputs or None, True)  # type: ignore[attr-defined]


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    parameters: dict[str, str] | None = None,
) -> Message:
    """The ModelInferResponse carrying `outputs` as raw contents, in order, and the response's `parameters`."""
    response = ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value  # type: ignore[attr-defined]
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))  # type: ignore[attr-defined]
        if out.datatype == BYTES:
            raw = serialize_bytes(out.data)  # type: ignore[arg-type]
        else:
            raw = np.ascontiguousarray(out.data, dtype=np.dtype(DTYPES[out.datatype]).newbyteorder("<")).tobytes()
        response.raw_output_contents.append(raw)  # type: ignore[attr-defined]
    return response
