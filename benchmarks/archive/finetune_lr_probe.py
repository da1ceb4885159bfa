"""A short `slim finetune` learning-rate probe: the same checkpoint, data and budget at several lr, each scored on
the first WikiText-2 windows before and after. It is how the +FT runs' lr was chosen: with a budget of a few
dozen optimizer steps, the paper's lr (1e-4, set for ~470 steps) barely moves the adapters.

Each run goes to WORK/lr<value>/ (`slim finetune ... --eval --eval-limit N`); a run whose results.json is there
already is reused, so the probe can be extended with more values. Writes OUT/results.json and OUT/README.md.

    python benchmarks/archive/finetune_lr_probe.py CKPT --out docs/results/finetune/lr-probe --lrs 1e-4,1e-3,1e-2 \
        --work /tmp/slim-lr-probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared grid helpers
from grid import describe_machine, machine, source_commit, write_result  # noqa: E402

from slim.cli.commands import main as slim_main


def table(res: dict) -> str:
    a = res["args"]
    lines = [f"# `slim finetune` learning-rate probe ({res['checkpoint']})\n",
             f"Machine: {describe_machine(res['machine'])}. Each run: {a['steps']} Adafactor steps of {a['batch']} x "
             f"{a['seqlen']} tokens of C4 ({a['max_tokens']:,} tokens), linear decay, `--autocast {a['autocast']}`, "
             f"{'distillation weight ' + str(a['distill']) if a['distill'] else 'no distillation'}; WikiText-2 on "
             f"the first {a['eval_limit']} windows of 2048 tokens (quick check, not the full test set).",
             f"Command: `{res['command']}` (code {(res['commit'] or '?')[:7]})\n",
             "| lr | LM loss first → last step | WikiText-2 before | after | change |", "|---|---|---|---|---|"]
    for r in res["runs"]:
        b, f = r["before"], r["after"]
        lines.append(f"| {r['lr']:g} | {r['lm_loss'][0]:.3f} → {r['lm_loss'][1]:.3f} | {b:.2f} | **{f:.2f}** | "
                     f"{100 * (f / b - 1):+.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a slim checkpoint directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="folder for the runs' checkpoints (reused when present)")
    ap.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="comma-separated learning rates")
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--autocast", default="bf16")
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    lrs = [x.strip() for x in args.lrs.split(",") if x.strip()]
    if not lrs:
        ap.error("--lrs needs at least one value")
    out, work = Path(args.out), Path(args.work)
    res: dict = {"checkpoint": args.checkpoint, "machine": machine(), "commit": source_commit(),
                 "command": "python " + " ".join(sys.argv), "args": {**vars(args), "steps": 0}, "runs": []}
    for lr in lrs:
        dest = work / f"lr{lr}"
        if not (dest / "results.json").is_file():
            cmd = ["finetune", args.checkpoint, "--out", str(dest), "--max-tokens", str(args.max_tokens),
                   "--batch", str(args.batch), "--micro-batch", str(args.micro_batch), "--seqlen", str(args.seqlen),
                   "--lr", lr, "--autocast", args.autocast, "--eval", "--eval-limit", str(args.eval_limit),
                   "--save-every", "100", "--overwrite", "-q",
                   *(["--distill", str(args.distill)] if args.distill else []),
                   *(["--data-dir", args.data_dir] if args.data_dir else [])]
            if slim_main(cmd) != 0:
                raise SystemExit(f"slim {' '.join(cmd)} failed")
        r = json.loads((dest / "results.json").read_text())
        hist = json.loads((dest / "slim_config.json").read_text())["finetune"]["history"]
        c = r["finetune"]["config"]
        want = {"max_tokens": args.max_tokens, "batch": args.batch, "micro_batch": args.micro_batch,
                "seqlen": args.seqlen, "autocast": args.autocast, "distill": args.distill, "lr": float(lr)}
        if any(c[k] != v for k, v in want.items()) or r["before"]["windows"] != args.eval_limit:
            raise SystemExit(f"{dest} holds a run with other options ({ {k: c[k] for k in want} }, "
                             f"{r['before']['windows']} windows); remove it or pass another --work")
        res["args"]["steps"] = r["finetune"]["steps"]
        res["runs"].append({"lr": float(lr), "before": r["before"]["ppl"], "after": r["after"]["ppl"],
                            "lm_loss": [hist[0]["lm_loss"], hist[-1]["lm_loss"]],
                            "train_seconds": r["finetune"]["train_seconds"], "config": r["finetune"]["config"]})
    print(write_result(out, res, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
