#!/usr/bin/env bash
# What a lent GPU runs for the cuda-int4 backend, as one call of about 8 minutes: the `gpu`-marked tests, then
# benchmarks/gpu_runtime.py (layer-wise and end to end). The device image has torch, Triton and transformers, so
# the package runs from src/ without an install. Results and logs go to $OUT (the device tool's folder) or to
# docs/results/runtime/gpu. Each stage is bounded, and a failing stage does not stop the next one.
#     bash benchmarks/gpu_runtime.sh            # then copy $OUT/gpu.json and gpu.md into docs/results/runtime/gpu
#     DRY_RUN=1 OUT=/tmp/g bash benchmarks/gpu_runtime.sh --smoke --no-e2e   # the same steps on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# DRY_RUN=1 (no GPU, tests): the kernels in Triton's interpreter; pass --smoke for tiny shapes
if [ "${DRY_RUN:-0}" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
OUT="${OUT:-docs/results/runtime/gpu}"
TEST_S="${TEST_S:-150}"
BENCH_S="${BENCH_S:-420}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/device.txt"
echo "== gpu tests (${TEST_S} s at most)"
timeout "$TEST_S" python3 -m pytest -m gpu tests/test_cuda_int4.py tests/test_runtime.py tests/test_generate_compiled.py \
  -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/gpu-tests.log" | tail -n 15
echo "[gpu-tests] rc ${PIPESTATUS[0]}"
echo "== benchmark (${BENCH_S} s at most)"
timeout "$BENCH_S" python3 benchmarks/gpu_runtime.py --out "$OUT" --budget-s $((BENCH_S - 40)) "$@" 2>&1 \
  | tee "$OUT/bench.log" | tail -n 80
echo "[benchmark] rc ${PIPESTATUS[0]}"
