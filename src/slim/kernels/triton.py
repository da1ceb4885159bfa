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
dense tile in registers (the two kept codes placed by selects on their positions, no gather; half the MMA work is
wasted, which a memory-bound layer affords), and for prefill a dequantization into a transient buffer plus cuBLAS.
Split-K adds fp32 partial sums with atomics. Arithmetic is fp32 throughout; only `tl.dot` takes 16-bit operands
(fp32 under the interpreter, which computes bf16 products wrongly). At decode sizes the kernels are bound by their
instruction count, not by memory: benchmarks/triton_sass.py counts it per weight from the sm_90 machine code, and
the shapes of the code below (tiles built as words x nibbles so that every shift is by a constant, the 2^23
dequantization trick) come from that count.
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
# how a 2:4 tile is built for `tl.dot` (see `_gemm_kernel`): "split4", "group" or "select"
EXPANSIONS = {"select": 0, "group": 1, "split4": 2}
EXPAND = "group"
# block sizes and warps, chosen by instructions per weight in the SASS (benchmarks/triton_sass.py) until a GPU
# measures them (benchmarks/gpu_runtime.py); the GEMM's BM follows the token count (16, 32 or 64)
GEMV_CONFIG = {"2:4": {"BN": 128, "BW": 8, "num_warps": 4}, "dense": {"BN": 64, "BW": 16, "num_warps": 4}}
GEMM_CONFIG = {"BN": 256, "BK": 64, "num_warps": 8}
DEQUANT_CONFIG = {"BN": 64, "BK": 64, "num_warps": 4}


@triton.jit
def _nibbles(words, shift_index):
    """The signed 4-bit codes (stored + 8) at nibble `shift_index` of each word, as fp32: the nibble is OR-ed into
    the mantissa of 2^23 and 2^23 + 8 subtracted, one logic operation and one add instead of a shift, a mask, a
    conversion and an add."""
    bits = ((words >> (shift_index * 4)) & 15) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _expand_tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k, n, N, KW, GROUP: tl.constexpr, HAS_Z: tl.constexpr):
    """The dense fp32 weights W[n, k] of a (BK, BN) 2:4 tile, built weight by weight (EXPAND "select": the
    slowest way, kept to measure against)."""
    w = k // 16
    m2 = (w < KW)[:, None] & (n < N)[None, :]
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
    if GROUP > 0:
        g = k // GROUP
        if HAS_Z:
            v = v - tl.load(z_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
        v = v * tl.load(s_ptr + g[:, None] * N + n[None, :], mask=m2, other=0.0)
    return tl.where(kept, v, 0.0)


@triton.jit
def _dense_tile(qv_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BK: tl.constexpr):
    """The (BK, BN) fp32 tile of a dense int4 matrix from input k0 (a multiple of 8): built as (words, 8, n), every
    shift by a constant, then flattened."""
    w3 = (k0 // 8 + tl.arange(0, BK // 8))[:, None, None]
    i3 = tl.arange(0, 8)[None, :, None]
    n3 = n[None, None, :]
    m3 = (w3 < KW) & (n3 < N)
    v = _nibbles(tl.load(qv_ptr + w3 * N + n3, mask=m3, other=0), i3)
    if GROUP > 0:  # a group holds whole words
        g = (w3 * 8) // GROUP
        if HAS_Z:
            v = v - tl.load(z_ptr + g * N + n3, mask=m3, other=0.0)
        v = v * tl.load(s_ptr + g * N + n3, mask=m3, other=0.0)
    return tl.reshape(v, (BK, n.shape[0]))


@triton.jit
def _kept_pairs(qv_ptr, qp_ptr, s_ptr, z_ptr, g0, n, N, KW, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                BG: tl.constexpr):
    """For the BG input groups (of 4) from g0 (a multiple of 4) and outputs `n` of a 2:4 matrix: the two kept values
    (scaled, fp32) and their positions, each (BG, len(n)); p0 < p1. Built as (words, 4, n) so that every shift is
    by a constant (a group's byte of its word), then flattened."""
    w3 = (g0 // 4 + tl.arange(0, BG // 4))[:, None, None]
    b3 = tl.arange(0, 4)[None, :, None]  # the group's index inside its word
    n3 = n[None, None, :]
    m3 = (w3 < KW) & (n3 < N)
    words = tl.load(qv_ptr + w3 * N + n3, mask=m3, other=0)
    pw = tl.load(qp_ptr + w3 * N + n3, mask=m3, other=0).to(tl.int32)
    c0 = _nibbles(words, b3 * 2)
    c1 = _nibbles(words, b3 * 2 + 1)
    p0 = (pw >> (b3 * 4)) & 3
    p1 = (pw >> (b3 * 4 + 2)) & 3
    if GROUP > 0:  # a scale group holds whole words
        g = (w3 * 16) // GROUP
        if HAS_Z:
            z = tl.load(z_ptr + g * N + n3, mask=m3, other=0.0)
            c0 = c0 - z
            c1 = c1 - z
        sc = tl.load(s_ptr + g * N + n3, mask=m3, other=0.0)
        c0 = c0 * sc
        c1 = c1 * sc
    shape: tl.constexpr = (BG, n.shape[0])
    return tl.reshape(c0, shape), tl.reshape(c1, shape), tl.reshape(p0, shape), tl.reshape(p1, shape)


@triton.jit
def _position(c0, c1, p0, p1, J: tl.constexpr):
    """The weight at position J of each input group: p0 < p1, so position 0 can only hold c0 and 3 only c1."""
    if J == 0:
        v = tl.where(p0 == 0, c0, 0.0)
    elif J == 3:
        v = tl.where(p1 == 3, c1, 0.0)
    else:
        v = tl.where(p0 == J, c0, tl.where(p1 == J, c1, 0.0))
    return v


@triton.jit
def _expand_tile_grouped(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                         BK: tl.constexpr):
    """`_expand_tile` for a 2:4 tile starting at input k0, one input group of 4 at a time: the two kept codes are
    extracted, scaled and placed once per group (not once per dense weight), then the (BK/4, 4, BN) tile is
    flattened to (BK, BN)."""
    c0, c1, p0, p1 = _kept_pairs(qv_ptr, qp_ptr, s_ptr, z_ptr, k0 // 4, n, N, KW, GROUP, HAS_Z, BK // 4)
    j = tl.arange(0, 4)[None, :, None]
    v = tl.where(j == p0[:, None, :], c0[:, None, :], tl.where(j == p1[:, None, :], c1[:, None, :], 0.0))
    return tl.reshape(v, (BK, v.shape[2]))


@triton.jit
def _tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, SPARSE: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
          EXPAND: tl.constexpr, BK: tl.constexpr):
    """The (BK, BN) fp32 weight tile from input k0: dense int4, or 2:4 built per group (EXPAND 1) or per weight."""
    if not SPARSE:
        w = _dense_tile(qv_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP, HAS_Z, BK)
    elif EXPAND == 1:
        w = _expand_tile_grouped(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, GROUP, HAS_Z, BK)
    else:
        w = _expand_tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k0 + tl.arange(0, BK), n, N, KW, GROUP, HAS_Z)
    return w


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
                 HAS_ACC: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, BN: tl.constexpr,
                 BW: tl.constexpr):
    """y[m, n] for one row m of x: program (n block, k split, m). Sparse: only the kept values are multiplied, each
    by the activation at its position (a gather from x, which stays in L1)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    nm = n < N
    # everything in one 3-D layout (word, nibble, output) from the loads on: no layout conversion in the loop
    n3 = n[None, None, :]
    i3 = tl.arange(0, 8)[None, :, None]
    xrow = x_ptr + pid_m * K
    acc3 = tl.zeros([BW, 8, BN], dtype=tl.float32)  # reduced once at the end, not across threads every step
    w_start = pid_k * WORDS_PER_SPLIT
    for i in range(0, WORDS_PER_SPLIT, BW):  # from 0, not w_start: older interpreters take no tensor bound
        w3 = (w_start + i + tl.arange(0, BW))[:, None, None]
        m3 = (w3 < KW) & (n3 < N)
        # a word past the end reads as eight zero-valued codes (0x88888888)
        words = tl.load(qv_ptr + w3 * N + n3, mask=m3, other=-2004318072)  # (BW, 1, BN)
        v = _nibbles(words, i3)  # (BW, 8, BN)
        if SPARSE:
            pw = tl.load(qp_ptr + w3 * N + n3, mask=m3, other=0).to(tl.int32)
            first_input = w3 * 16
            if EVEN_K:  # every gathered index is inside x: no mask per weight (a word past the end reads x[K-16:])
                k = tl.minimum(first_input, K - 16) + (i3 // 2) * 4 + ((pw >> (i3 * 2)) & 3)
                xv = tl.load(xrow + k).to(tl.float32)
            else:
                k = first_input + (i3 // 2) * 4 + ((pw >> (i3 * 2)) & 3)
                xv = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)
        else:
            k = w3 * 8 + i3
            xv = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)
            first_input = w3 * 8
        if GROUP > 0:  # a group holds whole words, so its index does not depend on the positions
            g = first_input // GROUP
            if HAS_Z:
                v = v - tl.load(z_ptr + g * N + n3, mask=m3, other=0.0)
            v = v * tl.load(s_ptr + g * N + n3, mask=m3, other=0.0)
        acc3 += v * xv
    acc = tl.sum(tl.sum(acc3, axis=1), axis=0)
    _epilogue(acc, y_ptr, acc_ptr, b_ptr, ts_ptr, pid_m * N + n, nm, n, nm, pid_k == 0, GROUP, HAS_BIAS, HAS_ACC,
              ATOMIC)


@triton.jit
def _gemm_kernel(x_ptr, qv_ptr, qp_ptr, s_ptr, z_ptr, ts_ptr, b_ptr, acc_ptr, y_ptr, M, N, K, KW, K_PER_SPLIT,
                 SPARSE: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ACC: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, EXPAND: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y = x @ W^T for a few rows of x, through `tl.dot` on weight tiles built in registers. A 2:4 tile, with
    EXPAND = 2 ("split4"): four (BK/4, BN) tiles, one per position in the input groups, each times the matching
    strided columns of x (x[:, 4g + j]), so each kept value is placed by two selects and nothing is reshaped;
    1 ("group"): one (BK, BN) tile built per group and flattened; 0 ("select"): built weight by weight."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for i in range(0, K_PER_SPLIT, BK):
        k0 = k_start + i
        if SPARSE and EXPAND == 2:
            gi = k0 // 4 + tl.arange(0, BK // 4)
            c0, c1, p0, p1 = _kept_pairs(qv_ptr, qp_ptr, s_ptr, z_ptr, k0 // 4, n, N, KW, GROUP, HAS_Z, BK // 4)
            xg = x_ptr + m[:, None] * K + (gi * 4)[None, :]
            xm = (m[:, None] < M) & ((gi * 4)[None, :] < K)
            for j in tl.static_range(4):
                xj = tl.load(xg + j, mask=xm, other=0.0)
                acc = tl.dot(xj.to(DOT), _position(c0, c1, p0, p1, j).to(DOT), acc)
        else:
            k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            w = _tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, SPARSE, GROUP, HAS_Z, EXPAND, BK)
            acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    offs = m[:, None] * N + n[None, :]
    mask = (m[:, None] < M) & (n[None, :] < N)
    _epilogue(acc, y_ptr, acc_ptr, b_ptr, ts_ptr, offs, mask, n[None, :], (n < N)[None, :], pid_k == 0, GROUP,
              HAS_BIAS, HAS_ACC, ATOMIC)


@triton.jit
def _dequant_kernel(qv_ptr, qp_ptr, s_ptr, z_ptr, ts_ptr, out_ptr, N, K, KW, SPARSE: tl.constexpr,
                    GROUP: tl.constexpr, HAS_Z: tl.constexpr, EXPAND: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
    """W^T (K, N) in the activations' dtype, for a cuBLAS GEMM over many tokens (prefill)."""
    k0 = tl.program_id(0) * BK
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    scale = tl.load(ts_ptr) if GROUP == 0 else 1.0
    if SPARSE and EXPAND == 2:  # four strided row sets, one per position in the input groups
        gi = k0 // 4 + tl.arange(0, BK // 4)
        c0, c1, p0, p1 = _kept_pairs(qv_ptr, qp_ptr, s_ptr, z_ptr, k0 // 4, n, N, KW, GROUP, HAS_Z, BK // 4)
        for j in tl.static_range(4):
            kj = gi * 4 + j
            mask = (kj[:, None] < K) & (n[None, :] < N)
            v = _position(c0, c1, p0, p1, j) * scale
            tl.store(out_ptr + kj[:, None] * N + n[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        k = k0 + tl.arange(0, BK)
        w = _tile(qv_ptr, qp_ptr, s_ptr, z_ptr, k0, n, N, KW, SPARSE, GROUP, HAS_Z, EXPAND, BK)
        mask = (k[:, None] < K) & (n[None, :] < N)
        tl.store(out_ptr + k[:, None] * N + n[None, :], (w * scale).to(out_ptr.dtype.element_ty), mask=mask)


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
        y = x @ dequantize_t(qv, qp, gscale, gzero, tscale, k, group, x.dtype)
        if bias is not None:
            y += bias.to(y.dtype)
        if acc is not None:
            y += acc
        return y
    if name == "gemv":
        cfg = GEMV_CONFIG["2:4" if sparse else "dense"]
        bn, bw, warps = cfg["BN"], cfg["BW"], cfg["num_warps"]
        splits = split_k or gemv_splits(n, kw, x.device, bn, bw)
        per = triton.cdiv(triton.cdiv(kw, splits), bw) * bw
        splits = triton.cdiv(kw, per)
        grid = (triton.cdiv(n, bn), splits, m)
        extra = dict(BN=bn, BW=bw, EVEN_K=k % 16 == 0 and k >= 16)
        sizes = (n, k, kw, per)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn, bk, warps = GEMM_CONFIG["BN"], GEMM_CONFIG["BK"], GEMM_CONFIG["num_warps"]
        splits = split_k or gemm_splits(m, n, k, x.device, bm, bn, bk)
        per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        splits = triton.cdiv(k, per)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
        extra = dict(DOT=_dot_dtype(x.dtype), EXPAND=EXPANSIONS[EXPAND], BM=bm, BN=bn, BK=bk)
        sizes = (m, n, k, kw, per)
    atomic = splits > 1
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else torch.empty(m, n, dtype=x.dtype,
                                                                                          device=x.device)
    kernel = _gemv_kernel if name == "gemv" else _gemm_kernel
    kernel[grid](x, *ptrs, y, *sizes, HAS_BIAS=bias is not None, HAS_ACC=acc is not None, ATOMIC=atomic,
                 num_warps=warps, **flags, **extra)
    return y.to(x.dtype) if atomic else y


def dequantize_t(qv: torch.Tensor, qp: torch.Tensor | None, gscale: torch.Tensor | None, gzero: torch.Tensor | None,
                 tscale: torch.Tensor | None, k: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """W^T (K, N) in `dtype`: what the prefill path multiplies by (for tests and the benchmark)."""
    n = qv.shape[1]
    wt = torch.empty(k, n, dtype=dtype, device=qv.device)
    ptrs = _args(qv, qp, gscale, gzero, tscale, None, None, qv)
    bn, bk = DEQUANT_CONFIG["BN"], DEQUANT_CONFIG["BK"]
    _dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        *ptrs[:5], wt, n, k, qv.shape[0], SPARSE=qp is not None, GROUP=group if gscale is not None else 0,
        HAS_Z=gzero is not None, EXPAND=EXPANSIONS[EXPAND], BN=bn, BK=bk, num_warps=DEQUANT_CONFIG["num_warps"])
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
