"""OPTQ's column loop over one block of columns as one Triton kernel: the error-feedback pass on a GPU without
a host round trip per block.

Why: the loop is sequential over a block's columns (each column's rounding error updates the columns after it)
but independent across rows. In Python on a GPU it launches ~10 small kernels a column (on an H200 that made the
default recipe 6x the paper recipe's time); sending each block to slim's C++ kernel on the host and back costs two
copies a block. Here one launch handles a block of up to 128 columns: a program owns BR rows and keeps their
BR x 128 tile in registers while it walks the columns; the block's row of the inverse-Hessian factor U is read
from memory (it is the same for every program, so L2 serves it). The lazy update of the later columns stays a
cuBLAS GEMM in `optq`. Arithmetic is float64, as the C++ kernel's (float32 error feedback moved SmolLM2's
perplexity by 5 %: slim.algorithms.optq.STATE_DTYPE); the rounding itself is float32 and half-to-even, as the
C++ kernel's `nearbyint` on float32 and `torch.round`. Runs on CPU tensors under TRITON_INTERPRET=1 (how CI tests
it).
May import: nothing from slim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 |x| < 2^22 half-to-even


@triton.jit
def _optq_block_kernel(w_ptr, u_ptr, k_ptr, s_ptr, z_ptr, q_ptr, e_ptr, R, B, qmin, qmax,
                       BR: tl.constexpr, BB: tl.constexpr, QUANT: tl.constexpr, HAS_Z: tl.constexpr,
                       MASKED: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BB)
    inside = (rows < R)[:, None] & (cols < B)[None, :]
    off = rows[:, None] * B + cols[None, :]
    w = tl.load(w_ptr + off, mask=inside, other=0.0)
    if QUANT:
        s = tl.load(s_ptr + off, mask=inside, other=1.0)
    if HAS_Z:
        z = tl.load(z_ptr + off, mask=inside, other=0.0)
    if MASKED:
        keep = tl.load(k_ptr + off, mask=inside, other=0.0)
    qs = tl.zeros([BR, BB], dtype=tl.float64)
    es = tl.zeros([BR, BB], dtype=tl.float64)
    for j in range(0, B):
        here = (cols == j)[None, :]
        c = tl.sum(tl.where(here, w, 0.0), axis=1)
        qc = c
        if QUANT:
            sj = tl.sum(tl.where(here, s, 0.0), axis=1)
            v = c.to(tl.float32) / sj
            v = (v + _ROUND) - _ROUND
            if HAS_Z:
                zj = tl.sum(tl.where(here, z, 0.0), axis=1)
                v = tl.minimum(tl.maximum(v + zj, qmin), qmax) - zj
            else:
                v = tl.minimum(tl.maximum(v, qmin), qmax)
            qc = (v * sj).to(tl.float64)
        if MASKED:
            qc = qc * tl.sum(tl.where(here, keep, 0.0), axis=1)
        urow = tl.load(u_ptr + j * B + cols, mask=(cols >= j) & (cols < B), other=0.0)
        ujj = tl.sum(tl.where(cols == j, urow, 0.0), axis=0)
        e = (c - qc) / ujj
        w = w - e[:, None] * urow[None, :]
        qs = tl.where(here, qc[:, None], qs)
        es = tl.where(here, e[:, None], es)
    tl.store(q_ptr + off, qs, mask=inside)
    tl.store(e_ptr + off, es, mask=inside)


def optq_block_triton(wb: torch.Tensor, ub: torch.Tensor, keep: torch.Tensor | None, scale: torch.Tensor | None,
                      zero: torch.Tensor | None, bits: int, rows_per_program: int = 16) -> tuple[torch.Tensor, ...]:
    """(q, scaled errors) of one block, as slim's C++ `optq_block`: wb (R, B) the block's current weights, ub (B, B)
    the block's diagonal block of U, keep (R, B) 0/1 or None, scale/zero broadcastable to (R, B) or None, bits 0 =
    no rounding. Returned in wb's dtype; wb is not modified."""
    r, b = wb.shape
    if b > 128:
        raise ValueError(f"optq_block_triton: a block has at most 128 columns, got {b}")
    f32 = dict(dtype=torch.float32, device=wb.device)
    f64 = dict(dtype=torch.float64, device=wb.device)

    def full(t: torch.Tensor | None, like: dict) -> torch.Tensor | None:
        return None if t is None else t.to(**like).expand(r, b).contiguous()

    w, u = wb.to(**f64, copy=True).contiguous(), ub.to(**f64).contiguous()
    k, s, z = full(keep, f64), full(scale, f32) if bits else None, full(zero, f32) if bits else None
    q, e = torch.empty_like(w), torch.empty_like(w)
    qmax = float(2 ** (bits - 1) - 1) if bits else 0.0
    _optq_block_kernel[(triton.cdiv(r, rows_per_program),)](
        w, u, w if k is None else k, w if s is None else s, w if z is None else z, q, e, r, b, -qmax - 1.0, qmax,
        BR=rows_per_program, BB=128, QUANT=s is not None, HAS_Z=z is not None, MASKED=k is not None, num_warps=4)
    return q.to(wb.dtype), e.to(wb.dtype)

