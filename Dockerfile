# syntax=docker/dockerfile:1.7
# ResNeSt inference images. Targets:
#   export       torch + the exporter; builds /models/model.onnx (+ model.parity.json) from the build args
#   runtime-cpu  the service on ONNX Runtime's CPU provider: no torch, non-root, model baked in
#   runtime-gpu  the same on CUDA 13 + cuDNN 9 (what onnxruntime-gpu 1.31 is built against)
#   batch        the offline job (`resnest-batch`) on Ray's own image, for KubeRay (deploy/kuberay/)
# Examples:
#   docker build --target runtime-cpu -t resnest-serve:cpu .
#   docker build --target runtime-gpu -t resnest-serve:gpu \
#     --build-arg CHECKPOINT_URL=https://.../resnest50-528c19ca.pth --build-arg CHECKPOINT_SHA256=<64 hex> .
# Without CHECKPOINT_URL the model has seeded RANDOM weights: the export says so loudly, and so do the
# service's logs and GET /model. Its answers are meaningless; the image is still good for plumbing and load.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
# The Ray release the `batch` extra pins: KubeRay's head and workers must all run the same one.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu

# ---------------------------------------------------------------------------------------------------------------
# The project as a wheel, built once: the runtime stages install it without copying the source tree or needing
# a build backend of their own.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models models
COPY modelcard modelcard
COPY imaging imaging
COPY providers providers
COPY export export
COPY service service
# The batch job ships in the same wheel; Ray comes only with its extra (`.[batch]`), never in these images.
COPY batch batch
RUN --mount=type=cache,target=/root/.cache/pip pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS export
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
# The extra index serves torch's CPU build (2.13.0+cpu sorts above PyPI's 2.13.0, so pip takes it): PyPI's
# Linux wheel would pull several GB of CUDA libraries for an export that runs on the CPU anyway.
RUN --mount=type=cache,target=/root/.cache/pip \
    whl=$(ls /wheels/*.whl) && pip install --extra-index-url https://download.pytorch.org/whl/cpu "${whl}[export]"
ARG VARIANT=resnest50
# fp32; fp16 (for runtime-gpu); int8 (for runtime-cpu: static quantization calibrated on the bundled
# photographs, and the build fails unless its accuracy report against fp32 passes; /models also gets
# model.accuracy.json). The CUDA EP has no int8 convolution kernels (it runs the QDQ graph in float): int8 is
# for the CPU image.
ARG PRECISION=fp32
ARG CHECKPOINT_URL=
ARG CHECKPOINT_SHA256=
# The download cache survives rebuilds (another precision, a fixed typo) without fetching the weights again.
# The export checks parity against PyTorch and fails the build when the graph disagrees (and for int8, when
# the quantized graph falls below its accuracy thresholds).
RUN --mount=type=cache,target=/root/.cache/resnest-serve \
    python -m export --variant "$VARIANT" --precision "$PRECISION" --output /models/model.onnx \
        ${CHECKPOINT_URL:+--checkpoint "$CHECKPOINT_URL"} ${CHECKPOINT_SHA256:+--sha256 "$CHECKPOINT_SHA256"} \
    && ls -l /models

# ---------------------------------------------------------------------------------------------------------------
# What both runtimes share is written twice below (a stage cannot be based on two images); keep them in step.
FROM ${PYTHON_IMAGE} AS runtime-cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The base install: onnxruntime-gpu (whose CPU provider needs no CUDA library), FastAPI, Pillow, numpy.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
COPY deploy/healthcheck.py /usr/local/bin/resnest-healthcheck
COPY --from=export /models /models
# A numeric UID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 resnest \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resnest
USER 10001:10001
ENV RESNEST_MODEL_PATH=/models/model.onnx RESNEST_PROVIDERS=cpu RESNEST_HOST=0.0.0.0 RESNEST_PORT=8000 \
    RESNEST_GRPC_PORT=8001
# HTTP (the service's API and the OIP's REST routes) and the OIP over gRPC.
EXPOSE 8000 8001
# Liveness only: the first start warms every batch size, hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/usr/local/bin/resnest-healthcheck", "/healthz"]
# SIGTERM starts the drain (readiness 503, keep serving RESNEST_DRAIN_GRACE_S, finish in-flight, exit 0). Exec
# form: the server is PID 1 and gets the signal itself, no shell in between.
STOPSIGNAL SIGTERM
CMD ["resnest-serve"]

# ---------------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime-gpu
# Ubuntu 24.04's Python 3.12, in a venv (the system interpreter is externally managed, PEP 668).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# onnxruntime-gpu finds CUDA, cuBLAS, cuFFT and cuDNN in the base image: no pip-installed nvidia-* wheels.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
COPY deploy/healthcheck.py /usr/local/bin/resnest-healthcheck
COPY --from=export /models /models
RUN groupadd --system --gid 10001 resnest \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resnest
USER 10001:10001
# REQUIRE_GPU: refuse to start (and so never turn ready) when ONNX Runtime silently falls back to the CPU.
ENV RESNEST_MODEL_PATH=/models/model.onnx RESNEST_PROVIDERS=cuda RESNEST_REQUIRE_GPU=true \
    RESNEST_HOST=0.0.0.0 RESNEST_PORT=8000 RESNEST_GRPC_PORT=8001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 CMD ["python", "/usr/local/bin/resnest-healthcheck", "/healthz"]
STOPSIGNAL SIGTERM
CMD ["resnest-serve"]

# ---------------------------------------------------------------------------------------------------------------
# The batch job on Ray's image (ray, its CLI and what KubeRay's probes run are there); the project's wheel with
# its `batch` extra on top, the model baked in as in the runtimes. The serving images never get Ray.
FROM ${RAY_IMAGE} AS batch
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000 --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/*.whl)[batch]"
COPY --from=export /models /models
