# The per-token loss against the block loss on the first 6 SmolLM2 blocks, with the perplexity proxy (#19).
cd "$(dirname "$0")/../../../../.."  # the repository root; needs the code of commit a3bdbfc (tune.loss, reverted after this probe)
export SLIM_DATA_DIR=${SLIM_DATA_DIR:-../shared/data}
T='"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense"'
python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune/token-loss --blocks 6 --ppl-windows 16 \
    --variants "{\"closed form\": {}, \"block 128\": {\"tune\": {$T}, \"calib\": {\"autocast\": \"bf16\"}}, \"token 128\": {\"tune\": {$T, \"loss\": \"token\"}, \"calib\": {\"autocast\": \"bf16\"}}}"
