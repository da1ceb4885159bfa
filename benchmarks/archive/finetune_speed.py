"""`slim finetune` throughput in float32 vs the bfloat16 settings (`--autocast bf16-base`: the compressed layers'
base matmuls; `--autocast bf16`: the whole forward under autocast), side by side: the same checkpoint, data and
steps, the variants alternating in one command so all see the same machine load. Also the LM loss of each step, to
show the runs train alike. Writes OUT/results.json and OUT/README.md.

    python benchmarks/archive/finetune_speed.py CKPT --out docs/results/finetune/speed --steps 2 \
        --order none,bf16-base,none
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared grid helpers
from grid import describe_machine, machine, source_commit, write_result  # noqa: E402

from slim.cli.commands import main as slim_main
from slim.format.checkpoint import read_slim_config


def table(res: dict) -> str:
    lines = [f"# `slim finetune` throughput: float32 vs bfloat16 ({res['checkpoint']})\n",
             f"Machine: {describe_machine(res['machine'])}; nothing else running. Each run: {res['steps']} optimizer "
             f"steps of {res['batch']} x {res['seqlen']} tokens (micro-batch {res['micro_batch']}), Adafactor, "
             "lr 1e-4, in this order, back to back.",
             f"Command: `{res['command']}` (code {res['commit'][:7] if res['commit'] else '?'})\n",
             "| run | --autocast | tokens/s | seconds | LM loss per step |", "|---|---|---|---|---|"]
    for i, r in enumerate(res["runs"]):
        losses = ", ".join(f"{x:.4f}" for x in r["lm_loss"])
        lines.append(f"| {i + 1} | {r['autocast']} | {r['tokens_per_second']:.1f} | {r['seconds']:.0f} | {losses} |")
    lines += ["", "| --autocast | runs | median tokens/s | vs none |", "|---|---|---|---|"]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['runs']} | {s['median']:.1f} | {s['vs_none']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a slim checkpoint directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--order", default="none,bf16-base,none", help="--autocast values in run order")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (2)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (4)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    order = [o.strip() for o in args.order.split(",") if o.strip()]
    if "none" not in order:
        ap.error("--order needs a 'none' run to compare against")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"checkpoint": args.checkpoint, "machine": machine(), "commit": source_commit(),
                 "command": "python " + " ".join(sys.argv), "steps": args.steps, "batch": args.batch,
                 "micro_batch": args.micro_batch, "seqlen": args.seqlen, "runs": []}
    tokens = args.steps * args.batch * args.seqlen
    with tempfile.TemporaryDirectory(prefix="slim-ft-speed-") as tmp:
        for i, mode in enumerate(order):
            dest = Path(tmp) / f"run{i}"
            cmd = ["finetune", args.checkpoint, "--out", str(dest), "--max-tokens", str(tokens), "--seqlen",
                   str(args.seqlen), "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
                   "--autocast", mode, "-q", *(["--data-dir", args.data_dir] if args.data_dir else [])]
            if slim_main(cmd) != 0:
                raise SystemExit(f"slim {' '.join(cmd)} failed")
            ft = read_slim_config(dest)["finetune"]
            res["runs"].append({"autocast": mode, "tokens_per_second": ft["tokens_per_second"],
                                "seconds": ft["seconds"], "lm_loss": [h["lm_loss"] for h in ft["history"]]})
    med = {m: statistics.median(r["tokens_per_second"] for r in res["runs"] if r["autocast"] == m)
           for m in dict.fromkeys(order)}
    res["summary"] = {m: {"runs": sum(r["autocast"] == m for r in res["runs"]), "median": v,
                          "vs_none": v / med["none"]} for m, v in med.items()}
    print(write_result(out, res, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
