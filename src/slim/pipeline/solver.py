"""The SLiM recipe for one weight matrix: mask, quantize, fit adapters, re-quantize (and optionally refit)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.lowrank import GramFactor, InverseFactor, gram_factor, output_error
from ..algorithms.methods import ADAPTERS, MASKS, QUANTIZERS, FixedParams, Setup
from ..algorithms.optq import ColumnGrid, Feedback, optq
from ..algorithms.quant import clamp_sym, expand_groups, fake_quant, gptq_scale, group_absmax_scale, quantize_codes
from ..algorithms.stats import InputStats
from ..config import AdapterConfig, CompressConfig, QuantConfig
from ..format.packed import CompressedWeight
from ..phases import phase


@dataclass
class QuantResult:
    """Quantized masked weights: codes (None when not quantized), scale, group size, dense values."""

    codes: torch.Tensor | None
    scale: torch.Tensor | None
    group_size: int
    dense: torch.Tensor  # M * Q(W) as floats
    info: dict
    mask: torch.Tensor | None = None  # the mask used (chosen in the pass for SparseGPT + OPTQ)
    zero: torch.Tensor | None = None  # asymmetric zero points (AWQ)
    scaled_err: torch.Tensor | None = None  # error feedback in natural column order: E_s with target - dense = E_s U


# The fullcov adapter fitted in the error-feedback pass's own coordinates (`InverseFactor`): the same adapter in
# exact arithmetic, without a second Cholesky or the E L product per fit (those are `solve.weight`, about 100 s of a
# 7B-shaped block's 344 s solve on 2 CPU cores). Off: per layer both paths agree to 1e-4 in the first refit rounds,
# but over SmolLM2's 30 blocks the mean final error came out 3 % higher and WikiText-2 74.87 against 71.78
# (docs/results/scale/cpu); until that is understood the default keeps the Cholesky factor's path. When off, the
# error-feedback pass does not keep its scaled errors either (a d_out x d_in float64 matrix).
SHARE_FEEDBACK_FACTOR = False


def fit_scale(w: torch.Tensor, mask: torch.Tensor, q: QuantConfig) -> tuple[torch.Tensor, int, dict]:
    """The quantizer's scale(s) for the kept weights: (scale, group_size or 0, info)."""
    fit = QUANTIZERS[q.method].fit
    if fit is None:
        raise ValueError(f"quantizer {q.method!r} has no stand-alone scale fit")
    return fit(w, mask, q)


def _ef_pass(
    w: torch.Tensor, gram: torch.Tensor, col_fn, mask: torch.Tensor | None, fb: Feedback, q: QuantConfig,
    choose: tuple[str, int, int, float] | None = None, on_block=None, grid: ColumnGrid | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One OPTQ pass (columns permuted under act-order, and put back)."""
    nm = ratio = None
    if choose is not None:
        kind, n, m, r = choose
        nm, ratio = ((n, m), None) if kind == "nm" else (None, r)
    if fb.perm is None:
        out = optq(w, gram, col_fn, mask, q.damping, hinv_chol=fb.chol, nm=nm, ratio=ratio, on_block=on_block,
                   grid=grid, errors=SHARE_FEEDBACK_FACTOR)
        return out if SHARE_FEEDBACK_FACTOR else (*out, None)
    if choose is not None:
        raise ValueError("act-order cannot be combined with choosing the mask in the same pass (SparseGPT)")
    perm, inv = fb.perm, torch.argsort(fb.perm)
    pgrid = None if grid is None else ColumnGrid(grid.bits, lambda cols: grid.params(perm[cols]))
    out, used = optq(
        w[:, perm], None, lambda c, j: col_fn(c, int(perm[j])), None if mask is None else mask[:, perm],
        q.damping, hinv_chol=fb.chol, grid=pgrid,
    )
    return out[:, inv], used[:, inv], None


def quantize_masked(
    w: torch.Tensor, mask: torch.Tensor | None, q: QuantConfig, gram: torch.Tensor | None = None,
    fb: Feedback | None = None, params: FixedParams | None = None,
    choose: tuple[str, int, int, float] | None = None,
) -> QuantResult:
    """Quantize M * W: round-to-nearest, or OPTQ error feedback when q.error_feedback (needs gram).

    With `mask` None and `choose` = (kind, n, m, ratio), the mask is chosen inside the error-feedback
    pass (SparseGPT + OPTQ in one pass). GPTQ's group scales are fitted lazily during that pass, on the
    error-updated weights at the start of each column block (static groups, from W, under act-order).
    """
    if q.error_feedback and gram is None:
        raise ValueError("error feedback needs the Gram matrix of the layer inputs")
    if q.error_feedback and fb is None:
        fb = Feedback.build(gram, q.damping, q.act_order)
    if mask is None and (choose is None or not q.error_feedback):
        raise ValueError("quantize_masked needs a mask, or `choose` with error feedback")
    quantizer = QUANTIZERS[q.method]
    if not quantizer.quantizes:
        if not q.error_feedback:
            return QuantResult(None, None, 0, w * mask, {}, mask)
        dense, used, errs = _ef_pass(w, gram, lambda c, j: c, mask, fb, q, choose,
                                     grid=ColumnGrid(0, lambda c: (None, None)))
        return QuantResult(None, None, 0, dense, {}, used, scaled_err=errs)
    d_in = w.shape[1]
    info: dict = {}
    zero = clip = None
    on_block = None
    fit_on = mask if mask is not None else torch.ones_like(w, dtype=torch.bool)
    if params is not None:
        scale, gsize, zero, clip = params.scale, params.group_size, params.zero, params.clip
    elif quantizer.lazy_groups and q.error_feedback and q.group_size and fb.perm is None:
        gsize = q.group_size
        scale = torch.ones(w.shape[0], -(-d_in // gsize), device=w.device)

        def on_block(b0: int, b1: int, cur: torch.Tensor) -> None:
            for g0 in range(-(-b0 // gsize) * gsize, b1, gsize):
                vals = cur[:, g0 - b0 : g0 - b0 + gsize]
                if mask is not None:
                    vals = vals * mask[:, g0 : g0 + gsize]
                scale[:, g0 // gsize] = gptq_scale(vals, q.bits)
    else:
        scale, gsize, info = fit_scale(w, fit_on, q)

    def full(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or gsize == 0 else expand_groups(t, d_in, gsize)

    def clamp(t: torch.Tensor, j: slice | int) -> torch.Tensor:
        if clip is None:
            return t
        return clamp_sym(t, full(clip)[:, j])

    if q.error_feedback:
        def col_fn(c: torch.Tensor, j: int) -> torch.Tensor:
            s_j = scale if gsize == 0 else scale[:, j // gsize]
            z_j = None if zero is None else zero[:, j // gsize]
            return fake_quant(clamp(c, j), s_j, q.bits, z_j)

        def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            if gsize == 0:
                return scale.reshape(-1, 1), None if zero is None else zero.reshape(-1, 1)
            return scale[:, cols // gsize], None if zero is None else zero[:, cols // gsize]

        grid = ColumnGrid(q.bits, params) if clip is None else None  # AWQ's clipping stays in Python
        target, mask, errs = _ef_pass(w, gram, col_fn, mask, fb, q, choose, on_block, grid)
    else:
        target, errs = clamp(w * mask, slice(None)), None
    sf, zf = full(scale), full(zero)
    codes = quantize_codes(target, sf, q.bits, zf)
    dense = (codes.float() - (0 if zf is None else zf)) * sf * mask
    return QuantResult(codes, scale, gsize, dense, info, mask, zero, errs)


def fit_adapter(
    err: torch.Tensor, stats: InputStats, gram: torch.Tensor | None, rank: int, ad: AdapterConfig,
    factor: GramFactor | InverseFactor | None = None, product: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A ~ err under the adapter method's weighting (`start`: a previous B, for a randomized SVD to
    start from)."""
    fit = ADAPTERS[ad.method].fit
    if fit is None:
        raise ValueError(f"adapter method {ad.method!r} fits no adapter")
    return fit(err, stats, gram, rank, ad, factor, product, start)


def closed_form_adapters(
    w: torch.Tensor, q_dense: torch.Tensor, stats: InputStats, cfg: CompressConfig, rank: int,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) fitted to W - Q by the configured adapter method for weights Q that were not solved here (tuned
    ones), quantized as they will be stored; `input_scale`: the layer's (Q is then in the scaled space)."""
    ad = cfg.adapter
    w = w.detach().float().to(q_dense.device)
    stats = stats.to(w.device)
    if input_scale is not None:
        w = w * input_scale[None, :].to(w.device)
        stats = stats.scaled(input_scale.to(w.device))
    gram = stats.mean_gram
    factor = None
    if ADAPTERS[ad.method].needs_gram and gram is not None:
        factor = stats.cached(("factor", ad.damping), lambda: gram_factor(gram, ad.damping))
    a, b = fit_adapter(w - q_dense, stats, gram, rank, ad, factor)
    if ad.quantize:
        a = quantize_grouped(a, ad.bits, ad.group_size)[2]
        b = quantize_grouped(b, ad.bits, ad.group_size)[2]
    return a, b


def quantize_grouped(t: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group AbsMax along the last dim: (codes, scales, dequantized)."""
    scale = group_absmax_scale(t, bits, group)
    full = expand_groups(scale, t.shape[1], group)
    codes = quantize_codes(t, full, bits)
    return codes, scale, codes.float() * full


@dataclass
class Prepared:
    """One layer after its mask and first quantization, with what the adapter stage reuses."""

    w: torch.Tensor  # in the (possibly input-scaled) space the layer computes in
    stats: InputStats
    mask: torch.Tensor
    fb: Feedback | None
    params: FixedParams | None
    factor: GramFactor | InverseFactor | None  # fullcov: S with S S^T = the damped Gram matrix
    input_scale: torch.Tensor | None
    qr: QuantResult
    info: dict


def prepare_weight(
    w: torch.Tensor, stats: InputStats, cfg: CompressConfig, mask: torch.Tensor | None = None, name: str = "",
) -> Prepared:
    """Mask, input scaling (SLiM-Quant^O, AWQ) and the first quantization of one weight.

    Everything is computed on the weight's device (the block's: `--device cuda` runs the solver there).
    """
    w = w.detach().float()
    stats = stats.to(w.device)
    if mask is not None:
        mask = mask.to(w.device)
    sp, q, ad = cfg.sparsity, cfg.quant, cfg.adapter
    quantizer, masker = QUANTIZERS[q.method], MASKS[sp.method]
    gram = stats.mean_gram
    choose = None
    if mask is None and masker.in_feedback_pass and q.error_feedback and quantizer.quantizes and not q.act_order:
        choose = (sp.kind, *sp.nm, sp.ratio)  # mask and quantization in one error-feedback pass
    elif mask is None:
        mask = masker.choose(w, stats, sp, q)
    mask_fb = stats.cache.get(("fb", q.damping, False))  # SparseGPT's mask: its factorization, cached before scaling
    setup = quantizer.setup(w, mask, stats, q, name) if quantizer.setup is not None else Setup()
    input_scale, params, info = setup.input_scale, setup.params, setup.info
    if input_scale is not None:
        w = w * input_scale[None, :]
        stats = stats.scaled(input_scale)
        gram = stats.mean_gram
    fb = None
    if q.error_feedback:
        fb = stats.cached(("fb", q.damping, q.act_order), lambda: Feedback.build(gram, q.damping, q.act_order))
    factor = None
    if ADAPTERS[ad.method].needs_gram and gram is not None:
        if (SHARE_FEEDBACK_FACTOR and fb is not None and fb.perm is None and fb.damping == ad.damping
                and bool(torch.diagonal(gram).all())):
            # the error-feedback pass's factor serves the adapter too: no second factorization, no E L products.
            # Not with dead inputs: OPTQ gives them a unit diagonal, harmless to it, but on the Gram matrix's own
            # scale a unit weight can outweigh every live input in the adapter's metric
            factor = stats.cached(("inverse-factor", q.damping), lambda: inverse_factor(fb, gram))
        else:
            factor = stats.cached(("factor", ad.damping), lambda: gram_factor(gram, ad.damping))
    qr = quantize_masked(w, mask, q, gram, fb, params, choose)
    info.update(qr.info)
    raised = {what: got.damping for what, got, asked in (("hessian", fb or mask_fb, q.damping),
                                                          ("adapter", factor, ad.damping))
              if got is not None and got.damping is not None and got.damping > asked}
    if raised:  # a failed Cholesky raised the damping (logged where it happened): the layer's report says how far
        info["damping_raised"] = raised
    return Prepared(w, stats, qr.mask, fb, params, factor, input_scale, qr, info)


def inverse_factor(fb: Feedback, gram: torch.Tensor) -> InverseFactor:
    """`InverseFactor` of the error-feedback pass, for a Gram matrix without dead inputs (its shift as
    `optq.damped_inverse_cholesky` damps)."""
    return InverseFactor(fb.chol, fb.damping * float(torch.diagonal(gram).double().mean()), fb.damping)


def weighted(err: torch.Tensor, prep: Prepared, ad: AdapterConfig) -> torch.Tensor:
    """The error as the adapter method sees it, E S, whose truncated SVD the adapter keeps."""
    return ADAPTERS[ad.method].weighted(err, prep.stats, prep.factor)


def error_spectrum(
    w: torch.Tensor, stats: InputStats, cfg: CompressConfig, mask: torch.Tensor | None = None, name: str = "",
) -> torch.Tensor:
    """Squared singular values of the weighted compression error, relative to the weighted W, descending:
    entry i is how much of the layer's (weighted) energy a rank-(i+1) adapter term wins back. The prepared
    layer is kept in `stats.cache` for the `compress_weight` call that follows."""
    prep = prepare_weight(w, stats, cfg, mask, name)
    stats.cache[("prep", name)] = prep
    m = weighted(prep.w - prep.qr.dense, prep, cfg.adapter)
    g = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    ev = torch.linalg.eigvalsh(g).flip(0).clamp_min(0)
    base = float((weighted(prep.w, prep, cfg.adapter) ** 2).sum())
    return ev / max(base, 1e-30)


def allocate_ranks(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ad: AdapterConfig
) -> dict[str, int]:
    """Spend the adapter parameters that uniform ranks would use, greedily where they remove the most
    relative error per parameter (each rank of a d_out x d_in layer costs d_out + d_in parameters)."""
    budget = sum(ad.rank_for(*shapes[k]) * sum(shapes[k]) for k in spectra)
    items = []
    for k, ev in spectra.items():
        cost = sum(shapes[k])
        items += [(float(g) / cost, k, cost) for g in ev[: min(shapes[k])]]
    items.sort(key=lambda t: -t[0])
    ranks = dict.fromkeys(spectra, 0)
    for _, k, cost in items:
        if cost <= budget:
            ranks[k] += 1
            budget -= cost
    return ranks


def compress_weight(
    w: torch.Tensor, stats: InputStats, cfg: CompressConfig, mask: torch.Tensor | None = None, name: str = "",
    rank: int | None = None, measure_gram: torch.Tensor | None = None,
) -> CompressedWeight:
    """Compress one d_out x d_in weight with the configured mask, quantizer and adapter.

    `name` is the linear's name inside its block (AWQ skips its clipping search for q/k projections);
    `rank` overrides the configured adapter rank (rank allocation); `measure_gram`, the mean input Gram
    matrix of a method that does not use one, only for reporting the final error in the full metric.
    """
    q, ad = cfg.quant, cfg.adapter
    given_mask = mask
    with phase("solve.prepare"):
        prep = stats.cache.pop(("prep", name), None) or prepare_weight(w, stats, cfg, mask, name)
    w, stats, mask, fb, params, factor = prep.w, prep.stats, prep.mask, prep.fb, prep.params, prep.factor
    input_scale, qr, info = prep.input_scale, prep.qr, prep.info
    gram, rms = stats.mean_gram, stats.rms

    def energy(err: torch.Tensor) -> float:  # tr(E H E^T), through the factor where there is one (half the work)
        return output_error(err, gram, rms) if factor is None else factor.energy(err, factor.weight(err))

    base = max(energy(w), 1e-30)

    def rel(err: torch.Tensor) -> float:
        return energy(err) / base

    # adapter.remask: each refit round re-chooses the mask on W - B A (not for a mask the caller fixed)
    remask = cfg.adapter.remask and given_mask is None and cfg.sparsity.kind != "dense"
    if cfg.adapter.remask and given_mask is not None:
        info["remask"] = "skipped: the mask was given (--mask-file)"

    def quantize(target: torch.Tensor, again: bool = False) -> QuantResult:
        with phase("solve.quantize"):
            if not (again and remask):
                return quantize_masked(target, mask, q, gram, fb, params)
            masker = MASKS[cfg.sparsity.method]
            if masker.in_feedback_pass and q.error_feedback and QUANTIZERS[q.method].quantizes and fb.perm is None:
                sp = cfg.sparsity  # SparseGPT: the mask chosen inside the error-feedback pass, as at the start
                return quantize_masked(target, None, q, gram, fb, params, choose=(sp.kind, *sp.nm, sp.ratio))
            return quantize_masked(target, masker.choose(target, stats, cfg.sparsity, q), q, gram, fb, params)

    def fit(err: torch.Tensor, product: torch.Tensor | None = None,
            start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with phase("solve.adapter"):
            return fit_adapter(err, stats, gram, rank, ad, factor, product, start)

    # fullcov: (W - Q) S is needed for each fit, and gives the error of the state before it. With the error-feedback
    # pass's own factor it comes free: (target - Q) S = the pass's scaled errors, and W - Q = target - Q + B A
    free = isinstance(factor, InverseFactor)

    def products(res: QuantResult, b: torch.Tensor | None = None,
                 a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """((W - Q) S, (W - Q - B A) S) for `res` = Q quantized from W - B A."""
        with phase("solve.weight"):
            if b is None:
                ba = 0
            else:
                wa = factor.weight(a)
                ba = b.to(wa.dtype) @ wa
            if free and res.scaled_err is not None:
                return res.scaled_err + ba, res.scaled_err
            p = factor.weight(w - res.dense)
            return p, p - ba

    product = None if factor is None else products(qr)[0]
    info["err_metric"] = "gram" if gram is not None else "diag"  # tr(E H E^T), or its diagonal approximation
    info["rel_err_compressed"] = (rel(w - qr.dense) if product is None
                                  else factor.energy(w - qr.dense, product) / base)
    if rank is None:
        rank = ad.rank_for(*w.shape) if ADAPTERS[ad.method].fit is not None else 0
    a = b = best = None
    adapter_q = None
    if rank:
        if ad.refit_rounds == 0:
            # the paper's order: fit on E, re-quantize W - BA under the same mask, then quantize the adapters
            a, b = fit(w - qr.dense, product)
            qr = quantize(w - b @ a)
            if ad.quantize:
                ca, sa, a = quantize_grouped(a, ad.bits, ad.group_size)
                cb, sb, b = quantize_grouped(b, ad.bits, ad.group_size)
                adapter_q = ((ca, cb), (sa, sb))
        else:
            # alternate: adapters (as stored) fitted to the current weights' error, weights re-quantized
            # against them; keep the best state by calibration error, stop when it stops falling. Each fit starts
            # from the previous round's B (a randomized SVD needs fewer steps from there)
            cur = qr
            errs: list[float] = []
            b1 = None
            for rnd in range(ad.refit_rounds + 1):
                a1, b1 = fit(w - cur.dense, product, b1)
                aq = None
                if ad.quantize:
                    ca, sa, a1 = quantize_grouped(a1, ad.bits, ad.group_size)
                    cb, sb, b1 = quantize_grouped(b1, ad.bits, ad.group_size)
                    aq = ((ca, cb), (sa, sb))
                target = w - b1 @ a1
                cur = quantize(target, again=True)
                if product is None:
                    e = rel(target - cur.dense)
                else:  # the next fit's product serves this measurement too
                    product, residual = products(cur, b1, a1)
                    e = factor.energy(target - cur.dense, residual) / base
                del target
                errs.append(e)
                if best is not None and e >= best[0]:
                    break
                best = (e, cur, a1, b1, aq, rnd)
            _, qr, a, b, adapter_q, rounds = best
            info["refit_rounds_used"] = rounds
            info["refit_rel_errs"] = errs
        info.update({k + "_final": v for k, v in qr.info.items()})
        info["rank"] = rank
    if qr.mask is not None:  # the kept state's mask (re-chosen in the refit with adapter.remask)
        mask = qr.mask
    if remask:
        info["remask_changed"] = float((mask != prep.mask).float().mean())
    cw = CompressedWeight(
        mask, qr.codes, qr.dense if qr.codes is None else None, qr.scale, q.bits if qr.codes is not None else 0,
        qr.group_size, zero=qr.zero, lora_A=a, lora_B=b, adapter_group=ad.group_size, input_scale=input_scale,
        info=info,
    )
    if adapter_q is not None:
        cw.adapter_codes, cw.adapter_scales = adapter_q
        cw.adapter_bits = ad.bits
    final_err = w - qr.dense - (b @ a if rank else 0)
    # the refit loop measured exactly this error for the state it kept
    info["rel_err_final"] = best[0] if rank and ad.refit_rounds else rel(final_err)
    # the diagonal metric as well, which every method has: errors of methods that collect the full
    # Gram matrix and of those that do not can then be compared layer by layer
    info["rel_err_final_diag"] = (info["rel_err_final"] if gram is None
                                  else output_error(final_err, None, rms) / max(output_error(w, None, rms), 1e-30))
    if gram is not None:
        info["rel_err_final_gram"] = info["rel_err_final"]
    elif measure_gram is not None:
        g = measure_gram.to(w.device)
        if input_scale is not None:  # w is in the scaled space: the layer sees x / s
            s = input_scale.double().to(g.device)
            g = g / s[:, None] / s[None, :]
        info["rel_err_final_gram"] = output_error(final_err, g, None) / max(output_error(w, g, None), 1e-30)
    return cw
