# Polyak averaging of the tuned adapters (tune.ema) against the last iterate, first 6 SmolLM2 blocks, with the
# perplexity proxy (#19).
cd "$(dirname "$0")/../../../../.."  # the repository root; needs the code of commit f7dd067 (tune.ema, reverted after this probe)
export SLIM_DATA_DIR=${SLIM_DATA_DIR:-../shared/data}
T='"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense"'
python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune/ema --blocks 6 --ppl-windows 16 \
    --variants "{\"block 128\": {\"tune\": {$T}, \"calib\": {\"autocast\": \"bf16\"}}, \"ema 0.9\": {\"tune\": {$T, \"ema\": 0.9}, \"calib\": {\"autocast\": \"bf16\"}}, \"ema 0.97\": {\"tune\": {$T, \"ema\": 0.97}, \"calib\": {\"autocast\": \"bf16\"}}}"
