"""Time of an OmniQuant / AffineQuant tuning step on SmolLM2's first block: the fused straight-through rounding
(`slim.algorithms.quant._AsymRoundSTE`, with the fixed weight's group extremes computed once, and AffineQuant's changing
extremes differentiated by `slim.algorithms.quant._GroupMinMax`'s scatter) against writing the same quantizer as
autograd
ops with the extremes recomputed every step by amax/amin (the code before them). Same block, calibration,
seed and steps in one process, the two run alternately; also reports how far the stored weights of the two
runs differ (the gradients agree to float rounding, so a few codes may flip over many steps).

    python benchmarks/archive/lwc_speed.py --out docs/results/timing/lwc-step --steps 256
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: the shared grid helpers


def autograd_lwc_fake_quant(w: Any, bits: int, group_size: int, up: Any, low: Any, minmax: Any = None) -> Any:
    """The 'before' side: the quantizer as autograd ops, the group extremes recomputed by amax/amin every step
    (`minmax` ignored, so gradients through the extremes take amax/amin's own backward)."""
    from slim.algorithms.quant import lwc_fake_quant_reference

    return lwc_fake_quant_reference(w, bits, group_size, up, low)


def measure(presets: list[str], steps: int, repeats: int, data_dir: str | None) -> list[dict[str, Any]]:
    import torch

    import slim.pipeline.tune
    from slim.config import PRESETS, CompressConfig, merge
    from slim.data import calibration_ids, read_texts
    from slim.format.packed import SlimLinear
    from slim.models import load_model
    from slim.pipeline.loop import compress_model

    dense, tok, _ = load_model(None)
    dense.model.layers = dense.model.layers[:1]
    dense.config.num_hidden_layers = 1
    fused = slim.pipeline.tune.lwc_fake_quant
    rows = []
    for preset in presets:
        cfg = CompressConfig.from_dict(merge(PRESETS[preset], {"tune": {"epochs": 0, "steps": steps}}))
        texts, _ = read_texts(cfg.calib.data, data_dir)
        calib = calibration_ids(tok, texts, cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib.seed)
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for rep_i in range(repeats):
            order = ["autograd", "fused"] if rep_i % 2 == 0 else ["fused", "autograd"]
            for impl in order:
                slim.pipeline.tune.lwc_fake_quant = autograd_lwc_fake_quant if impl == "autograd" else fused
                try:
                    m = copy.deepcopy(dense)
                    t0 = time.perf_counter()
                    rep = compress_model(m, calib, cfg, progress=False)
                    total = time.perf_counter() - t0
                finally:
                    slim.pipeline.tune.lwc_fake_quant = fused
                tune = next(v["block_tune"] for v in rep["layers"].values() if v.get("block_tune"))
                weights[impl] = {n: mod.dequantized_weight() for n, mod in m.named_modules()
                                 if isinstance(mod, SlimLinear)}
                row = {"preset": preset, "impl": impl, "repeat": rep_i, "steps": tune["steps"],
                       "tune_seconds": tune["seconds"], "seconds_per_step": tune["seconds"] / tune["steps"],
                       "compress_seconds": total, "train_last": tune["train_last"]}
                rows.append(row)
                print(f"{preset} {impl}: {row['seconds_per_step'] * 1000:.1f} ms/step "
                      f"(last loss {row['train_last']:.5f})", flush=True)
        diff = max(float((weights["fused"][n] - weights["autograd"][n]).abs().max() /
                         weights["autograd"][n].abs().max()) for n in weights["fused"])
        for r in rows:
            if r["preset"] == preset:
                r["stored_max_rel_diff"] = diff
    return rows


def render(res: dict[str, Any]) -> str:
    from grid import describe_machine

    out = ["# OmniQuant / AffineQuant tuning step: fused rounding vs autograd ops\n",
           f"SmolLM2-135M block 0, 128 x 512 C4 calibration windows, one window a step, {res['steps']} steps per "
           f"run, each preset's own settings (bf16 autocast); runs alternate, {res['repeats']} each. Machine: "
           f"{describe_machine(res['machine'])}. Command: `{res['command']}`.\n",
           "| preset | ms per step, autograd ops | ms per step, fused | speed-up | stored weights, max rel. diff |",
           "|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["preset"] == preset]

        def mean(impl: str, rs: list[dict[str, Any]] = rs) -> float:
            v = [r["seconds_per_step"] for r in rs if r["impl"] == impl]
            return sum(v) / len(v)

        a, f = mean("autograd"), mean("fused")
        diff = rs[0]["stored_max_rel_diff"]
        out.append(f"| {preset} | {a * 1000:.1f} | {f * 1000:.1f} | {a / f:.2f}x | {diff:.2e} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (results.json + README.md)")
    ap.add_argument("--steps", type=int, default=256, help="tuning steps per run (256)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each implementation (2, alternating)")
    ap.add_argument("--presets", default="wanda-omniquant,wanda-affinequant")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from grid import machine, source_commit

    from slim.format.checkpoint import write_json

    rows = measure(args.presets.split(","), args.steps, args.repeats, args.data_dir)
    res = {"machine": machine(), "commit": source_commit(), "command": " ".join(["python", *sys.argv]),
           "steps": args.steps, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    (out / "README.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
