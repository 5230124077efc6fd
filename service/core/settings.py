"""Service configuration: environment variables with the RESNEST_ prefix, validated at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RESNEST_"
# After the listener closes, connections accepted an instant before get this long to deliver their request.
LATE_REQUEST_WAIT_S = 0.3
# Of the shutdown budget, the least left for in-flight work once the drain grace and late wait are spent.
MIN_FINISH_S = 1.0
# Starlette parses each multipart part into memory up to 1 MiB, then spools it to a temporary file.
UPLOAD_PART_IN_MEMORY_BYTES = 2**20
# Working memory of one decode, per pixel of the largest image: the decoded image (RGBA at most, 4 bytes),
# one converted copy (RGB, 3) and the resize's source copy (3); measured paths stay below it.
DECODE_BYTES_PER_PIXEL = 10
# Variables with the prefix that belong to other parts of the project (the export's checkpoint cache).
NOT_SERVICE_SETTINGS = frozenset({"RESNEST_CACHE"})


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers' cpusets narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the service. `python -m service --help` and the README list them with defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, protected_namespaces=(), validate_default=True
    )

    model_path: Path = Field(
        Path("artifacts/resnest50-fp32.onnx"), description="the exported .onnx file to serve (one model, version 1)"
    )
    model_repository: Path | None = Field(
        None, description="serve a Triton-layout repository instead: <dir>/<model>/<version>/model.onnx"
    )
    model_control: bool = Field(
        False,
        description="allow POST /v2/repository/models/{m}/load and /unload and their gRPC RPCs (Triton's explicit "
        "mode); needs RESNEST_CONTROL_KEY set",
    )
    default_model: str | None = Field(
        None, description="the model of requests that name none (default: the only one served)"
    )
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="execution provider preference: auto tries CUDA then falls back to CPU"
    )
    require_gpu: bool = Field(False, description="refuse to start unless the CUDA EP is really active")
    cuda_device_id: int = Field(0, ge=0, description="GPU ordinal for the CUDA EP")
    max_batch_size: int = Field(8, ge=1, le=1024, description="most images in one inference run")
    pad_batches: bool = Field(
        False,
        description="pad every batch up to the next warmed shape (fixed shapes, e.g. for CUDA graphs); "
        "without it a batch is cut down to one",
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="when idle, wait this long for more images to fill a batch"
    )
    max_queue_size: int = Field(64, ge=1, description="most images waiting for inference; beyond it: 429")
    max_concurrent_requests: int = Field(
        256,
        ge=1,
        description="most /classify, /embed and OIP infer requests in progress at once (read, decoded or queued); "
        "beyond: 429",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline per request, queueing included; then 504")
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request body may pause this long between two reads, and gets this long plus what "
        "RESNEST_BODY_MIN_RATE allows for the bytes it sent; past either: 408 and the connection closes",
    )
    body_min_rate: int = Field(
        16 * 1024,
        ge=1,
        description="bytes per second a request body must average past its first RESNEST_BODY_TIMEOUT_S (a "
        "trickling client is cut off as a silent one is)",
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a batch still inside the model after this long fails liveness (/healthz, /v2/health/live, "
        "gRPC ServerLive), so the orchestrator restarts a process whose runtime is stuck; readiness fails after "
        "RESNEST_REQUEST_TIMEOUT_S",
    )
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="most bytes in one request body; beyond: 413")
    max_buffered_upload_bytes: int = Field(
        160 * 2**20,
        ge=1024,
        description="most request-body bytes held at once by all uploads in progress (memory and the temp-dir "
        "spool); beyond: 429",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="most pixels (width x height) per image; beyond: 413")
    max_images_per_request: int = Field(16, ge=1, description="most images in one request; beyond: 413")
    top_k_default: int = Field(5, ge=1, description="predictions per image when top_k is not given")
    top_k_max: int = Field(100, ge=1, description="largest top_k accepted")
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0: one per physical core)")
    inter_op_threads: int = Field(1, ge=0, description="ORT inter-op threads")
    ort_spinning: bool = Field(
        True, description="let idle ORT threads spin for work (lower latency; costs CPU that decoding could use)"
    )
    decode_threads: int = Field(
        default_factory=lambda: available_cpus(),
        ge=1,
        description="image decode/preprocess threads (default: the CPUs this process may run on; Pillow releases "
        "the GIL while it decodes and resizes)",
    )
    jpeg_draft: bool = Field(
        False, description="decode large JPEGs at reduced DCT scale (faster; pixels differ slightly from reference)"
    )
    # The GPU path: host work per image, and how batches reach the device (service/core/request/inference.py).
    resize_reducing_gap: float | None = Field(
        None,
        ge=1.0,
        description="shrink large images by an integer factor (box filter) while they stay this many times the "
        "resize target, then resize exactly (Pillow's reducing_gap; faster, pixels differ slightly; unset: off)",
    )
    io_binding: bool = Field(
        True,
        description="feed ONNX Runtime through IO binding: one reused host buffer per warmed batch shape (pinned "
        "on CUDA), outputs fetched once; off or other shapes: session.run",
    )
    cuda_graphs: bool = Field(
        False,
        description="capture one CUDA graph per warmed batch shape during warm-up and replay it (needs the CUDA "
        "EP and io_binding; elsewhere the plain path runs and GET /model says why)",
    )
    drain_grace_s: float = Field(
        5.0, ge=0, description="after SIGTERM: seconds /readyz answers 503 while requests are still served"
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="after SIGTERM: most seconds until the process exits, drain grace included; what is still "
        "in flight then gets 503 and the exit code is 3",
    )
    api_key: SecretStr | None = Field(
        None,
        description="if set, 'Bearer <key>' is needed by /classify, /embed, /model and the /v2 metadata, config, "
        "infer and repository index routes, and as gRPC 'authorization' metadata by their RPCs, checked before "
        "any body is read (health, readiness, server metadata, /metrics, /docs and the page stay open)",
    )
    control_key: SecretStr | None = Field(
        None,
        description="the key ('Bearer <key>') of model load and unload, over HTTP and gRPC; needed with "
        "RESNEST_MODEL_CONTROL, and different from RESNEST_API_KEY (clients that may infer may not swap models)",
    )
    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port (0: any free port, logged at start)")
    grpc_enabled: bool = Field(
        True, description="also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService)"
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC listen port, on the same host (0: any free port, logged at start)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: lines for people; json: one JSON object per line (log pipelines)"
    )
    otel_endpoint: str | None = Field(
        None,
        description="send OpenTelemetry traces over OTLP to this collector (http://host:4318, or host:4317 with "
        "OTEL_EXPORTER_OTLP_PROTOCOL=grpc); unset: tracing off. OTEL_* variables are honoured",
    )
    cache_bytes: int = Field(
        0, ge=0, description="an in-process response cache of at most this many bytes of model outputs (0: off)"
    )
    cache_url: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="a response cache in Redis, shared by every replica (redis://host:6379/0); wins over cache_bytes",
    )
    cache_ttl_s: int = Field(86400, ge=1, description="how long Redis keeps a cached answer")
    cache_timeout_ms: float = Field(
        50.0, gt=0, description="longest wait for Redis per lookup or store; past it, the model answers"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.top_k_default > self.top_k_max:
            raise ValueError(f"top_k_default ({self.top_k_default}) exceeds top_k_max ({self.top_k_max})")
        if self.max_images_per_request > self.max_queue_size:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) exceeds max_queue_size "
                f"({self.max_queue_size}): such a request could never be admitted"
            )
        if self.model_repository is not None and "model_path" in self.model_fields_set:
            raise ValueError("set model_path or model_repository, not both: a repository names its own files")
        if self.model_control and self.control_key is None:
            raise ValueError("model_control lets a client load and unload models: it needs control_key set too")
        if (
            self.control_key is not None
            and self.api_key is not None
            and (self.control_key.get_secret_value() == self.api_key.get_secret_value())
        ):
            raise ValueError("control_key equals api_key: every client that may infer could load and unload models")
        if self.max_upload_bytes > self.max_buffered_upload_bytes:
            raise ValueError(
                f"max_upload_bytes ({self.max_upload_bytes}) exceeds max_buffered_upload_bytes "
                f"({self.max_buffered_upload_bytes}): an upload of the largest allowed size could never be admitted"
            )
        if self.grpc_enabled and self.grpc_port == self.port and self.port != 0:
            raise ValueError(f"grpc_port and port are both {self.port}: each protocol needs its own port")
        finish = self.shutdown_timeout_s - self.drain_grace_s - LATE_REQUEST_WAIT_S
        if finish < MIN_FINISH_S:
            raise ValueError(
                f"shutdown_timeout_s ({self.shutdown_timeout_s}) leaves {finish:.2f}s for in-flight work after "
                f"drain_grace_s ({self.drain_grace_s}) and the {LATE_REQUEST_WAIT_S}s late-request wait; "
                f"it needs at least {MIN_FINISH_S}s: raise shutdown_timeout_s or lower drain_grace_s"
            )
        return self

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the environment; an unknown RESNEST_* variable (a typo, usually) is an error too."""
        known = {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields} | NOT_SERVICE_SETTINGS
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; see `resnest-serve --help`")
        return cls()

    def single_model_name(self) -> str:
        """The name RESNEST_MODEL_PATH is served under: the file's stem (resnest50-fp32.onnx -> resnest50-fp32)."""
        return self.default_model or self.model_path.stem

    def batch_shapes(self) -> list[int]:
        """Every batch size the batcher can hand a model configured by these settings alone (what warm-up must
        cover): the powers of two below max_batch_size, and max_batch_size. Batches are padded up to one
        (pad_batches) or cut down to one, so warm-up stays logarithmic in max_batch_size, not quadratic. A
        model's config.pbtxt may say otherwise (service/core/repository/config.py)."""
        return [*powers_of_two_below(self.max_batch_size), self.max_batch_size]

    def grpc_reads(self) -> int:
        """gRPC messages read at once: grpc reads a message whole, so as many as the upload budget holds at the
        largest size (at least one); the rest wait their turn."""
        return max(1, self.max_buffered_upload_bytes // self.max_upload_bytes) if self.grpc_enabled else 0

    def request_memory_bytes(self) -> int:
        """Worst-case host memory of the request path apart from the models' queues: decodes in progress, the
        uploads' in-memory parts, the gRPC messages being read and the in-process response cache."""
        decoding = self.decode_threads * self.max_image_pixels * DECODE_BYTES_PER_PIXEL
        uploads = min(self.max_buffered_upload_bytes, self.max_concurrent_requests * UPLOAD_PART_IN_MEMORY_BYTES)
        cache = self.cache_bytes if self.cache_url is None else 0
        return decoding + uploads + self.grpc_reads() * self.max_upload_bytes + cache

    def host_memory_bytes(self, input_size: int, versions: int = 1) -> int:
        """Worst-case host memory the request path can hold at once, besides the models' own, for `versions`
        model versions batched by these settings (what a deployment is sized for): request_memory_bytes and
        each version's queued input tensors."""
        queued = queue_memory_bytes(self.max_queue_size, self.max_batch_size, input_size)
        return self.request_memory_bytes() + versions * queued


def powers_of_two_below(n: int) -> list[int]:
    """1, 2, 4, ... below n: the batch shapes warmed below the largest when none are preferred."""
    sizes, size = [], 1
    while size < n:
        sizes.append(size)
        size *= 2
    return sizes


def queue_memory_bytes(max_queue_size: int, max_batch_size: int, input_size: int) -> int:
    """A model version's queued input tensors at their most: a full queue plus the batch being run (float32)."""
    return (max_queue_size + max_batch_size) * 3 * input_size * input_size * 4


def describe_settings() -> str:
    """A --help style table of every setting: variable, default, meaning."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        lines.append(f"  {ENV_PREFIX}{name.upper():<28} default {default!s:<30} {field.description}")
    return "\n".join(lines)
