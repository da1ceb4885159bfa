"""Per-layer final calibration errors of the default recipe on SmolLM2's first blocks, for adapter.svd settings and
randomized-SVD power steps, side by side in one process (one calibration set). #47 used it to see what the
randomized SVD costs where the exact one is cheap enough to compare against.

    python benchmarks/archive/svd_accuracy.py --blocks 4 --variants "exact;randomized,4,2;randomized,4,4"

A variant is SVD[,COLD,WARM]: adapter.svd, and the power steps from a random start and from the previous round's B.
"""

from __future__ import annotations

import argparse
import time

import slim.algorithms.lowrank as lr
from slim.config import CompressConfig
from slim.data import calibration_ids, read_texts
from slim.models import load_model
from slim.pipeline.loop import compress_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4, help="compress the first N blocks (4)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (32)")
    ap.add_argument("--variants", default="exact;randomized,4,2", help="';'-separated SVD[,COLD,WARM]")
    args = ap.parse_args()
    res: dict[str, dict[str, float]] = {}
    variants = args.variants.split(";")
    for v in variants:
        svd, cold, warm = (v.split(",") + ["4", "2"])[:3]
        lr._POWER_COLD, lr._POWER_WARM = int(cold), int(warm)
        model, tok, _ = load_model(None)
        model.model.layers = model.model.layers[: args.blocks]
        cfg = CompressConfig.from_dict({"adapter": {"svd": svd}, "calib": {"n_samples": args.samples}})
        texts, _ = read_texts(cfg.calib.data, None)
        ids = calibration_ids(tok, texts, cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib.seed)
        t = time.perf_counter()
        rep = compress_model(model, ids, cfg, progress=False)
        res[v] = {k: layer["rel_err_final"] for k, layer in rep["layers"].items()}
        mean = sum(res[v].values()) / len(res[v])
        print(f"{v}: {time.perf_counter() - t:.1f} s, mean final relative error {mean:.5f}", flush=True)
    base = res[variants[0]]
    for v in variants[1:]:
        r = [res[v][k] / base[k] - 1 for k in base]
        print(f"{v} vs {variants[0]}: mean per-layer change {sum(r) / len(r):+.2%} (min {min(r):+.1%}, "
              f"max {max(r):+.1%})")


if __name__ == "__main__":
    main()
