"""The Python entry point: `slim.compress(model, config)`.

May import: slim.pipeline, slim.format, slim.config, slim.data, slim.models, leaves.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .config import CompressConfig
from .data import calibration_ids, read_texts
from .models import check_compressible, check_context, family_of, find_linears, get_layers, layers_prefix, load_model
from .pipeline.loop import compress_model

log = logging.getLogger(__name__)


def compress(
    model: nn.Module | str | None, config: CompressConfig | None = None, tokenizer=None,
    data_dir: str | os.PathLike | None = None, progress: bool = True,
    masks: dict[str, torch.Tensor] | None = None, run: Any = None, max_memory: int | None = None,
    ranks: Any = None, checked: bool = False,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Compress a model (object, local path, hub id, or None for the bundled SmolLM2) in place.

    Returns (model, tokenizer, metadata) where metadata holds the resolved config, data hashes
    and the compression report; pass it to `slim.save` to record it next to the checkpoint. `run` (a
    `slim.pipeline.stream.BlockRun`) commits each block to disk as it is done; `slim compress` uses it.
    `max_memory` (bytes) moves the calibration activations to disk when they would take more than a quarter of it.
    `ranks` (`slim.pipeline.dist.from_env()`) shares the work among the processes torchrun started. `checked`: the
    caller already ran `slim.models.check_compressible` on this model and config (it scans every weight: once is
    enough).
    """
    cfg = config or CompressConfig()
    source: dict[str, Any] = {}
    if model is None or isinstance(model, str):
        model, tokenizer, source = load_model(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer along with a model object")
    family_of(model)
    check_context(model, cfg)
    if not checked:
        check_compressible(model, cfg)
    if masks is not None:
        check_masks(model, masks, cfg)
    torch.manual_seed(cfg.calib.seed)
    texts, prov = read_texts(cfg.calib.data, data_dir, tokens_needed=cfg.calib.n_samples * cfg.calib.seqlen)
    ids = calibration_ids(tokenizer, texts, cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib.seed)
    report = compress_model(model, ids, cfg, progress=progress, masks=masks, run=run, max_memory=max_memory,
                            ranks=ranks, checked=True)
    meta = {"source": source, "config": cfg.to_dict(), "calibration_data": prov, "report": report}
    return model, tokenizer, meta


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Precomputed masks (e.g. MaskLLM's): a safetensors file with one tensor per linear, keyed by
    the module name (`model.layers.0.self_attn.q_proj`, optionally with a `.mask` suffix); nonzero = kept."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .config import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"mask file {p} does not exist")
    try:
        raw = load_file(str(p))
    except Exception as e:
        raise ConfigError(f"mask file {p} is not a readable safetensors file: {e}") from None
    return {k.removesuffix(".mask"): v != 0 for k, v in raw.items()}


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor], cfg: CompressConfig) -> None:
    """Every compressed linear needs a mask of its shape that follows the configured pattern."""
    from .config import ConfigError

    prefix = layers_prefix(model)
    for i, block in enumerate(get_layers(model)):
        for k, lin in find_linears(block).items():
            name = f"{prefix}.{i}.{k}"
            mk = masks.get(name)
            if mk is None:
                raise ConfigError(f"mask file has no mask for {name}")
            if tuple(mk.shape) != tuple(lin.weight.shape):
                raise ConfigError(f"mask for {name} has shape {tuple(mk.shape)}, the layer {tuple(lin.weight.shape)}")
            if cfg.sparsity.kind == "nm":
                n, m = cfg.sparsity.nm
                if not bool((mk.view(mk.shape[0], -1, m).sum(-1) == n).all()):
                    raise ConfigError(f"mask for {name} is not {n}:{m} along the input dimension")
            elif cfg.sparsity.kind == "unstructured" and not bool((mk.sum(1) == mk[0].sum()).all()):
                raise ConfigError(f"mask for {name} keeps different counts per row; slim stores equal counts")
