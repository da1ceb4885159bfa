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

# The error-feedback pass's precision, its state and its factor of H^-1. float64: in float32 (as GPTQ implementations
# run) SmolLM2's default-recipe WikiText-2 perplexity went from 71.78 to 75.36 (docs/results/ablation, row
# best-fp32-feedback); layer 0's o_proj, whose error feedback removes all but 0.05 % of its error, ended 2.6x worse,
# with either the state or the factor in float32 (the other in float64), and equilibrating H did not help.
STATE_DTYPE = torch.float64


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
    """Whether the error-feedback column loop runs in slim's compiled CPU kernel (else in Python: same
    algorithm, ~10x slower at LLM layer sizes, equal to float rounding, not bit for bit)."""
    return _native_loop() is not None


def inverse_hessian_cholesky(h: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after relative damping (dead inputs get a unit diagonal)."""
    return damped_inverse_cholesky(h, damping)[0]


def upper_inverse_factor(h: torch.Tensor, chunk: int = 1024, flipped: bool = False) -> tuple[torch.Tensor, int]:
    """(U, info): U upper with U^T U = h^-1, without forming h^-1. With J the order reversal and J h J = C C^T,
    U = J C^-1 J: one Cholesky and one triangular inverse (by column chunks of the identity, skipping the
    inverse's zero upper part), ~2/3 n^3 against ~5/3 n^3 for Cholesky, inverse, Cholesky again. `flipped`: h is
    given as J h J already (saves a copy). info != 0: h is not positive definite (U is then garbage)."""
    c, info = torch.linalg.cholesky_ex(h if flipped else h.flip(0, 1))
    n = c.shape[0]
    inv = torch.zeros_like(c)  # peak: h, c and inv
    for j0 in range(0, n, chunk):
        j1 = min(j0 + chunk, n)
        rhs = torch.zeros(n - j0, j1 - j0, dtype=c.dtype, device=c.device)
        rhs[: j1 - j0].fill_diagonal_(1.0)
        inv[j0:, j0:j1] = torch.linalg.solve_triangular(c[j0:, j0:], rhs, upper=False)
    del c
    return inv.flip(0, 1), int(info)


def damped_inverse_cholesky(
    h: torch.Tensor, damping: float = 0.01, dtype: torch.dtype = STATE_DTYPE
) -> tuple[torch.Tensor, float]:
    """`inverse_hessian_cholesky` and the relative damping it reached: raised (0.1, 1, 10 more) while the
    factorization fails, with a warning, since a raised damping weakens the error feedback and should be seen.

    Factorized in `dtype` (float64 by default: see STATE_DTYPE). One copy of H in `dtype`, damped on its diagonal
    in place: a 70B MLP's H is 6.6 GB in float64."""
    d = torch.diagonal(h).double()
    dead = d == 0
    fixed = d + dead  # dead inputs: a unit diagonal
    mean = float(fixed.mean())
    hh = h.flip(0, 1).to(dtype)  # J H J: the one copy, damped on its (reversed) diagonal in place
    diag, fixed = torch.diagonal(hh), fixed.flip(0)
    diag.copy_(fixed + damping * mean)
    for extra in (0.0, 0.1, 1.0, 10.0):
        if extra:
            diag.copy_(fixed + (damping + extra + damping * extra) * mean)  # as damping the damped H again
        chol, info = upper_inverse_factor(hh, flipped=True)
        if info or not bool(torch.isfinite(torch.diagonal(chol)).all()):
            del chol
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
    errors: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Return (dense fake-quantized weight with pruned entries exactly zero, mask used), and with `errors` the
    scaled column errors E_s too: w - q = E_s U for the factor U used (what `lowrank.InverseFactor` reuses).

    quantize_column(col, j) maps column j (d_out,) to its quantized-dequantized values. With `mask`
    None and `nm` or `ratio` given, the mask is chosen during the pass (SparseGPT); with neither,
    nothing is pruned. Pass `hinv_chol` (from `inverse_hessian_cholesky`) to reuse the factorization.
    `on_block(b0, b1, cur)` is called at the start of each column block with the current (error-updated)
    values of columns b0.. onwards, so a quantizer can fit group parameters there as GPTQ does.
    `grid`, the same quantizer as `quantize_column` in parameter form, lets a block's column loop run in one
    compiled call: slim's C++ kernel on a CPU, its Triton kernel on a GPU (mask given); without it the loop runs
    in Python on the weight's device. Everything runs in STATE_DTYPE (float64, see there); the lazy update of the
    later columns (most of the work: d_out x d_in^2 multiply-adds) is one in-place GEMM per block.
    """
    w = w.to(STATE_DTYPE, copy=True)
    d_out, d_in = w.shape
    u = hinv_chol if hinv_chol is not None else inverse_hessian_cholesky(h, damping)
    u = u.to(device=w.device, dtype=STATE_DTYPE)
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
    scaled = torch.zeros_like(w) if errors else None
    block_loop = _block_loop(w.device) if grid is not None and not choose else None
    for b0 in range(0, d_in, block_size):
        b1 = min(b0 + block_size, d_in)
        wb = w[:, b0:b1].double()
        ub = u[b0:b1, b0:b1].double()
        d = torch.diagonal(ub)
        if choose and ratio is not None:
            # per-row budget for this block, spread so that the whole row keeps exactly total_keep
            k = round(total_keep * b1 / d_in) - kept_so_far
            kept_so_far += k
            mask[:, b0:b1] = _keep_top(wb**2 / d[None, :] ** 2, k)
        if on_block is not None:
            on_block(b0, b1, torch.cat([wb.float(), w[:, b1:]], dim=1))
        keep = None if choose and nm is not None else mask[:, b0:b1].double()
        if block_loop is not None:
            sc, z = grid.params(torch.arange(b0, b1, device=w.device))
            qb, err = block_loop(wb, ub, keep, sc, z, grid.bits)
        else:
            qb, err = torch.empty_like(wb), torch.empty_like(wb)
            for j in range(b1 - b0):
                if choose and nm is not None and j % nm[1] == 0:
                    n, m = nm
                    mask[:, b0 + j : b0 + j + m] = _keep_top(wb[:, j : j + m] ** 2 / d[None, j : j + m] ** 2, n)
                    keep = mask[:, b0:b1].double()
                col = wb[:, j]
                qc = quantize_column(col.float(), b0 + j).double().mul_(keep[:, j])
                qb[:, j] = qc
                e = (col - qc).div_(ub[j, j])
                wb[:, j:].addr_(e, ub[j, j:], alpha=-1)
                err[:, j] = e
        q[:, b0:b1] = qb
        err = err.to(STATE_DTYPE)
        if scaled is not None:
            scaled[:, b0:b1] = err
        w[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1)  # in place: BLAS writes the strided view directly
    q = q.float()  # the codes' values: exact in float32
    return (q, mask, scaled) if errors else (q, mask)


BlockLoop = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _block_loop(device: torch.device) -> BlockLoop | None:
    """The compiled column loop for weights on `device`: (wb, ub, keep, scale, zero, bits) -> (q, scaled errors),
    float64 in and out. None where there is none (the Python loop runs)."""
    if device.type == "cuda":
        try:
            from ..kernels.optq_triton import optq_block_triton
        except ImportError:  # no Triton: the Python loop
            return None
        return optq_block_triton
    native = _native_loop()
    if native is None:
        return None
    cpu, none = torch.device("cpu"), torch.empty(0)

    def run(wb: torch.Tensor, ub: torch.Tensor, keep: torch.Tensor, sc: torch.Tensor | None, z: torch.Tensor | None,
            bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        sc, z = (none if t is None else t.float().expand(wb.shape).to(cpu).contiguous() for t in (sc, z))
        return native.optq_block(wb.to(cpu).contiguous(), ub.to(cpu).contiguous(), keep.to(cpu).contiguous(),
                                 sc if bits else none, z, bits)

    return run
