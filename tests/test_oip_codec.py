"""The OIP wire format on its own: requests as tritonclient encodes them, responses as tritonclient decodes them."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request

from service.core.oip.tensors import BYTES, OutputTensor, ProtocolError, deserialize_bytes, serialize_bytes
from service.http.oip.codec import encode_response, parse_request

LIMIT = 10**7


def triton_body(inputs: list[triton.InferInput], outputs: list[triton.InferRequestedOutput] | None = None):  # type: ignore[no-untyped-def]
    """(body, Inference-Header-Content-Length) exactly as tritonclient.http would send them."""
    body, header_length = _get_inference_request(inputs, "req-1", outputs, 0, False, False, 0, None, None)
    return body, None if header_length is None else str(header_length)


def test_binary_fp32_and_bytes_inputs_from_tritonclient_parse_to_the_same_values() -> None:
    images = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    blobs = np.array([b"\xff\xd8jpeg-one", b"\x89PNG-two\x00"], dtype=np.object_)
    a = triton.InferInput("images", list(images.shape), "FP32")
    a.set_data_from_numpy(images, binary_data=True)
    b = triton.InferInput("image_bytes", [2], "BYTES")
    b.set_data_from_numpy(blobs, binary_data=True)
    out = [
        triton.InferRequestedOutput("logits", binary_data=True, class_count=3),
        triton.InferRequestedOutput("embedding"),
    ]
    body, header = triton_body([a, b], out)
    assert header is not None
    req = parse_request(body, header, LIMIT, 16)
    assert req.id == "req-1"
    np.testing.assert_array_equal(req.inputs[0].data, images)
    assert req.inputs[1].data == [b"\xff\xd8jpeg-one", b"\x89PNG-two\x00"]
    assert [(o.name, o.binary, o.classification) for o in req.outputs or []] == [
        ("logits", True, 3),
        ("embedding", True, 0),
    ]


def test_json_inputs_flat_or_nested_and_base64_bytes() -> None:
    images = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    a = triton.InferInput("images", list(images.shape), "FP32")
    a.set_data_from_numpy(images, binary_data=False)
    body, header = triton_body([a])
    assert header is None  # all JSON
    req = parse_request(body, header, LIMIT, 16)
    np.testing.assert_array_equal(req.inputs[0].data, images)
    assert req.outputs is None and req.binary_default  # no outputs named: every output, binary (tritonclient's ask)
    nested = {"inputs": [{"name": "images", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": images.tolist()}]}
    np.testing.assert_array_equal(parse_request(json.dumps(nested).encode(), None, LIMIT, 16).inputs[0].data, images)
    encoded = base64.b64encode(b"\xff\xd8\x00raw").decode()
    doc = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
    assert parse_request(json.dumps(doc).encode(), None, LIMIT, 16).inputs[0].data == [b"\xff\xd8\x00raw"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"inputs": []}, "non-empty 'inputs'"),
        (
            {"inputs": [{"name": "images", "shape": [2], "datatype": "FP32", "data": [1.0]}]},
            "1 value(s) for a shape of 2",
        ),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}, "unknown datatype"),
        ({"inputs": [{"name": "images", "shape": [-1], "datatype": "FP32", "data": []}]}, "negative dimension"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": ["x"]}]}, "not all FP32"),
        ({"inputs": [{"name": "b", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, "base64"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32"}]}, "neither 'data' nor"),
        ({"inputs": [{"name": "images", "shape": [10**9], "datatype": "FP32", "data": []}]}, "more than the limit"),
        ({"inputs": [{"name": "b", "shape": [17], "datatype": "BYTES", "data": [""] * 17}]}, "at most 16 images"),
        ({"inputs": [{"name": "i", "shape": [1, 1], "datatype": "FP32", "data": [[[1.0]]]}]}, "nested deeper"),
        ({"inputs": [{"name": "i", "shape": [2, 1], "datatype": "FP32", "data": [[1.0], 2.0]}]}, "ragged"),
    ],
)
def test_malformed_requests_name_what_is_wrong(doc: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError, match=re.escape(message)):
        parse_request(json.dumps(doc).encode(), None, LIMIT, 16)


def test_binary_sizes_that_do_not_add_up_are_refused() -> None:
    head = json.dumps(
        {"inputs": [{"name": "images", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    ).encode()
    parse_request(head + b"\x00" * 8, str(len(head)), LIMIT, 16)
    with pytest.raises(ProtocolError, match="runs past the end"):
        parse_request(head + b"\x00" * 4, str(len(head)), LIMIT, 16)
    with pytest.raises(ProtocolError, match="belong to no input"):
        parse_request(head + b"\x00" * 12, str(len(head)), LIMIT, 16)
    with pytest.raises(ProtocolError, match="not a length within the body"):
        parse_request(head, str(len(head) + 1), LIMIT, 16)
    with pytest.raises(ProtocolError, match="length prefix is cut short"):
        deserialize_bytes(b"\x05\x00")


def test_responses_decode_in_tritonclient_binary_and_json() -> None:
    logits = np.random.default_rng(1).standard_normal((2, 5), dtype=np.float32)
    labels = [b"0.9:1:cat", b"0.1:0:dog"]
    outputs = [
        OutputTensor("logits", "FP32", (2, 5), logits, binary=True),
        OutputTensor("embedding", "FP32", (2, 5), logits * 2, binary=False),
        OutputTensor("classes", BYTES, (2, 1), labels, binary=True),
        OutputTensor("classes_json", BYTES, (2, 1), labels, binary=False),
    ]
    body, header = encode_response("resnest", "1", "req-9", outputs)
    result = InferResult.from_response_body(body, header_length=header)
    assert result.get_response()["id"] == "req-9"
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_allclose(result.as_numpy("embedding"), logits * 2, rtol=1e-6)
    assert result.as_numpy("classes").reshape(-1).tolist() == labels
    assert [str(v) for v in result.as_numpy("classes_json").reshape(-1)] == ["0.9:1:cat", "0.1:0:dog"]
    json_only, none = encode_response("resnest", "1", None, outputs[1:2])
    assert none is None and "id" not in json.loads(json_only)


def test_bytes_round_trip() -> None:
    elements = [b"", b"a", b"\x00" * 300]
    assert deserialize_bytes(serialize_bytes(elements), 3) == elements


def test_hostile_nesting_is_refused_without_recursion() -> None:
    # 990 levels: within orjson's depth limit, far beyond the stack a recursive flatten would need.
    deep = "[" * 990 + "1.0" + "]" * 990
    body = f'{{"inputs": [{{"name": "images", "shape": [1], "datatype": "FP32", "data": {deep}}}]}}'
    with pytest.raises(ProtocolError, match="nested deeper than its shape"):
        parse_request(body.encode(), None, LIMIT, 16)
