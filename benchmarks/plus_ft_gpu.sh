#!/usr/bin/env bash
# The issue-19 GPU runs in one go, most wanted first, each stage skipped once the time left is below what it
# needs, so one bounded call of a rented GPU gives whole results: the default and --preset paper checkpoints,
# `slim finetune` (+FT) on each with and without --distill (2,031,616 tokens: 31 steps x 64 x 1024; --autocast bf16
# --lr 1e-3), the +FT table (benchmarks/plus_ft.py --keep: rows of earlier calls stay), the zero-shot of the best
# finetuned checkpoint and of its one-shot source, then the OmniQuant and AffineQuant baselines rows. Every
# number comes from `slim` commands and the benchmark scripts.
#
#   MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf RUNS=/tmp/runs DEADLINE=560 bash benchmarks/plus_ft_gpu.sh
#
# ONLY=REGEX runs only the stages whose names match (grep -E), e.g. the ones a bounded call did not reach:
#   ONLY='compress-(default|paper)$|finetune-(default|paper)$|plus-ft|zeroshot' ... bash benchmarks/plus_ft_gpu.sh
set -uo pipefail
MODEL=${MODEL:?the dense model (the bundled SmolLM2 GGUF)}
RUNS=${RUNS:?a folder for the checkpoints}
DEADLINE=${DEADLINE:-100000}  # seconds for all stages
ONLY=${ONLY:-.}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-docs/results}  # the +FT table goes to RESULTS/finetune/plus-ft, the grid rows to RESULTS/baselines-gpu
# appended to the commands (argparse keeps the last value): tiny settings for a dry run of this script on a CPU
COMPRESS_EXTRA=${COMPRESS_EXTRA:-} FT_EXTRA=${FT_EXTRA:-} EVAL_EXTRA=${EVAL_EXTRA:-}
T0=$SECONDS
S="python3 -m slim"
FT="--device $DEVICE --autocast bf16 --lr 1e-3 --max-tokens 2031616 --micro-batch 16 -q $FT_EXTRA"
TASKS=piqa,arc_easy,arc_challenge,winogrande,openbookqa
mkdir -p "$RUNS"

left() { echo $((DEADLINE - (SECONDS - T0))); }
stage() {  # NAME NEEDS_SECONDS COMMAND...: run unless less time is left than it needs; bounded by what is left
  local name=$1 need=$2 t=$SECONDS rc
  shift 2
  if ! grep -qE "$ONLY" <<<"$name"; then echo "[$name] not selected (ONLY=$ONLY)"; return 1; fi
  if [ "$(left)" -lt "$need" ]; then echo "[$name] skipped: $(left) s left, needs $need"; return 1; fi
  echo "[$name] start at $((SECONDS - T0)) s"
  timeout "$(left)" "$@"
  rc=$?
  echo "[$name] rc $rc after $((SECONDS - t)) s"
  return $rc
}
table() {  # the +FT table over the finetuned checkpoints written so far (scores cached by content hash; rows
  # of earlier calls kept)
  local runs=()
  for r in default+KD=default-ft-kd paper+KD=paper-ft-kd default=default-ft paper=paper-ft; do
    [ -f "$RUNS/${r#*=}/slim_config.json" ] && runs+=("${r%%=*}=$RUNS/${r#*=}")
  done
  [ ${#runs[@]} -gt 0 ] && stage plus-ft-table 30 python3 benchmarks/plus_ft.py --out $RESULTS/finetune/plus-ft --keep \
    --device $DEVICE --backend reference --dtype fp32 $EVAL_EXTRA "${runs[@]}"
}

zeroshot() {  # STAGE CHECKPOINT: the 5-task zero-shot, written next to the checkpoints
  stage "$1" 120 $S eval "$2" --tasks $TASKS --no-ppl --device $DEVICE --backend reference --dense-cache --dtype fp32 \
    --batch-size 64 -q $EVAL_EXTRA --out "$RUNS/zeroshot-$(basename "$2").json"
}
best() {  # the best finetuned checkpoint on this machine (lowest ppl after) and the one-shot checkpoint it came from
  python3 -c "import json, os; r = json.load(open('$RESULTS/finetune/plus-ft/results.json'))['runs']; \
b = min((v for v in r.values() if os.path.isdir(v['after']['checkpoint'])), key=lambda v: v['after']['ppl']); \
print(b['after']['checkpoint']); print(b['before']['checkpoint'])" 2>/dev/null
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# most wanted first: the default's +FT with and without distillation, its table rows, the best run's zero-shot
stage compress-default 90 $S compress "$MODEL" --out "$RUNS/default" --device $DEVICE -q $COMPRESS_EXTRA
stage finetune-default-kd 90 $S finetune "$RUNS/default" --out "$RUNS/default-ft-kd" $FT --distill
stage finetune-default 60 $S finetune "$RUNS/default" --out "$RUNS/default-ft" $FT
table
mapfile -t best < <(best)
[ ${#best[@]} -eq 2 ] && zeroshot zeroshot-best-ft "${best[0]}"
stage compress-paper 90 $S compress "$MODEL" --preset paper --out "$RUNS/paper" --device $DEVICE -q $COMPRESS_EXTRA
stage finetune-paper 60 $S finetune "$RUNS/paper" --out "$RUNS/paper-ft" $FT
stage finetune-paper-kd 90 $S finetune "$RUNS/paper" --out "$RUNS/paper-ft-kd" $FT --distill
table
[ ${#best[@]} -eq 2 ] && zeroshot zeroshot-its-source "${best[1]}"
grid=()
for spec in 2:4/wanda-omniquant=omni-24 2:4/wanda-affinequant=affine-24 50%/wanda-omniquant=omni-50 \
            50%/wanda-affinequant=affine-50; do
  row=${spec%%=*} dir=$RUNS/${spec#*=} sp=()
  [ "${row%%/*}" = "50%" ] && sp=(--sparsity 0.5)
  if [ -f "$dir/slim_config.json" ]; then grid+=(--from-checkpoint "$row=$dir"); continue; fi  # done in a past call
  # --resume: a stage cut by the deadline continues in the next call on the same (warm) machine, block by block
  stage "compress-${spec#*=}" 60 $S compress "$MODEL" --preset "${row#*/}" "${sp[@]}" --out "$dir" --resume \
    --device $DEVICE -q $COMPRESS_EXTRA \
    && grid+=(--from-checkpoint "$row=$dir")
done
[ ${#grid[@]} -gt 0 ] && stage baselines-rows 40 python3 benchmarks/baselines.py --model "$MODEL" \
  --out $RESULTS/baselines-gpu --tables 2:4,50% --rows wanda-omniquant,wanda-affinequant --device $DEVICE $EVAL_EXTRA "${grid[@]}"
echo "all stages done at $((SECONDS - T0)) s"
