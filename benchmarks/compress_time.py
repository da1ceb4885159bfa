"""Compression wall time of recipes side by side, in one process, from one calibration set.

A ratio of two timings means something only when both ran on the same machine under the same
load, so recipes run back to back in the order given (e.g. paper,default,paper brackets the
default run between two paper runs). Writes OUT/results.json and OUT/README.md.

    python benchmarks/compress_time.py --out docs/results/timing --order paper,default,paper \
        [--save-dir runs/timing]   # also keep each compressed checkpoint (e.g. for zero-shot evals)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from grid import (
    DEFAULT_MODEL_NAME,
    add_common_args,
    calib_label,
    describe_machine,
    load_calibration,
    machine,
    with_calib,
    write_result,
)

from slim.config import PRESETS, CompressConfig
from slim.format.checkpoint import save, versions
from slim.models import load_model
from slim.pipeline.loop import compress_model

RECIPES = {"paper": PRESETS["paper"], "default": {}}


def table(res: dict) -> str:
    lines = [f"# Compression time, side by side: {res['model']}\n",
             f"Calibration {res['calib']}. Machine: {describe_machine(res['machine'])}; nothing else running. "
             "Runs in this order, back to back, one process.",
             f"Command: `{res['command']}`\n",
             "| run | recipe | compress s | bits/weight |", "|---|---|---|---|"]
    for i, r in enumerate(res["runs"]):
        lines.append(f"| {i + 1} | {r['recipe']} | {r['seconds']:.0f} | {r['bits_per_weight']:.3f} |")
    lines += ["", "| recipe | runs | median s | min s | max s | median vs paper |", "|---|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['runs']} | {s['median']:.0f} | {s['min']:.0f} | {s['max']:.0f} | "
                     f"{s.get('vs_paper', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, with_eval=False)
    ap.add_argument("--order", default="paper,default,paper", help=f"recipes in run order, from {list(RECIPES)}")
    ap.add_argument("--save-dir", default=None, help="save each run's checkpoint under this folder")
    args = ap.parse_args()
    order = [r.strip() for r in args.order.split(",") if r.strip()]
    bad = [r for r in order if r not in RECIPES]
    if not order:
        ap.error("--order names no recipe")
    if bad:
        ap.error(f"unknown recipes {bad}; choose from {list(RECIPES)}")
    cfgs = {name: CompressConfig.from_dict(with_calib(RECIPES[name], args.calib_samples, args.seed))
            for name in set(order)}
    if len({calib_label(c) for c in cfgs.values()}) != 1:
        ap.error("the recipes differ in calibration settings; timings would not be comparable")
    base = next(iter(cfgs.values()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, calib, prov = load_calibration(args.model, base, args.data_dir)
    res = {"model": args.model or DEFAULT_MODEL_NAME, "machine": machine(),
           "versions": versions(), "calib_data": prov, "command": "python " + " ".join(sys.argv),
           "calib": calib_label(base), "runs": []}
    for i, name in enumerate(order):
        if model is None:  # each run starts from a fresh copy of the dense model
            model, tok, _ = load_model(args.model)
        t0 = time.perf_counter()
        rep = compress_model(model, calib, cfgs[name])
        sec = time.perf_counter() - t0
        res["runs"].append({"recipe": name, "seconds": sec, "bits_per_weight": rep["bits_per_weight"],
                            "config": cfgs[name].to_dict()})
        print(f"[{i + 1}/{len(order)}] {name}: {sec:.1f} s", flush=True)
        if args.save_dir:
            meta = {"config": cfgs[name].to_dict(), "calibration_data": prov, "report": rep,
                    "command": res["command"]}
            save(model, Path(args.save_dir) / f"{i + 1}-{name}", tok, meta, overwrite=True)
        model = None
        summ = {}
        for r in dict.fromkeys(x["recipe"] for x in res["runs"]):
            s = [x["seconds"] for x in res["runs"] if x["recipe"] == r]
            summ[r] = {"runs": len(s), "median": statistics.median(s), "min": min(s), "max": max(s)}
        if "paper" in summ:
            for s in summ.values():
                s["vs_paper"] = s["median"] / summ["paper"]["median"]
        res["summary"] = summ
        text = write_result(out, res, table)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
