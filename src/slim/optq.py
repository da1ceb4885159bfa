"""OPTQ/GPTQ-style column-by-column quantization with error feedback, under a fixed sparsity mask.

Pure function: it knows only torch and the per-column quantizer it is given. Columns are processed
in blocks; each column's rounding (and pruning) error is spread over the columns not yet processed,
weighted by the inverse Hessian H = E[x^T x], so later columns compensate for earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def inverse_hessian_cholesky(h: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after relative damping (dead inputs get a unit diagonal)."""
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
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after heavy damping")


def optq(
    w: torch.Tensor,
    h: torch.Tensor,
    quantize_column: Callable[[torch.Tensor, int], torch.Tensor],
    mask: torch.Tensor | None = None,
    damping: float = 0.01,
    block_size: int = 128,
    hinv_chol: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the dense fake-quantized weight (pruned entries exactly zero) after error feedback.

    quantize_column(col, j) maps column j (d_out,) to its quantized-dequantized values; pruned entries
    (mask False) are set to zero and their error is compensated like rounding error. Pass `hinv_chol`
    (from `inverse_hessian_cholesky`) to reuse the factorization across calls on the same layer.
    """
    w = w.double().clone()
    d_out, d_in = w.shape
    u = hinv_chol if hinv_chol is not None else inverse_hessian_cholesky(h, damping)
    q = torch.zeros_like(w)
    for b0 in range(0, d_in, block_size):
        b1 = min(b0 + block_size, d_in)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = wb[:, j]
            qc = quantize_column(col.float(), b0 + j).double()
            if mask is not None:
                qc = qc * mask[:, b0 + j]
            q[:, b0 + j] = qc
            e = (col - qc) / ub[j, j]
            wb[:, j:] -= e[:, None] * ub[j, j:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q.float()
