"""Baseline methods the paper compares against, written from their papers' recipes.

- AWQ (Lin et al., 2024): per-input-channel scales s = mean|x|^a (normalized), a searched on a grid,
  then a per-group clipping search; asymmetric (zero-point) group quantization. Applied after the
  mask, on the pruned weights, as the SLiM paper does. Deviation: both searches score a candidate by
  the linear's own calibration output error tr(E H E^T) (exact, via the Gram matrix) rather than by
  the output of the enclosing attention/MLP module, and each linear gets its own scales, stored as
  the layer's `input_scale` instead of being folded into the previous operation.
- JSQ (Guo et al., 2024): pruning metric |W| * ||x_clipped|| + rho * ss, where ss[o, i] is the range
  over tokens of output o when input channel i is removed (the quantization-range term), statistics
  on inputs whose top 1% entries are clipped; then 4-bit group quantization (the SLiM paper's 4-bit
  extension). JSQ's SmoothQuant step only matters when activations are quantized; with weight-only
  quantization it leaves the layer's function unchanged, so it is not applied.
"""

from __future__ import annotations

import torch

from .lowrank import output_error
from .quant import clamp_sym, fake_quant, grouped, minmax_asym_params, round_scale
from .stats import JSQStats


def _asym_dequant(wg: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped (rows, G, g) weights quantized-dequantized with AWQ's asymmetric min/max quantizer."""
    if clip is not None:
        wg = clamp_sym(wg, clip[..., None])
    scale, zero = minmax_asym_params(wg, bits)
    return fake_quant(wg, scale[..., None], bits, zero[..., None])


def awq_search(
    w: torch.Tensor, mean_abs: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, grid: int = 20,
    max_shrink: float = 0.5, clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """AWQ for one (already masked) weight: (input_scale s (d_in,), group scale, group zero, group clip
    bound, info), all groups (rows, n_groups). The layer stores clamp(W diag(s), +-clip) quantized with
    those parameters and divides its input by s. `clip=False` skips the
    clipping search (AWQ skips it for q/k projections, whose errors are amplified by the softmax).
    """
    rows, d_in = w.shape
    w = w.float()
    x = mean_abs.float().clamp_min(0)
    best = (float("inf"), torch.ones(d_in, device=w.device), 0.0)
    for i in range(grid):
        a = i / grid
        s = x.pow(a).clamp_min(1e-4)
        s = round_scale(s / (s.max() * s.min()).sqrt())
        deq = _asym_dequant(grouped(w * s, group_size), bits).reshape(rows, -1)[:, :d_in] / s
        e = output_error(deq - w, gram)
        if e < best[0]:
            best = (e, s, a)
    _, s, alpha = best
    ws = w * s
    hs = gram.double() / s.double()[:, None] / s.double()[None, :]
    wg = grouped(ws, group_size)
    amax = wg.abs().amax(-1)
    clipv = amax.clone()
    if clip:
        n_g = wg.shape[1]
        pad = n_g * group_size - d_in
        hp = torch.nn.functional.pad(hs, (0, pad, 0, pad))
        blocks = torch.stack([hp[j * group_size:(j + 1) * group_size, j * group_size:(j + 1) * group_size]
                              for j in range(n_g)]).float()
        best_err = torch.full_like(amax, float("inf"))
        for k in range(int(max_shrink * grid)):
            cand = amax * (1 - k / grid)
            e = _asym_dequant(wg, bits, cand) - wg
            err = torch.einsum("rgi,gij,rgj->rg", e, blocks, e)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            clipv = torch.where(better, cand, clipv)
    scale, zero = minmax_asym_params(wg, bits, clipv)
    return s, scale, zero, clipv, {"awq_alpha": alpha, "awq_clipped_groups": float((clipv < amax).float().mean())}


def jsq_range_sensitivity(
    act: torch.Tensor, w: torch.Tensor, budget: int = 32_000_000
) -> torch.Tensor:
    """ss[o, i] = max_t - min_t of (act @ W^T)[t, o] - act[t, i] W[o, i]: the range of output o over the
    calibration positions once input i is pruned (JSQ's term for the activation quantization range)."""
    act = act.float()
    w = w.float()
    t, d_in = act.shape
    y = act @ w.T  # (T, out)
    ss = torch.empty_like(w)
    chunk = max(1, budget // max(1, t * w.shape[0]))
    for c0 in range(0, d_in, chunk):
        c1 = min(c0 + chunk, d_in)
        out = y[:, :, None] - act[:, None, c0:c1] * w[None, :, c0:c1]  # (T, out, c)
        ss[:, c0:c1] = out.amax(0) - out.amin(0)
    return ss


def jsq_score(w: torch.Tensor, jsq: JSQStats, mixing: float) -> torch.Tensor:
    """JSQ's pruning metric (higher = keep): Wanda's score on clipped inputs plus rho * ss."""
    if jsq.pos_sum is None or jsq.n_seqs == 0:
        raise ValueError("JSQ needs its calibration statistics (collected when sparsity.method is 'jsq')")
    norm = (jsq.sum_sq.float() / jsq.n_seqs).sqrt()  # per-sequence mean of sum_t x^2, as JSQ normalizes it
    return w.abs().float() * norm[None, :] + mixing * jsq_range_sensitivity(jsq.mean_activation, w)
