"""Evaluation: WikiText-2 perplexity as the paper computes it (zero-shot tasks live elsewhere)."""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LEAN_CHUNK = 512  # tokens per lean-path call: bounds the (chunk x vocabulary) fp32 logits


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, limit: int | None = None, device: str = "cpu",
    progress: bool = True, path: str = "eager",
) -> dict:
    """exp(mean NLL) over non-overlapping `seqlen` windows of one token stream (the tail is dropped).

    `path` "lean" runs each window through slim's C++ decoder (`slim.runtime.lean`) in chunks of `LEAN_CHUNK`
    tokens over its KV cache, as `slim generate` prefills: the figures of the path users decode with."""
    if path not in ("eager", "lean"):
        raise ValueError(f"unknown perplexity path {path!r}; choose eager or lean")
    lean = None
    if path == "lean":
        from ..runtime.lean import decoder_for

        lean = decoder_for(model)
        lean.reserve(seqlen)
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
        if lean is None:
            logits = model(x, use_cache=False).logits.float()
            nll_sum += float(nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        else:
            for c in range(0, seqlen, LEAN_CHUNK):
                logits = lean.forward(x[0, c:c + LEAN_CHUNK], c, all_logits=True)
                target = x[0, c + 1:c + LEAN_CHUNK + 1]
                nll_sum += float(nn.functional.cross_entropy(logits[: target.numel()], target, reduction="sum"))
        count += seqlen - 1
    ppl = math.exp(nll_sum / count)
    return {"ppl": ppl, "windows": n_windows, "seqlen": seqlen, "seconds": time.perf_counter() - t0, "path": path}
