"""Why SLiM-Quant^O can lose to SLiM-Quant^W: the doubled columns land in the clipped range.

For the first blocks of the (dense) model, with a Wanda 2:4 mask, prints per linear: the calibration
output error (input-RMS weighted, summed) of per-tensor SLiM-Quant without and with the 1 % most salient
input columns doubled, split into those columns and the rest, and the share of the doubled columns'
weights that fall outside the 4-bit range (clipped).

    python benchmarks/archive/slim_quant_o_clipping.py [--model PATH] [--blocks 3] [--samples 16] > out.txt
"""

from __future__ import annotations

import argparse

import torch

from slim.algorithms.methods import outlier_scale
from slim.algorithms.prune import make_mask
from slim.algorithms.quant import fake_quant, qrange, slim_quant_scale
from slim.algorithms.stats import InputStats
from slim.data import calibration_ids, read_texts
from slim.models import find_linears, get_layers, load_model


def split_error(
    w: torch.Tensor, st: InputStats, mask: torch.Tensor, s: torch.Tensor, doubled: bool,
) -> tuple[float, float, float, float]:
    """(error in the salient columns, error elsewhere, clipped share of the salient columns, step), for the
    Wanda mask and SLiM-Quant^O column factors `s` (>1 on the salient columns) that both variants share."""
    top = s > 1
    col = s[None, :] if doubled else torch.ones(1)
    ws = w * mask * col
    step, _, _ = slim_quant_scale(ws[mask], 4)
    err = (ws - fake_quant(ws, step, 4) * mask) / col
    e = err.pow(2) * st.sum_sq[None, :]
    qmin, qmax = qrange(4)
    codes = ws[:, top][mask[:, top]] / step  # kept weights only
    clipped = float(((codes > qmax + 0.5) | (codes < qmin - 0.5)).float().mean())
    return float(e[:, top].sum()), float(e[:, ~top].sum()), clipped, float(step)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 512 C4 tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, _ = load_model(args.model)
    texts, _ = read_texts("c4", args.data_dir)
    ids = calibration_ids(tok, texts, args.samples, 512, 0)
    stats: dict[str, InputStats] = {}
    lins: dict[str, torch.nn.Linear] = {}
    hooks = []
    for i, blk in enumerate(get_layers(model)[: args.blocks]):
        for n, lin in find_linears(blk).items():
            key = f"{i}.{n}"
            stats[key], lins[key] = InputStats.empty(lin.in_features, with_gram=False), lin
            hooks.append(lin.register_forward_hook(
                lambda m, a, o, k=key: stats[k].add(a[0].reshape(-1, a[0].shape[-1]).float())))
    with torch.no_grad():
        for b in ids.split(4):
            model(b)
    for h in hooks:
        h.remove()
    print("| layer | output error W / O | salient 1 % columns W / O | other columns W / O "
          "| salient weights clipped W / O | step W / O |")
    print("|---|---|---|---|---|---|")
    for key, st in stats.items():
        w = lins[key].weight.detach().float()
        mask = make_mask(w, st.sum_sq, "nm", "wanda", 2, 4, 0.5)
        s = outlier_scale(w, st, 0.01, 2.0)
        tw, rw, cw, sw = split_error(w, st, mask, s, False)
        to, ro, co, so = split_error(w, st, mask, s, True)
        print(f"| {key} | {tw + rw:.3g} / {to + ro:.3g} | {tw:.3g} / {to:.3g} | {rw:.3g} / {ro:.3g} "
              f"| {cw:.3f} / {co:.3f} | {sw:.4f} / {so:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
