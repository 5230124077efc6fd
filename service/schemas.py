"""Response schemas: they document the API in OpenAPI (responses are encoded with orjson, not re-validated)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int = Field(description="ImageNet class index, 0-999")
    label: str = Field(description="class label, e.g. 'tench'")
    score: float = Field(description="softmax probability")


class Classification(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str = Field(description="the served variant")
    results: list[Classification] = Field(description="one entry per uploaded image, in upload order")


class Embedding(BaseModel):
    filename: str | None
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    dim: int = Field(description="embedding length (2048 for the published variants)")
    normalized: bool = Field(description="whether each embedding was scaled to unit L2 norm")
    results: list[Embedding]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    reasons: list[str] = Field(default_factory=list)


class ModelInfo(BaseModel):
    variant: str
    precision: str
    providers: list[str] = Field(description="execution providers actually active, first one runs the model")
    input_size: int
    preprocess: dict[str, Any]
    embedding_dim: int
    num_classes: int
    max_batch_size: int
    weights: dict[str, Any] = Field(description="checkpoint source and SHA-256, or 'random'")
    warning: str | None = Field(description="set when the model carries random weights")
    parity: dict[str, Any] = Field(description="the export's parity report summary")
    export: dict[str, Any]
