"""The lean decode path: a Llama-family model's whole forward in one call of slim's C++ `Decoder` (kernels/csrc).

Why: at one token a transformers forward spends most of its time in Python between small kernels (attention
interface, cache update, masks, a module call per layer), which on a small model decides the speed: SmolLM2-135M
decoded at about 30 tokens/s through it where llama.cpp runs 124. The `Decoder` holds the model's own tensors (no
copies of the weights: the compressed layers' packed codes, 16-bit dense weights, the embedding), a KV cache of its
own, and runs embedding, every block (RMSNorm, q/k/v in one kernel call, RoPE, attention, o, gate/up in one call,
SiLU, down) and the head without returning to Python. It serves prefill (chunks of any length, torch's SDPA for
the attention above 8 tokens) and decode alike, and `generate` takes it by default where `supported` says yes.

Numerics: the same kernels as the eager `cpu-int4` model (slim's int8-activation kernels for compressed layers,
the 16-bit GEMV for dense ones), with fp32 activations, norms and KV cache throughout; the eager model may run
bf16 activations where the CPU has bf16 arithmetic, so the two agree to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

import slim.kernels.native as native

from .cpu_int4 import HalfWeightLinear, Int4Linear, QuantHead

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
PROJECTIONS = ((("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
               (("self_attn", "o_proj"),),
               (("mlp", "gate_proj"), ("mlp", "up_proj")),
               (("mlp", "down_proj"),))


class LeanUnsupported(ValueError):
    """The model cannot run on the lean path; the message says why (generate falls back to transformers)."""


def _projection_ok(m: nn.Module) -> str | None:
    if isinstance(m, Int4Linear):
        if not m.fused:
            return f"a compressed layer runs outside slim's fused kernel ({m.kernel} kernel, {m.adapter_kind} adapters)"
        if m.input_scale is not None or m.fp8_inputs:
            return "a compressed layer scales or fp8-rounds its inputs"
        return None
    if isinstance(m, QuantHead | HalfWeightLinear) or type(m) is nn.Linear:
        return None
    return f"a projection is a {type(m).__name__}"


def _head_dim(cfg: object) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // max(getattr(cfg, "num_attention_heads", 1), 1)


def supported(model: nn.Module) -> str | None:
    """None when `LeanDecoder(model)` can run it, else why not (checked without building anything)."""
    if native.load() is None:
        return f"slim's CPU kernel is not available ({native.unavailable_reason() or 'build failed'})"
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        return f"model type {mt!r} (the lean path runs {', '.join(MODEL_TYPES)})"
    try:
        if next(model.parameters()).device.type != "cpu":
            return "the model is not on the CPU"
    except StopIteration:
        return "the model has no parameters"
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        return f"activation {act!r} (the lean path runs SiLU)"
    if getattr(cfg, "sliding_window", None) and (mt == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    head_dim = _head_dim(cfg)
    if head_dim % 8:
        return f"head dimension {head_dim} is not a multiple of 8"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None or getattr(model, "lm_head", None) is None:
        return "not the transformers Llama module layout (model.layers, model.rotary_emb, lm_head)"
    for i, layer in enumerate(layers):
        for group in PROJECTIONS:
            for parent, name in group:
                m = getattr(getattr(layer, parent, None), name, None)
                why = "it is missing" if m is None else _projection_ok(m)
                if why is not None:
                    return f"layer {i} {parent}.{name}: {why}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, norm, None), "variance_epsilon"):
                return f"layer {i} {norm} is not an RMSNorm"
        if hasattr(layer.self_attn, "q_norm"):
            return "per-head q/k norms"
    why = _projection_ok(model.lm_head)
    return None if why is None else f"lm_head: {why}"


def _linears(members: list[Int4Linear] | list[QuantHead], k: int) -> Any:
    lin = native.load().Linears(k)
    for m in members:
        lin.add(*m.native_args())
    return lin


class LeanDecoder:
    """One model on the lean path: `forward(ids, pos)` runs tokens at positions pos.. through the whole model,
    writing their keys and values into the decoder's cache; logits of the last token (or all) come back fp32.
    Holds the model's tensors, not the model: keep the model alive while using it."""

    def __init__(self, model: nn.Module) -> None:
        why = supported(model)
        if why is not None:
            raise LeanUnsupported(f"{type(model).__name__} cannot run on the lean decode path: {why}")
        cfg = model.config
        inner = model.model
        layers = inner.layers
        attn = layers[0].self_attn
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = _head_dim(cfg)
        emb = inner.embed_tokens.weight.detach()
        self.vocab, self.hidden = emb.shape
        self.rotary = inner.rotary_emb
        eps = float(layers[0].input_layernorm.variance_epsilon)
        scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        kernel = native.load()
        self._dec = kernel.Decoder(len(layers), self.hidden, heads, kv, head_dim, self.vocab, eps, scaling)
        for i, layer in enumerate(layers):
            for slot, group in enumerate(PROJECTIONS):
                mods = [getattr(getattr(layer, p), n) for p, n in group]
                self._add(i, slot, mods)
            self._dec.set_norms(i, layer.input_layernorm.weight.detach(),
                                layer.post_attention_layernorm.weight.detach())
        self._add(-1, 0, [model.lm_head])
        self._dec.set_final(emb, inner.norm.weight.detach())
        self.length = 0
        self.key = _fingerprint(model)
        self.kinds = sorted({type(m).__name__ for layer in layers for g in PROJECTIONS
                             for m in (getattr(getattr(layer, p), n) for p, n in g)})
        log.info("lean decode path: %d blocks (%s), head %s", len(layers), ", ".join(self.kinds),
                 type(model.lm_head).__name__)

    def _add(self, layer: int, slot: int, mods: list[nn.Module]) -> None:
        quant = [m for m in mods if isinstance(m, Int4Linear | QuantHead)]
        lin = _linears(quant, mods[0].in_features) if quant else None
        for m in mods:
            bias = m.bias.detach() if getattr(m, "bias", None) is not None else torch.empty(0)
            if isinstance(m, Int4Linear | QuantHead):
                self._dec.add_quant(layer, slot, lin, bias)
            else:
                self._dec.add_dense(layer, slot, m.weight.detach().contiguous(), bias)

    def reserve(self, length: int) -> None:
        """A KV cache (and RoPE tables) for positions 0..length-1; what is cached stays."""
        if length <= self.length:
            return
        pos = torch.arange(length)[None]
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos)
        self._dec.set_rope(cos[0].float().contiguous(), sin[0].float().contiguous())
        self._dec.reserve(length)
        self.length = length

    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """ids: (T,) or (1, T) token ids at positions pos..pos+T-1 -> fp32 logits (1, V), or (T, V) with all_logits."""
        ids = ids.reshape(-1)
        if pos + ids.numel() > self.length:
            self.reserve(max(pos + ids.numel(), 2 * self.length))
        return self._dec.forward(ids, pos, all_logits)


_DECODERS: weakref.WeakKeyDictionary[nn.Module, LeanDecoder] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Which modules the decoder was built from: a model changed since (a new head, a converted layer) rebuilds."""
    return tuple(id(m) for m in model.modules())


def decoder_for(model: nn.Module) -> LeanDecoder:
    """The model's lean decoder, built on first use and kept while the model lives (raises `LeanUnsupported`)."""
    dec = _DECODERS.get(model)
    if dec is None or dec.key != _fingerprint(model):
        dec = LeanDecoder(model)
        _DECODERS[model] = dec
    return dec
