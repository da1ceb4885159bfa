"""AffineQuant's learnable equivalent transformation (Ma et al. 2024), weight-only, trained by block tuning.

Why a transformation at all: quantizing W T instead of W, with T^-1 moved onto the layer's input, changes which
values share a quantization grid without changing what the float model computes. AffineQuant learns T block by
block together with OmniQuant's clipping (tune.clipping), against the dense block's outputs. Its weight-only
LLaMA-2 scripts (`--lwc --let`) use three kinds of T, all of which fold into weights the model stores anyway:

- between each norm and the linears it feeds (q/k/v; gate/up; OPT's fc1): a per-channel scale s and shift b,
  the linears see (x - b) / s and store W diag(s), plus a bias W b; 1/s folds into the norm's weight;
- between q and k: a per-channel scale, q's rows divided, k's multiplied (the attention logits unchanged);
- between v and o: an affine matrix A per head, v's rows by A^-T, o's columns by A^T, A block-diagonal over the
  heads and opened off its diagonal epoch by epoch (AffineQuant's gradual mask, weighted by its stability
  factor) so that it stays invertible and close to diagonal.

Departures, each for the 2:4 storage or for exactness: the transformed weights are masked again with the Wanda
mask (AffineQuant quantizes the pruned checkpoint's transformed weights, whose v/o pattern A destroys); the q/k
scale is shared by each rotary pair (i, i + d/2), so it stays an identity of the float model under RoPE, and left
out where a per-head norm follows q and k (Qwen3); with grouped-query attention a key/value head's A serves the
query heads that read it; activation maxima come from the compressed stream's own inputs; the shift's bias terms
are folded into the linears' biases (a norm without one, RMSNorm, cannot hold it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_TRUNCATE = 1e-2  # AffineQuant keeps |scale| >= 1e-2 (its truncate_number), so that 1/s stays finite


@dataclass(frozen=True)
class LetMap:
    """Where a block keeps what the transformation spans (module names inside the block)."""

    norms: tuple[tuple[str, tuple[str, ...]], ...]  # (norm, the linears it feeds; the first seeds the scale)
    q: str
    k: str
    v: str
    o: str
    qk: bool  # a q/k scale (off where a per-head norm follows q and k)
    rotary: bool  # rotary pairs (i, i + d/2) share the q/k scale

    @property
    def biased(self) -> tuple[str, ...]:
        """The linears that get a bias (from the shifts)."""
        return tuple(n for _, fed in self.norms for n in fed) + (self.o,)


def let_map(block: nn.Module) -> LetMap:
    """The transformation's layout for a LLaMA-like or OPT block; ValueError for anything else."""
    names = {n for n, _ in block.named_modules()}
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if {"input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"} <= names:
        return LetMap(norms=(("input_layernorm", attn), ("post_attention_layernorm", ("mlp.up_proj", "mlp.gate_proj"))),
                      q=attn[0], k=attn[1], v=attn[2], o="self_attn.o_proj",
                      qk="self_attn.q_norm" not in names, rotary=True)
    if {"self_attn_layer_norm", "final_layer_norm", "fc1"} <= names:
        return LetMap(norms=(("self_attn_layer_norm", attn), ("final_layer_norm", ("fc1",))),
                      q=attn[0], k=attn[1], v=attn[2], o="self_attn.out_proj", qk=True, rotary=False)
    raise ValueError("AffineQuant's transformation (tune.let) knows LLaMA-like blocks (input_layernorm, "
                     "post_attention_layernorm, gate/up/down) and OPT blocks; this block has neither")


def heads_of(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a model config."""
    n = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or n
    hd = getattr(config, "head_dim", None) or config.hidden_size // n
    return n, kv, hd


def _smooth(act: Tensor, w: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-channel scale max|x|^alpha / max|W|^(1 - alpha), AffineQuant's start (it takes the
    weight's signed column max; the magnitude is used here, which is what the formula means)."""
    a = act.float().clamp(min=1e-5)
    m = w.abs().amax(0).float().clamp(min=1e-5)
    return (a.pow(alpha) / m.pow(1 - alpha)).clamp(min=1e-5)


def gradual_mask(epoch: int, epochs: int, hd: int, sf: float) -> Tensor:
    """AffineQuant's mask of an (hd, hd) matrix at `epoch` of `epochs`: the diagonal, and the first
    round((hd - 1) e / (E - 1)) off-diagonals on either side weighted by the stability factor."""
    opened = int((hd - 1) / (epochs - 1) * epoch) + 1 if epochs > 1 else hd
    i = torch.arange(hd)
    dist = (i[:, None] - i[None, :]).abs()
    m = torch.where(dist < opened, torch.full((hd, hd), sf), torch.zeros(hd, hd))
    m.fill_diagonal_(1.0)
    return m


def _truncated(p: Tensor) -> Tensor:
    return torch.where(p.abs() < _TRUNCATE, p.sign() * _TRUNCATE, p)


class AffineTransform(nn.Module):
    """One block's transformation parameters; `apply` hands every opened layer its transformed float weight,
    input transform and bias for the next step, `fold` writes the trained transformation into the stored block."""

    def __init__(self, block: nn.Module, opened: dict[str, nn.Module], config: Any, act_max: dict[str, Tensor],
                 alpha: float, sf: float, epochs: int) -> None:
        super().__init__()
        self.map = m = let_map(block)
        self.heads = n, kv, hd = heads_of(config)
        self.rep = n // kv
        self.sf, self.epochs = sf, epochs
        self._opened = opened  # a plain dict: the layers are the block's submodules, not this module's
        dev = opened[m.q].base.device
        self.scales = nn.ParameterList()
        self.shifts = nn.ParameterList()
        for _, fed in m.norms:
            s = _smooth(act_max[fed[0]], opened[fed[0]].base, alpha).to(dev)
            self.scales.append(nn.Parameter(s))
            self.shifts.append(nn.Parameter(torch.zeros_like(s)))
        # v -> o: one (hd, hd) matrix per key/value head, starting at the diagonal scale of its o columns
        wo = opened[m.o].base.view(-1, kv, self.rep, hd)
        act = act_max[m.o].view(kv, self.rep, hd).amax(1)
        start = torch.stack([_smooth(act[j], wo[:, j].reshape(-1, hd), alpha) for j in range(kv)])
        self.A = nn.Parameter(torch.diag_embed(start).to(dev))
        self.shift_v = nn.Parameter(torch.zeros(kv * hd, device=dev))
        self.qk = nn.Parameter(torch.ones(kv, hd // 2 if m.rotary else hd, device=dev)) if m.qk else None
        self.epoch = 0

    @torch.no_grad()
    def truncate(self) -> None:
        """AffineQuant's guard, once per step on the scales' values (zeros, the closed off-diagonals, stay)."""
        for p in [*self.scales, self.A] + ([self.qk] if self.qk is not None else []):
            p.copy_(_truncated(p))

    def _qk(self) -> tuple[Tensor, Tensor] | None:
        """The q/k scale as (per key row, per query row)."""
        if self.qk is None:
            return None
        t = torch.cat([self.qk, self.qk], 1) if self.map.rotary else self.qk
        return t.flatten(), t.repeat_interleave(self.rep, 0).flatten()

    def transformed(self) -> dict[str, tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]]:
        """Every spanned layer's (masked transformed weight, bias, input (shift, scale) or None)."""
        m, (_, kv, hd) = self.map, self.heads
        o = self._opened
        mask = gradual_mask(min(self.epoch, self.epochs - 1), self.epochs, hd, self.sf).to(self.A.device)
        A = self.A * mask
        A_inv = torch.linalg.inv(A)
        out: dict[str, tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]] = {}

        def bias0(name: str) -> Tensor:
            b = o[name].bias
            return torch.zeros(o[name].base.shape[0], device=A.device) if b is None else b

        for (_, fed), s, b in zip(m.norms, self.scales, self.shifts, strict=True):
            for name in fed:
                w = o[name].base  # the Wanda-masked float weight
                out[name] = (w * s[None, :], bias0(name) + w @ b, (b, s))
        qk = self._qk()
        if qk is not None:
            tk, tq = qk
            wq, bq, t_in = out[m.q]
            out[m.q] = (wq / tq[:, None], bq / tq, t_in)
            wk, bk, t_in = out[m.k]
            out[m.k] = (wk * tk[:, None], bk * tk, t_in)
        wv, bv, t_in = out[m.v]
        wv = torch.einsum("jab,jac->jbc", A_inv, wv.view(kv, hd, -1)).reshape(kv * hd, -1)
        bv = torch.einsum("ja,jab->jb", (bv - self.shift_v).view(kv, hd), A_inv).flatten()
        out[m.v] = (wv, bv, t_in)
        wo = o[m.o].base
        A_q = A.repeat_interleave(self.rep, 0)  # the matrix of each query head's key/value head
        shift_q = self.shift_v.view(kv, hd).repeat_interleave(self.rep, 0).flatten()
        wo_t = torch.einsum("oha,hba->ohb", wo.view(wo.shape[0], -1, hd), A_q).reshape(wo.shape)
        out[m.o] = (wo_t, bias0(m.o) + wo @ shift_q, None)
        # only v and o need the mask again (A mixes their rows / columns); the others' scalings keep the
        # masked base's zeros
        return {k: (w * o[k].keep if k in (m.v, m.o) else w, b, t) for k, (w, b, t) in out.items()}

    def apply(self) -> None:
        """Give the opened layers this step's transformed weights (a fresh graph each step)."""
        self.truncate()
        for name, (w, b, t_in) in self.transformed().items():
            layer = self._opened[name]
            layer.let_weight, layer.let_bias, layer.let_input = w, b, t_in

    @torch.no_grad()
    def settle(self) -> None:
        """Make the trained transformation the opened layers' own float weights and biases (what `write_back`
        quantizes with the trained clipping); `fold` then moves the input transform out of the stored block."""
        self.epoch = self.epochs - 1
        self.truncate()
        for name, (w, b, _) in self.transformed().items():
            layer = self._opened[name]
            layer.base = w.detach().clone()
            layer.bias = b.detach().clone()
            layer.let_weight = layer.let_bias = layer.let_input = None

    @torch.no_grad()
    def fold(self, block: nn.Module) -> None:
        """Move the input transform (x - shift) / scale out of the stored layers: 1/scale into the norm, and the
        shift into each layer's bias through its stored (quantized) weight, so the stored block computes what was
        trained. After `settle`: the scales are the truncated ones the layers were settled with."""
        for (norm_name, fed), s, shift in zip(self.map.norms, self.scales, self.shifts, strict=True):
            s, shift = s.detach(), shift.detach()
            norm = block.get_submodule(norm_name)
            norm.weight.div_(s.to(norm.weight))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias))
            for name in fed:
                lin = block.get_submodule(name)
                wq = lin.dequantized_weight()
                lin.bias.sub_((wq @ (shift / s).to(wq)).to(lin.bias))
                lin.clear_cache()


def record_act_max(modules: Iterable[tuple[str, nn.Module]]) -> tuple[dict[str, Tensor], list[Any]]:
    """Forward pre-hooks that keep max |x| per input channel of each named module (AffineQuant's act_scales);
    returns the dict they fill and the hook handles to remove."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name, mod in modules:
        def hook(_m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            seen[name] = x if name not in seen else torch.maximum(seen[name], x)
        handles.append(mod.register_forward_pre_hook(hook))
    return seen, handles
