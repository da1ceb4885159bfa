"""OPTQ/GPTQ-style column-by-column quantization with error feedback, with a fixed or chosen mask.

Pure function: it knows only torch and the per-column quantizer it is given. Columns are processed
in blocks; each column's rounding (and pruning) error is spread over the columns not yet processed,
weighted by the inverse Hessian H = E[x^T x], so later columns compensate for earlier ones. When no
mask is given and a pattern is, the mask is chosen on the fly as SparseGPT does: by the OBS
saliency w^2 / [H^-1]_jj^2 of the error-updated weights (per group of M columns for N:M, per row
within each column block for a ratio, so every row keeps the same count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnGrid:
    """`quantize_column` in the form slim's native loop takes: b-bit rounding (as `quant.fake_quant`) with a
    scale, and optionally a zero point, per row and column. `params(cols)` gives both for the columns `cols`
    (indices into the weight as the caller knows it), each (d_out, len(cols)); bits 0 = no rounding."""

    bits: int
    params: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]


def _native_loop() -> ModuleType | None:
    from ..kernels.native import load

    mod = load()
    return mod if mod is not None and hasattr(mod, "optq_block") else None


def native_available() -> bool:
    """Whether the error-feedback column loop runs in slim's compiled kernel (else in Python: same
    algorithm, ~10x slower at LLM layer sizes, equal to float rounding, not bit for bit)."""
    return _native_loop() is not None


def inverse_hessian_cholesky(h: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after relative damping (dead inputs get a unit diagonal)."""
    return damped_inverse_cholesky(h, damping)[0]


def damped_inverse_cholesky(h: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, float]:
    """`inverse_hessian_cholesky` and the relative damping it reached: raised (0.1, 1, 10 more) while the
    factorization fails, with a warning, since a raised damping weakens the error feedback and should be seen."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damping * float(torch.diagonal(h).mean())
    for extra in (0.0, 0.1, 1.0, 10.0):
        try:
            hh = h.clone()
            hh[diag, diag] += extra * float(torch.diagonal(h).mean())
            inv = torch.cholesky_inverse(torch.linalg.cholesky(hh))
            chol = torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
        if extra:
            log.warning("error feedback: the %d x %d Hessian's Cholesky failed at damping %g; raised to %g",
                        h.shape[0], h.shape[1], damping, damping + extra)
        return chol, damping + extra
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after heavy damping")


@dataclass
class Feedback:
    """What the error-feedback pass reuses across calls for one layer: the Cholesky factor of H^-1
    (of the permuted H under act-order) and the column order."""

    chol: torch.Tensor
    perm: torch.Tensor | None = None
    damping: float | None = None  # the relative damping the factorization reached (above the configured one if raised)

    @classmethod
    def build(cls, gram: torch.Tensor, damping: float, act_order: bool) -> Feedback:
        perm = torch.argsort(torch.diagonal(gram), descending=True) if act_order else None
        chol, reached = damped_inverse_cholesky(gram if perm is None else gram[perm][:, perm], damping)
        return cls(chol, perm, reached)


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def optq(
    w: torch.Tensor,
    h: torch.Tensor | None,
    quantize_column: Callable[[torch.Tensor, int], torch.Tensor],
    mask: torch.Tensor | None = None,
    damping: float = 0.01,
    block_size: int = 128,
    hinv_chol: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    ratio: float | None = None,
    on_block: Callable[[int, int, torch.Tensor], None] | None = None,
    grid: ColumnGrid | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (dense fake-quantized weight with pruned entries exactly zero, mask used).

    quantize_column(col, j) maps column j (d_out,) to its quantized-dequantized values. With `mask`
    None and `nm` or `ratio` given, the mask is chosen during the pass (SparseGPT); with neither,
    nothing is pruned. Pass `hinv_chol` (from `inverse_hessian_cholesky`) to reuse the factorization.
    `on_block(b0, b1, cur)` is called at the start of each column block with the current (error-updated)
    values of columns b0.. onwards, so a quantizer can fit group parameters there as GPTQ does.
    `grid`, the same quantizer as `quantize_column` in parameter form, lets the column loop run in slim's
    compiled CPU kernel (mask given; also for weights on a GPU, block by block); without it, or without the
    kernel, the loop runs in Python on the weight's device.
    """
    w = w.double().clone()
    d_out, d_in = w.shape
    u = hinv_chol if hinv_chol is not None else inverse_hessian_cholesky(h, damping)
    choose = mask is None and (nm is not None or ratio is not None)
    if mask is None:
        mask = torch.ones_like(w, dtype=torch.bool)
    else:
        mask = mask.clone()
    if nm is not None and choose and block_size % nm[1]:
        block_size = nm[1] * max(1, block_size // nm[1])
    total_keep = d_in - int(d_in * ratio) if ratio is not None else d_in
    kept_so_far = 0
    q = torch.zeros_like(w)
    # the compiled loop also serves weights on a GPU: a block's columns go to the CPU and back, its update of the
    # later columns stays on the GPU (the Python loop launches ~10 small kernels a column: on an H200 that made
    # the default recipe's compression 6x the paper recipe's, against 1.6x on a CPU)
    native = _native_loop() if grid is not None and not choose else None
    cpu = torch.device("cpu")
    none = torch.empty(0)
    for b0 in range(0, d_in, block_size):
        b1 = min(b0 + block_size, d_in)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        d = torch.diagonal(ub)
        if choose and ratio is not None:
            # per-row budget for this block, spread so that the whole row keeps exactly total_keep
            k = round(total_keep * b1 / d_in) - kept_so_far
            kept_so_far += k
            mask[:, b0:b1] = _keep_top(wb**2 / d[None, :] ** 2, k)
        if on_block is not None:
            on_block(b0, b1, torch.cat([wb, w[:, b1:]], dim=1).float())
        keep = None if choose and nm is not None else mask[:, b0:b1].double()
        if native is not None:
            sc, z = (none if t is None else t.float().expand(wb.shape).to(cpu).contiguous()
                     for t in grid.params(torch.arange(b0, b1, device=w.device)))
            qb, err = native.optq_block(wb.to(cpu).contiguous(), ub.to(cpu).contiguous(), keep.to(cpu).contiguous(),
                                        sc if grid.bits else none, z, grid.bits)
            q[:, b0:b1], err = qb.to(w.device), err.to(w.device)
            w[:, b1:] -= err @ u[b0:b1, b1:]
            continue
        for j in range(b1 - b0):
            if choose and nm is not None and j % nm[1] == 0:
                n, m = nm
                mask[:, b0 + j : b0 + j + m] = _keep_top(wb[:, j : j + m] ** 2 / d[None, j : j + m] ** 2, n)
                keep = mask[:, b0:b1].double()
            col = wb[:, j]
            qc = quantize_column(col.float(), b0 + j).double().mul_(keep[:, j])
            q[:, b0 + j] = qc
            e = (col - qc).div_(ub[j, j])
            wb[:, j:].addr_(e, ub[j, j:], alpha=-1)
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q.float(), mask
