"""The Python entry point: `slim.compress(model, config)`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .pipeline import compress_model
from .config import CompressConfig
from .data import calibration_ids, read_texts
from .models import check_compressible, family_of, load_model

log = logging.getLogger(__name__)


def compress(
    model: nn.Module | str | None, config: CompressConfig | None = None, tokenizer=None,
    data_dir: str | os.PathLike | None = None, progress: bool = True,
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Compress a model (object, local path, hub id, or None for the bundled SmolLM2) in place.

    Returns (model, tokenizer, metadata) where metadata holds the resolved config, data hashes
    and the compression report; pass it to `slim.save` to record it next to the checkpoint.
    """
    cfg = config or CompressConfig()
    source: dict[str, Any] = {}
    if model is None or isinstance(model, str):
        model, tokenizer, source = load_model(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer along with a model object")
    family_of(model)
    check_compressible(model, cfg)
    torch.manual_seed(cfg.calib.seed)
    texts, prov = read_texts(cfg.calib.data, data_dir)
    ids = calibration_ids(tokenizer, texts, cfg.calib.n_samples, cfg.calib.seqlen, cfg.calib.seed)
    report = compress_model(model, ids, cfg, progress=progress, masks=masks)
    meta = {"source": source, "config": cfg.to_dict(), "calibration_data": prov, "report": report}
    return model, tokenizer, meta
