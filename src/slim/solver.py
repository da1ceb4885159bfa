"""The SLiM recipe for one weight matrix: mask, quantize, fit adapters, re-quantize (and optionally refit)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import AdapterConfig, CompressConfig, QuantConfig
from .lowrank import fullcov_adapter, naive_adapter, output_error, slim_adapter, sqrt_and_inv_sqrt
from .optq import inverse_hessian_cholesky, optq
from .packed import CompressedWeight
from .prune import make_mask, sparsegpt_mask
from .quant import (
    absmax_scale,
    expand_groups,
    fake_quant,
    group_absmax_scale,
    group_slim_scale,
    quantize_codes,
    slim_quant_scale,
)
from .stats import InputStats


def outlier_scale(w: torch.Tensor, stats: InputStats, fraction: float, factor: float) -> torch.Tensor:
    """SLiM-Quant^O: per-input-channel factor, `factor` on the top channels by ||x_j|| * sum_i |W_ij|."""
    d_in = w.shape[1]
    k = int(round(fraction * d_in))
    s = torch.ones(d_in)
    if k:
        sal = stats.sum_sq.float().sqrt() * w.abs().sum(0)
        s[sal.topk(k).indices] = factor
    return s


@dataclass
class QuantResult:
    """Quantized masked weights: codes (None when not quantized), scale, group size, dense values."""

    codes: torch.Tensor | None
    scale: torch.Tensor | None
    group_size: int
    dense: torch.Tensor  # M * Q(W) as floats
    info: dict


def fit_scale(w: torch.Tensor, mask: torch.Tensor, q: QuantConfig) -> tuple[torch.Tensor, int, dict]:
    """The quantizer's scale(s) for the kept weights: (scale, group_size or 0, info)."""
    if q.method in ("slim", "slim-o"):
        scale, alpha, rel = slim_quant_scale(w[mask], q.bits)
        return scale, 0, {"alpha": alpha, "quant_rel_err": rel}
    if q.method == "absmax":
        return absmax_scale(w * mask, q.bits), 0, {}
    if q.method == "group-absmax":
        return group_absmax_scale(w * mask, q.bits, q.group_size), q.group_size, {}
    if q.method == "slim-group":
        return group_slim_scale(w, mask, q.bits, q.group_size), q.group_size, {}
    raise ValueError(f"unknown quantizer {q.method!r}")


def quantize_masked(
    w: torch.Tensor, mask: torch.Tensor, q: QuantConfig, gram: torch.Tensor | None = None,
    hinv_chol: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize M * W: round-to-nearest, or OPTQ error feedback when q.error_feedback (needs gram)."""
    if q.error_feedback and gram is None:
        raise ValueError("error feedback needs the Gram matrix of the layer inputs")
    if q.error_feedback and hinv_chol is None:
        hinv_chol = inverse_hessian_cholesky(gram, q.damping)
    if q.method == "none":
        dense = optq(w, gram, lambda c, j: c, mask, hinv_chol=hinv_chol)[0] if q.error_feedback else w * mask
        return QuantResult(None, None, 0, dense, {})
    scale, gsize, info = fit_scale(w, mask, q)
    full = scale if gsize == 0 else expand_groups(scale, w.shape[1], gsize)
    if q.error_feedback:
        if gsize == 0:
            def col_fn(c: torch.Tensor, j: int) -> torch.Tensor:
                return fake_quant(c, scale, q.bits)
        else:
            def col_fn(c: torch.Tensor, j: int) -> torch.Tensor:
                return fake_quant(c, full[:, j], q.bits)
        target = optq(w, gram, col_fn, mask, hinv_chol=hinv_chol)[0]
    else:
        target = w * mask
    codes = quantize_codes(target, full, q.bits)
    return QuantResult(codes, scale, gsize, codes.float() * full * mask, info)


def fit_adapter(
    err: torch.Tensor, stats: InputStats, gram: torch.Tensor | None, rank: int, ad: AdapterConfig,
    roots: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A ~ err under the adapter method's weighting."""
    if ad.method == "naive":
        return naive_adapter(err, rank)
    if ad.method == "slim":
        return slim_adapter(err, stats.rms, rank)
    if gram is None:
        raise ValueError("fullcov adapters need the Gram matrix of the layer inputs")
    return fullcov_adapter(err, gram, rank, ad.damping, roots)


def quantize_grouped(t: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group AbsMax along the last dim: (codes, scales, dequantized)."""
    scale = group_absmax_scale(t, bits, group)
    full = expand_groups(scale, t.shape[1], group)
    codes = quantize_codes(t, full, bits)
    return codes, scale, codes.float() * full


def compress_weight(
    w: torch.Tensor, stats: InputStats, cfg: CompressConfig, mask: torch.Tensor | None = None
) -> CompressedWeight:
    """Compress one d_out x d_in weight with the configured mask, quantizer and adapter."""
    w = w.detach().float().cpu()
    stats = InputStats(stats.sum_sq.cpu(), None if stats.gram is None else stats.gram.cpu(), stats.n_tokens)
    sp, q, ad = cfg.sparsity, cfg.quant, cfg.adapter
    input_scale = None
    if q.method == "slim-o":
        input_scale = outlier_scale(w, stats, q.outlier_fraction, q.outlier_factor)
        w = w * input_scale[None, :]
        stats = stats.scaled(input_scale)
    n, m = sp.nm if sp.kind == "nm" else (0, 0)
    gram, rms = stats.mean_gram, stats.rms
    # factorizations of H are computed once per layer and reused by every pass
    chol = inverse_hessian_cholesky(gram, q.damping) if q.error_feedback or sp.method == "sparsegpt" else None
    if mask is None and sp.method == "sparsegpt":
        mask = sparsegpt_mask(w, gram, sp.kind, n, m, sp.ratio, q.damping, hinv_chol=chol)
    elif mask is None:
        mask = make_mask(w, stats.sum_sq, sp.kind, sp.method, n, m, sp.ratio)
    base = max(output_error(w, gram, rms), 1e-30)

    def rel(err: torch.Tensor) -> float:
        return output_error(err, gram, rms) / base

    roots = sqrt_and_inv_sqrt(gram, ad.damping) if ad.method == "fullcov" and gram is not None else None

    def quantize(target: torch.Tensor) -> QuantResult:
        return quantize_masked(target, mask, q, gram, chol)

    def fit(err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fit_adapter(err, stats, gram, rank, ad, roots)

    qr = quantize(w)
    info = dict(qr.info)
    info["err_metric"] = "gram" if gram is not None else "diag"  # tr(E H E^T), or its diagonal approximation
    info["rel_err_compressed"] = rel(w - qr.dense)
    rank = ad.rank_for(*w.shape) if ad.method != "none" else 0
    a = b = None
    adapter_q = None
    if rank:
        if ad.refit_rounds == 0:
            # the paper's order: fit on E, re-quantize W - BA under the same mask, then quantize the adapters
            a, b = fit(w - qr.dense)
            qr = quantize(w - b @ a)
            if ad.quantize:
                ca, sa, a = quantize_grouped(a, ad.bits, ad.group_size)
                cb, sb, b = quantize_grouped(b, ad.bits, ad.group_size)
                adapter_q = ((ca, cb), (sa, sb))
        else:
            # alternate: adapters (as stored) fitted to the current weights' error, weights re-quantized
            # against them; keep the best state by calibration error, stop when it stops falling
            best = None
            cur = qr
            for rnd in range(ad.refit_rounds + 1):
                a1, b1 = fit(w - cur.dense)
                aq = None
                if ad.quantize:
                    ca, sa, a1 = quantize_grouped(a1, ad.bits, ad.group_size)
                    cb, sb, b1 = quantize_grouped(b1, ad.bits, ad.group_size)
                    aq = ((ca, cb), (sa, sb))
                cur = quantize(w - b1 @ a1)
                e = rel(w - cur.dense - b1 @ a1)
                if best is not None and e >= best[0]:
                    break
                best = (e, cur, a1, b1, aq, rnd)
            _, qr, a, b, adapter_q, rounds = best
            info["refit_rounds_used"] = rounds
        info.update({k + "_final": v for k, v in qr.info.items()})
        info["rank"] = rank
    cw = CompressedWeight(
        mask, qr.codes, qr.dense if qr.codes is None else None, qr.scale, q.bits if qr.codes is not None else 0,
        qr.group_size, lora_A=a, lora_B=b, adapter_group=ad.group_size, input_scale=input_scale, info=info,
    )
    if adapter_q is not None:
        cw.adapter_codes, cw.adapter_scales = adapter_q
        cw.adapter_bits = ad.bits
    info["rel_err_final"] = rel(w - qr.dense - (b @ a if rank else 0))
    return cw
