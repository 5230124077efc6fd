"""Response schemas: they document the API in OpenAPI (responses are encoded with orjson, not re-validated)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    index: int = Field(description="class index, 0 to num_classes - 1 (ImageNet: 0-999)")
    label: str = Field(description="class label, from the labels exported with the model (e.g. 'tench')")
    score: float = Field(description="softmax probability")


class Classification(BaseModel):
    filename: str | None
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str = Field(description="the served variant")
    model_name: str = Field(description="the model's name (a repository folder, or the model file's stem)")
    model_version: int = Field(description="the version that answered")
    results: list[Classification] = Field(description="one entry per uploaded image, in upload order")


class Embedding(BaseModel):
    filename: str | None
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    model_name: str
    model_version: int
    dim: int = Field(description="embedding length (2048 for the published variants)")
    normalized: bool = Field(description="whether each embedding was scaled to unit L2 norm")
    results: list[Embedding]


class ClassMap(BaseModel):
    height: int
    width: int
    min: float
    max: float
    values: list[list[float]] = Field(description="the raw map, h x w: its mean plus the class's bias is the logit")


class MapPicture(BaseModel):
    width: int
    height: int
    png: str = Field(description="base64 PNG, 16-bit grey: 0 is the map's min, 65535 its max")


class ImageMapPicture(MapPicture):
    original_width: int
    original_height: int
    crop_box: list[float] = Field(description="the model's crop in this picture: left, top, right, bottom")


class Overlay(BaseModel):
    width: int
    height: int
    media_type: str
    png: str = Field(description="base64 RGB PNG: the heatmap over the crop the model saw, the rest dimmed")


class ClassExplanation(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability, as /classify answers it")
    logit: float
    map: ClassMap
    crop: MapPicture | None = Field(None, description="the map upsampled to the crop the model saw")
    image: ImageMapPicture | None = Field(None, description="the map upsampled onto the original image")
    overlay: Overlay | None = None


class Explanation(BaseModel):
    filename: str | None
    classes: list[ClassExplanation]


class ExplainResponse(BaseModel):
    model: str
    model_name: str
    model_version: int
    feature_map: list[int] = Field(description="channels, height, width of the last feature map")
    results: list[Explanation] = Field(description="one entry per uploaded image, in upload order")


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


class TopKLimits(BaseModel):
    default: int = Field(description="predictions per image when top_k is not given (capped at num_classes)")
    max: int = Field(description="largest top_k accepted: the smaller of RESNEST_TOP_K_MAX and num_classes")


class ModelInfo(BaseModel):
    name: str = Field(description="the model's name, as requests give it in model=")
    version: int
    versions: list[int] = Field(description="every version of this model being served")
    models: list[str] = Field(description="every model being served")
    memory_bytes: int = Field(description="resident memory this version added when it was loaded and warmed")
    variant: str
    precision: str
    providers: list[str] = Field(description="execution providers actually active, first one runs the model")
    acceleration: dict[str, Any] | None = Field(
        None,
        description="the inference path actually active: plain, io_binding or io_binding+cuda_graphs, the input "
        "format, and why an option is off",
    )
    input_size: int
    preprocess: dict[str, Any] = Field(description="resize, crop, interpolation and normalisation applied to uploads")
    embedding_dim: int
    num_classes: int = Field(description="classes the classifier scores; 0 for a headless (embedding-only) model")
    labels_source: str = Field(
        description="where the labels came from: 'imagenet' (bundled), 'file' (--labels at export, see "
        "export.labels_file), 'generic' (class_<i>: nobody named the classes), 'none' (headless)"
    )
    labels: list[str] = Field(description="class labels in class-index order")
    outputs: list[str] = Field(
        description="the graph's outputs: ['logits', 'embedding', 'features'] (or without 'features', exported "
        "before class activation maps), or ['embedding'] headless"
    )
    explainable: bool = Field(description="whether POST /explain can answer for this model")
    feature_map: list[int] | None = Field(description="channels, height, width of the features output, or null")
    top_k: TopKLimits | None = Field(description="top_k limits of /classify; null when the model has no classifier")
    max_batch_size: int
    weights: dict[str, Any] = Field(description="checkpoint source and SHA-256, or 'random'")
    warning: str | None = Field(description="all warnings in one string (random weights, unnamed classes), or null")
    warnings: list[str] = Field(description="each warning on its own")
    parity: dict[str, Any] = Field(description="the export's parity report summary")
    quantization: dict[str, Any] | None = Field(
        description="int8 only: recipe, calibration, nodes left in float and the accuracy report against fp32"
    )
    export: dict[str, Any]
