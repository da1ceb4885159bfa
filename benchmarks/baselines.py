"""The paper's comparison on one model: every compared method, one calibration set, one table per setting.

Tables (the paper's layout, rows = methods): 2:4 + 4-bit and 50 % unstructured + 4-bit (its Tables 10-11),
pruning only (Table 13) and quantization only (Table 14). Columns: WikiText-2 perplexity, compression
wall time, and bits per weight of the linear layers as stored. Writes OUT/results.json after every row
(an interrupted grid resumes) and OUT/README.md.

    python benchmarks/baselines.py --out docs/results/baselines [--tables 2:4,50%] [--rows ...] [--limit N]

Each method is a named preset (`slim compress --preset NAME --sparsity ...` gives the same model);
MaskLLM has no row: its masks come from separate GPU training and enter through `--mask-file`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from grid import (  # benchmarks/ is on sys.path when run as a script
    add_common_args,
    describe_machine,
    parse_checkpoints,
    run_grid,
    with_calib,
)

from slim.config import PRESETS, CompressConfig, merge

# method -> (row label as the paper writes it: pruning/LoRA method | weight quantization, preset or None)
METHODS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "magnitude-group-absmax": ("Magnitude", "Group AbsMax", PRESETS["magnitude-group-absmax"]),
    "magnitude-absmax": ("Magnitude", "AbsMax", PRESETS["magnitude-absmax"]),
    "sparsegpt-optq": ("SparseGPT", "Group OPTQ (joint pass)", PRESETS["sparsegpt-optq"]),
    "wanda-group-absmax": ("Wanda", "Group AbsMax", PRESETS["wanda-group-absmax"]),
    "wanda-absmax": ("Wanda", "AbsMax", PRESETS["wanda-absmax"]),
    "wanda-awq": ("Wanda", "AWQ", PRESETS["wanda-awq"]),
    "wanda-gptq": ("Wanda", "Group OPTQ", PRESETS["wanda-gptq"]),
    "wanda-omniquant": ("Wanda", "OmniQuant (LWC, 20 epochs)", PRESETS["wanda-omniquant"]),
    "wanda-affinequant": ("Wanda", "AffineQuant (LWC + LET, 20 epochs)", PRESETS["wanda-affinequant"]),
    "wanda-slim-quant": ("Wanda", "SLiM-Quant (W)", PRESETS["wanda-slim-quant"]),
    "slim-quant-o": ("Wanda", "SLiM-Quant^O (1 % channels x2)", PRESETS["slim-quant-o"]),
    "jsq": ("JSQ", "JSQ (Group AbsMax)", PRESETS["jsq"]),
    "l2qer": ("L2QER", "Group AbsMax", PRESETS["l2qer"]),
    "naive-lora-group-absmax": ("Naive-LoRA", "Group AbsMax", PRESETS["naive-lora-group-absmax"]),
    "naive-lora": ("Naive-LoRA", "SLiM-Quant", PRESETS["naive-lora"]),
    "slim-lora": ("SLiM-LoRA", "SLiM-Quant", PRESETS["slim-lora"]),
    "slim-lora-q": ("SLiM-LoRA^Q (--preset paper)", "SLiM-Quant", PRESETS["paper"]),
    "slim": ("slim default (fullcov + EF + refit, 4-bit adapters)", "SLiM-Quant + OPTQ", {}),
}
PRUNE_ONLY = {  # Table 13: no weight quantization
    "magnitude": ("Magnitude", "-", merge(PRESETS["magnitude-absmax"], {"quant": {"method": "none"}})),
    "wanda": ("Wanda", "-", merge(PRESETS["wanda-absmax"], {"quant": {"method": "none"}})),
    "sparsegpt": ("SparseGPT", "-", merge(PRESETS["sparsegpt-optq"], {"quant": {"method": "none"}})),
    "slim-lora": ("SLiM-LoRA", "-", merge(PRESETS["slim-lora"], {"quant": {"method": "none"}})),
    "slim": ("slim default (fullcov + EF + refit, fp16 adapters)", "-",
             {"quant": {"method": "none"}, "adapter": {"quantize": False}}),
}
QUANT_ONLY = {  # Table 14: dense weights, 4-bit
    "absmax": ("-", "AbsMax", PRESETS["wanda-absmax"]),
    "group-absmax": ("-", "Group AbsMax", PRESETS["wanda-group-absmax"]),
    "gptq": ("-", "Group OPTQ", PRESETS["wanda-gptq"]),
    "awq": ("-", "AWQ", PRESETS["wanda-awq"]),
    "slim-quant": ("-", "SLiM-Quant", PRESETS["wanda-slim-quant"]),
    "slim-quant-o": ("-", "SLiM-Quant^O", PRESETS["slim-quant-o"]),
    "l2qer": ("L2QER", "Group AbsMax", PRESETS["l2qer"]),
    "naive-lora": ("Naive-LoRA", "SLiM-Quant", PRESETS["naive-lora"]),
    "slim-lora": ("SLiM-LoRA", "SLiM-Quant", PRESETS["slim-lora"]),
    "slim-lora-q": ("SLiM-LoRA^Q", "SLiM-Quant", PRESETS["paper"]),
    "slim": ("slim default", "SLiM-Quant + OPTQ", {}),
}
TABLES: dict[str, tuple[str, str, dict]] = {  # key -> (title, sparsity pattern, methods)
    "2:4": ("2:4 sparsity + 4-bit weights", "2:4", METHODS),
    "50%": ("50% unstructured sparsity + 4-bit weights", "0.5", METHODS),
    "prune-2:4": ("Pruning only, 2:4", "2:4", PRUNE_ONLY),
    "prune-50%": ("Pruning only, 50% unstructured", "0.5", PRUNE_ONLY),
    "quant": ("Quantization only, 4-bit", "none", QUANT_ONLY),
}


def all_rows(calib_samples: int | None = None, seed: int | None = None) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Every row of every table: 'TABLE/method' -> (description, full config dict)."""
    rows: dict[str, tuple[str, dict[str, Any] | None]] = {"dense": ("dense model", None)}
    for key, (_, pattern, methods) in TABLES.items():
        for name, (prune, quant, cfg) in methods.items():
            cfg = with_calib(merge(cfg, {"sparsity": {"pattern": pattern}}), calib_samples, seed)
            rows[f"{key}/{name}"] = (f"{prune} | {quant}", cfg)
    return rows


def _fmt_ppl(ppl: float) -> str:
    """Collapsed models reach 1e7: two decimals of that are noise, three significant digits are not."""
    return f"{ppl:.2f}" if ppl < 1e5 else f"{ppl:.3g}"


def render(res: dict) -> str:
    dense = res["rows"].get("dense", {}).get("ppl")
    out = [f"# Compared methods on {res['model']}\n",
           f"WikiText-2 test, {res['eval']['windows']} windows x {res['eval']['seqlen']} tokens; calibration "
           f"{res['calib']} (the same windows for every row). Machine: {describe_machine(res['machine'])}.",
           f"Last command: `{res['command']}` (each row's own command and commit are in results.json)."
           + (f" Dense perplexity: {dense:.2f}.\n" if dense else "\n")]
    for key, (title, _, methods) in TABLES.items():
        done = [(n, res["rows"][f"{key}/{n}"]) for n in methods if f"{key}/{n}" in res["rows"]]
        if not done:
            continue
        out += [f"## {title}\n", "| pruning / LoRA | weight quantization | WikiText-2 ppl | compress s | bits/weight |",
                "|---|---|---|---|---|"]
        for n, r in done:
            prune, quant, _ = methods[n]
            lim = f" ({r['limit']} windows)" if r.get("limit") else ""
            lim += " *" if r.get("reused_from") else ""
            out.append(f"| {prune} | {quant} | {_fmt_ppl(r['ppl'])}{lim} | {r.get('compress_seconds', 0):.0f} | "
                       f"{r.get('bits_per_weight') or 16:.3f} |")
        missing = [n for n in methods if f"{key}/{n}" not in res["rows"]]
        if missing:
            out.append(f"\nNot measured yet: {', '.join(missing)}.")
        out.append("")
    reused = sorted({r["reused_from"] for r in res["rows"].values() if r.get("reused_from")})
    if reused:
        out.append("\\* measured once in another grid with the same recipe, model, calibration and evaluation "
                   "windows, and taken from there (`--reuse`): " + "; ".join(f"`{x}`" for x in reused) + ".\n")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--tables", default=",".join(TABLES), help="tables from: " + ", ".join(TABLES).replace("%", "%%"))
    ap.add_argument("--rows", default=None, help="only these methods (comma-separated, e.g. jsq,wanda-awq)")
    args = ap.parse_args()
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = [t for t in tables if t not in TABLES]
    if bad:
        ap.error(f"unknown tables {bad}; choose from {list(TABLES)}")
    rows = all_rows(args.calib_samples, args.seed)
    names = ["dense"] + [f"{t}/{n}" for t in tables for n in TABLES[t][2]]
    if args.rows:
        want = {r.strip() for r in args.rows.split(",") if r.strip()}
        known = {n.split("/", 1)[1] for n in rows if "/" in n}
        if want - known:
            ap.error(f"unknown methods {sorted(want - known)}; choose from {sorted(known)}")
        names = ["dense"] + [n for n in names[1:] if n.split("/", 1)[1] in want]
    base = CompressConfig.from_dict(with_calib(PRESETS["paper"], args.calib_samples, args.seed))
    res = run_grid(rows, names, Path(args.out), base, args.model, args.data_dir, args.limit, render,
                   [Path(r) for r in args.reuse], [r for r in args.redo.split(",") if r],
                   parse_checkpoints(args.from_checkpoint, rows), device=args.device)
    if res.get("rows"):
        print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
