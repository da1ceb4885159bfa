"""`cpu-int4`: int4 kernels on the CPU, converted from the stored layout (format 1) at load time.

Two kernels, chosen per layer:
- slim's own (kernels/csrc, built on first use; see `kernels.native`): activations are quantized to int8 with one scale
  per 16 inputs inside the call (llama.cpp's Q8_0 scheme at half its block; below bf16 rounding) so a block of 32
  weights costs one `maddubs`. A 2:4 layer is read in its stored form, 3 bits a weight (kept codes + 2-bit
  positions, the kept activations gathered with a byte shuffle); other layouts as dense int4 with pruned slots at
  zero. Scales stay fp32, group scales per stored group, zero points exact. Base weight and adapters run in one
  call.
- PyTorch's `_weight_int4pack_mm_for_cpu`, where slim's cannot be built: codes c become nibbles q = c + 8, a pruned
  slot the nibble that dequantizes to 0 (8, or z + 8 with a zero point); the kernel computes
  w = (q - 8) * scale + zero per group of 32-256 inputs with bf16 activations, so group scales are rounded to bf16
  and a per-tensor scale is applied to the output in fp32 (exact); int4 adapters run through the same kernel (rank
  padded with zero rows to a multiple of 32, which changes nothing).
fp16 (or non-4-bit) adapters run as fp32 matmuls. From `gemm_min_tokens` tokens on, a layer dequantizes its weight
into a transient buffer and runs a GEMM instead (bf16 where the CPU has native bf16, else fp32), one layer at a
time; benchmarks/runtime_layers.py measures where that pays.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

import slim.kernels.native as native  # the submodules, not the package: imports point one way
import slim.kernels.ops as ops

from ..algorithms.quant import expand_groups, n_groups
from ..format.packed import SlimLinear, layer_inputs, unpack_bits, unpack_codes
from ..names import HEAD_CHOICES

log = logging.getLogger(__name__)

NAME = "cpu-int4"
KERNEL_GROUPS = (256, 128, 64, 32)
RANK_MULTIPLE = 32
# tokens from which a layer dequantizes and runs a GEMM instead of its int4 kernel, per kernel: measured by
# benchmarks/runtime_layers.py (slim's kernel beat the GEMM path at every count up to 512; PyTorch's lost from ~256)
GEMM_MIN_TOKENS = {"slim": 1 << 20, "torch": 256}
if os.environ.get("SLIM_CPU_INT4_GEMM_TOKENS"):
    GEMM_MIN_TOKENS = dict.fromkeys(GEMM_MIN_TOKENS, int(os.environ["SLIM_CPU_INT4_GEMM_TOKENS"]))


@functools.lru_cache(maxsize=1)
def available(device: str = "cpu") -> str | None:
    if torch.device(device).type != "cpu":
        return "runs on the CPU only"
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return f"torch {torch.__version__} has no CPU int4 kernel (torch >= 2.6 has it)"
    try:
        q = torch.full((16, 32), 9, dtype=torch.int32)
        packed = ops._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([torch.ones(1, 16), torch.zeros(1, 16)], -1).to(torch.bfloat16)
        y = ops._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, 32, sz)
    except RuntimeError as e:
        return f"the CPU int4 kernel failed a self-test: {e}"
    if float(y[0, 0]) != 32.0:
        return "the CPU int4 kernel failed a self-test (wrong result)"
    return None


def kernel_group(cols: int, group: int) -> int | None:
    """Largest kernel group size that divides `cols` and lies inside one stored group (`group` 0: per tensor)."""
    return next((g for g in KERNEL_GROUPS if cols % g == 0 and (group == 0 or group % g == 0)), None)


def supports(layer: SlimLinear) -> str | None:
    L = layer.layout
    if L.bits != 4:
        return f"weights stored as {'fp16 values' if not L.bits else f'{L.bits}-bit codes'}; the kernel takes 4-bit"
    if L.d_out % 16:
        return f"output width {L.d_out} is not a multiple of 16"
    if kernel_group(L.d_in, L.group_size) is None:
        return (f"input width {L.d_in} with group size {L.group_size or 'per tensor'} has no kernel group size "
                f"in {KERNEL_GROUPS} that divides it")
    return None


# ------------------------------------------------------------------ the kernel's weight layout


@functools.lru_cache(maxsize=64)
def _layout(n: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """How the kernel's packing places row r of an n-row matrix, found by packing probes (K = 2).

    The packing works on blocks of BN rows: block b's bytes are (K, nb/2) with nb = min(BN, n - b*BN), and row r
    of the block sits at byte d(r), nibble h(r) of every k. Returns (BN, j for a full block, j for the last
    partial block) with j(r) = 2*d(r) + h(r), or None if the packing does not follow that pattern (then layers
    keep the kernel for every token count)."""
    rows = torch.arange(n)
    where = torch.zeros(2 * n, dtype=torch.long)  # nibble position -> row
    for digit in range(4):
        q = ((rows >> (4 * digit)) & 15).to(torch.int32)[:, None].expand(n, 2).contiguous()
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1).to(torch.long)
        nib = torch.stack([p & 15, p >> 4], -1).reshape(-1)
        where += nib << (4 * digit)
    order = torch.argsort(where * 4 * n + torch.arange(where.numel()), stable=True)  # group positions by row
    if not torch.equal(where[order], rows.repeat_interleave(2)):
        return None
    pos = order.view(n, 2)
    byte0, byte1 = pos[:, 0] // 2, pos[:, 1] // 2
    bn = int(2 * (byte1 - byte0).max())
    if bn <= 0 or bn % 16:
        return None
    b = rows // bn
    nb = torch.clamp(n - b * bn, max=bn)
    if not torch.equal(byte1 - byte0, nb // 2) or not torch.equal(pos[:, 0] % 2, pos[:, 1] % 2):
        return None
    j = 2 * (byte0 - b * bn) + pos[:, 0] % 2
    full = j[:bn] if n >= bn else torch.empty(0, dtype=torch.long)
    nfull = n // bn
    if nfull and not torch.equal(j[: nfull * bn].view(nfull, bn), full.expand(nfull, bn)):
        return None
    return bn, full, j[nfull * bn:]


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """(n, k) uint8 nibbles from the kernel's packed weight, or None if its layout is not understood."""
    lay = _layout(n)
    if lay is None:
        return None
    bn, jfull, jrest = lay
    flat = packed.reshape(-1)
    nfull = n // bn
    parts = []
    if nfull:
        blk = flat[: nfull * bn * k // 2].view(nfull, k, bn // 2)
        nib = torch.stack([blk & 15, blk >> 4], -1).view(nfull, k, bn)
        parts.append(nib.index_select(2, jfull).transpose(1, 2).reshape(nfull * bn, k))
    rest = n - nfull * bn
    if rest:
        blk = flat[nfull * bn * k // 2:].view(k, rest // 2)
        nib = torch.stack([blk & 15, blk >> 4], -1).view(k, rest)
        parts.append(nib.index_select(1, jrest).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


# ------------------------------------------------------------------ one int4 matrix


class Int4Matrix(nn.Module):
    """An (n, k) int4 matrix in the kernel's layout with per-group (scale, zero) pairs; `mm` is x @ W.T."""

    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> None:
        """nibbles: (n, k) ints in 0..15 (n % 16 == 0); scale, zero: (n, k/group) float, w = (q - 8)*scale + zero."""
        super().__init__()
        n, k = nibbles.shape
        self.n, self.k, self.group = n, k, group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            nibbles.to(torch.int32).contiguous(), 1))
        self.unit_scale = zero is None and bool((scale == 1).all())
        if self.unit_scale:  # (1, 0) pairs: one shared tensor per shape, not one per layer
            sz = _unit_scale_zeros(k // group, n)
        else:
            z = torch.zeros_like(scale) if zero is None else zero
            sz = torch.stack([scale.t(), z.t()], -1).to(torch.bfloat16).contiguous()
        self.register_buffer("scale_zeros", sz)
        self.dense_ok = _dense_path_ok(self.packed, nibbles)
        if self.dense_ok:
            self.block_rows = _layout(n)[0]  # kept: a compiled graph cannot trace the probes behind `_layout`
            cols, rows = _storage_order(n)
            self.register_buffer("storage_cols", cols.to(torch.int32), persistent=False)
            self.register_buffer("storage_rows", rows.to(torch.int32), persistent=False)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x: (m, k) contiguous bf16 -> (m, n) bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zeros)

    def dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T as a (k, n) transient buffer with its columns in the kernel's storage order (no row gather): one
        permuted byte copy and one 256-entry table look-up per weight, then group scales if there are any."""
        bn = self.block_rows
        nfull = self.n // bn
        flat = self.packed.reshape(-1)
        parts = []
        if nfull:
            blk = flat[: nfull * bn * self.k // 2].view(nfull, self.k, bn // 2).transpose(0, 1).contiguous()
            parts.append(blk.view(self.k, nfull * bn // 2))
        rest = self.n - nfull * bn
        if rest:
            parts.append(flat[nfull * bn * self.k // 2:].view(self.k, rest // 2))
        b = (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).reshape(-1).to(torch.int32)
        table = _nibbles(dtype) if torch.compiler.is_compiling() else _nibble_table(dtype)  # no cache in a graph
        wt = table.index_select(0, b).view(self.k, self.n)
        if not self.unit_scale:
            g = self.k // self.group
            sz = self.scale_zeros.index_select(1, self.storage_rows).to(dtype)  # (g, n, 2), storage order
            wt = (wt.view(g, self.group, self.n) * sz[:, None, :, 0] + sz[:, None, :, 1]).view(self.k, self.n)
        return wt

    def mm_dense(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through a transient dequantized weight and a GEMM in x's dtype."""
        return (x @ self.dequantize_t(x.dtype)).index_select(1, self.storage_cols)


@functools.lru_cache(maxsize=64)
def _unit_scale_zeros(groups: int, n: int) -> torch.Tensor:
    """Scale 1, zero 0 for every group: the kernel's arguments when the real scale is applied to the output."""
    return torch.stack([torch.ones(groups, n), torch.zeros(groups, n)], -1).to(torch.bfloat16)


def _nibbles(dtype: torch.dtype) -> torch.Tensor:
    """byte -> (low nibble - 8, high nibble - 8), the kernel's zero-centred codes."""
    b = torch.arange(256)
    return torch.stack([(b & 15) - 8, (b >> 4) - 8], -1).to(dtype)


_nibble_table = functools.lru_cache(maxsize=4)(_nibbles)


def _storage_order(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage column of each row, row of each storage column) for an n-row packed matrix."""
    bn, jfull, jrest = _layout(n)
    nfull = n // bn
    cols = torch.cat([(torch.arange(nfull)[:, None] * bn + jfull[None, :]).reshape(-1), nfull * bn + jrest])
    return cols, torch.argsort(cols)


def _dense_path_ok(packed: torch.Tensor, nibbles: torch.Tensor) -> bool:
    n, k = nibbles.shape
    try:
        back = unpack_int4pack(packed, n, k)
    except RuntimeError:
        back = None
    ok = back is not None and torch.equal(back.to(torch.int32), nibbles.to(torch.int32))
    if not ok:
        log.warning("cpu-int4: could not decode the kernel's packed layout for a (%d, %d) weight; that layer uses "
                    "the int4 kernel at every token count", n, k)
    return ok


def _pad_rows(t: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]), value=value) if rows > t.shape[0] else t


def _pad_cols(t: torch.Tensor, cols: int, value: float = 0) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1]), value=value) if cols > t.shape[1] else t


# ------------------------------------------------------------------ the layer


class NativeInt4Matrix(nn.Module):
    """An (n, k) int4 matrix for slim's own kernel (kernels/csrc): blocks of 32 nibbles in 16 bytes, fp32 scales
    (and zero points) per stored group of `group` inputs (a multiple of 32; the last group may be short)."""

    dense_ok = True

    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> None:
        super().__init__()
        n, k = nibbles.shape
        self.n, self.k, self.group = n, k, group
        v = nibbles.to(torch.uint8).view(n, k // 32, 2, 16)
        self.register_buffer("packed", (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", torch.empty(0) if zero is None else zero.float().contiguous())
        self._kernel = native.load()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x: (m, k) -> (m, n) fp32; activations are quantized to int8 per 16 inputs inside the kernel."""
        if torch.compiler.is_compiling():  # the op, not the pybind function: traceable
            return ops.cpu_int4_gemv(x.float().contiguous(), self.packed, self.scale, self.zero, self.group)
        return self._kernel.int4_gemv(x.float().contiguous(), self.packed, self.scale, self.zero, self.group)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ops.cpu_int4_dequant(self.packed, self.scale, self.zero, self.group).to(dtype)
        return self._kernel.int4_dequant(self.packed, self.scale, self.zero, self.group).to(dtype)

    def mm_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


class NativeSparse24Matrix(nn.Module):
    """A 2:4 int4 matrix for slim's 2:4 kernel: the stored kept codes (4 bits each, regrouped per pair of blocks:
    `paired_values`) and their positions (2 bits each, regrouped per block of 32 inputs into one 32-bit word): 3 bits
    a weight in memory."""

    dense_ok = True

    def __init__(self, layer: SlimLinear) -> None:
        super().__init__()
        L = layer.layout
        self.n, self.k = L.d_out, L.d_in
        self.group = L.group_size or L.d_in
        self.register_buffer("values", paired_values(layer.values, self.n, self.k))
        loc = unpack_bits(layer.indices, 2, L.keep).view(self.n, self.k // 32, 4, 4).transpose(2, 3).to(torch.int32)
        by = loc[..., 0] | (loc[..., 1] << 2) | (loc[..., 2] << 4) | (loc[..., 3] << 6)  # byte k: kept k, k+4, ...
        words = by[..., 0] | (by[..., 1] << 8) | (by[..., 2] << 16) | (by[..., 3] << 24)
        self.register_buffer("positions", words.contiguous())
        s = layer.scale.float()
        self.register_buffer("scale", (s.reshape(1, 1).expand(self.n, 1) if L.group_size == 0 else s).contiguous())
        self._kernel = native.load()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ops.cpu_sparse24_dequant(self.values, self.positions, self.scale, self.group).to(dtype)
        return self._kernel.sparse24_dequant(self.values, self.positions, self.scale, self.group).to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return ops.cpu_linear(x.float(), self.values, self.positions, self.scale, torch.empty(0), self.group,
                                  *_NO_ADAPTERS)
        lin = self._kernel.Linears(self.k)
        lin.add(self.values, self.positions, self.scale, torch.empty(0), self.group, *_NO_ADAPTERS)
        return lin.forward1(x.float())

    def mm_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))


def paired_values(values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The stored 2:4 kept codes (per block of 32 inputs 8 bytes, kept j at nibble j) in the kernel's paired layout:
    per pair of blocks 16 bytes, byte j = kept j of the first block | kept j of the second << 4 (an odd last block
    leaves the high nibbles 0). Same bytes per row (8 more for an odd number of blocks); lets the kernel split a
    pair's codes with one mask instead of three shuffles."""
    nb = k // 32
    v = values.view(n, nb, 8)
    q = torch.stack([v & 15, v >> 4], -1).view(n, nb, 16)  # kept j in order
    if nb % 2:
        q = torch.cat([q, torch.zeros(n, 1, 16, dtype=q.dtype)], 1)
    q = q.view(n, -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1).contiguous()


_NO_ADAPTERS = (torch.empty(0, dtype=torch.uint8), torch.empty(0), 32, torch.empty(0, dtype=torch.uint8),
                torch.empty(0), 32)


def _sparse24_ok(layer: SlimLinear) -> bool:
    L = layer.layout
    return (native.load() is not None and L.sparsity == "nm" and (L.n, L.m) == (2, 4) and not L.zero_point
            and L.d_in % 32 == 0 and (L.group_size == 0 or L.group_size % 32 == 0)
            and os.environ.get("SLIM_CPU_SPARSE24", "1") != "0")


def _native_ok(cols: int, group: int) -> bool:
    return native.load() is not None and cols % 32 == 0 and (group == 0 or group % 32 == 0)


def _matrix(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> nn.Module:
    """An int4 matrix for the best kernel here. q: (n, k) nibbles, w = (q - 8) * scale + zero per stored group
    (`group` 0: per tensor, scale/zero (n, 1)); the torch kernel gets the groups split to its group size."""
    n, k = q.shape
    if _native_ok(k, group):
        return NativeInt4Matrix(q, scale, zero, group or k)
    gk = kernel_group(k, group)
    if group == 0:
        return Int4Matrix(q, scale.expand(n, k // gk), None, gk)
    s = expand_groups(scale, k, group)[:, ::gk]
    z = None if zero is None else expand_groups(zero, k, group)[:, ::gk]
    return Int4Matrix(q, s, z, gk)


class Int4Linear(nn.Module):
    """A SlimLinear converted for int4 kernels (slim's own where it builds, else PyTorch's): same function, kernel
    layout, no dense weight kept."""

    def __init__(self, layer: SlimLinear, gemm_min_tokens: int | None = None) -> None:
        super().__init__()
        L = self.layout = layer.layout
        self.in_features, self.out_features = L.d_in, L.d_out
        self.gemm_dtype = torch.bfloat16 if _native_bf16() else torch.float32
        self.register_buffer("out_scale", None)
        if _sparse24_ok(layer):
            self.base = NativeSparse24Matrix(layer)
            vals = pos = q = None
        else:
            vals = unpack_codes(layer.values, 4, L.keep).to(torch.int32)
            pos = layer.kept_positions()
        if vals is None:
            pass
        elif L.zero_point:
            zero = unpack_codes(layer.zero, 4, n_groups(L.d_in, L.group_size)).to(torch.int32)
            q = zero.repeat_interleave(L.group_size, 1)[:, : L.d_in] + 8  # pruned slots: (q - 8 - z) * s = 0
            q.scatter_(1, pos, vals + 8)
            s = layer.scale.float()
            self.base = _matrix(q, s, -zero.float() * s, L.group_size)
        else:
            q = torch.full((L.d_out, L.d_in), 8, dtype=torch.int32)
            q.scatter_(1, pos, vals + 8)
            if L.group_size:
                self.base = _matrix(q, layer.scale.float(), None, L.group_size)
            elif _native_ok(L.d_in, 0):  # slim's kernel takes the fp32 per-tensor scale as it is
                self.base = _matrix(q, layer.scale.float().expand(L.d_out, 1), None, 0)
            else:  # torch's: scale 1 in the kernel (exact), the fp32 scale on the output
                self.base = _matrix(q, torch.ones(L.d_out, 1), None, 0)
                self.out_scale = layer.scale.float().reshape(())
        del q, vals, pos
        self.kernel = "torch" if isinstance(self.base, Int4Matrix) else "slim"
        self.sparse24 = isinstance(self.base, NativeSparse24Matrix)
        self.gemm_min_tokens = GEMM_MIN_TOKENS[self.kernel] if gemm_min_tokens is None else gemm_min_tokens
        self.adapter_kind = "none"
        self.ad_A = self.ad_B = None
        if L.rank:
            self._convert_adapters(layer)
        self.fused = self.kernel == "slim" and self.out_scale is None and (
            self.adapter_kind == "none" or all(isinstance(m, NativeInt4Matrix) for m in (self.ad_A, self.ad_B)))
        self.register_buffer("input_scale", layer.input_scale.clone() if L.input_scale else None)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.fp8_inputs = L.fp8_inputs
        self.__dict__["_plain"] = self.fused and not L.input_scale and not L.fp8_inputs and layer.bias is None
        if self.fused:  # now, not at the first forward: its small long-lived allocations would pin the heap's top
            self._make_fused_call()

    def _convert_adapters(self, layer: SlimLinear) -> None:
        L = self.layout
        r_pad = -(-L.rank // RANK_MULTIPLE) * RANK_MULTIPLE
        ok = L.adapter_bits == 4 and (
            (_native_ok(L.d_in, L.adapter_group) and _native_ok(r_pad, L.adapter_group))
            or (kernel_group(L.d_in, L.adapter_group) is not None and kernel_group(r_pad, L.adapter_group) is not None))
        if ok:
            ca = unpack_codes(layer.lora_A, 4, L.d_in).to(torch.int32) + 8
            cb = unpack_codes(layer.lora_B, 4, L.rank).to(torch.int32) + 8
            sa = layer.lora_A_scale.float()
            sb = layer.lora_B_scale.float()
            # zero rows of A (code 8 = 0) make the padded ranks' outputs 0, so B's padded columns change nothing
            self.ad_A = _matrix(_pad_rows(ca, r_pad, 8), _pad_rows(sa, r_pad, 1.0), None, L.adapter_group)
            gb = n_groups(r_pad, L.adapter_group)
            self.ad_B = _matrix(_pad_cols(cb, r_pad, 8), _pad_cols(sb, gb, 1.0), None, L.adapter_group)
            self.adapter_kind = "int4"
        else:
            a, b = layer.adapters()
            self.register_buffer("lora_A", a.float().contiguous())
            self.register_buffer("lora_B", b.float().contiguous())
            self.adapter_kind = "fp32"
            log.info("cpu-int4: %s adapters run as fp32 matmuls",
                     "fp16" if not L.adapter_bits else f"{L.adapter_bits}-bit")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # few ops: at decode, a small layer's time is mostly per-op overhead
        if self.__dict__["_plain"]:  # no input scale, fp8 or bias: the whole layer is one kernel call
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] < self.gemm_min_tokens:
                if torch.compiler.is_compiling():  # the layer's own op: a traced graph has no tensor identities
                    y = ops.cpu_linear(x2, *self.native_args())
                elif (group := self.__dict__.get("_group")) is not None:  # siblings on one input: one call
                    y = group.run(self, x, x2)
                else:
                    y = (self.__dict__.get("_fused_call") or self._make_fused_call())(x2)
                return y.view(*x.shape[:-1], self.out_features)
        shape = x.shape
        x2 = layer_inputs(x.reshape(-1, self.in_features), self.input_scale, self.fp8_inputs)
        if self.fused and x2.shape[0] < self.gemm_min_tokens:  # the whole layer in one call of slim's kernel
            if torch.compiler.is_compiling():
                y = ops.cpu_linear(x2.float(), *self.native_args())
            else:
                call = self.__dict__.get("_fused_call") or self._make_fused_call()
                y = call(x2.float())
            if self.bias is not None:
                y.add_(self.bias)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        if self.kernel == "slim":
            xb = x2
        else:  # torch's kernel takes bf16 activations (its fp16/fp32 paths are 20-40x slower)
            xb = x2 if x2.dtype == torch.bfloat16 and x2.is_contiguous() else x2.to(torch.bfloat16).contiguous()
        if xb.shape[0] >= self.gemm_min_tokens and self.base.dense_ok:
            y = self.base.mm_dense(x2.to(self.gemm_dtype))
        else:
            y = self.base.mm(xb)
        if self.out_scale is not None:
            y.mul_(self.out_scale)
        if self.adapter_kind == "int4":
            y.add_(self.ad_B.mm(self.ad_A.mm(xb)))
        elif self.adapter_kind == "fp32":
            y = y + F.linear(F.linear(x2.float(), self.lora_A), self.lora_B).to(y.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def native_args(self) -> tuple:
        """This layer as arguments of the kernel's `Linears.add` (fused layers only)."""
        b, a, bb = self.base, self.ad_A, self.ad_B
        ad = _NO_ADAPTERS if a is None else (a.packed, a.scale, a.group, bb.packed, bb.scale, bb.group)
        if self.sparse24:
            return (b.values, b.positions, b.scale, torch.empty(0), b.group, *ad)
        return (b.packed, torch.empty(0, dtype=torch.int32), b.scale, b.zero, b.group, *ad)

    def _make_fused_call(self):  # noqa: ANN202 - a bound C++ method: module attribute look-ups cost more than the op
        lin = self.base._kernel.Linears(self.in_features)
        args = self.native_args()
        lin.add(*args)
        ops.remember(self.in_features, *ops.split_args(args), lin)  # a compiled graph's op call finds it
        self.__dict__["_fused_call"] = lin.forward1
        return lin.forward1

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - tensors may be replaced: rebuild what holds the old ones
        out = super()._apply(fn, recurse)
        if "_fused_call" in self.__dict__:  # rebuilt now: built at the first forward, its small long-lived
            self._make_fused_call()  # allocations would land between that forward's transients and pin them
        if self.__dict__.get("_group") is not None:  # by each member: the last one's build holds all new tensors
            self.__dict__["_group"].build()
        return out

    def extra_repr(self) -> str:
        L = self.layout
        return (f"in={L.d_in}, out={L.d_out}, kernel={self.kernel}, group={self.base.group}, "
                f"adapters={self.adapter_kind}, "
                f"gemm_min_tokens={self.gemm_min_tokens}")


@functools.lru_cache(maxsize=1)
def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


COMPRESSED_TYPES = (Int4Linear,)
# up to this many tokens the dense 16-bit linears (lm_head) run slim's GEMV; above, an fp32 GEMM per slice of rows
HALF_KERNEL_MAX_TOKENS = 16
HALF_GEMM_ROWS = 8192


class HalfWeightLinear(nn.Module):
    """A dense linear (lm_head, a layer left uncompressed) whose bf16/fp16 weight stays 16-bit in memory while it
    takes and returns fp32 activations: the weight is widened inside slim's kernel (few tokens) or a slice of rows
    at a time (many), never as a whole. The Parameter is the original one, so tied embeddings stay tied."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._kernel = native.load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        w = self.weight
        if x2.shape[0] <= HALF_KERNEL_MAX_TOKENS and self._kernel is not None and self.in_features % 16 == 0:
            if torch.compiler.is_compiling():
                y = ops.cpu_half_linear(x2, w.contiguous())
            else:
                y = self._kernel.half_linear(x2, w.contiguous())
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            for i in range(0, self.out_features, HALF_GEMM_ROWS):
                y[:, i:i + HALF_GEMM_ROWS] = F.linear(x2, w[i:i + HALF_GEMM_ROWS].float())
        if self.bias is not None:
            y.add_(self.bias.float())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}, activations=fp32"


# what `quantize_head` can make of lm_head (names.HEAD_CHOICES): "stored" keeps the loaded weight (bf16 as slim
# saves it)
HEAD_INT4_GROUP = 32
# the clipping ratios searched per group of the int4 head (absmax x ratio maps to the code range's end)
HEAD_INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)


class QuantHead(nn.Module):
    """A dense linear (lm_head) quantized at load time and run by slim's kernel: "int8" per output channel
    (round to nearest, absmax / 127) or "int4" in groups of 32 inputs (codes -8..7, per group the clipping ratio
    of `HEAD_INT4_CLIPS` with the least squared error). At one token the head over a 49k vocabulary is the largest
    single read of a small model (SmolLM2-135M: 57 MB in bf16, of 100 MB); llama.cpp keeps it in Q6_K for that
    reason. Takes any activations, returns fp32."""

    def __init__(self, linear: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("int8", "int4"):
            raise ValueError(f"unknown head format {kind!r}; choose one of: {', '.join(HEAD_CHOICES)}")
        w = linear.weight.detach()
        n, k = w.shape
        if k % 32:
            raise ValueError(f"the head's input width {k} is not a multiple of 32; keep --head stored")
        self.in_features, self.out_features, self.kind = k, n, kind
        self.bias = None if getattr(linear, "bias", None) is None else linear.bias.detach().float()
        check_head(kind)  # slim's kernel must be there
        self._kernel = native.load()
        if kind == "int8":
            codes = torch.empty(n, k, dtype=torch.int8)
            scale = torch.empty(n, 1)
            for i in range(0, n, 4096):  # slices: no fp32 copy of the whole head
                wf = w[i:i + 4096].float()
                s = wf.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
                codes[i:i + 4096] = torch.round(wf / s).clamp_(-127, 127).to(torch.int8)
                scale[i:i + 4096] = s
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.group = k
        else:
            g = HEAD_INT4_GROUP
            nib = torch.empty(n, k, dtype=torch.uint8)
            scale = torch.empty(n, k // g)
            for i in range(0, n, 4096):
                wf = w[i:i + 4096].float().view(-1, k // g, g)
                amax = wf.abs().amax(-1, keepdim=True).clamp_min(1e-12)
                best_err = best_s = None
                for r in HEAD_INT4_CLIPS:
                    s = amax * r / 8
                    err = (torch.round(wf / s).clamp_(-8, 7) * s - wf).square_().sum(-1, keepdim=True)
                    if best_err is None:
                        best_err, best_s = err, s
                    else:
                        better = err < best_err
                        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
                c = torch.round(wf / best_s).clamp_(-8, 7) + 8
                nib[i:i + 4096] = c.view(-1, k).to(torch.uint8)
                scale[i:i + 4096] = best_s.view(-1, k // g)
            m = NativeInt4Matrix(nib, scale, None, g)
            self.register_buffer("codes", m.packed)
            self.register_buffer("scale", m.scale)
            self.group = g
        self._lin = self._kernel.Linears(k)
        self._lin.add(*self.native_args())

    def native_args(self) -> tuple:
        """This head as arguments of the kernel's `Linears.add`."""
        return (self.codes, torch.empty(0, dtype=torch.int32), self.scale, torch.empty(0), self.group, *_NO_ADAPTERS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():
            y = ops.cpu_linear(x2, *self.native_args())
        else:
            y = self._lin.forward1(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = "per channel" if self.kind == "int8" else f"groups of {self.group}"
        return f"in={self.in_features}, out={self.out_features}, {self.kind} {g}, activations=int8 per 16"


def resolve_head(kind: str, device: str | torch.device = "cpu") -> str:
    """"auto" -> int8 on the CPU with slim's kernel, else stored; any other choice as it is (checked)."""
    if kind == "auto":
        return "int8" if torch.device(device).type == "cpu" and native.load() is not None else "stored"
    check_head(kind, device)
    return kind


def check_head(kind: str, device: str | torch.device = "cpu") -> None:
    """Refuse, before any loading, a head format that does not exist or cannot run on `device`."""
    if kind == "auto":
        return
    if kind not in HEAD_CHOICES:
        raise ValueError(f"unknown head format {kind!r}; choose one of: {', '.join(HEAD_CHOICES)}")
    if kind != "stored" and torch.device(device).type != "cpu":
        raise ValueError(f"a quantized head (--head {kind}) runs on the CPU only; keep --head stored on "
                         f"{torch.device(device).type}")
    if kind != "stored" and native.load() is None:
        raise ValueError(f"a quantized head (--head {kind}) needs slim's CPU kernel, which is not available here "
                         f"({native.unavailable_reason() or 'build failed'}); keep --head stored")


def quantize_head(model: nn.Module, kind: str = "stored") -> str:
    """Replace `model.lm_head` by a `QuantHead` of `kind` ("stored": leave it; "auto": `resolve_head`); returns what
    the head now is. A tied embedding keeps its 16-bit table for look-ups (the head's copy is separate)."""
    kind = resolve_head(kind, next(model.parameters()).device)
    head = getattr(model, "lm_head", None)
    model.slim_head = kind  # what results record
    if kind == "stored" or isinstance(head, QuantHead) and head.kind == kind:
        return kind
    if head is None or not hasattr(head, "weight") or head.weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no dense lm_head to quantize; keep --head stored")
    model.lm_head = QuantHead(head, kind)
    log.info("lm_head quantized at load: %s", model.lm_head.extra_repr())
    return kind


# sibling layers that read the same tensor in the transformers models slim compresses
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """Sibling layers that read the same input (q/k/v, gate/up) in one kernel call: the first one called with a
    tensor runs them all (the input quantized once, one parallel region) and keeps the others' outputs until they
    are called with that same, unmodified tensor; any other call computes afresh."""

    def __init__(self, members: list[Int4Linear]) -> None:
        self.members = members
        self.kernel = None
        self.x: torch.Tensor | None = None
        self.version = -1
        self.waiting: dict[int, torch.Tensor] = {}

    def build(self):  # noqa: ANN201 - the kernel's Linears object for all members
        self.kernel = self.members[0].base._kernel.Linears(self.members[0].in_features)
        tensors, ints = [], []
        for m in self.members:
            args = m.native_args()
            self.kernel.add(*args)
            t, i = ops.split_args(args)
            tensors += t
            ints += i
        return ops.remember(self.members[0].in_features, tensors, ints, self.kernel)  # for `ops.cpu_linears`

    def run(self, layer: Int4Linear, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        i = self.members.index(layer)
        if x is self.x and x._version == self.version and i in self.waiting:
            y = self.waiting.pop(i)
            if not self.waiting:
                self.x = None
            return y
        outs = (self.kernel or self.build()).forward(x2)
        self.x, self.version = x, x._version
        self.waiting = {j: o for j, o in enumerate(outs) if j != i}
        return outs[i]


def fuse_shared_inputs(model: nn.Module) -> int:
    """Group the sibling layers of `SHARED_INPUT` that run whole in slim's kernel; returns the number of groups."""
    groups = 0
    for parent in model.modules():
        for names in SHARED_INPUT:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, Int4Linear) and m.__dict__["_plain"] and m.kernel == "slim" for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or len({m.gemm_min_tokens for m in members}) != 1:
                continue
            group = SharedInput(members)
            group.build()
            for m in members:
                m.__dict__["_group"] = group
            groups += 1
    return groups


def _fp32_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def prepare_model(model: nn.Module) -> str | None:
    """After conversion: group siblings that share an input (`fuse_shared_inputs`; SLIM_CPU_FUSE=0 turns it off),
    and, where the CPU has no 16-bit arithmetic (AVX2 without AVX512-BF16), run the activations in fp32 while the
    dense parts stay bf16/fp16 in memory: 16-bit elementwise ops, attention and the casts around every compressed
    layer cost more there than fp32 ones. Norm weights and biases (tiny) become fp32, embeddings return fp32, dense
    linears become `HalfWeightLinear`; the KV cache is fp32 (twice bf16's bytes). SLIM_CPU_FP32_ACTIVATIONS=0
    keeps the stored dtype, =1 forces fp32. Returns "fp32" when it widened the activations, else None."""
    groups = fuse_shared_inputs(model) if os.environ.get("SLIM_CPU_FUSE", "1") != "0" else 0
    if groups:
        log.info("cpu-int4: %d groups of layers sharing an input (q/k/v, gate/up) run as one kernel call each", groups)
    mode = os.environ.get("SLIM_CPU_FP32_ACTIVATIONS", "auto")
    half = (torch.bfloat16, torch.float16)
    if mode == "0" or (mode != "1" and _native_bf16()) or native.load() is None:
        return None
    inside = {id(m) for mod in model.modules() if isinstance(mod, Int4Linear) for m in mod.modules()}
    plain = [(n, m) for n, m in model.named_modules() if id(m) not in inside]
    if any(isinstance(m, SlimLinear) for _, m in plain):
        return None  # a layer on the reference backend computes in the stored dtype
    if not any(p.dtype in half for _, m in plain for p in m.parameters(recurse=False)):
        return None
    for name, mod in plain:  # only what this knows how to widen: else leave the model as it is
        big = [k for k, p in mod.named_parameters(recurse=False) if p.dtype in half and p.dim() > 1]
        if big and not (type(mod) is nn.Linear or isinstance(mod, nn.Embedding)):
            log.info("cpu-int4: activations stay 16-bit: %s (%s) holds 16-bit matrices %s", name,
                     type(mod).__name__, big)
            return None
    from ..models import set_submodule

    for name, mod in plain:
        for key, t in list(mod._parameters.items()):
            if t is not None and t.dtype in half and t.dim() <= 1:
                mod._parameters[key] = nn.Parameter(t.detach().float(), requires_grad=False)
        for key, t in list(mod._buffers.items()):
            if t is not None and t.dtype in half and t.dim() <= 1:
                mod._buffers[key] = t.float()
        if isinstance(mod, nn.Embedding) and mod.weight.dtype in half:
            mod.register_forward_hook(_fp32_output)
        elif type(mod) is nn.Linear and mod.weight.dtype in half:
            set_submodule(model, name, HalfWeightLinear(mod))
    log.info("cpu-int4: activations run in fp32 (no 16-bit arithmetic on this CPU); dense weights stay 16-bit")
    return "fp32"


def convert(layer: SlimLinear) -> nn.Module:
    return Int4Linear(layer)
