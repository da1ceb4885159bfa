"""Recipe grid on one model: each row compressed from the same calibration set, then WikiText-2 ppl.

Writes RESULTS_DIR/results.json (one entry per row, written after each row so an interrupted grid
resumes where it stopped) and RESULTS_DIR/README.md (a markdown table with the machine described).

    python benchmarks/ablation.py --out docs/results/ablation [--rows dense,paper,...] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grid import (  # benchmarks/ is on sys.path when run as a script
    add_common_args,
    describe_machine,
    parse_checkpoints,
    run_grid,
    with_calib,
)

from slim.config import PRESETS, CompressConfig, merge
from slim.format.checkpoint import write_json

FULLCOV = {"adapter": {"method": "fullcov"}}
EF = {"quant": {"error_feedback": True}}
REFIT = {"adapter": {"refit_rounds": 3}}
BEST = merge(merge(FULLCOV, EF), REFIT)
GREEDY = {"adapter": {"allocation": "greedy"}}
TUNE = {"tune": {"steps": 32, "lr": 0.03, "teacher": "dense"}}

# name -> (description, overrides on top of the paper preset); "dense" is the uncompressed model
ROWS: dict[str, tuple[str, dict]] = {
    "dense": ("dense model (no compression)", {}),
    "paper": ("--preset paper: Wanda 2:4, SLiM-Quant 4b, SLiM-LoRA^Q rank 0.1", {}),
    "paper-fp16-adapters": ("SLiM-LoRA (fp16 adapters)", {"adapter": {"quantize": False}}),
    "no-adapter": ("Wanda 2:4 + SLiM-Quant 4b, no adapters", {"adapter": {"method": "none"}}),
    "naive": ("Naive-LoRA^Q (plain SVD adapters)", {"adapter": {"method": "naive"}}),
    "fullcov": ("1. full-covariance adapters", FULLCOV),
    "error-feedback": ("2. OPTQ error feedback before the adapter", EF),
    "refit": ("3. alternating refit (<= 3 rounds)", REFIT),
    "fullcov+refit": ("1 + 3", merge(FULLCOV, REFIT)),
    "fullcov+ef": ("1 + 2", merge(FULLCOV, EF)),
    "best": ("1 + 2 + 3", BEST),
    "best+sparsegpt-mask": ("1 + 2 + 3 with SparseGPT's 2:4 mask", merge(BEST, {"sparsity": {"method": "sparsegpt"}})),
    "best+true-sequential": ("1 + 2 + 3, true-sequential within blocks", merge(BEST, {"true_sequential": True})),
    "slim-group": ("4. SLiM-Quant with group-128 scales (+0.125 bit/weight)", {"quant": {"method": "slim-group"}}),
    "greedy": ("5. greedy rank allocation by error spectrum (same adapter budget)", GREEDY),
    "best+greedy": ("1 + 2 + 3 + 5", merge(BEST, GREEDY)),
    "best+tune": ("1 + 2 + 3 + block tuning (32 steps, lr 3e-2, dense teacher)", merge(BEST, TUNE)),
    "best+tune16": ("1 + 2 + 3 + block tuning (16 steps, lr 3e-2, dense teacher)",
                    merge(BEST, merge(TUNE, {"tune": {"steps": 16}}))),
    "best+tune+scales": ("1 + 2 + 3 + block tuning of adapters and scales (32 steps, lr 3e-2, dense teacher)",
                         merge(BEST, merge(TUNE, {"tune": {"scales": True}}))),
    "best+tune64x2": ("1 + 2 + 3 + block tuning (64 steps of 2 windows, lr 3e-2, dense teacher, held-out check "
                      "every 32 steps)",
                      merge(BEST, merge(TUNE, {"tune": {"steps": 64, "eval_every": 32}, "calib": {"batch_size": 2}}))),
    "best+tune128x1": ("1 + 2 + 3 + block tuning (128 steps of 1 window, lr 3e-2, dense teacher, held-out check "
                       "every 64 steps)",
                       merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64},
                                                "calib": {"batch_size": 1}}))),
    "best+tune128x1s": ("1 + 2 + 3 + block tuning (128 steps of 1 window sliced from batches of 8, lr 3e-2, dense "
                        "teacher, held-out check every 64 steps)",
                        merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64, "batch_size": 1}}))),
    "best+tune128x1s-bf16": ("1 + 2 + 3 + block tuning as best+tune128x1s, the frozen base matmuls in bfloat16 "
                             "(tune.autocast bf16-base)",
                             merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64, "batch_size": 1,
                                                               "autocast": "bf16-base"}}))),
    "best-cal": ("1 + 2 + 3 with the calibration forwards in bfloat16 (calib.autocast bf16)",
                 merge(BEST, {"calib": {"autocast": "bf16"}})),
    "best+tune128x1s-bf16-cal": ("1 + 2 + 3 + block tuning as best+tune128x1s-bf16, and the calibration forwards in "
                                 "bfloat16 (calib.autocast bf16)",
                                 merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64, "batch_size": 1,
                                                                   "autocast": "bf16-base"},
                                                          "calib": {"autocast": "bf16"}}))),
    "best+tune128x1s-bf16-cal-norms": ("1 + 2 + 3 + block tuning as best+tune128x1s-bf16-cal, also training the "
                                       "blocks' norms (tune.norms: full precision, no extra bits)",
                                       merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64,
                                                                         "batch_size": 1, "autocast": "bf16-base",
                                                                         "norms": True},
                                                                "calib": {"autocast": "bf16"}}))),
}

# #48: the kept weights tuned too (shadow weights through the quantizer, mask fixed) and the mask re-chosen on
# W - B A inside the refit, on top of the best block-tuning row
TUNED = merge(BEST, merge(TUNE, {"tune": {"steps": 128, "eval_every": 64, "batch_size": 1, "autocast": "bf16-base"},
                                 "calib": {"autocast": "bf16"}}))
ROWS.update({
    "best-cal+remask": ("1 + 2 + 3 + the mask re-chosen on W - BA in each refit round (adapter.remask), calibration "
                        "forwards in bfloat16",
                        merge(BEST, {"adapter": {"remask": True}, "calib": {"autocast": "bf16"}})),
    "tuned-remask": ("best+tune128x1s-bf16-cal with the mask re-chosen on W - BA in each refit round (adapter.remask)",
                     merge(TUNED, {"adapter": {"remask": True}})),
    "tuned-weights": ("best+tune128x1s-bf16-cal, also training the kept weights (tune.weights, lr 0.03 steps)",
                      merge(TUNED, {"tune": {"weights": True, "weights_lr": 0.03}})),
    "tuned-weights-remask": ("best+tune128x1s-bf16-cal + tune.weights (lr 0.03 steps) + adapter.remask",
                             merge(TUNED, {"tune": {"weights": True, "weights_lr": 0.03},
                                           "adapter": {"remask": True}})),
})


def table(res: dict) -> str:
    dense = res["rows"].get("dense", {}).get("ppl")
    paper = res["rows"].get("paper", {})
    lines = ["| row | recipe | WikiText-2 ppl | gap to dense | gap vs paper | C4 held-out ppl | compress s "
             "| time vs paper | bits/weight | code |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        gap = r["ppl"] - dense if dense else None
        pgap = paper.get("ppl", 0) - dense if dense and paper else None
        rel_gap = f"{gap / pgap:.2f}x" if gap is not None and pgap and name != "dense" else ""
        ref = paper.get("compress_seconds") if r.get("command") == paper.get("command") else r.get("paper_seconds")
        tvs = f"{r['compress_seconds'] / ref:.2f}x" if r.get("compress_seconds") and ref else ""
        c4 = f"{r['c4_ppl']:.2f} ({r['c4_windows']} w)" if r.get("c4_ppl") else ""
        lines.append(
            f"| {name} | {r['description']} | {r['ppl']:.2f} | {'' if gap is None else f'{gap:.2f}'} | {rel_gap} | "
            f"{c4} | {r.get('compress_seconds', 0):.0f} | {tvs} | {r.get('bits_per_weight') or 16:.3f} | "
            f"{(r.get('commit') or '')[:7]} |"
        )
    head = (f"# Ablation on {res['model']}\n\nWikiText-2 test, {res['eval']['windows']} windows x "
            f"{res['eval']['seqlen']} tokens; calibration {res['calib']} (same windows for every row).\n"
            f"Machine: {describe_machine(res['machine'])}.\nCommand: `{res['command']}`\n\n"
            "Rows are measured one at a time, some in earlier sessions with earlier code (`code`: the commit, blank "
            "before commits were recorded); compression times vary by up to ±20 % between sessions on this shared "
            "CPU, so compare times only between rows of one command (docs/results/timing has side-by-side runs); "
            "'time vs paper' divides by the paper row of the run that measured the row (`paper_seconds`). "
            "'C4 held-out' (rows run with `--c4-heldout N`): perplexity on N windows of 2048 tokens of the C4 "
            "sample that no calibration window touches.\n\n")
    return head + "\n".join(lines) + "\n"


def keep_paper_time(rfile: Path) -> None:
    """Before the paper row is measured again, stamp every other timed row with the paper time it was compared
    with, so that a re-run on another machine does not change their 'time vs paper'."""
    if not rfile.exists():
        return
    res = json.loads(rfile.read_text())
    paper = res.get("rows", {}).get("paper", {})
    for name, r in res.get("rows", {}).items():
        if name != "paper" and r.get("compress_seconds") and "paper_seconds" not in r and paper.get("compress_seconds"):
            r["paper_seconds"] = paper["compress_seconds"]
    write_json(rfile, res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from: {', '.join(ROWS)}")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    paper = with_calib(PRESETS["paper"], args.calib_samples, args.seed)
    base = CompressConfig.from_dict(paper)
    grid_rows = {n: (d, None if n == "dense" else merge(paper, o)) for n, (d, o) in ROWS.items()}
    if "paper" in args.redo.split(","):
        keep_paper_time(Path(args.out) / "results.json")
    res = run_grid(grid_rows, rows, Path(args.out), base, args.model, args.data_dir, args.limit, table,
                   [Path(r) for r in args.reuse], [r for r in args.redo.split(",") if r],
                   parse_checkpoints(args.from_checkpoint, grid_rows), device=args.device,
                   c4_heldout=args.c4_heldout)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
