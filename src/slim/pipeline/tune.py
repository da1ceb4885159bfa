"""Block-wise tuning: gradient descent on a compressed block's adapters (and, optionally, its quantizer scales)
so that the block's outputs match the dense model's, after the closed form has solved each linear on its own.

Why: the closed form minimises each linear's output error on its own inputs, one linear at a time; what the next
block sees is the error of the whole block (attention, norms and MLP together), which only a joint fit reaches.
The mask and the base codes stay frozen (the mask cannot change by construction: only adapters and scales are
parameters), and quantized adapters are trained through their quantizer with a straight-through estimator, so
what is stored is what was trained. A held-out share of the calibration batches stops the training early, and
the best state seen (the closed form included) is the one kept: tuning never makes the held-out loss worse.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.affine import AffineTransform, let_map, record_act_max
from ..algorithms.quant import (
    expand_groups,
    fake_quant_grouped,
    fp8_fake_quant,
    group_minmax,
    lwc_fake_quant,
    lwc_params,
    n_groups,
    qrange,
    quantize_codes,
    round_scale,
)
from ..config import TuneConfig
from ..format.checkpoint import cast_dense_parts
from ..format.packed import SlimLinear, pack_codes, unpack_codes
from ..models import set_submodule
from .capture import block_forward, map_tensors
from .dist import Ranks
from .solver import quantize_grouped

log = logging.getLogger(__name__)


def ste(t: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Group-AbsMax fake quantization whose gradient is the identity (straight-through): the forward sees the
    stored adapter, the backward updates the latent float one."""
    if not bits:
        return t
    with torch.no_grad():
        q = fake_quant_grouped(t, bits, group)
    return t + (q - t).detach()


class _RoundThrough(torch.autograd.Function):
    """M * Q(w) on a fixed grid (scale, zero point) with straight-through rounding: the gradient passes where the
    weight is kept and its code is inside the range, and nowhere else (a pruned slot never moves)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, keep: torch.Tensor,
                bits: int) -> torch.Tensor:
        lo, hi = qrange(bits)
        r = torch.round(w / scale)
        if zero is not None:
            r.add_(zero)
        ctx.save_for_backward(keep & (r >= lo) & (r <= hi))
        r.clamp_(lo, hi)
        if zero is not None:
            r.sub_(zero)
        return r.mul_(scale).mul_(keep)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ok,) = ctx.saved_tensors
        return g * ok, None, None, None, None


class _Stop(Exception):
    """Raised by `UpTo`'s hook: the rest of the block is not needed."""


class UpTo(nn.Module):
    """A block run only up to the input of one of its modules, which it returns: with a LLaMA block's
    post-attention norm, the state after attention (the residual sum), the first unit of tune.units attn-mlp."""

    def __init__(self, block: nn.Module, name: str) -> None:
        super().__init__()
        self.block = block
        self._at = [block.get_submodule(name)]  # a list: not registered twice
        self.name = name

    def forward(self, h: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def stop(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            seen.append(args[0])
            raise _Stop

        handle = self._at[0].register_forward_pre_hook(stop)
        try:
            self.block(h, **kw)
        except _Stop:
            return seen[0]
        finally:
            handle.remove()
        raise RuntimeError(f"the block never called {self.name}: it cannot be split there")


def halves(block: nn.Module) -> tuple[str, set[str]]:
    """(the module whose input is the state after attention, the attention linears' names) of a LLaMA-like or
    OPT block (ValueError for others): tune.units attn-mlp's split."""
    m = let_map(block)
    return m.norms[1][0], {m.q, m.k, m.v, m.o}


class TrainableLinear(nn.Module):
    """A SlimLinear opened for training: its dense base weight frozen, adapters (and scale gains) as parameters.

    The SlimLinear is kept aside (not a submodule), and `write_back` stores the trained values into it.
    """

    def __init__(self, mod: SlimLinear, scales: bool = False, clip_source: torch.Tensor | None = None,
                 lwc_init: float = 4.0, base_dtype: torch.dtype | None = None, weights: bool = False) -> None:
        super().__init__()
        L = mod.layout
        self.layout = L
        self._slim = [mod]  # a list: not registered, so its packed buffers stay out of this module
        self.register_buffer("input_scale", mod.input_scale.float() if L.input_scale else None)
        self.register_buffer("bias", None if mod.bias is None else mod.bias.detach().float())
        self.up = self.low = None
        if clip_source is None:
            self.register_buffer("base", mod.dequantized_weight())
        else:  # OmniQuant's learnable clipping: the masked float weight, quantized afresh in every forward
            if not (L.zero_point and L.group_size and L.bits):
                raise ValueError("learnable clipping needs asymmetric (zero-point) quantized groups")
            keep = mod.mask()
            self.register_buffer("base", clip_source.detach().float().to(keep.device) * keep)
            self.register_buffer("keep", keep)
            # the fixed weight's group extremes, computed once per base tensor (AffineQuant's transformed weight
            # changes every step; its `settle` replaces the base)
            self._minmax: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
            logits = torch.full((L.d_out, n_groups(L.d_in, L.group_size)), lwc_init, device=keep.device)
            self.up, self.low = nn.Parameter(logits.clone()), nn.Parameter(logits.clone())
        self.gain = nn.Parameter(torch.ones(mod.scale.shape, device=self.base.device)) if scales and L.bits else None
        # tune.weights: the kept values as shadow weights, seen through the layer's own quantizer (fixed scales,
        # or scales x gains) with straight-through rounding; the mask multiplies the forward, so a pruned slot
        # gets no gradient and is never stored. The start is the stored weight itself: the same codes
        self.shadow = None
        if weights:
            if clip_source is not None:
                raise ValueError("tune.weights and tune.clipping both re-quantize the weights: choose one")
            self.register_buffer("keep", mod.mask())
            self.shadow = nn.Parameter(self.base.clone())
            if L.bits:
                s = mod.scale.float()
                self.register_buffer("qscale", self._per_weight(s))
                self.register_buffer("qzero", self._zero(mod) if L.zero_point else None)
        ad = mod.adapters()
        self.A = None if ad is None else nn.Parameter(ad[0].clone())
        self.B = None if ad is None else nn.Parameter(ad[1].clone())
        # tune.autocast "bf16-base": the frozen weight's matmul (forward and input gradient: most of a step's
        # work) in `base_dtype`, everything trained in float32; `exact` switches it off (the held-out check)
        self.base_dtype = base_dtype
        self.exact = False
        # AffineQuant's transformation (affine.AffineTransform.apply): this step's transformed float weight, bias
        # and input transform (x - shift) / scale, all carrying gradients to the transformation's parameters
        self.let_weight: torch.Tensor | None = None
        self.let_bias: torch.Tensor | None = None
        self.let_input: tuple[torch.Tensor, torch.Tensor] | None = None
        fixed = self.up is None and self.gain is None and self.shadow is None
        self.register_buffer("base_low", self.base.to(base_dtype) if base_dtype is not None and fixed else None)

    def _per_weight(self, t: torch.Tensor) -> torch.Tensor:
        """A per-tensor or per-group quantizer value (scale, gain, zero point) as it applies to each weight."""
        L = self.layout
        return t if L.group_size == 0 else expand_groups(t, L.d_in, L.group_size)

    def _zero(self, mod: SlimLinear) -> torch.Tensor:
        """The layer's zero points, one per weight (d_out x d_in), as floats."""
        L = mod.layout
        return self._per_weight(unpack_codes(mod.zero, L.bits, n_groups(L.d_in, L.group_size)).float())

    def step_size(self) -> float:
        """The unit of tune.weights_lr: the layer's mean quantization step, or for fp16 values (no quantizer) the
        kept weights' RMS."""
        if not self.layout.bits:
            return max(float(self.shadow.detach()[self.keep].pow(2).mean().sqrt()), 1e-12)
        return float(self.qscale.mean())

    def _scale(self) -> torch.Tensor:
        """The quantizer's step per weight as the forward uses it (with tune.scales, times the trained gains)."""
        return self.qscale if self.gain is None else self.qscale * self._per_weight(self.gain)

    def _shadow_weight(self) -> torch.Tensor:
        L = self.layout
        if not L.bits:
            return self.shadow * self.keep
        if self.gain is None:  # fixed scales: one autograd function, fewer temporaries than the composed ops
            return _RoundThrough.apply(self.shadow, self.qscale, self.qzero, self.keep, L.bits)
        s = self._scale()
        x = self.shadow / s
        if self.qzero is not None:
            x = x + self.qzero
        lo, hi = qrange(L.bits)
        q = (x + (torch.round(x) - x).detach()).clamp(lo, hi)  # straight-through rounding; no gradient when clamped
        if self.qzero is not None:
            q = q - self.qzero
        return q * s * self.keep

    def weight(self) -> torch.Tensor:
        L = self.layout
        if self.shadow is not None:
            return self._shadow_weight()
        if self.up is not None:
            src, mm = self.let_weight, None
            if src is None:
                if self._minmax is None or self._minmax[0] is not self.base:
                    self._minmax = (self.base, group_minmax(self.base, L.group_size))
                src, mm = self.base, self._minmax[1]
            return lwc_fake_quant(src, L.bits, L.group_size, self.up, self.low, mm) * self.keep
        if self.gain is None:
            return self.base
        return self.base * self._per_weight(self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layout
        if self.input_scale is not None:
            x = x / self.input_scale
        if self.let_input is not None:
            x = (x - self.let_input[0]) / self.let_input[1]
        bias = self.bias if self.let_bias is None else self.let_bias
        if L.fp8_inputs:  # straight through the input quantizer as well, so earlier linears get gradients
            x = x + (fp8_fake_quant(x.detach()) - x).detach()
        if self.base_dtype is None or self.exact:
            y = F.linear(x, self.weight(), bias)
        else:
            w = self.base_low if self.base_low is not None else self.weight().to(self.base_dtype)
            # under autocast (finetune's "bf16") the adapters take the same low-precision input and the output
            # stays low: two fewer casts of the activations per layer in the forward and two in the backward
            low = torch.is_autocast_enabled(x.device.type)
            xl = x.to(self.base_dtype)
            y = F.linear(xl, w)
            if low:
                x = xl
            else:
                y = y.to(x.dtype)
            if bias is not None:
                y = y + bias
        if self.A is not None:
            a = ste(self.A, L.adapter_bits, L.adapter_group)
            b = ste(self.B, L.adapter_bits, L.adapter_group)
            y = y + F.linear(F.linear(x, a), b)
        return y

    @torch.no_grad()
    def write_back(self) -> SlimLinear:
        """Store the trained adapters (quantized as the forward saw them) and scales into the SlimLinear."""
        mod, L = self._slim[0], self.layout
        if self.A is not None:
            set_adapters(mod, self.A.detach(), self.B.detach())
        if mod.bias is not None and self.bias is not None:  # trained where AffineQuant's shifts moved it
            mod.bias.copy_(self.bias.to(mod.bias.dtype))
        if self.gain is not None:
            mod.scale.copy_(round_scale(mod.scale.float() * self.gain).to(torch.float16))
        if self.shadow is not None:  # the codes re-quantized from the shadow weights, with the scales as stored
            pos = mod.kept_positions()
            if L.bits:
                codes = quantize_codes(self.shadow.detach(), self._per_weight(mod.scale.float()), L.bits, self.qzero)
                mod.values.copy_(pack_codes(codes.gather(1, pos), L.bits))
            else:
                mod.values.copy_(self.shadow.detach().gather(1, pos).to(torch.float16))
        if self.up is not None:  # codes, scales and zero points from the trained clipping; the mask stays
            scale, zero = lwc_params(self.base, L.bits, L.group_size, self.up, self.low)
            codes = quantize_codes(self.base, expand_groups(scale, L.d_in, L.group_size), L.bits,
                                   expand_groups(zero, L.d_in, L.group_size))
            mod.values.copy_(pack_codes(codes.gather(1, mod.kept_positions()), L.bits))
            mod.scale.copy_(scale.to(torch.float16))
            mod.zero.copy_(pack_codes(zero.to(torch.int8), L.bits))
        mod.clear_cache()
        return mod


@torch.no_grad()
def set_adapters(mod: SlimLinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """Store float adapters (A: rank x d_in, B: d_out x rank) into a SlimLinear in its layout's format (grouped
    AbsMax codes for quantized adapters: what a straight-through forward saw, or a closed-form fit's values)."""
    L = mod.layout
    for name, t in (("lora_A", a), ("lora_B", b)):
        if L.adapter_bits:
            codes, scale, _ = quantize_grouped(t, L.adapter_bits, L.adapter_group)
            getattr(mod, name).copy_(pack_codes(codes, L.adapter_bits))
            getattr(mod, name + "_scale").copy_(scale.to(torch.float16))
        else:
            getattr(mod, name).copy_(t.to(torch.float16))
    mod.clear_cache()


def autocast_dtype(autocast: str) -> torch.dtype | None:
    """The dtype of the frozen base matmuls for an `autocast` setting ("bf16-base"), None for float32."""
    return torch.bfloat16 if autocast == "bf16-base" else None


def open_layers(model: nn.Module, scales: bool, clip_sources: dict[str, torch.Tensor] | None = None,
                lwc_init: float = 4.0, base_dtype: torch.dtype | None = None,
                weights: bool = False) -> dict[str, TrainableLinear]:
    """Replace every SlimLinear of a model (or block) with a TrainableLinear whose adapters (and scale gains, or
    clipping logits from `clip_sources`: each layer's float weight, or with `weights` the kept weights as shadow
    weights) are the only parameters that require gradients; `close_layers` puts the trained SlimLinears back."""
    for p in model.parameters():
        p.requires_grad_(False)
    opened = {n: TrainableLinear(m, scales, None if clip_sources is None else clip_sources[n], lwc_init, base_dtype,
                                 weights)
              for n, m in model.named_modules() if isinstance(m, SlimLinear)}
    for n, t in opened.items():
        set_submodule(model, n, t)
    for p in trainable(opened).values():
        p.requires_grad_(True)
    return opened


def close_layers(model: nn.Module, opened: dict[str, TrainableLinear]) -> None:
    for n, t in opened.items():
        set_submodule(model, n, t.write_back())


def trainable(opened: dict[str, TrainableLinear]) -> dict[str, nn.Parameter]:
    """The opened layers' parameters by name, in a fixed order (the optimizer's and the saved state's)."""
    return {f"{n}.{k}": p for n, t in opened.items()
            for k, p in (("A", t.A), ("B", t.B), ("gain", t.gain), ("clip_up", t.up), ("clip_low", t.low),
                         ("W", t.shadow))
            if p is not None}


def _rel_loss(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(squared error summed, target energy): the loss is their ratio over a set of batches."""
    t = t.to(y.device, torch.float32)
    return (y - t).pow(2).sum(), float(t.pow(2).sum())


def _rows(kw: dict[str, Any], a: int, b: int, n: int) -> dict[str, Any]:
    """Rows a:b of a batch's block arguments: tensors whose first dimension is the batch's n windows are sliced,
    broadcast ones (first dimension 1: rotary tables, position ids) and everything else pass as they are."""
    return map_tensors(kw, lambda t: t[a:b] if t.dim() and t.shape[0] == n else t)


class _Batches:
    """The tuning's unit of work: the calibration batches, or slices of `size` windows of them (`tune.batch_size`:
    small steps without small calibration batches, whose passes cost more per window). Batch g of all is local
    batch g // world of rank g % world (how `pipeline._share` deals them out), so every rank walks the same global
    sequence of units, each computed on the rank that holds its batch."""

    def __init__(self, inputs: Sequence[torch.Tensor], ranks: Ranks, size: int = 0, holdout: float = 0.0) -> None:
        self.ranks = ranks
        shapes = inputs.signature() if hasattr(inputs, "signature") else [(list(t.shape), "") for t in inputs]
        counts = torch.zeros(ranks.world, dtype=torch.float64)
        counts[ranks.rank] = len(shapes)
        ranks.all_reduce([counts])
        nb = int(counts.sum())
        rows = torch.zeros(nb, dtype=torch.float64)  # every global batch's windows, known to every rank
        for j, (shape, _) in enumerate(shapes):
            rows[j * ranks.world + ranks.rank] = shape[0]
        ranks.all_reduce([rows])
        # the last batches are held out whole (a forward pass over whole batches is the cheaper one); the others
        # are the training units
        n_hold = min(nb - 1, max(1, round(holdout * nb))) if holdout > 0 and nb >= 2 else 0
        self.units: list[tuple[int, int, int]] = []  # (global batch, first window, end)
        for g, n in enumerate(int(r) for r in rows):
            step = size if 0 < size < n and g < nb - n_hold else n
            self.units += [(g, a, min(a + step, n)) for a in range(0, n, step)]
        total = len(self.units)
        self.train = list(range(total - n_hold))
        self.hold = list(range(total - n_hold, total))

    def local(self, u: int, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
              kwargs: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
        """Unit u's (inputs, targets, block arguments) when this rank holds its batch, else None."""
        g, a, b = self.units[u]
        r = self.ranks
        if g % r.world != r.rank:
            return None
        j = g // r.world
        x, t, kw = inputs[j], targets[j], kwargs[j]
        n = x.shape[0]
        if (a, b) == (0, n):  # the whole batch: as it is
            return x, t, kw
        return x[a:b], t[a:b], _rows(kw, a, b, n)

    def gather(self, values: dict[int, torch.Tensor], like: torch.Tensor, ids: list[int]) -> None:
        """Fill every rank's `values` with the tensor of each unit in `ids` from the rank that computed it (a sum
        with zeros from the others: exact)."""
        if not self.ranks.active:
            return
        for u in ids:
            t = values.get(u)
            if t is None:
                t = values[u] = torch.zeros_like(like)
            self.ranks.all_reduce([t])


def tune_block(
    block: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kwargs: list[dict[str, Any]],
    device: str, cfg: TuneConfig, seed: int = 0, ranks: Ranks | None = None,
    clip_sources: dict[str, torch.Tensor] | None = None, lwc_init: float = 4.0, config: Any = None,
    on_step: Callable[[int, int, float], None] | None = None,
    refit: Callable[[str, SlimLinear], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    mid_targets: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train the adapters (and scale gains) of the block's SlimLinears to map `inputs` to `targets`, one
    calibration batch (or `cfg.batch_size` windows of one) per step; the block is modified in place. Returns what
    happened (losses, steps, seconds).
    With `cfg.clipping`, each layer's clipping logits (from `lwc_init`) are trained on its float weight in
    `clip_sources` (OmniQuant's LWC) and its codes recomputed; with `cfg.let` also AffineQuant's transformation
    (the model's `config` gives the heads), folded into the block's weights, norms and biases at the end.
    With `cfg.weights`, the kept weights train too (shadow weights through the quantizer, mask fixed) and are
    re-quantized at the end; then `refit(name, layer)` (the closed-form adapters for a layer's final weights, or
    None) gives a second candidate for the adapters, kept where the held-out loss prefers it.
    With `cfg.units` "attn-mlp", the attention layers train first against `mid_targets` (the dense block's
    states after attention, `UpTo`), then the others against `targets`.

    Under torchrun (`ranks`), each rank holds its share of the batches: every step runs on the rank that holds
    its batch and the gradients reach the others by an all-reduce (a sum with zeros: exact), so every rank takes
    the one-process steps and ends with the one-process adapters.
    `on_step(step, steps, loss)` is called after every step: a progress display (OmniQuant's 2,560 steps a
    block take minutes on a CPU)."""
    t0 = time.perf_counter()
    where = _Batches(inputs, ranks or Ranks(), cfg.batch_size, cfg.holdout)
    train_ids, hold_ids = where.train, where.hold
    if not hold_ids and cfg.holdout > 0:
        log.warning("block tuning: a single calibration batch, none held out: no early stop, every step is kept")
    dtypes = cast_dense_parts(block, torch.float32)
    frozen = {p: p.requires_grad for p in block.parameters()}
    if cfg.clipping and clip_sources is None:
        raise ValueError("tune.clipping needs each layer's float weight (clip_sources)")
    act_max: dict[str, torch.Tensor] = {}
    if cfg.let:  # AffineQuant's start needs each spanned input's max |x|: one pass over the training windows
        act_max = _act_max(block, inputs, kwargs, device, train_ids, where)
    opened = open_layers(block, cfg.scales, clip_sources if cfg.clipping else None, lwc_init,
                         autocast_dtype(cfg.autocast), cfg.weights)
    params = list(trainable(opened).values())
    let: AffineTransform | None = None
    # shadow weights: a rate in units of each layer's mean quantization step (a share of one rounding step per
    # update), the same for every layer and model
    lrs: dict[int, float] = {id(t.shadow): cfg.weights_lr * t.step_size() for t in opened.values()
                             if t.shadow is not None}
    prepare = None
    if cfg.let:
        if config is None:
            raise ValueError("tune.let needs the model config (its attention heads)")
        epochs = cfg.epochs or max(1, math.ceil(cfg.steps / max(len(train_ids), 1)))
        let = AffineTransform(block, opened, config, act_max, cfg.let_alpha, cfg.let_sf, epochs)
        lrs = {id(p): cfg.let_lr for p in let.parameters()}
        params += list(let.parameters())

        def prepare(epoch: int) -> None:
            let.epoch = epoch
            let.apply()
    if cfg.norms:  # the block's dense parameters besides the opened layers: its norms
        seen = {id(p) for p in params}
        extra = [p for p in block.parameters() if id(p) not in seen and p.is_floating_point()]
        for p in extra:
            p.requires_grad_(True)
        params += extra
    info: dict[str, Any] = {"steps": 0}
    try:
        with torch.enable_grad():
            if cfg.units == "block":
                info = _train(block, params, inputs, targets, kwargs, device, cfg, train_ids, hold_ids, seed, where,
                              lrs, prepare, on_step)
            else:
                if mid_targets is None:
                    raise ValueError("tune.units attn-mlp needs the dense block's states after attention")
                mid, attn = halves(block)
                first = {id(p) for n, t in opened.items() if n in attn for p in trainable({n: t}).values()}
                units = ((UpTo(block, mid), [p for p in params if id(p) in first], mid_targets),
                         (block, [p for p in params if id(p) not in first], targets))
                parts = []
                for k, (fwd, ps, tg) in enumerate(units):
                    for p in params:  # the other unit's parameters frozen: no gradients computed for them
                        p.requires_grad_(any(p is q for q in ps))
                    parts.append(_train(fwd, ps, inputs, tg, kwargs, device, cfg, train_ids, hold_ids, seed + k,
                                        where, lrs, prepare, on_step))
                info = {**parts[1], "attn": parts[0], "steps": parts[0]["steps"] + parts[1]["steps"]}
        if let is not None:
            let.settle()
    finally:
        close_layers(block, opened)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        cast_dense_parts(block, dtypes)
    if let is not None:
        let.fold(block)
    if refit is not None and cfg.weights and hold_ids and info["steps"]:
        info["adapter_refit"] = _refit_adapters(block, refit, inputs, targets, kwargs, device, hold_ids, where)
    info["seconds"] = time.perf_counter() - t0
    def num(k: str) -> float:
        v = info.get(k)
        return math.nan if v is None else v

    held = (f"held-out loss {num('holdout_before'):.5f} -> {num('holdout_after'):.5f}"
            if info.get("holdout_before") is not None else "no held-out windows")
    log.info("block tuning: %d steps, %s, train %.5f -> %.5f (%.1f s)", info["steps"], held,
             num("train_first"), num("train_last"), info["seconds"])
    return info


def _refit_adapters(block: nn.Module, refit: Callable[[str, SlimLinear], tuple[torch.Tensor, torch.Tensor] | None],
                    inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], kwargs: list[dict[str, Any]],
                    device: str, hold_ids: list[int], where: _Batches) -> dict[str, Any]:
    """After weight tuning: the adapters re-fitted in closed form to the re-quantized weights, against the tuned
    adapters, both measured as stored on the held-out windows; the lower loss keeps its adapters."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, SlimLinear) and m.layout.rank}
    names = ("lora_A", "lora_B", "lora_A_scale", "lora_B_scale")
    before = {n: {k: getattr(m, k).clone() for k in names if getattr(m, k, None) is not None}
              for n, m in layers.items()}
    dtypes = cast_dense_parts(block, torch.float32)
    try:
        tuned = _holdout(block, inputs, targets, kwargs, device, hold_ids, where)
        fitted = 0
        for n, m in layers.items():
            ab = refit(n, m)
            if ab is not None:
                set_adapters(m, *ab)
                fitted += 1
        got = _holdout(block, inputs, targets, kwargs, device, hold_ids, where) if fitted else math.inf
    finally:
        cast_dense_parts(block, dtypes)
    keep = "refit" if got < tuned else "tuned"
    if keep == "tuned":
        for n, m in layers.items():
            for k, t in before[n].items():
                getattr(m, k).copy_(t)
            m.clear_cache()
    log.info("block tuning: closed-form adapters on the tuned weights, held-out %.5f against the tuned adapters' "
             "%.5f: kept the %s ones", got, tuned, keep)
    return {"kept": keep, "holdout_refit": got if fitted else None, "holdout_tuned": tuned, "layers": fitted}


def _act_max(block: nn.Module, inputs: Sequence[torch.Tensor], kwargs: list[dict[str, Any]], device: str,
             ids: list[int], where: _Batches) -> dict[str, torch.Tensor]:
    """Max |x| per input channel of the layers that seed AffineQuant's scales, over the training windows (every
    rank's, combined by a max)."""
    m = let_map(block)
    seeds = [fed[0] for _, fed in m.norms] + [m.o]
    seen, handles = record_act_max((n, block.get_submodule(n)) for n in seeds)
    try:
        with torch.no_grad():
            for u in ids:
                unit = where.local(u, inputs, inputs, kwargs)
                if unit is not None:
                    block_forward(block, unit[0], unit[2], device, torch.float32)
    finally:
        for h in handles:
            h.remove()
    if where.ranks.active:
        for n in seeds:
            t = seen.get(n)
            if t is None:
                t = seen[n] = torch.zeros(block.get_submodule(n).in_features, device=device)
            where.ranks.all_reduce([t], op="max")
    return seen


def _holdout(block: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
             kwargs: list[dict[str, Any]], device: str, ids: list[int], where: _Batches) -> float:
    parts: dict[int, torch.Tensor] = {}
    opened = [m for m in block.modules() if isinstance(m, TrainableLinear)]
    for m in opened:  # measured as stored: float32 throughout
        m.exact = True
    try:
        with torch.no_grad():
            for u in ids:
                unit = where.local(u, inputs, targets, kwargs)
                if unit is not None:
                    e, n = _rel_loss(block_forward(block, unit[0], unit[2], device, torch.float32), unit[1])
                    parts[u] = torch.tensor([float(e), n], dtype=torch.float64)
    finally:
        for m in opened:
            m.exact = False
    where.gather(parts, torch.zeros(2, dtype=torch.float64), ids)
    err = energy = 0.0
    for u in ids:  # summed in unit order on every rank: the one-process sum
        err, energy = err + float(parts[u][0]), energy + float(parts[u][1])
    return err / max(energy, 1e-30)


def _train(block: nn.Module, params: list[nn.Parameter], inputs: Sequence[torch.Tensor],
           targets: Sequence[torch.Tensor], kwargs: list[dict[str, Any]], device: str, cfg: TuneConfig,
           train_ids: list[int], hold_ids: list[int], seed: int, where: _Batches,
           lrs: dict[int, float] | None = None, prepare: Callable[[int], None] | None = None,
           on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    # the learning rate is relative to each tensor's RMS: adapters' magnitudes differ by orders of magnitude
    # between models (and between A and B), and a step should move a tensor by a share of its own size
    # (absolute with lr_relative off: OmniQuant's clipping logits)
    # (`lrs`: absolute rates by parameter id, AffineQuant's let_lr; `prepare(epoch)` runs before every forward)
    def lr(p: nn.Parameter) -> float:
        if lrs and id(p) in lrs:
            return lrs[id(p)]
        return cfg.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-12) if cfg.lr_relative else cfg.lr

    steps = cfg.steps or cfg.epochs * len(train_ids)
    # one group per distinct rate: with absolute rates (OmniQuant's clipping logits) a step is then one multi-tensor
    # update on a GPU instead of ~14 small kernels a tensor; per-tensor rates keep one group each (same arithmetic)
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(lr(p), []).append(p)
    # fused: one kernel for every tensor of a group instead of a loop over tensors (with shadow weights, Adam's
    # update is no longer a small share of a step)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.Adam([{"params": ps, "lr": r} for r, ps in groups.items()], fused=fused or None)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best_state = [p.detach().clone() for p in params]
    per_epoch = max(len(train_ids), 1)
    if prepare is not None:
        prepare(0)
    best = _holdout(block, inputs, targets, kwargs, device, hold_ids, where) if hold_ids else math.inf
    info: dict[str, Any] = {"holdout_before": best if hold_ids else None, "best_step": 0}
    since, first, last, step = 0, None, None, 0
    for step in range(1, steps + 1):
        if not order:  # a fresh pass over the training batches, in a seeded order
            order = [train_ids[k] for k in torch.randperm(len(train_ids), generator=gen).tolist()]
        unit = where.local(order.pop(), inputs, targets, kwargs)
        opt.zero_grad(set_to_none=True)
        if prepare is not None:
            prepare((step - 1) // per_epoch)
        loss_t = torch.zeros(1, dtype=torch.float64)
        if unit is not None:
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cfg.autocast == "bf16"):
                y = block_forward(block, unit[0], unit[2], device, torch.float32)
            e, n = _rel_loss(y.float(), unit[1])
            loss = e / max(n, 1e-30)
            loss.backward()
            loss_t[0] = float(loss.detach())
        if where.ranks.active:  # the step's gradients (and loss) from the rank that holds its batch
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            where.ranks.all_reduce([p.grad for p in params] + [loss_t])
        opt.step()
        sched.step()
        last = float(loss_t[0])
        first = last if first is None else first
        if on_step is not None:
            on_step(step, steps, last)
        if hold_ids and (step % cfg.eval_every == 0 or step == steps):
            if prepare is not None:
                with torch.no_grad():
                    prepare((step - 1) // per_epoch)
            h = _holdout(block, inputs, targets, kwargs, device, hold_ids, where)
            if h < best:
                best, since, info["best_step"] = h, 0, step
                best_state = [p.detach().clone() for p in params]
            else:
                since += 1
                if since >= cfg.patience:
                    info["stopped_early"] = True
                    break
    if hold_ids:
        with torch.no_grad():
            for p, b in zip(params, best_state, strict=True):
                p.copy_(b)
    info.update({"steps": step, "train_first": first, "train_last": last,
                 "holdout_after": best if hold_ids else None})
    return info
