"""The gRPC front's protocol definition: wire-compatible with the protocol's own (as the client library ships
it), and the descriptor set the server loads is what protoc makes of the committed inference.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from service.grpc.messages import DESCRIPTOR_SET, METHODS, POOL, SERVICE

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "service" / "grpc" / "inference.proto"


def _ours() -> list[Descriptor]:
    """Every message of our file, nested ones included (map entries are checked through their fields)."""
    file = POOL.FindFileByName("inference.proto")
    found: list[Descriptor] = []
    todo = list(file.message_types_by_name.values())
    while todo:
        message = todo.pop()
        found.append(message)
        todo.extend(message.nested_types)
    return found


def _kind(field) -> str:  # type: ignore[no-untyped-def]
    """A field's wire identity: number, type, repetition, and the full name of its message or enum."""
    target = field.message_type or field.enum_type
    repeated = field.is_repeated if isinstance(field.is_repeated, bool) else field.is_repeated()
    return f"{field.number}:{field.type}:{repeated}:{target.full_name if target else ''}"


def test_every_message_and_field_matches_the_protocols_own_definition() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    pool = triton.DESCRIPTOR.pool
    checked = 0
    for message in _ours():
        theirs = pool.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            assert field.name in theirs.fields_by_name, f"{message.full_name}.{field.name} is not in the protocol"
            assert _kind(field) == _kind(theirs.fields_by_name[field.name]), f"{message.full_name}.{field.name}"
            checked += 1
        for enum in message.enum_types:
            _same_enum(enum, pool.FindEnumTypeByName(enum.full_name))
    _same_enum(POOL.FindEnumTypeByName("inference.DataType"), pool.FindEnumTypeByName("inference.DataType"))
    # The RPCs: same names, same request and response messages, as the client calls them.
    service = pool.FindServiceByName(SERVICE)
    for name, (request, response) in METHODS.items():
        method = service.methods_by_name[name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            request.DESCRIPTOR.full_name,
            response.DESCRIPTOR.full_name,
        )
    assert checked > 80


def _same_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    for value in ours.values:
        assert theirs.values_by_name[value.name].number == value.number, f"{ours.full_name}.{value.name}"


def test_the_descriptor_set_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "inference.binpb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", str(PROTO)],
        check=True,
    )
    assert out.read_bytes() == DESCRIPTOR_SET.read_bytes(), "inference.proto changed: run `make proto`"
