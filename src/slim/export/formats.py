"""Exports that load outside slim: a compressed-tensors W4A16 base, PEFT LoRA adapters beside it, a merged dense
checkpoint, and a model card for each.

- `compressed-tensors`: the base weights (mask · quantized weights; adapters not folded in) in the
  `pack-quantized` format as compressed-tensors writes it, so `transformers` (with the `compressed-tensors`
  package) and vLLM's W4A16 kernels load it. Pruned slots are zero codes in a dense int4 layout (compressed-tensors
  dropped its 2:4 formats in 0.15). A per-tensor scale becomes a channel scale repeated per row (exact; vLLM's
  W4A16 takes channel or group strategies only).
- `peft`: `base/` (the compressed-tensors export) and `adapter/` (a PEFT LoRA adapter: ΔW = (α/r)·B·A with
  α = r, so ΔW = B·A exactly; per-layer ranks in `rank_pattern` / `alpha_pattern`), so that
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` is slim's model.
- `merged`: a plain transformers checkpoint with the adapters folded in (dense, the largest; runs anywhere).

Scales and adapters are exact in fp16 and fp32; the default export dtype is therefore fp16 (bf16 would round the
fp16 group scales). Every export is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms.quant import n_groups
from ..format.card import VLLM_RANKS, model_card
from ..format.checkpoint import (
    DTYPES,
    CheckpointError,
    atomic_dir,
    check_output_dir,
    dir_bytes,
    read_slim_config,
    write_json,
)
from ..format.packed import SlimLinear, unpack_codes
from ..runtime.loader import load

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "peft", "merged")
# files copied from the checkpoint as they are
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


class ExportError(CheckpointError):
    """A checkpoint cannot be written in the asked format; the message names the layer and the way out."""


def _require(module: str, extra: str = "export") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this export needs the `{module.replace('_', '-')}` package: "
                          f"pip install 'slim-compress[{extra}]'") from None


def check_exportable(layouts: dict[str, dict], fmt: str) -> None:
    """Fail before any work if a layer cannot be held by `fmt`, naming the layer and what to do instead."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    for name, d in layouts.items():
        if d.get("fp8_inputs"):
            raise ExportError(f"layer {name} computes on fp8-rounded inputs, which no export format can express; "
                              "re-compress without fp8_inputs (--set fp8_inputs=false)")
        if fmt == "merged":
            continue
        if d.get("bits") != 4:
            raise ExportError(f"layer {name} stores {d.get('bits') or 'fp16'}-bit weights; compressed-tensors W4A16 "
                              "holds 4-bit codes only: re-compress with --quant.bits 4 or export --format merged")
        g = d.get("group_size", 0)
        if g and d["d_in"] % g:
            raise ExportError(f"layer {name}: input width {d['d_in']} is not a multiple of the group size {g} (a "
                              "short last group), which compressed-tensors cannot hold: re-compress with a group "
                              "size that divides it, or export --format merged")
        if d.get("input_scale"):
            raise ExportError(f"layer {name} scales its inputs (SLiM-Quant^O / AWQ input_scale), which the W4A16 "
                              "format cannot hold on a quantization grid: export --format merged")


def ct_tensors(layer: SlimLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer as compressed-tensors `pack-quantized` tensors: the dense layout of signed int4 codes q with
    w = (q - zp) * scale, pruned slots at q = zp (so w = 0), packed 8 codes an int32 by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    L = layer.layout
    codes = unpack_codes(layer.values, L.bits, L.keep).to(torch.int8)
    pos = layer.kept_positions()
    out: dict[str, torch.Tensor] = {}
    if L.zero_point:
        zero = unpack_codes(layer.zero, L.bits, n_groups(L.d_in, L.group_size)).to(torch.int8)
        q = zero.repeat_interleave(L.group_size, 1)[:, : L.d_in].contiguous()
        out["weight_zero_point"] = pack_to_int32(zero, L.bits, packed_dim=0).contiguous()
    else:
        q = torch.zeros(L.d_out, L.d_in, dtype=torch.int8)
    q.scatter_(1, pos, codes)
    scale = layer.scale.float()
    scale = scale.reshape(1, 1).expand(L.d_out, 1) if L.group_size == 0 else scale
    out["weight_packed"] = pack_to_int32(q, L.bits)
    out["weight_scale"] = scale.to(dtype).contiguous()
    out["weight_shape"] = torch.tensor([L.d_out, L.d_in])
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype)
    return out


def quantization_config(model: nn.Module, layers: dict[str, SlimLinear]) -> Any:
    """compressed-tensors' QuantizationConfig for the compressed linears; every other Linear is ignored."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: dict[tuple, list[str]] = collections.defaultdict(list)
    for name, layer in layers.items():
        L = layer.layout
        by_scheme[(L.bits, L.group_size, L.zero_point)].append(name)
    groups = {}
    for i, ((bits, g, zp), names) in enumerate(sorted(by_scheme.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=not zp,
                                strategy="group" if g else "channel", group_size=g or None)
        # one scheme: target the Linear class; several: each group by its layers' names
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=ignore)


def _dense_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything outside the compressed layers, cast to `dtype`; a tied output embedding is written once."""
    sd: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in skip:
            continue
        if t.numel() and t.data_ptr() in seen:  # tied (lm_head = embed_tokens): transformers re-ties on load
            continue
        seen[t.data_ptr()] = key
        sd[key] = t.detach().to(dtype).contiguous() if t.is_floating_point() else t.detach().contiguous()
    return sd


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in SIDE_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def _foreign_biases(model: nn.Module, layers: dict[str, SlimLinear]) -> list[str]:
    """Layers that store a bias where the architecture, as its config builds it, has none."""
    from transformers import AutoModelForCausalLM

    biased = [n for n, m in layers.items() if m.bias is not None]
    if not biased:
        return []
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    return [n for n in biased if getattr(plain.get_submodule(n), "bias", None) is None]


def _save_config(model: nn.Module, dst: Path, dtype: torch.dtype) -> None:
    cfg = model.config
    old = cfg.dtype
    cfg.dtype = dtype
    try:
        cfg.save_pretrained(dst)
    finally:
        cfg.dtype = old


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_base(model: nn.Module, layers: dict[str, SlimLinear], src: Path, dst: Path, dtype: torch.dtype) -> int:
    """The compressed-tensors base; returns the bytes of its compressed layers' tensors."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    sd = _dense_state(model, set(layers), dtype)
    linear = 0
    for name, layer in layers.items():
        tensors = ct_tensors(layer, dtype)
        linear += _nbytes(tensors.values())
        for k, t in tensors.items():
            sd[f"{name}.{k}"] = t
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _save_config(model, dst, dtype)
    ModelCompressor(quantization_config=quantization_config(model, layers)).update_config(str(dst))
    _copy_side_files(src, dst)
    return linear


def vllm_rank(r: int) -> int:
    """The smallest rank vLLM serves that holds `r`."""
    for v in VLLM_RANKS:
        if v >= r:
            return v
    raise ExportError(f"rank {r} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}; export without --pad-rank")


def peft_adapter(layers: dict[str, SlimLinear], dtype: torch.dtype,
                 pad_rank: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(LoraConfig keyword arguments, adapter tensors) for every layer with adapters: A (r, in), B (out, r)
    dequantized, α = r per layer; `pad_rank="vllm"` pads each rank with zero rows of A / columns of B up to
    vLLM's next allowed rank (exact)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        ad = layer.adapters()
        if ad is None:
            continue
        a, b = ad
        r = a.shape[0]
        if pad_rank == "vllm":
            rp = vllm_rank(r)
            a = torch.cat([a, a.new_zeros(rp - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rp - r)], 1)
            r = rp
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[name] = r
    if not ranks:
        raise ExportError("the checkpoint has no adapters (rank 0): export --format compressed-tensors instead")
    r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {n: r for n, r in ranks.items() if r != r0}
    # short target names (q_proj, ...) where every layer of that name has adapters, else the full names
    short = collections.defaultdict(list)
    for n in layers:
        short[n.rpartition(".")[2]].append(n)
    targets: list[str] = []
    for s, names in sorted(short.items()):
        with_ad = [n for n in names if n in ranks]
        targets += [s] if len(with_ad) == len(names) else with_ad
    kwargs = dict(r=r0, lora_alpha=r0, target_modules=targets, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=False)
    return kwargs, tensors


def _write_adapter(layers: dict[str, SlimLinear], dst: Path, base: Path, dtype: torch.dtype,
                   pad_rank: str | None) -> tuple[dict[str, Any], int]:
    """The PEFT adapter directory; returns its LoraConfig arguments and the adapter tensors' bytes."""
    peft = _require("peft")
    from safetensors.torch import save_file

    kwargs, tensors = peft_adapter(layers, dtype, pad_rank)
    cfg = peft.LoraConfig(base_model_name_or_path=str(base), **kwargs)
    cfg.save_pretrained(str(dst))
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return kwargs, _nbytes(tensors.values())


def _write_merged(model: nn.Module, layers: dict[str, SlimLinear], src: Path, dst: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    sd = _dense_state(model, set(layers), dtype)
    for name, layer in layers.items():
        sd[f"{name}.weight"] = layer.effective_weight().to(dtype).contiguous()
        if layer.bias is not None:
            sd[f"{name}.bias"] = layer.bias.detach().to(dtype)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _save_config(model, dst, dtype)
    _copy_side_files(src, dst)


def base_only(model: nn.Module) -> nn.Module:
    """`model` (in place) with every SlimLinear replaced by a dense Linear holding its dequantized base, mask ·
    Q(W) without adapters: what a compressed-tensors export holds, for comparing with it."""
    from ..models import set_submodule

    for name, mod in list(model.named_modules()):
        if isinstance(mod, SlimLinear):
            lin = nn.Linear(mod.layout.d_in, mod.layout.d_out, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight()
            if mod.bias is not None:
                lin.bias.data = mod.bias.detach().float()
            set_submodule(model, name, lin)
    return model


def export(src: str | os.PathLike, out: str | os.PathLike, fmt: str, dtype: str = "fp16",
           pad_rank: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write checkpoint `src` as `fmt` into `out` (see the module docstring); returns what was written."""
    src, out = Path(src), Path(out)
    cfg = read_slim_config(src)
    check_exportable(cfg["layers"], fmt)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose fp16, bf16 or fp32")
    if pad_rank not in (None, "vllm"):
        raise ExportError(f"unknown --pad-rank {pad_rank!r}; the only choice is vllm")
    if pad_rank == "vllm":
        for d in cfg["layers"].values():
            vllm_rank(d.get("rank", 0))  # a rank vLLM cannot serve fails now
    if fmt in ("compressed-tensors", "peft"):
        _require("compressed_tensors")
    if fmt == "peft":
        _require("peft")
    check_output_dir(out, overwrite)
    tdtype = DTYPES[dtype]
    model = load(src, backend="reference", dtype="fp32")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SlimLinear)}
    foreign = _foreign_biases(model, layers)
    if foreign:
        raise ExportError(f"layer {foreign[0]} (and {len(foreign) - 1} more) has a bias that the "
                          f"{model.config.model_type} architecture has no place for (AffineQuant's shifts, "
                          "tune.let, put it there): transformers and vLLM would drop it. Run this checkpoint "
                          "with slim.load, or re-compress without tune.let (--set tune.let=false)")
    info: dict[str, Any] = {"format": fmt, "source": str(src), "dtype": dtype, "layers": len(layers)}

    n_weights = sum(m.layout.d_in * m.layout.d_out for m in layers.values())

    def write(tmp: Path) -> None:
        if fmt == "compressed-tensors":
            linear = _write_base(model, layers, src, tmp, tdtype)
        elif fmt == "merged":
            _write_merged(model, layers, src, tmp, tdtype)
            linear = n_weights * DTYPES[dtype].itemsize
        else:
            (tmp / "base").mkdir()
            linear = _write_base(model, layers, src, tmp / "base", tdtype)
            info["lora"], ad = _write_adapter(layers, tmp / "adapter", out.resolve() / "base", tdtype, pad_rank)
            linear += ad
        info["linear_bytes"], info["bits_per_weight"] = linear, 8 * linear / n_weights
        info["bytes"] = dir_bytes(tmp)
        (tmp / "README.md").write_text(model_card(cfg, fmt, out, info, src))
        write_json(tmp / "slim_export.json", {**info, "slim_config": {k: cfg.get(k) for k in (
            "format_version", "config", "versions", "source", "calibration_data")}})

    atomic_dir(out, write, overwrite)
    log.info("exported %s as %s to %s", src, fmt, out)
    return info


def write_checkpoint_card(path: str | os.PathLike) -> None:
    """(Re)write a slim checkpoint's README.md from its slim_config.json."""
    p = Path(path)
    cfg = read_slim_config(p)
    (p / "README.md").write_text(model_card(cfg, "slim", p))


__all__ = ["FORMATS", "ExportError", "base_only", "check_exportable", "export", "model_card", "peft_adapter",
           "write_checkpoint_card"]
