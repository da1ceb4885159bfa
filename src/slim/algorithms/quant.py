"""Weight quantizers as pure torch functions.

Integer levels are qmin..qmax = -2^(b-1)..2^(b-1)-1 with a step (scale) per tensor or per group
along the input dimension. Symmetric quantizers map w to round(w / scale); asymmetric ones (AWQ)
add an integer zero point per group, stored in the same signed code space: code = round(w / scale)
+ zero, value = (code - zero) * scale. Scales are rounded to fp16 before the codes are computed,
so what is stored on disk is exactly what the in-memory model uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def qrange(bits: int) -> tuple[int, int]:
    """Integer range of a symmetric b-bit quantizer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 (the stored precision), keeping them positive: a zero (or underflowed) scale becomes
    fp16's smallest subnormal, 2^-24 (1e-8, used before, rounds to 0 in fp16, and 0 / 0 made NaN codes)."""
    s = scale.to(torch.float16).float()
    return torch.where(s > 0, s, torch.full_like(s, 2.0**-24))


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, bits: int, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """round(w / scale) (+ zero) clamped to the b-bit range, as int8 codes. `scale`/`zero` broadcast."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zero is not None:
        q = q + zero
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, bits: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize with the exact forward quantizer (the codes stay in float: they are small
    integers, exact in any float format, and this runs once per column inside error-feedback loops)."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale)
    if zero is None:
        return q.clamp_(qmin, qmax).mul_(scale)
    return q.add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


# ---------------------------------------------------------------- per-tensor scales


def absmax_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """AbsMax: the largest magnitude maps to qmax."""
    return round_scale(w.abs().max().float() / qrange(bits)[1])


def slim_quant_scale(
    values: torch.Tensor, bits: int, levels: int = 3, points: int = 24
) -> tuple[torch.Tensor, float, float]:
    """SLiM-Quant: one per-tensor clipping value alpha that minimizes the expected squared error.

    The error of each candidate alpha is integrated over a histogram of the (non-pruned) weight
    values, using the *same* rounding and clamping as `quantize_codes` (the official code models a
    floor quantizer with step alpha/2^b but applies round(w/(alpha/7)) clamped to [-8, 7]). The search
    is multi-grid: a coarse grid over (0, max|w|], then finer grids around the best point.
    Returns (scale, alpha, relative squared error on the exact values).
    """
    v = values.detach().flatten().float()
    qmin, qmax = qrange(bits)
    amax = float(v.abs().max()) if v.numel() else 0.0
    if amax == 0.0:
        return round_scale(torch.ones((), device=v.device)), 0.0, 0.0
    bins = max(512, min(v.numel() // 1000, 20000))
    hist = torch.histc(v, bins=bins, min=-amax, max=amax)
    edges = torch.linspace(-amax, amax, bins + 1, device=v.device)
    centers = (edges[:-1] + edges[1:]) / 2

    def err(alphas: torch.Tensor) -> torch.Tensor:
        step = (alphas / qmax)[:, None]
        q = torch.clamp(torch.round(centers[None, :] / step), qmin, qmax) * step
        return ((q - centers[None, :]) ** 2 * hist[None, :]).sum(1)

    lo, hi = amax / points, amax
    best = amax
    for _ in range(levels):
        grid = torch.linspace(lo, hi, points, device=v.device)
        e = err(grid)
        i = int(torch.argmin(e))
        best = float(grid[i])
        width = (hi - lo) / (points - 1)
        lo, hi = max(best - width, amax * 1e-4), min(best + width, amax)
    scale = round_scale(torch.tensor(best / qmax, device=v.device))
    rel = float(((fake_quant(v, scale, bits) - v) ** 2).sum() / (v**2).sum().clamp_min(1e-30))
    return scale, best, rel


# ---------------------------------------------------------------- grouped scales


def n_groups(d_in: int, group_size: int) -> int:
    return math.ceil(d_in / group_size)


def expand_groups(scale: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    """(rows, n_groups) group scales -> (rows, d_in), the last group possibly shorter."""
    return scale.repeat_interleave(group_size, dim=-1)[..., :d_in]


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, d_in) -> (rows, n_groups, group_size), zero-padding a shorter last group."""
    rows, d_in = w.shape
    g = n_groups(d_in, group_size)
    return torch.nn.functional.pad(w.float(), (0, g * group_size - d_in)).view(rows, g, group_size)


def clamp_sym(t: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Clamp t to [-bound, bound] elementwise (bound broadcasts against t)."""
    return torch.maximum(torch.minimum(t, bound), -bound)


def fake_quant_grouped(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Group AbsMax quantize-dequantize of w (rows, d_in) in float: the values `solver.quantize_grouped` returns,
    computed on the grouped view (no expanded scales, no int8 codes), for the straight-through estimator that
    runs it on every adapter at every tuning step."""
    rows, d_in = w.shape
    q = fake_quant(grouped(w, group_size), group_absmax_scale(w, bits, group_size)[..., None], bits)
    return q.view(rows, -1)[:, :d_in]


def group_absmax_scale(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """AbsMax per group of `group_size` consecutive input columns (a shorter last group if needed)."""
    return round_scale(grouped(w.abs(), group_size).amax(-1) / qrange(bits)[1])


def group_slim_scale(
    w: torch.Tensor, mask: torch.Tensor, bits: int, group_size: int, points: int = 24, levels: int = 2
) -> torch.Tensor:
    """SLiM-Quant with a scale per group of input columns: each group's clipping value minimizes the
    exact squared error of the forward quantizer over its kept weights (coarse-to-fine search over
    fractions of the group's absmax). A shorter last group covers widths not divisible by the size."""
    wm = grouped(w * mask, group_size)
    amax = wm.abs().amax(-1).clamp_min(1e-12)  # (rows, g)
    qmin, qmax = qrange(bits)
    lo = torch.full_like(amax, 1.0 / points)
    hi = torch.ones_like(amax)
    best = torch.ones_like(amax)
    for _ in range(levels):
        fr = lo[..., None] + (hi - lo)[..., None] * torch.linspace(0, 1, points, device=w.device)  # (rows, g, P)
        step = (fr * amax[..., None] / qmax)[..., None]  # (rows, g, P, 1)
        x = wm[:, :, None, :]
        err = ((torch.clamp(torch.round(x / step), qmin, qmax) * step - x) ** 2).sum(-1)
        i = err.argmin(-1, keepdim=True)
        best = fr.gather(-1, i)[..., 0]
        width = (hi - lo) / (points - 1)
        lo, hi = (best - width).clamp_min(1e-3), (best + width).clamp_max(1.0)
    return round_scale(best * amax / qmax)


def gptq_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's symmetric rule along the last dim: step 2 * max|w| / (2^b - 1) with levels -2^(b-1)..2^(b-1)-1,
    so the largest magnitude is clipped by one half step on the positive side."""
    amax = w.abs().float().amax(-1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return round_scale(2 * amax / (2**bits - 1))


def minmax_asym_params(
    wg: torch.Tensor, bits: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (zero-point) parameters over the last dim, as AWQ computes them: step (max - min) /
    (2^b - 1) and zero -round(min / step), shifted into the signed code space. `clip` (same shape as the
    result) first clamps w to [-clip, clip] (AWQ's clipping search)."""
    if clip is not None:
        wg = clamp_sym(wg, clip[..., None])
    mx, mn = wg.amax(-1), wg.amin(-1)
    scale = round_scale(((mx - mn).clamp_min(1e-5)) / (2**bits - 1))
    qmin, qmax = qrange(bits)
    zero = (-torch.round(mn / scale)).clamp(0, 2**bits - 1) + qmin
    return scale, zero.clamp(qmin, qmax)


class _GroupMinMax(torch.autograd.Function):
    """Each group's (max, min) of a grouped (rows, n_groups, group_size) weight, whose backward scatters the two
    gradients to the argmax and argmin entries: what amax/amin's backward gives except at exact ties (there
    one tied entry takes the gradient, amax splits it), its backward one pass over the weight where amax/amin's
    take ~10 (an AffineQuant step on a SmolLM2 block, with `_AsymRoundSTE`: 1.05x, docs/results/timing/
    lwc-step-extremes)."""

    @staticmethod
    def forward(ctx: Any, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mx, imx = wg.max(-1)
        mn, imn = wg.min(-1)
        ctx.save_for_backward(imx, imn)
        ctx.shape = wg.shape
        return mx, mn

    @staticmethod
    def backward(ctx: Any, gmx: torch.Tensor | None, gmn: torch.Tensor | None) -> torch.Tensor:
        imx, imn = ctx.saved_tensors
        dtype = gmx.dtype if gmx is not None else gmn.dtype
        g = torch.zeros(ctx.shape, dtype=dtype, device=imx.device)
        for grad, idx in ((gmx, imx), (gmn, imn)):
            if grad is not None:
                g.scatter_add_(-1, idx[..., None], grad[..., None])
        return g


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (max, min), (rows, n_groups) each; differentiable in w (AffineQuant's transformed weights)."""
    wg = grouped(w, group_size)
    if not wg.requires_grad:
        return wg.amax(-1), wg.amin(-1)
    return _GroupMinMax.apply(wg)


def lwc_params(
    w: torch.Tensor, bits: int, group_size: int, up: torch.Tensor, low: torch.Tensor,
    minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OmniQuant's learnable weight clipping: asymmetric min-max groups whose max and min are shrunk by
    sigmoid(up) and sigmoid(low), (rows, n_groups) logits. Returns (scale, zero), zero in the signed code space.
    Differentiable in `up` and `low`: the scale's fp16 rounding passes gradients straight through, the zero
    point carries none (as in OmniQuant), so training sees exactly the quantizer that is stored. `minmax`:
    `group_minmax(w)` when known (a weight that stays fixed while its clipping trains)."""
    gmax, gmin = group_minmax(w, group_size) if minmax is None else minmax
    mx = gmax * torch.sigmoid(up)
    mn = gmin * torch.sigmoid(low)
    raw = ((mx - mn) / (2**bits - 1)).clamp(1e-5, 1e4)
    scale = raw + (round_scale(raw.detach()) - raw).detach()
    zero = torch.round(-mn.detach() / scale.detach()).clamp(0, 2**bits - 1) + qrange(bits)[0]
    return scale, zero


class _AsymRoundSTE(torch.autograd.Function):
    """(clamp(round(w / s) + z) - z) * s with a straight-through round: the values and gradients of writing it
    as autograd ops (x + (round(x) - x).detach(), clamp, ...), in fewer passes over the weight (a step on a
    SmolLM2 block: 1.06x for OmniQuant, none for AffineQuant, docs/results/timing/lwc-step). Gradients: to w where
    the code is not clamped, to s (q - z) - x there and (q - z) where clamped; z (computed from detached values)
    takes none."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(w, s, z)
        ctx.qrange = (qmin, qmax)
        return torch.round(w / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        x = w / s
        v = torch.round(x).add_(z)
        inside = (v >= qmin) & (v <= qmax)  # torch.clamp's gradient mask (bounds included)
        gw = g * inside if ctx.needs_input_grad[0] else None
        gs = v.clamp_(qmin, qmax).sub_(z).sub_(x.mul_(inside)).mul_(g) if ctx.needs_input_grad[1] else None
        return gw, gs, None, None, None


def lwc_fake_quant(
    w: torch.Tensor, bits: int, group_size: int, up: torch.Tensor, low: torch.Tensor,
    minmax: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weight as `lwc_params`' quantizer stores it, with straight-through rounding (for training)."""
    scale, zero = lwc_params(w, bits, group_size, up, low, minmax)
    d_in = w.shape[1]
    s, z = expand_groups(scale, d_in, group_size), expand_groups(zero, d_in, group_size)
    return _AsymRoundSTE.apply(w, s, z, *qrange(bits))


def lwc_fake_quant_reference(
    w: torch.Tensor, bits: int, group_size: int, up: torch.Tensor, low: torch.Tensor,
) -> torch.Tensor:
    """`lwc_fake_quant` written as plain autograd ops (x + (round(x) - x).detach(), clamp, ...), the group extremes
    by amax/amin: the formula the fused rounding is tested and timed against."""
    wg = grouped(w, group_size)
    scale, zero = lwc_params(w, bits, group_size, up, low, (wg.amax(-1), wg.amin(-1)))
    d_in = w.shape[1]
    s, z = expand_groups(scale, d_in, group_size), expand_groups(zero, d_in, group_size)
    x = w / s
    return (torch.clamp(x + (torch.round(x) - x).detach() + z, *qrange(bits)) - z) * s


# ---------------------------------------------------------------- activations


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor on a dynamic scale: an all-zero tensor stays finite


def fp8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """FP8 input quantization as vLLM serves it: dynamic per-tensor E4M3 with scale = max|x| / 448 (floored),
    values divided by the scale, saturated to +-448, rounded to E4M3, multiplied back.

    The scale stays a device tensor: no host synchronization per forward, and `torch.compile` sees one graph.
    Simulated (quantize + dequantize in fp32) so it runs on any device."""
    xf = x.float()
    scale = (xf.detach().abs().amax() / FP8_MAX).clamp(min=FP8_MIN_SCALE) if x.numel() else xf.new_ones(())
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)
