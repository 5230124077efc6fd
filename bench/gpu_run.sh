#!/usr/bin/env bash
# Every GPU check in one run, sized for a short device lease (about 8 minutes on one H100/H200):
#   0. optional: install wheels carried in $WHEELS (default .whl; split parts NAME.whl.part-* are joined first)
#      into /tmp/site, put it on PYTHONPATH; onnxruntime.preload_dlls() runs in the CUDA probe;
#   1. the machine (nvidia-smi, lscpu) and the CUDA EP really active (not a silent CPU fallback);
#   2. export parity on every active provider (CUDA included): fp32, fp16, and fp16 with uint8-nhwc input
#      against the float graph; then the service runtime on CUDA: IO binding and CUDA graphs against the
#      plain session.run, on the uint8 model;
#   3. model ceiling: ORT CUDA fp32/fp16, the service runtime fp16 with and without CUDA graphs, PyTorch eager
#      fp16, batch 1/8/32/64/128; and what uint8-nhwc input saves (host time, bytes, model time);
#   4. service sweep with 500 px JPEG uploads at several concurrencies, fp16 uint8-nhwc model, CUDA graphs on.
# Results land in $RESULTS (default bench/results) with the machine; where the device tool's $OUT is set they
# are also packed into $OUT/gpu-results.tar.gz (it returns at most 8 files) with the log.
#
# REQUIRE_CUDA=0 turns it into a CPU dry run of the same steps, into a temporary folder unless RESULTS is set
# (the CPU figures in bench/results stay). Knobs for a fast dry run (defaults: the GPU run's):
#   VARIANT=resnest50 BATCHES="1 8 32 64 128" REPEATS=5 MAX_BATCH=64 SWEEP_CONCURRENCY="1 16 64"
#   SWEEP_IMAGES="1 8" SWEEP_DURATION=10 SWEEP_WARMUP=3 CEILING_BATCHES="1 8 32 64" CEILING_SECONDS=4
#   DECODE_THREADS=(CPUs) STEP_TIMEOUT=300 PYTHON=(.venv/bin/python, else python3)
# e.g.  REQUIRE_CUDA=0 VARIANT=resnest14d BATCHES="1 2" REPEATS=1 MAX_BATCH=4 SWEEP_CONCURRENCY="1 4" \
#       SWEEP_IMAGES=1 SWEEP_DURATION=2 SWEEP_WARMUP=1 CEILING_BATCHES="1 2" CEILING_SECONDS=1 bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
if [ -z "${RESULTS:-}" ]; then
    if [ "$REQUIRE_CUDA" = 1 ]; then RESULTS=bench/results; else RESULTS=$(mktemp -d); fi
fi
VARIANT=${VARIANT:-resnest50}
BATCHES=${BATCHES:-1 8 32 64 128}
REPEATS=${REPEATS:-5}
MAX_BATCH=${MAX_BATCH:-64}
SWEEP_CONCURRENCY=${SWEEP_CONCURRENCY:-1 16 64}
SWEEP_IMAGES=${SWEEP_IMAGES:-1 8}
SWEEP_DURATION=${SWEEP_DURATION:-10}
SWEEP_WARMUP=${SWEEP_WARMUP:-3}
CEILING_BATCHES=${CEILING_BATCHES:-1 8 32 64}
CEILING_SECONDS=${CEILING_SECONDS:-4}
DECODE_THREADS=${DECODE_THREADS:-$(nproc)}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
WHEELS=${WHEELS:-.whl}
HOST=$(hostname -s 2>/dev/null || echo host)
WORK=$(mktemp -d)
LOG="$RESULTS/gpu-run-$HOST.log"
mkdir -p "$RESULTS"
exec > >(tee "$LOG") 2>&1
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }
pack() {
    # The device tool brings back at most 8 files: one archive of everything this run wrote, and the log.
    if [ -n "${OUT:-}" ] && [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
        mkdir -p "$OUT"
        tar czf "$OUT/gpu-results.tar.gz" -C "$RESULTS" --newer-mtime="@$STARTED" . 2>/dev/null || true
        cp "$LOG" "$OUT/" 2>/dev/null || true
    fi
}
STARTED=$(date +%s)
trap pack EXIT

step "wheels"
if [ -d "$WHEELS" ]; then
    # Wheels over a carry's file limits travel split (split -b 60M X.whl X.whl.part-): join them back.
    for first in "$WHEELS"/*.whl.part-aa; do
        [ -e "$first" ] || continue
        whole="$WORK/$(basename "${first%.part-aa}")"
        cat "${first%aa}"* >"$whole"
        echo "joined $(basename "$whole") ($(du -h "$whole" | cut -f1))"
    done
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl "$WORK"/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed ${#wheels[@]} wheel(s) into /tmp/site"
    fi
else
    echo "no $WHEELS folder: using the interpreter's own packages"
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && [ -z "${PYTHONPATH:-}" ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
py() { timeout "$STEP_TIMEOUT" "$PYTHON" "$@"; }
echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"

step "machine and CUDA EP"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $HOST"
    lscpu | grep -E '^(Model name|CPU\(s\)|Flags)' || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
} >"$RESULTS/machine-$HOST.txt"
head -4 "$RESULTS/machine-$HOST.txt"
py - "$REQUIRE_CUDA" <<'PY'
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from providers.probe import probe_cuda

probe = probe_cuda()  # loads the CUDA libraries (nvidia-* wheels or the system) and runs ort.preload_dlls()
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers(), "probe:", probe)
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
active = session.get_providers()
print("active providers:", active)
session.run(None, {"x": np.ones(1, np.float32)})
if sys.argv[1] == "1" and active[0] != "CUDAExecutionProvider":
    sys.exit("CUDA EP is not active: stopping before any GPU figure is taken")
PY

step "export + parity: fp32, fp16, fp16 with uint8-nhwc input"
py -m export --variant "$VARIANT" --skip-naive --output "$WORK/m.onnx"
py -m export --variant "$VARIANT" --skip-naive --precision fp16 --output "$WORK/m-fp16.onnx"
py -m export --variant "$VARIANT" --skip-naive --precision fp16 --input-format uint8-nhwc --output "$WORK/m-fp16-u8.onnx"
cp "$WORK/m.parity.json" "$RESULTS/parity-fp32-$HOST.json"
cp "$WORK/m-fp16.parity.json" "$RESULTS/parity-fp16-$HOST.json"
cp "$WORK/m-fp16-u8.parity.json" "$RESULTS/parity-fp16-uint8-$HOST.json"

step "service runtime: IO binding and CUDA graphs vs session.run (uint8-nhwc fp16 model)"
py - "$WORK/m-fp16-u8.onnx" "$MAX_BATCH" "$RESULTS/runtime-paths-$HOST.json" "$REQUIRE_CUDA" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np

from imaging.transforms import preprocess
from service.core.request.inference import OrtModel, warm_up
from service.core.settings import Settings
from export.photos import sample_photos

path, max_batch, out, require = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
base = dict(model_path=path, max_batch_size=max_batch, grpc_enabled=False, max_queue_size=max(64, max_batch))
paths = {"plain": dict(io_binding=False), "io_binding": dict(io_binding=True),
         "io_binding+cuda_graphs": dict(io_binding=True, cuda_graphs=True)}
report: dict = {"model": path.name, "paths": {}}
outputs = {}
for name, options in paths.items():
    settings = Settings(**base, **options)
    model = OrtModel(settings)
    warm_up(model, settings.batch_shapes())
    cfg = model.card.preprocess
    photos = np.stack([preprocess(data, cfg, 1 << 28) for _, data in sample_photos()])
    n = max(b for b in settings.batch_shapes() if b <= 8)  # a warmed shape: the bound path, not the fallback
    batch = np.ascontiguousarray(photos[np.arange(n) % len(photos)])
    outputs[name] = model.infer(batch)
    report["paths"][name] = {"providers": model.providers, "acceleration": model.acceleration}
    print(name, json.dumps(model.acceleration))
for name in ("io_binding", "io_binding+cuda_graphs"):
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs[name], outputs["plain"], strict=True))
    report["paths"][name]["max_abs_diff_vs_plain"] = diff
    print(f"{name}: max abs diff vs plain session.run {diff:.3g}")
out.write_text(json.dumps(report, indent=2) + "\n")
graphs = report["paths"]["io_binding+cuda_graphs"]["acceleration"]["cuda_graphs"]
if require and not graphs["active"]:
    sys.exit(f"CUDA graphs are not active on the CUDA EP: {graphs['reason']}")
if any(p.get("max_abs_diff_vs_plain", 0) > 1e-3 for p in report["paths"].values()):
    sys.exit("IO binding / CUDA graphs disagree with session.run")
PY

step "model ceiling (batches $BATCHES)"
# shellcheck disable=SC2086  # the knobs are space-separated lists
py -m bench.model --variant "$VARIANT" --batches $BATCHES --repeats "$REPEATS" --gpu-only --out "$RESULTS"
# shellcheck disable=SC2086
py -m bench.model --uint8 --variant "$VARIANT" --batches $BATCHES --repeats "$REPEATS" --gpu-only --out "$RESULTS"

step "service sweep (fp16, uint8-nhwc input, CUDA graphs, padded batches; 500 px JPEG uploads)"
# shellcheck disable=SC2086
py -m bench.serving --model "$WORK/m-fp16-u8.onnx" --tag "${TAG:-gpu}" --out "$RESULTS" \
    --concurrency $SWEEP_CONCURRENCY --images $SWEEP_IMAGES --duration "$SWEEP_DURATION" --warmup "$SWEEP_WARMUP" \
    --ceiling-batches $CEILING_BATCHES --ceiling-seconds "$CEILING_SECONDS" --skip-naive \
    --env RESNEST_MAX_BATCH_SIZE="$MAX_BATCH" RESNEST_PAD_BATCHES=true RESNEST_CUDA_GRAPHS=true \
    RESNEST_IO_BINDING=true RESNEST_DECODE_THREADS="$DECODE_THREADS" RESNEST_MAX_QUEUE_SIZE=4096
step "done: results in $RESULTS"
