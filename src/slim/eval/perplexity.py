"""Evaluation: WikiText-2 perplexity as the paper computes it (zero-shot tasks live elsewhere)."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, limit: int | None = None, device: str = "cpu",
    progress: bool = True,
) -> dict:
    """exp(mean NLL) over non-overlapping `seqlen` windows of one token stream (the tail is dropped)."""
    ids = ids.reshape(1, -1)
    n_windows = ids.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    if limit:
        n_windows = min(n_windows, limit)
    t0 = time.perf_counter()
    nll_sum, count = 0.0, 0
    for i in tqdm(range(n_windows), desc="perplexity", unit="window", disable=not progress):
        x = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
        logits = model(x, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll_sum += float(loss)
        count += seqlen - 1
    ppl = math.exp(nll_sum / count)
    return {"ppl": ppl, "windows": n_windows, "seqlen": seqlen, "seconds": time.perf_counter() - t0}
