#!/usr/bin/env bash
# Every GPU check in one run, sized for a short device lease (about 5 minutes on one H100):
#   1. the CUDA EP is really active (not a silent CPU fallback);
#   2. export parity with ORT's CUDA EP, fp32 and fp16 (the export runs it on every active provider);
#   3. model ceiling: ORT CUDA (fp32, fp16) vs PyTorch eager fp16 at batch 1/8/32/64;
#   4. service sweep with the fp16 model, batches padded to fixed shapes.
# Results land in $OUT (default bench/results). REQUIRE_CUDA=0 turns it into a CPU dry run of the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
WORK=$(mktemp -d)
mkdir -p "$OUT"
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "CUDA EP"
python - "$REQUIRE_CUDA" <<'PY'
import sys
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
import numpy as np
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
active = session.get_providers()
print("onnxruntime", ort.__version__, "active providers:", active)
session.run(None, {"x": np.ones(1, np.float32)})
if sys.argv[1] == "1" and active[0] != "CUDAExecutionProvider":
    sys.exit("CUDA EP is not active: stopping before any GPU figure is taken")
PY

step "export + parity, fp32 and fp16"
python -m export --variant resnest50 --skip-naive --output "$WORK/r50.onnx"
python -m export --variant resnest50 --skip-naive --precision fp16 --output "$WORK/r50-fp16.onnx"
cp "$WORK"/r50.parity.json "$OUT/parity-fp32-$(hostname -s).json"
cp "$WORK"/r50-fp16.parity.json "$OUT/parity-fp16-$(hostname -s).json"

step "model ceiling"
python -m bench.model --variant resnest50 --batches 1 8 32 64 --repeats 5 --out "$OUT"

step "service sweep (fp16, padded batches)"
python -m bench.serving --model "$WORK/r50-fp16.onnx" --tag "${TAG:-gpu}" --out "$OUT" \
    --concurrency 1 16 64 --images 1 8 --duration 10 --warmup 3 --ceiling-batches 1 8 32 64 --skip-naive \
    --env RESNEST_MAX_BATCH_SIZE=64 RESNEST_PAD_BATCHES=true RESNEST_DECODE_THREADS=12 RESNEST_MAX_QUEUE_SIZE=4096
step "done"
