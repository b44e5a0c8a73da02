#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network: build the extension in place, run every test (GPU
# tests included), run stepfusion-bench, and leave the logs and tables in $OUT (default ./gpu-results).
# Usage: OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1

echo "== build" | tee "$OUT/build.log"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; then
  echo "build failed: see $OUT/build.log"; tail -n 40 "$OUT/build.log"; exit 1
fi

echo "== tests"
python3 -m pytest -q -rs tests > "$OUT/tests.log" 2>&1 || status=1
tail -n 30 "$OUT/tests.log"

echo "== benchmarks"
stepfusion-bench --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -n 60 "$OUT/bench.log"
exit $status
