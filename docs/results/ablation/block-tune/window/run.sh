cd "$(dirname "$0")/../../../../.."  # the repository root; needs the code of commit 0b66710 (tune.window, reverted after this probe)
export SLIM_DATA_DIR=${SLIM_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
T='"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense"'
T2='"steps": 64, "eval_every": 32, "batch_size": 1, "autocast": "bf16-base", "lr": 0.03, "teacher": "dense", "window": 2'
python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune/window --blocks 6 --variants "{\"w1 128\": {\"tune\": {$T}, \"calib\": {\"autocast\": \"bf16\"}}, \"w2 64\": {\"tune\": {$T2}, \"calib\": {\"autocast\": \"bf16\"}}}"
