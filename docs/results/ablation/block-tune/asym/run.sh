# The asymmetric closed form before block tuning, first 6 SmolLM2 blocks, perplexity proxy (#19).
cd "$(dirname "$0")/../../../../.."  # the repository root; needs the code of commit d106102 (calib.asymmetric, reverted after this probe)
export SLIM_DATA_DIR=${SLIM_DATA_DIR:-../shared/data}
T='"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense"'
python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune/asym --blocks 6 --ppl-windows 16 \
    --variants "{\"block 128 asym\": {\"tune\": {$T}, \"calib\": {\"autocast\": \"bf16\", \"asymmetric\": true}}}"
