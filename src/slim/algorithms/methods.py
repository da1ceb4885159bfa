"""Compression methods found by name: one object per mask method, weight quantizer and adapter method.

Why: a recipe is three independent choices, and each choice reaches into several stages (which statistics the
calibration pass collects, how a weight is prepared, how its scales are fitted, how its adapter is fitted and in
which metric). Each method answers all of them in one place, looked up by name (as torchao and llm-compressor
do), so a new method is one entry here instead of another `elif` in each stage of `solver.py`, and the
configuration's validation reads the names and constraints from the same entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .baselines import awq_search, jsq_score
from .lowrank import GramFactor, InverseFactor, fullcov_adapter, naive_adapter, slim_adapter
from .optq import Feedback
from .prune import make_mask, make_mask_from_score, sparsegpt_mask
from .quant import (
    absmax_scale,
    gptq_scale,
    group_absmax_scale,
    group_slim_scale,
    grouped,
    lwc_params,
    n_groups,
    slim_quant_scale,
)
from .stats import InputStats

if TYPE_CHECKING:
    from ..config import AdapterConfig, QuantConfig, SparsityConfig

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class MaskMethod:
    """How one weight's sparsity mask is chosen: `choose(w, stats, sparsity, quant)` returns the boolean mask."""

    name: str
    choose: Callable[[Tensor, InputStats, SparsityConfig, QuantConfig], Tensor]
    needs_gram: bool = False
    needs_jsq: bool = False  # JSQ's clipped-activation statistics
    # with an error-feedback quantizer (and no act-order), chosen inside the OPTQ pass on the error-updated
    # weights instead of by `choose` (SparseGPT + OPTQ in one pass)
    in_feedback_pass: bool = False


def _saliency(method: str) -> Callable[[Tensor, InputStats, SparsityConfig, QuantConfig], Tensor]:
    def choose(w: Tensor, stats: InputStats, sp: SparsityConfig, q: QuantConfig) -> Tensor:
        n, m = sp.nm
        return make_mask(w, stats.sum_sq, sp.kind, method, n, m, sp.ratio)

    return choose


def _sparsegpt(w: Tensor, stats: InputStats, sp: SparsityConfig, q: QuantConfig) -> Tensor:
    n, m = sp.nm
    gram = stats.mean_gram
    chol = stats.cached(("fb", q.damping, False), lambda: Feedback.build(gram, q.damping, False)).chol
    return sparsegpt_mask(w, gram, sp.kind, n, m, sp.ratio, q.damping, hinv_chol=chol)


def _jsq(w: Tensor, stats: InputStats, sp: SparsityConfig, q: QuantConfig) -> Tensor:
    n, m = sp.nm
    return make_mask_from_score(jsq_score(w, stats.jsq, sp.jsq_mixing), sp.kind, n, m, sp.ratio)


MASKS: dict[str, MaskMethod] = {k.name: k for k in (
    MaskMethod("wanda", _saliency("wanda")),
    MaskMethod("magnitude", _saliency("magnitude")),
    MaskMethod("sparsegpt", _sparsegpt, needs_gram=True, in_feedback_pass=True),
    MaskMethod("jsq", _jsq, needs_jsq=True),
)}


# ------------------------------------------------------------------------------------------ quantizers


@dataclass
class FixedParams:
    """Quantizer parameters fitted before the quantization pass (AWQ's search, OmniQuant's clipping)."""

    scale: Tensor  # (rows, n_groups)
    zero: Tensor | None
    clip: Tensor | None  # (rows, n_groups) clamp bound applied before rounding
    group_size: int


@dataclass
class Setup:
    """What a quantizer decides about a weight before quantizing it: an input scaling folded into the weight
    (the layer divides its input by it) and parameters fitted once instead of per quantization."""

    input_scale: Tensor | None = None
    params: FixedParams | None = None
    info: dict = field(default_factory=dict)


ScaleFit = Callable[[Tensor, Tensor, "QuantConfig"], tuple[Tensor, int, dict]]
SetupFn = Callable[[Tensor, Tensor, InputStats, "QuantConfig", str], Setup]


@dataclass(frozen=True)
class Quantizer:
    """A weight quantizer. `fit(w, mask, quant)` gives (scale, group size or 0, info) for the kept weights;
    `setup(w, mask, stats, quant, name)` runs first where the method scales inputs or fixes its parameters."""

    name: str
    fit: ScaleFit | None = None
    setup: SetupFn | None = None
    quantizes: bool = True  # False: weights stay in floating point ("none": sparsity and adapters only)
    grouped: bool = False  # needs quant.group_size >= 1
    needs_gram: bool = False
    needs_abs: bool = False  # mean input magnitudes
    feedback: bool = True  # may run under OPTQ error feedback
    # grouped scales fitted inside the error-feedback pass, on the error-updated weights (GPTQ)
    lazy_groups: bool = False
    learnable_clipping: bool = False  # block tuning can train its clipping (tune.clipping)


def _slim_fit(w: Tensor, mask: Tensor, q: QuantConfig) -> tuple[Tensor, int, dict]:
    scale, alpha, rel = slim_quant_scale(w[mask], q.bits)
    return scale, 0, {"alpha": alpha, "quant_rel_err": rel}


def _gptq_fit(w: Tensor, mask: Tensor, q: QuantConfig) -> tuple[Tensor, int, dict]:
    if q.group_size == 0:
        return gptq_scale((w * mask).flatten(), q.bits), 0, {}
    return gptq_scale(grouped(w * mask, q.group_size), q.bits), q.group_size, {}


def outlier_scale(w: Tensor, stats: InputStats, fraction: float, factor: float) -> Tensor:
    """SLiM-Quant^O: per-input-channel factor, `factor` on the top channels by ||x_j|| * sum_i |W_ij|."""
    d_in = w.shape[1]
    k = int(round(fraction * d_in))
    s = torch.ones(d_in, device=w.device)
    if k:
        sal = stats.sum_sq.float().sqrt() * w.abs().sum(0)
        s[sal.topk(k).indices] = factor
    return s


def _slim_o_setup(w: Tensor, mask: Tensor, stats: InputStats, q: QuantConfig, name: str) -> Setup:
    return Setup(input_scale=outlier_scale(w, stats, q.outlier_fraction, q.outlier_factor))


def _awq_setup(w: Tensor, mask: Tensor, stats: InputStats, q: QuantConfig, name: str) -> Setup:
    gram = stats.mean_gram
    if gram is None:
        raise ValueError("AWQ needs the Gram matrix of the layer inputs")
    clip = not any(t in name for t in ("q_proj", "k_proj"))  # AWQ skips clipping where softmax amplifies errors
    input_scale, scale, zero, clipv, info = awq_search(
        w * mask, stats.mean_abs, gram, q.bits, q.group_size, q.awq_grid, clip=clip
    )
    return Setup(input_scale, FixedParams(scale, zero, clipv, q.group_size), info)


def _omniquant_setup(w: Tensor, mask: Tensor, stats: InputStats, q: QuantConfig, name: str) -> Setup:
    """The clipping's start; block tuning (tune.clipping) trains it."""
    logits = torch.full((w.shape[0], n_groups(w.shape[1], q.group_size)), q.lwc_init, device=w.device)
    scale, zero = lwc_params(w * mask, q.bits, q.group_size, logits, logits)
    return Setup(params=FixedParams(scale, zero, None, q.group_size))


QUANTIZERS: dict[str, Quantizer] = {k.name: k for k in (
    Quantizer("slim", _slim_fit),
    Quantizer("slim-o", _slim_fit, _slim_o_setup),
    Quantizer("slim-group", lambda w, m, q: (group_slim_scale(w, m, q.bits, q.group_size), q.group_size, {}),
              grouped=True),
    Quantizer("absmax", lambda w, m, q: (absmax_scale(w * m, q.bits), 0, {})),
    Quantizer("group-absmax", lambda w, m, q: (group_absmax_scale(w * m, q.bits, q.group_size), q.group_size, {}),
              grouped=True),
    Quantizer("gptq", _gptq_fit, lazy_groups=True),
    Quantizer("awq", setup=_awq_setup, grouped=True, needs_gram=True, needs_abs=True),
    Quantizer("omniquant", setup=_omniquant_setup, grouped=True, feedback=False, learnable_clipping=True),
    Quantizer("none", quantizes=False),
)}


# ------------------------------------------------------------------------------------- adapter methods


@dataclass(frozen=True)
class AdapterMethod:
    """A closed-form low-rank adapter. `fit(err, stats, gram, rank, adapter, factor, product)` gives (A, B) with
    B @ A ~ err in the method's metric (`start`: a basis near the answer's B, e.g. the previous refit round's, that
    a randomized SVD starts from); `weighted(err, stats, factor)` is the error as that metric sees it, E S,
    whose truncated SVD the adapter keeps (what greedy rank allocation ranks by)."""

    name: str
    fit: Callable[..., tuple[Tensor, Tensor]] | None
    weighted: Callable[[Tensor, InputStats, GramFactor | None], Tensor]
    needs_gram: bool = False  # and the Gram matrix's Cholesky factor
    needs_abs: bool = False


def _plain(err: Tensor, stats: InputStats, factor: GramFactor | None) -> Tensor:
    return err.double()


def _diagonal(weight: Callable[[InputStats], Tensor], name: str, needs_abs: bool = False) -> AdapterMethod:
    """SLiM-LoRA (input RMS) or L2QER (mean input magnitude): one closed form under a diagonal input weighting."""

    def fit(err: Tensor, stats: InputStats, gram: Tensor | None, rank: int, ad: AdapterConfig,
            factor: GramFactor | None = None, product: Tensor | None = None,
            start: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return slim_adapter(err, weight(stats), rank, svd=ad.svd, start=start)

    def weighted(err: Tensor, stats: InputStats, factor: GramFactor | None) -> Tensor:
        return err.double() * weight(stats).double()[None, :]

    return AdapterMethod(name, fit, weighted, needs_abs=needs_abs)


def _naive_fit(err: Tensor, stats: InputStats, gram: Tensor | None, rank: int, ad: AdapterConfig,
               factor: GramFactor | None = None, product: Tensor | None = None,
               start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return naive_adapter(err, rank, ad.svd, start)


def _fullcov_fit(err: Tensor, stats: InputStats, gram: Tensor | None, rank: int, ad: AdapterConfig,
                 factor: GramFactor | InverseFactor | None = None, product: Tensor | None = None,
                 start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if gram is None:
        raise ValueError("fullcov adapters need the Gram matrix of the layer inputs")
    return fullcov_adapter(err, gram, rank, ad.damping, factor, product, ad.svd, start)


def _fullcov_weighted(err: Tensor, stats: InputStats, factor: GramFactor | None) -> Tensor:
    """E S with S S^T = H (S = L, H's Cholesky factor): its singular values are those of E H^(1/2)."""
    return factor.weight(err)


ADAPTERS: dict[str, AdapterMethod] = {k.name: k for k in (
    _diagonal(lambda s: s.rms, "slim"),
    AdapterMethod("naive", _naive_fit, _plain),
    AdapterMethod("fullcov", _fullcov_fit, _fullcov_weighted, needs_gram=True),
    _diagonal(lambda s: s.mean_abs, "l2qer", needs_abs=True),
    AdapterMethod("none", None, _plain),
)}
