# One adapter factor trained, the other kept from the closed form (tune.factors), first 6 SmolLM2 blocks, with the
# perplexity proxy (#19). Both factors trained: the "block 128" row of ../ema (same code path, same machine).
cd "$(dirname "$0")/../../../../.."  # the repository root; needs the code of commit 16022bf (tune.factors, reverted after this probe)
export SLIM_DATA_DIR=${SLIM_DATA_DIR:-../shared/data}
T='"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense"'
python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune/factors --blocks 6 --ppl-windows 16 \
    --variants "{\"A only\": {\"tune\": {$T, \"factors\": \"A\"}, \"calib\": {\"autocast\": \"bf16\"}}, \"B only\": {\"tune\": {$T, \"factors\": \"B\"}, \"calib\": {\"autocast\": \"bf16\"}}}"
