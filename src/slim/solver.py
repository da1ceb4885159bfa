"""The SLiM recipe for one weight matrix: mask, quantize, fit adapters, re-quantize."""

from __future__ import annotations

import torch

from .config import CompressConfig, QuantConfig
from .lowrank import fullcov_adapter, naive_adapter, output_error, slim_adapter
from .packed import CompressedWeight
from .prune import make_mask
from .quant import absmax_scale, expand_groups, group_absmax_scale, quantize_codes, slim_quant_scale
from .stats import InputStats


def outlier_scale(w: torch.Tensor, stats: InputStats, fraction: float, factor: float) -> torch.Tensor:
    """SLiM-Quant^O: scale factor per input channel, `factor` on the top channels by ||x_j|| * sum_i |W_ij|."""
    d_in = w.shape[1]
    k = int(round(fraction * d_in))
    s = torch.ones(d_in)
    if k:
        sal = stats.sum_sq.float().sqrt() * w.abs().sum(0)
        s[sal.topk(k).indices] = factor
    return s


def quantize_weight(
    w: torch.Tensor, mask: torch.Tensor, q: QuantConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None, int, dict]:
    """Quantize the kept weights: returns (codes, scale, group_size, info); codes None for 'none'."""
    if q.method == "none":
        return None, None, 0, {}
    wm = w * mask
    info: dict = {}
    if q.method in ("slim", "slim-o"):
        scale, alpha, rel = slim_quant_scale(w[mask], q.bits)
        info = {"alpha": alpha, "quant_rel_err": rel}
        return quantize_codes(wm, scale, q.bits), scale, 0, info
    if q.method == "absmax":
        scale = absmax_scale(wm, q.bits)
        return quantize_codes(wm, scale, q.bits), scale, 0, info
    if q.method == "group-absmax":
        scale = group_absmax_scale(wm, q.bits, q.group_size)
        full = expand_groups(scale, w.shape[1], q.group_size)
        return quantize_codes(wm, full, q.bits), scale, q.group_size, info
    raise ValueError(f"unknown quantizer {q.method!r}")


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
    if mask is None:
        mask = make_mask(w, stats.sum_sq, sp.kind, sp.method, n, m, sp.ratio)
    gram, rms = stats.mean_gram, stats.rms

    def rel(err: torch.Tensor) -> float:
        return output_error(err, gram, rms) / max(output_error(w, gram, rms), 1e-30)

    codes, scale, gsize, info = quantize_weight(w, mask, q)
    cw = CompressedWeight(mask, codes, w * mask if codes is None else None, scale, q.bits if codes is not None else 0, gsize,
                          input_scale=input_scale, info=info)
    info["rel_err_compressed"] = rel(w - cw.weight())
    rank = ad.rank_for(*w.shape) if ad.method != "none" else 0
    if rank == 0:
        info["rel_err_final"] = info["rel_err_compressed"]
        return cw

    err = w - cw.weight()
    if ad.method == "naive":
        a, b = naive_adapter(err, rank)
    elif ad.method == "slim":
        a, b = slim_adapter(err, rms, rank)
    else:
        if gram is None:
            raise ValueError("fullcov adapters need the Gram matrix; collect statistics with the gram")
        a, b = fullcov_adapter(err, gram, rank, ad.damping)
    # re-quantize the weights against W - BA under the same mask (the adapter is not re-fitted)
    codes, scale, gsize, info2 = quantize_weight(w - b @ a, mask, q)
    info.update({k + "_final": v for k, v in info2.items()})
    cw.codes, cw.scale = codes, scale
    if codes is None:
        cw.dense_values = (w - b @ a) * mask
    if ad.quantize:
        ca, sa, a = quantize_grouped(a, ad.bits, ad.group_size)
        cb, sb, b = quantize_grouped(b, ad.bits, ad.group_size)
        cw.adapter_codes, cw.adapter_scales, cw.adapter_bits = (ca, cb), (sa, sb), ad.bits
    cw.adapter_group = ad.group_size
    cw.lora_A, cw.lora_B = a, b
    info["rank"] = rank
    info["rel_err_final"] = rel(w - cw.weight() - b @ a)
    return cw
