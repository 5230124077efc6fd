"""OpenAPI schemas of the OIP routes: they document the protocol's bodies (requests are parsed by the codec,
which also takes Triton's binary form, so these models are never used to validate)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ...core.errors import ERRORS


class OipError(BaseModel):
    error: str = Field(description="what went wrong, for the client")


class Tensor(BaseModel):
    name: str
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64 or BYTES")
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size for binary data")
    data: list[Any] | None = Field(None, description="row-major values, flat or nested; BYTES as base64 strings")


class RequestedOutput(BaseModel):
    name: str = Field(description="logits, embedding or probabilities")
    parameters: dict[str, Any] | None = Field(None, description="binary_data (bool), classification (top k)")


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output: every output binary")
    inputs: list[Tensor] = Field(description="exactly one: images (FP32 [N,3,S,S]) or image_bytes (BYTES [N,1])")
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[Tensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Readiness(BaseModel):
    ready: bool
    name: str | None = None
    version: str | None = None


class Live(BaseModel):
    live: bool


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, UNLOADING or UNAVAILABLE")
    reason: str | None = None


class Empty(BaseModel):
    pass


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error table's statuses a route can answer, in the protocol's error form."""
    return {
        status: {"model": OipError, "description": ", ".join(c for c, k in ERRORS.items() if k.http == status)}
        for status in statuses
    }


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Triton's binary extension: the JSON header (Inference-Header-Content-Length "
                "bytes), then each binary input's bytes",
            },
        },
    },
}
INFER_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON, or with binary outputs the JSON header then their bytes",
    }
}


def components() -> dict[str, Any]:
    """Component schemas that only the hand-written request body above refers to."""
    schema = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    found: dict[str, Any] = schema.pop("$defs", {})
    return {**found, "InferRequest": schema}
