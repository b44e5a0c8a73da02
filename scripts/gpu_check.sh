#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network: build the extension in place, run every test (the GPU
# tests first), run stepfusion-bench, and leave the logs and tables in $OUT (default ./gpu-results).
#
# Each stage has a time limit (seconds) so that one call of a leased machine always returns its logs:
#   BUILD_S (300), GPU_TESTS_S (300: the Triton skew_pair_project autotuning compiles several tiles per
#   shape), CPU_TESTS_S (0: skipped; the CPU tests run in CI), BENCH_S (150)
#   BENCH_OPS   the ops to benchmark (default: all); skew_pair_project runs a second time with
#               STEPFUSION_SKEW_TRITON_TMA=1 (its Triton TMA kernels), into $OUT/triton-tma
#   TESTS       the test files or ids of the GPU stage (default: tests)
#   VARIANTS_S  (150) the tests of skew_pair_project's opt-in cuBLASLt variants, in a stage of their own
#               (a variant cuBLASLt mishandles must not take the main stage down)
#   TUNE_S      (200) scripts/tune_skew_cuda.py: each of those variants timed against the dense GEMM (bf16),
#               and the host time of a small call, into $OUT/tune-skew-cuda
#   HOST_S      (60) scripts/host_time.py on the GPU: every op's time per call at tiny shapes, cuda and triton
#   GUIDANCE_TUNE_S (60) scripts/tune_guidance_triton.py in float32 at Dh 64: the default float32 tiles
#               (chosen by compiled register use, scripts/compile_triton.py) against 64 x 64 and 16 x 32
#               (16 x 32 is the one that spills nothing at Dh 64 under triton 3.6 as well)
#   WIDE_ROWS_S (45) scripts/time_wide_rows.py: Triton shift_expand and cohort_mutual_loss, whole-row
#               against chunked kernels at D and C 4096-16384 in bfloat16 (where to put FUSED_MAX), and
#               the chunked kernels' results against the whole-row ones
#   FUZZ_S      (60) scripts/fuzz_ops.py on CUDA tensors, the cuda and triton backends: random inputs
#               against the float64 reference for that long, the failing rounds into $OUT/fuzz.txt
# Usage: OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

echo "== build"
start=$SECONDS
if ! timeout "${BUILD_S:-300}" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed: see $OUT/build.log"; grep -n "error" "$OUT/build.log" | head -n 40; tail -n 20 "$OUT/build.log"; exit 1
fi
echo "built in $((SECONDS - start)) s"
python3 -c "import stepfusion_kernels as s; print('backends', s.backends())"

# pytest-xdist spreads the tests over processes when it is installed; they share the one GPU.
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")

echo "== GPU tests"
start=$SECONDS
timeout "${GPU_TESTS_S:-300}" python3 -m pytest -q -rfEs "${parallel[@]}" -k "cuda and not blaslt_variant" \
  -m "not large_memory" ${TESTS:-tests} > "$OUT/tests.log" 2>&1 || status=1
# The tests that take tens of GiB of GPU memory, one at a time.
timeout "${GPU_TESTS_S:-300}" python3 -m pytest -q -rfEs -m large_memory tests/test_large_shapes.py \
  >> "$OUT/tests.log" 2>&1 || status=1
echo "GPU tests took $((SECONDS - start)) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | head -n 60

if [ "${VARIANTS_S:-150}" -gt 0 ]; then
  echo "== skew_pair_project's opt-in cuBLASLt variants"
  start=$SECONDS
  timeout "$VARIANTS_S" python3 -m pytest -q -rfEs "${parallel[@]}" -k "blaslt_variant" \
    tests/test_skew_pair_project.py > "$OUT/tests-variants.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests-variants.log" | head -n 30
  echo "variant tests took $((SECONDS - start)) s"
fi
if [ "${TUNE_S:-200}" -gt 0 ]; then
  echo "== the variants timed against the dense GEMM"
  start=$SECONDS
  timeout "$TUNE_S" python3 scripts/tune_skew_cuda.py --out "$OUT/tune-skew-cuda" --profile \
    > "$OUT/tune-skew-cuda.log" 2>&1 || status=1
  grep -E "^(host time|failed)" "$OUT/tune-skew-cuda.log"
  cat "$OUT/tune-skew-cuda/tune_skew_cuda.md" 2>/dev/null
  echo "timings took $((SECONDS - start)) s"
fi

if [ "${HOST_S:-60}" -gt 0 ]; then
  echo "== time per call at tiny shapes (host-bound)"
  timeout "$HOST_S" python3 scripts/host_time.py --device cuda --calls 300 --repeats 3 > "$OUT/host-time.txt" 2>&1 || status=1
  cat "$OUT/host-time.txt"
fi

if [ "${GUIDANCE_TUNE_S:-60}" -gt 0 ]; then
  echo "== float32 guidance_attention tiles"
  timeout "$GUIDANCE_TUNE_S" python3 scripts/tune_guidance_triton.py --dtype float32 --length 4096 \
    --configs 64,64,4,2 16,32,4,2 > "$OUT/tune-guidance-fp32.txt" 2>&1 || status=1
  cat "$OUT/tune-guidance-fp32.txt"
fi

if [ "${WIDE_ROWS_S:-45}" -gt 0 ]; then
  echo "== wide rows: whole-row against chunked Triton kernels"
  timeout "$WIDE_ROWS_S" python3 scripts/time_wide_rows.py --widths 4096 8192 16384 \
    > "$OUT/wide-rows.txt" 2>&1 || status=1
  cat "$OUT/wide-rows.txt"
fi

if [ "${FUZZ_S:-60}" -gt 0 ]; then
  echo "== random inputs against the reference"
  timeout $((FUZZ_S + 60)) python3 scripts/fuzz_ops.py --device cuda --rounds 1000000 --seconds "$FUZZ_S" \
    > "$OUT/fuzz.txt" 2>&1 || status=1
  grep -E "^FAIL|rounds failed" "$OUT/fuzz.txt" | tail -n 40
fi

if [ "${CPU_TESTS_S:-0}" -gt 0 ]; then
  echo "== the other tests"
  timeout "$CPU_TESTS_S" python3 -m pytest -q -rfE "${parallel[@]}" -k "not cuda" -m "not large_memory" tests \
    >> "$OUT/tests.log" 2>&1 || status=1
  tail -n 3 "$OUT/tests.log"
fi

if [ "${BENCH_S:-150}" -gt 0 ]; then
  echo "== benchmarks"
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-150}" stepfusion-bench --out "$OUT" ${BENCH_OPS:+--ops $BENCH_OPS} > "$OUT/bench.log" 2>&1 || status=1
  tail -n 60 "$OUT/bench.log"
  if [[ -z "${BENCH_OPS:-}" || "$BENCH_OPS" == *skew_pair_project* ]]; then
    echo "== skew_pair_project again, the Triton backend with its TMA kernels"
    STEPFUSION_SKEW_TRITON_TMA=1 timeout "${BENCH_S:-150}" stepfusion-bench --out "$OUT/triton-tma" \
      --ops skew_pair_project > "$OUT/bench-triton-tma.log" 2>&1 || status=1
    tail -n 40 "$OUT/bench-triton-tma.log"
  fi
fi
exit $status
