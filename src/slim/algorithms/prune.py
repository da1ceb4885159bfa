"""Sparsity masks as pure torch functions. A mask is a bool tensor shaped like W (True = kept)."""

from __future__ import annotations

import torch

from .optq import optq


def saliency(w: torch.Tensor, sum_sq: torch.Tensor | None, method: str) -> torch.Tensor:
    """Per-weight importance: |W| (magnitude) or |W| * ||x_j||_2 (Wanda)."""
    s = w.abs().float()
    if method == "wanda":
        if sum_sq is None:
            raise ValueError("Wanda needs input statistics (sum of squares per input channel)")
        s = s * sum_sq.float().sqrt()[None, :]
    elif method != "magnitude":
        raise ValueError(f"unknown mask method {method!r}")
    return s


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns of each row."""
    rows, d_in = score.shape
    if d_in % m:
        raise ValueError(f"input width {d_in} is not divisible by M={m}")
    g = score.view(rows, d_in // m, m)
    idx = g.topk(n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(rows, d_in)


def unstructured_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Drop the lowest `ratio` of each output row (every row keeps the same count)."""
    rows, d_in = score.shape
    keep = d_in - int(d_in * ratio)
    idx = score.topk(keep, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True)


def make_mask(
    w: torch.Tensor, sum_sq: torch.Tensor | None, kind: str, method: str, n: int = 2, m: int = 4,
    ratio: float = 0.5,
) -> torch.Tensor:
    """Mask for one weight matrix: kind is 'nm', 'unstructured' or 'dense'."""
    if kind == "dense":
        return torch.ones_like(w, dtype=torch.bool)
    return make_mask_from_score(saliency(w, sum_sq, method), kind, n, m, ratio)


def make_mask_from_score(score: torch.Tensor, kind: str, n: int = 2, m: int = 4, ratio: float = 0.5) -> torch.Tensor:
    """Keep the highest scores under the pattern (N:M groups, or the same count in every row)."""
    if kind == "dense":
        return torch.ones_like(score, dtype=torch.bool)
    if kind == "nm":
        return nm_mask(score, n, m)
    if kind == "unstructured":
        return unstructured_mask(score, ratio)
    raise ValueError(f"unknown sparsity kind {kind!r}")


def sparsegpt_mask(
    w: torch.Tensor, gram: torch.Tensor, kind: str, n: int = 2, m: int = 4, ratio: float = 0.5,
    damping: float = 0.01, hinv_chol: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT's mask: chosen column block by column block by OBS saliency with error feedback."""
    if kind == "dense":
        return torch.ones_like(w, dtype=torch.bool)
    _, mask = optq(
        w, gram, lambda c, j: c, None, damping, hinv_chol=hinv_chol,
        nm=(n, m) if kind == "nm" else None, ratio=ratio if kind == "unstructured" else None,
    )
    return mask
