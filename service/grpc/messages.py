"""The protocol's message classes, built at import from the descriptor set protoc made of inference.proto.

They live in a private descriptor pool: a client library in the same process (tritonclient.grpc, in the tests
and benchmarks) registers the same `inference.*` names in protobuf's default pool, and two files defining one
name there collide.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

SERVICE = "inference.GRPCInferenceService"
DESCRIPTOR_SET = Path(__file__).with_name("inference.binpb")


def _pool() -> descriptor_pool.DescriptorPool:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


POOL = _pool()


def message(name: str) -> type[Message]:
    """The class of `inference.<name>`."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


# Each RPC of the service: (request class, response class), from the service's own descriptor.
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    method.name: (
        message_factory.GetMessageClass(method.input_type),
        message_factory.GetMessageClass(method.output_type),
    )
    for method in POOL.FindServiceByName(SERVICE).methods
}

ModelInferResponse = message("ModelInferResponse")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelConfigResponse = message("ModelConfigResponse")
RepositoryIndexResponse = message("RepositoryIndexResponse")
