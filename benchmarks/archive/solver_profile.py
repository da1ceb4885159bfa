"""Solve time of one 7B-shaped block's seven linears (random weights, synthetic correlated inputs: the solver's cost
does not depend on the values), by function, for a recipe. A scratch profile: it times slim's solver functions by
wrapping them, so the parts overlap (quantize_masked contains optq and fit_scale, _truncated contains
randomized_svd). #47 used it to find where the 664 s of a 7B-shaped block went and what each change saved.

    python benchmarks/archive/solver_profile.py --recipe default [--tokens 4096] [--linears q,gate,down]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch

import slim.algorithms.lowrank as lr
import slim.algorithms.optq as oq
import slim.pipeline.solver as sv
from slim.algorithms.stats import InputStats
from slim.config import PRESETS, CompressConfig

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (11008, 4096),
          "up": (11008, 4096), "down": (4096, 11008)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="default", help="default, or a preset name (e.g. paper)")
    ap.add_argument("--tokens", type=int, default=4096, help="synthetic calibration tokens (4096)")
    ap.add_argument("--linears", default=",".join(SHAPES), help="which of q,k,v,o,gate,up,down")
    args = ap.parse_args()
    ntok, only = args.tokens, args.linears.split(",")
    cfg = CompressConfig.from_dict(PRESETS[args.recipe]) if args.recipe != "default" else CompressConfig()
    seconds: dict[str, float] = collections.defaultdict(float)

    def wrap(mod: object, name: str) -> None:
        f = getattr(mod, name)

        @functools.wraps(f)
        def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            r = f(*a, **k)
            seconds[name] += time.perf_counter() - t
            return r

        setattr(mod, name, timed)

    for mod, name in [(lr, "_truncated"), (lr, "randomized_svd"), (lr, "times_lower"), (oq, "damped_inverse_cholesky"),
                      (oq, "upper_inverse_factor"), (sv, "optq"), (sv, "gram_factor"), (sv, "quantize_masked"),
                      (sv, "quantize_grouped"), (sv, "fit_scale")]:
        wrap(mod, name)
    torch.manual_seed(0)
    stats: dict[int, InputStats] = {}
    total = 0.0
    for name in only:
        d_out, d_in = SHAPES[name]
        if d_in not in stats:
            s = InputStats.empty(d_in, True)
            g = torch.Generator().manual_seed(d_in)
            scales = torch.exp(torch.randn(d_in, generator=g))
            mix = torch.randn(d_in, d_in // 8, generator=g) / (d_in // 8) ** 0.5
            for _ in range(0, ntok, 1024):
                z = torch.randn(1024, d_in // 8, generator=g)
                s.add((z @ mix.T + 0.3 * torch.randn(1024, d_in, generator=g)) * scales)
            stats[d_in] = s
        w = torch.randn(d_out, d_in) / d_in**0.5
        t = time.perf_counter()
        sv.compress_weight(w, stats[d_in], cfg, name=name)
        dt = time.perf_counter() - t
        total += dt
        print(f"{name}: {dt:.1f} s; cumulative by function: { {k: round(v, 1) for k, v in seconds.items()} }",
              flush=True)
    print(f"total solve {total:.1f} s")


if __name__ == "__main__":
    main()
