"""Triton kernels for 4-bit weights, 2:4-sparse or dense, and their `torch.library` ops (`slim::int4_mm`).

Imported only where Triton is installed (`cuda_int4` checks first). The kernels know nothing of `SlimLinear`: they
take the kernel layout that `cuda_int4` builds from the stored one, all K-major so that a program's loads along the
output dimension are coalesced:
  qv     int32 (KW, N)  4-bit codes + 8, nibble i of word w: for 2:4, kept slot 8w+i (16 inputs a word: slots 2j
                        and 2j+1 are the two kept weights of input group j); dense, input 8w+i (8 inputs a word)
  qp     int16 (KW, N)  2:4 only: bits 2i..2i+1 of word w, the position (0-3) of kept slot 8w+i in its group of 4
  gscale fp32 (G, N)    group scales (group size `group`, a multiple of the inputs a word) or None
  gzero  fp32 (G, N)    zero points in code space (a weight is (c - 8 - z) * s) or None
  tscale fp32 (1,)      the per-tensor scale (when there are no group scales), applied to the output
Three paths, chosen by the token count: a GEMV on CUDA cores over the kept values only (each kept code times the
activation at its position; a pruned weight costs nothing), a `tl.dot` GEMM that expands each group of 4 into a
dense tile in registers (a select on the position, no gather; half the MMA work is wasted, which a memory-bound
layer affords), and for prefill a dequantization into a transient buffer plus cuBLAS. Split-K adds fp32 partial
sums with atomics. Arithmetic is fp32 throughout; only `tl.dot` takes 16-bit operands (fp32 under the interpreter,
which computes bf16 products wrongly).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PATHS = {"auto": 0, "gemv": 1, "gemm": 2, "dense": 3}
# the crossovers between the paths, in tokens (rows of x); benchmarks/gpu_runtime.py measures them
GEMV_MAX_TOKENS = 1
GEMM_MAX_TOKENS = 64
# how a 2:4 tile is expanded for `tl.dot`: "group" (per input group of 4, then flattened) or "select" (per weight)
EXPAND = "group"


@triton.jit
def _expand_tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k, n, N, KW, SPARSE: tl.constexpr, GROUP: tl.constexpr,
                 HAS_Z: tl.constexpr):
    """The dense fp32 weights W[n, k] of a (BK, BN) tile: codes expanded, positions selected, groups applied."""
    nm = n < N
    if SPARSE:
        w = k // 16
        m2 = (w < KW)[:, None] & nm[None, :]
        words = tl.load(qv_ptr + w[:, None] * N + n[None, :], mask=m2, other=0)
        pw = tl.load(qp_ptr + w[:, None] * N + n[None, :], mask=m2, other=0).to(tl.int32)
        sh = (k >> 2) & 3  # the input group's index inside its word
        c0 = (words >> (sh * 8)[:, None]) & 15
        c1 = (words >> (sh * 8 + 4)[:, None]) & 15
        p0 = (pw >> (sh * 4)[:, None]) & 3
        p1 = (pw >> (sh * 4 + 2)[:, None]) & 3
        j = (k & 3)[:, None]
        kept = (j == p0) | (j == p1)
        v = tl.where(j == p0, c0, c1).to(tl.float32) - 8.0
    else:
        w = k // 8
        m2 = (w < KW)[:, None] & nm[None, :]
        words = tl.load(qv_ptr + w[:, None] * N + n[None, :], mask=m2, other=0)
        v = ((words >> ((k % 8) * 4)[:, None]) & 15).to(tl.float32) - 8.0
    if GROUP > 0:
        g = k // GROUP
        if HAS_Z:
            v = v - tl.load(z_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
        v = v * tl.load(s_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
    if SPARSE:
        v = tl.where(kept, v, 0.0)
    return v


@triton.jit
def _expand_tile_grouped(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                         BK: tl.constexpr):
    """`_expand_tile` for a 2:4 tile starting at input k0, one input group of 4 at a time: the two kept codes are
    extracted, scaled and placed once per group (not once per dense weight), then the (BK/4, 4, BN) tile is
    flattened to (BK, BN). Fewer integer operations a weight; whether the flattening costs more on a GPU is
    what benchmarks/gpu_runtime.py's variant rows measure."""
    nm = n < N
    gi = k0 // 4 + tl.arange(0, BK // 4)  # input groups of this tile
    w = gi // 4
    m2 = (w < KW)[:, None] & nm[None, :]
    words = tl.load(qv_ptr + w[:, None] * N + n[None, :], mask=m2, other=0)
    pw = tl.load(qp_ptr + w[:, None] * N + n[None, :], mask=m2, other=0).to(tl.int32)
    sh = (gi & 3)[:, None]
    c0 = ((words >> (sh * 8)) & 15).to(tl.float32) - 8.0
    c1 = ((words >> (sh * 8 + 4)) & 15).to(tl.float32) - 8.0
    p0 = (pw >> (sh * 4)) & 3
    p1 = (pw >> (sh * 4 + 2)) & 3
    if GROUP > 0:  # a scale group holds whole input groups
        g = (gi * 4) // GROUP
        if HAS_Z:
            z = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
            c0 = c0 - z
            c1 = c1 - z
        sc = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
        c0 = c0 * sc
        c1 = c1 * sc
    j = tl.arange(0, 4)[None, :, None]
    v = tl.where(j == p0[:, None, :], c0[:, None, :], tl.where(j == p1[:, None, :], c1[:, None, :], 0.0))
    return tl.reshape(v, (BK, v.shape[2]))


@triton.jit
def _epilogue(acc, y_ptr, acc_ptr, b_ptr, ts_ptr, offs, mask, n, nm, first, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_ACC: tl.constexpr, ATOMIC: tl.constexpr):
    """Per-tensor scale, bias and an added tensor (the adapters' accumulation), then store or atomically add."""
    if GROUP == 0:
        acc = acc * tl.load(ts_ptr)
    if ATOMIC:  # split-K: fp32 partial sums; the first split adds the bias and the added tensor
        if HAS_BIAS:
            acc += tl.where(first, tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32), 0.0)
        if HAS_ACC:
            acc += tl.where(first, tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
        tl.atomic_add(y_ptr + offs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        if HAS_ACC:
            acc += tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, qv_ptr, qp_ptr, s_ptr, z_ptr, ts_ptr, b_ptr, acc_ptr, y_ptr, N, K, KW, WORDS_PER_SPLIT,
                 SPARSE: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ACC: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """y[m, n] for one row m of x: program (n block, k split, m). Sparse: only the kept values are multiplied, each
    by the activation at its position (a gather from x, which stays in L1)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    nm = n < N
    i8 = tl.arange(0, 8)
    xrow = x_ptr + pid_m * K
    acc = tl.zeros([BN], dtype=tl.float32)
    w_start = pid_k * WORDS_PER_SPLIT
    for i in range(0, WORDS_PER_SPLIT, BW):  # from 0, not w_start: older interpreters take no tensor bound
        w = w_start + i + tl.arange(0, BW)
        m2 = (w < KW)[:, None] & nm[None, :]
        words = tl.load(qv_ptr + w[:, None] * N + n[None, :], mask=m2, other=0)
        v = ((words[:, None, :] >> (i8 * 4)[None, :, None]) & 15).to(tl.float32) - 8.0  # (BW, 8, BN)
        if SPARSE:
            pw = tl.load(qp_ptr + w[:, None] * N + n[None, :], mask=m2, other=0).to(tl.int32)
            pos = (pw[:, None, :] >> (i8 * 2)[None, :, None]) & 3
            k = (w * 16)[:, None, None] + ((i8 // 2) * 4)[None, :, None] + pos
            xv = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)
            first_input = w * 16
        else:
            k = (w * 8)[:, None] + i8[None, :]
            xv = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)[:, :, None]
            first_input = w * 8
        if GROUP > 0:  # a group holds whole words, so its index does not depend on the positions
            g = first_input // GROUP
            if HAS_Z:
                v = v - tl.load(z_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)[:, None, :]
            v = v * tl.load(s_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)[:, None, :]
        acc += tl.sum(tl.sum(v * xv, axis=1), axis=0)
    _epilogue(acc, y_ptr, acc_ptr, b_ptr, ts_ptr, pid_m * N + n, nm, n, nm, pid_k == 0, GROUP, HAS_BIAS, HAS_ACC,
              ATOMIC)


@triton.jit
def _gemm_kernel(x_ptr, qv_ptr, qp_ptr, s_ptr, z_ptr, ts_ptr, b_ptr, acc_ptr, y_ptr, M, N, K, KW, K_PER_SPLIT,
                 SPARSE: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ACC: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, GROUPED: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y = x @ W^T for a few rows of x: each (BK, BN) weight tile is expanded to dense in registers for `tl.dot`."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for i in range(0, K_PER_SPLIT, BK):
        k0 = k_start + i
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        if SPARSE and GROUPED:
            w = _expand_tile_grouped(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP, HAS_Z, BK)
        else:
            w = _expand_tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k, n, N, KW, SPARSE, GROUP, HAS_Z)
        acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    offs = m[:, None] * N + n[None, :]
    mask = (m[:, None] < M) & (n[None, :] < N)
    _epilogue(acc, y_ptr, acc_ptr, b_ptr, ts_ptr, offs, mask, n[None, :], (n < N)[None, :], pid_k == 0, GROUP,
              HAS_BIAS, HAS_ACC, ATOMIC)


@triton.jit
def _dequant_kernel(qv_ptr, qp_ptr, s_ptr, z_ptr, ts_ptr, out_ptr, N, K, KW, SPARSE: tl.constexpr,
                    GROUP: tl.constexpr, HAS_Z: tl.constexpr, GROUPED: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    """W^T (K, N) in the activations' dtype, for a cuBLAS GEMM over many tokens (prefill)."""
    k0 = tl.program_id(0) * BK
    k = k0 + tl.arange(0, BK)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    if SPARSE and GROUPED:
        w = _expand_tile_grouped(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP, HAS_Z, BK)
    else:
        w = _expand_tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k, n, N, KW, SPARSE, GROUP, HAS_Z)
    if GROUP == 0:
        w = w * tl.load(ts_ptr)
    mask = (k[:, None] < K) & (n[None, :] < N)
    tl.store(out_ptr + k[:, None] * N + n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------ launchers


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    if INTERPRET or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def gemv_splits(n: int, kw: int, device: torch.device, bn: int = 64, bw: int = 8) -> int:
    """Split-K for the GEMV: enough programs for about four a multiprocessor, at least `bw` words a split."""
    programs = triton.cdiv(n, bn)
    return max(1, min(triton.cdiv(kw, bw), triton.cdiv(4 * _sm_count(device), programs)))


def gemm_splits(m: int, n: int, k: int, device: torch.device, bm: int, bn: int, bk: int) -> int:
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(triton.cdiv(k, bk), triton.cdiv(2 * _sm_count(device), programs)))


def _args(qv, qp, gscale, gzero, tscale, bias, acc, x):  # noqa: ANN001, ANN202 - pointers or a dummy for absent ones
    dummy = x
    return (qv, dummy if qp is None else qp, dummy if gscale is None else gscale, dummy if gzero is None else gzero,
            dummy if tscale is None else tscale, dummy if bias is None else bias, dummy if acc is None else acc)


def choose_path(tokens: int) -> str:
    if tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    return "gemm" if tokens <= GEMM_MAX_TOKENS else "dense"


def int4_mm_impl(x: torch.Tensor, qv: torch.Tensor, qp: torch.Tensor | None, gscale: torch.Tensor | None,
                 gzero: torch.Tensor | None, tscale: torch.Tensor | None, bias: torch.Tensor | None,
                 acc: torch.Tensor | None, group: int, path: int = 0, split_k: int = 0) -> torch.Tensor:
    """x (M, K) @ W^T (+ bias) (+ acc) -> (M, N) in x's dtype; `path` 0 picks by M, `split_k` 0 picks by shape."""
    m, k = x.shape
    n = qv.shape[1]
    kw = qv.shape[0]
    sparse = qp is not None
    x = x.contiguous()
    name = choose_path(m) if path == 0 else next(p for p, i in PATHS.items() if i == path)
    flags = dict(SPARSE=sparse, GROUP=group if gscale is not None else 0, HAS_Z=gzero is not None)
    ptrs = _args(qv, qp, gscale, gzero, tscale, bias, acc, x)
    if name == "dense":
        bn, bk = 64, 64
        wt = torch.empty(k, n, dtype=x.dtype, device=x.device)
        _dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](*ptrs[:5], wt, n, k, kw, GROUPED=EXPAND == "group",
                                                                 BN=bn, BK=bk, **flags)
        y = x @ wt
        if bias is not None:
            y += bias.to(y.dtype)
        if acc is not None:
            y += acc
        return y
    if name == "gemv":
        bn, bw = 64, 8
        splits = split_k or gemv_splits(n, kw, x.device, bn, bw)
        per = triton.cdiv(triton.cdiv(kw, splits), bw) * bw
        splits = triton.cdiv(kw, per)
        grid = (triton.cdiv(n, bn), splits, m)
        extra = dict(BN=bn, BW=bw)
        sizes = (n, k, kw, per)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn, bk = 64, 64
        splits = split_k or gemm_splits(m, n, k, x.device, bm, bn, bk)
        per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        splits = triton.cdiv(k, per)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
        extra = dict(DOT=_dot_dtype(x.dtype), GROUPED=EXPAND == "group", BM=bm, BN=bn, BK=bk)
        sizes = (m, n, k, kw, per)
    atomic = splits > 1
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else torch.empty(m, n, dtype=x.dtype,
                                                                                          device=x.device)
    kernel = _gemv_kernel if name == "gemv" else _gemm_kernel
    kernel[grid](x, *ptrs, y, *sizes, HAS_BIAS=bias is not None, HAS_ACC=acc is not None, ATOMIC=atomic,
                 **flags, **extra)
    return y.to(x.dtype) if atomic else y


def dequantize_t(qv: torch.Tensor, qp: torch.Tensor | None, gscale: torch.Tensor | None, gzero: torch.Tensor | None,
                 tscale: torch.Tensor | None, k: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """W^T (K, N) in `dtype`: what the prefill path multiplies by (for tests and the benchmark)."""
    n = qv.shape[1]
    wt = torch.empty(k, n, dtype=dtype, device=qv.device)
    ptrs = _args(qv, qp, gscale, gzero, tscale, None, None, qv)
    _dequant_kernel[(triton.cdiv(k, 64), triton.cdiv(n, 64))](*ptrs[:5], wt, n, k, qv.shape[0], SPARSE=qp is not None,
                                                              GROUP=group if gscale is not None else 0,
                                                              HAS_Z=gzero is not None, GROUPED=EXPAND == "group",
                                                              BN=64, BK=64)
    return wt


# ------------------------------------------------------------------ the op torch.compile sees


@torch.library.custom_op("slim::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, qv: torch.Tensor, qp: torch.Tensor | None, gscale: torch.Tensor | None,
            gzero: torch.Tensor | None, tscale: torch.Tensor | None, bias: torch.Tensor | None,
            acc: torch.Tensor | None, group: int, path: int = 0) -> torch.Tensor:
    """x (M, K) @ W^T (+ bias) (+ acc) through slim's Triton kernels (layout: this module's docstring)."""
    return int4_mm_impl(x, qv, qp, gscale, gzero, tscale, bias, acc, group, path)


@int4_mm.register_fake
def _(x, qv, qp, gscale, gzero, tscale, bias, acc, group, path=0):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], qv.shape[1])
