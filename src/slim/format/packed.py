"""`SlimLinear`: a linear layer stored compressed (packed int codes, N:M indices, scales, adapters).

On-disk/in-memory layout (format 1), all row-major, little-endian bit order inside a byte:
  values    uint8 (d_out, ceil(keep*bits/8))  kept weights' codes + 2^(b-1), packed b bits each
            (fp16 (d_out, keep) when the weights are not quantized)
  indices   uint8 (d_out, ceil(keep*ib/8))    N:M only: position of each kept value inside its
            group of M, ib = 2 bits for M = 4 (1, 2, 4 or 8 bits in general)
  bitmask   uint8 (d_out, ceil(d_in/8))       unstructured only: 1 bit per weight (1 = kept)
  scale     fp16 () or (d_out, n_groups)      step of the quantizer
  zero      uint8 (d_out, ceil(n_groups*bits/8)) asymmetric (AWQ) only: each group's zero point in
            the same code space, packed like the values; a weight is (code - zero) * scale
  lora_A    (r, d_in), lora_B (d_out, r)      adapters dW = lora_B @ lora_A; fp16, or packed codes
            with lora_A_scale / lora_B_scale  group scales along each one's input dimension
  input_scale fp16 (d_in)                     SLiM-Quant^O: the layer computes with x / input_scale
The reference forward decompresses and runs a dense matmul (caching the dense weight only when asked:
`cache=True`, or `set_dense_cache`); the backends in `slim.runtime` convert this layout to their kernels'
layouts at load time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.quant import expand_groups, fp8_fake_quant, n_groups, qrange
from ..names import CODE_BITS, MAX_NM_M  # the stored layout's limits, kept torch-free for the configuration

FORMAT_VERSION = 1
# the files of a format-1 checkpoint (slim.format.checkpoint writes them; the model card names them)
CONFIG_NAME = "slim_config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------- bit packing


def index_bits(m: int) -> int:
    """Bits per N:M index: the smallest of 1, 2, 4, 8 that can hold 0..m-1."""
    need = max(1, math.ceil(math.log2(m)))
    return next(b for b in (1, 2, 4, 8) if b >= need)


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned values < 2^bits along the last dim, 8/bits per byte (zero-padded)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit values")
    x = x.to(torch.uint8)
    if bits == 8:
        return x.contiguous()
    per = 8 // bits
    n = x.shape[-1]
    pad = (-n) % per
    if pad:
        x = F.pad(x, (0, pad))
    x = x.view(*x.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=x.device) * bits
    return (x << shifts).sum(-1).to(torch.uint8)


def unpack_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., bytes) -> (..., n) uint8."""
    if bits == 8:
        return p[..., :n]
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
    x = (p.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return x.reshape(*p.shape[:-1], -1)[..., :n].to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2^(b-1), 2^(b-1)) -> packed unsigned bytes."""
    return pack_bits((codes.to(torch.int16) - qrange(bits)[0]).to(torch.uint8), bits)


def unpack_codes(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_bits(p, bits, n).to(torch.int16) + qrange(bits)[0]


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Shapes and formats of one SlimLinear; saved per layer in slim_config.json."""

    d_in: int
    d_out: int
    sparsity: str = "dense"  # dense | nm | unstructured
    n: int = 0
    m: int = 0
    keep: int = 0  # kept weights per row
    bits: int = 4  # 0: weights stored as fp16
    group_size: int = 0  # 0: one scale per tensor
    zero_point: bool = False  # asymmetric groups (AWQ): a packed zero point per group
    rank: int = 0
    adapter_bits: int = 0  # 0: fp16 adapters
    adapter_group: int = 128
    input_scale: bool = False
    fp8_inputs: bool = False
    bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        """A layout read from a file, checked field by field (ValueError says which): a checkpoint's config is
        input, and a layout decides how much memory a layer allocates."""
        if not isinstance(d, dict):
            raise ValueError(f"a layout is a JSON object, not {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown layout fields {unknown}")
        for k, v in d.items():
            want = {"int": int, "bool": bool, "str": str}[fields[k].type]
            if type(v) is not want:
                raise ValueError(f"layout field {k!r} must be {fields[k].type}, not {v!r}")
        if "d_in" not in d or "d_out" not in d:
            raise ValueError("a layout needs d_in and d_out")
        L = cls(**d)
        L.check()
        return L

    def check(self) -> None:
        """Raise ValueError if the fields contradict each other or leave their ranges."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"inconsistent layout: {what}")

        need(0 < self.d_in <= 1 << 20 and 0 < self.d_out <= 1 << 20, "d_in and d_out in 1..2^20")
        need(self.sparsity in ("dense", "nm", "unstructured"), "sparsity is dense, nm or unstructured")
        need(0 < self.keep <= self.d_in, "0 < keep <= d_in")
        if self.sparsity == "nm":
            need(0 < self.n <= self.m <= MAX_NM_M and self.d_in % self.m == 0
                 and self.keep == self.d_in // self.m * self.n,
                 f"N:M with 0 < N <= M <= {MAX_NM_M}, M dividing d_in and keep = d_in / M * N")
        elif self.sparsity == "dense":
            need(self.keep == self.d_in, "a dense layer keeps d_in weights a row")
        allowed = (0, *CODE_BITS)
        need(self.bits in allowed and self.adapter_bits in allowed,
             f"bits and adapter_bits in {', '.join(map(str, allowed))} (0: fp16), "
             f"got {self.bits} and {self.adapter_bits}")
        need(0 <= self.group_size <= 1 << 20 and 0 < self.adapter_group <= 1 << 20, "group sizes in range")
        need(not self.zero_point or (self.group_size > 0 and self.bits > 0), "zero points need quantized groups")
        need(0 <= self.rank <= min(self.d_in, self.d_out), "0 <= rank <= min(d_in, d_out)")


@dataclass
class CompressedWeight:
    """Result of compressing one weight matrix, in dense coordinates (before packing)."""

    mask: torch.Tensor  # bool (d_out, d_in)
    codes: torch.Tensor | None  # int8 (d_out, d_in), None when not quantized
    dense_values: torch.Tensor | None  # weights when not quantized
    scale: torch.Tensor | None  # () or (d_out, n_groups)
    bits: int
    group_size: int
    zero: torch.Tensor | None = None  # int8 (d_out, n_groups) zero points in code space (asymmetric)
    lora_A: torch.Tensor | None = None  # (r, d_in) float, already quantized-dequantized if adapter_bits
    lora_B: torch.Tensor | None = None
    adapter_codes: tuple[torch.Tensor, torch.Tensor] | None = None
    adapter_scales: tuple[torch.Tensor, torch.Tensor] | None = None
    adapter_bits: int = 0
    adapter_group: int = 128
    input_scale: torch.Tensor | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to(self, device: torch.device | str) -> CompressedWeight:
        """A copy with every tensor on `device` (the solver computes on the block's device; packing is on
        the CPU, where the packed module is built)."""

        def mv(t: Any) -> Any:
            if isinstance(t, tuple):
                return tuple(mv(x) for x in t)
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return dataclasses.replace(self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def weight(self) -> torch.Tensor:
        """The dense effective weight M * Q(W) (without adapters), in the scaled input space."""
        if self.codes is None:
            assert self.dense_values is not None
            return self.dense_values.float() * self.mask
        d_in = self.mask.shape[1]
        s = self.scale if self.group_size == 0 else expand_groups(self.scale, d_in, self.group_size)
        c = self.codes.float()
        if self.zero is not None:
            c = c - expand_groups(self.zero.float(), d_in, self.group_size)
        return c * s * self.mask


# ---------------------------------------------------------------- the module


class SlimLinear(nn.Module):
    """A compressed replacement for nn.Linear; see the module docstring for the stored layout."""

    def __init__(self, layout: Layout, dtype: torch.dtype = torch.float32, cache: bool = False) -> None:
        super().__init__()
        self.layout = layout
        self.in_features, self.out_features = layout.d_in, layout.d_out
        self.cache = cache
        self._cached: tuple[torch.Tensor, ...] | None = None
        L = layout
        u8 = torch.uint8
        if L.bits:
            self.register_buffer("values", torch.zeros(L.d_out, math.ceil(L.keep * L.bits / 8), dtype=u8))
            sshape = () if L.group_size == 0 else (L.d_out, n_groups(L.d_in, L.group_size))
            self.register_buffer("scale", torch.ones(sshape, dtype=torch.float16))
            if L.zero_point:
                if L.group_size == 0:
                    raise ValueError("asymmetric (zero-point) weights need a group size")
                g = n_groups(L.d_in, L.group_size)
                self.register_buffer("zero", torch.zeros(L.d_out, math.ceil(g * L.bits / 8), dtype=u8))
        else:
            self.register_buffer("values", torch.zeros(L.d_out, L.keep, dtype=torch.float16))
        if L.sparsity == "nm":
            ib = index_bits(L.m)
            self.register_buffer("indices", torch.zeros(L.d_out, math.ceil(L.keep * ib / 8), dtype=u8))
        elif L.sparsity == "unstructured":
            self.register_buffer("bitmask", torch.zeros(L.d_out, math.ceil(L.d_in / 8), dtype=u8))
        if L.rank:
            for name, rows, cols in (("lora_A", L.rank, L.d_in), ("lora_B", L.d_out, L.rank)):
                if L.adapter_bits:
                    self.register_buffer(name, torch.zeros(rows, math.ceil(cols * L.adapter_bits / 8), dtype=u8))
                    g = n_groups(cols, L.adapter_group)
                    self.register_buffer(name + "_scale", torch.ones(rows, g, dtype=torch.float16))
                else:
                    self.register_buffer(name, torch.zeros(rows, cols, dtype=torch.float16))
        if L.input_scale:
            self.register_buffer("input_scale", torch.ones(L.d_in, dtype=torch.float16))
        if L.bias:
            self.register_buffer("bias", torch.zeros(L.d_out, dtype=dtype))
        else:
            self.bias = None

    # -- construction

    @classmethod
    def from_compressed(
        cls, cw: CompressedWeight, bias: torch.Tensor | None, sparsity: str, n: int = 0, m: int = 0,
        fp8_inputs: bool = False,
    ) -> SlimLinear:
        """Pack a CompressedWeight into the stored layout (built on the CPU; move the module after)."""
        cw = cw.to("cpu")
        mask = cw.mask
        d_out, d_in = mask.shape
        keep = int(mask[0].sum()) if sparsity != "dense" else d_in
        if sparsity != "dense" and not bool((mask.sum(1) == keep).all()):
            raise ValueError("every row of the mask must keep the same number of weights")
        rank = 0 if cw.lora_A is None else cw.lora_A.shape[0]
        layout = Layout(
            d_in=d_in, d_out=d_out, sparsity=sparsity, n=n, m=m, keep=keep, bits=cw.bits,
            group_size=cw.group_size, zero_point=cw.zero is not None, rank=rank,
            adapter_bits=cw.adapter_bits if rank else 0,
            adapter_group=cw.adapter_group, input_scale=cw.input_scale is not None, fp8_inputs=fp8_inputs,
            bias=bias is not None,
        )
        layout.check()  # what the loader would refuse, refused here with its reason (not deep inside packing)
        mod = cls(layout, dtype=bias.dtype if bias is not None else torch.float32)
        # positions of kept weights, ascending within each row
        if sparsity == "dense":
            pos = torch.arange(d_in).expand(d_out, d_in)
        else:
            pos = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :keep]
        if cw.bits:
            mod.values.copy_(pack_codes(cw.codes.gather(1, pos), cw.bits))
            mod.scale.copy_(cw.scale.to(torch.float16))
            if cw.zero is not None:
                mod.zero.copy_(pack_codes(cw.zero, cw.bits))
        else:
            mod.values.copy_(cw.dense_values.gather(1, pos).to(torch.float16))
        if sparsity == "nm":
            mod.indices.copy_(pack_bits(pos % m, index_bits(m)))
            expect = (torch.arange(keep) // n * m).expand(d_out, keep)
            if not bool(((pos - pos % m) == expect).all()):
                raise ValueError(f"mask is not {n}:{m}: some group of {m} does not keep exactly {n}")
        elif sparsity == "unstructured":
            mod.bitmask.copy_(pack_bits(mask.to(torch.uint8), 1))
        if rank:
            if cw.adapter_bits:
                ca, cb = cw.adapter_codes
                sa, sb = cw.adapter_scales
                mod.lora_A.copy_(pack_codes(ca, cw.adapter_bits))
                mod.lora_B.copy_(pack_codes(cb, cw.adapter_bits))
                mod.lora_A_scale.copy_(sa.to(torch.float16))
                mod.lora_B_scale.copy_(sb.to(torch.float16))
            else:
                mod.lora_A.copy_(cw.lora_A.to(torch.float16))
                mod.lora_B.copy_(cw.lora_B.to(torch.float16))
        if cw.input_scale is not None:
            mod.input_scale.copy_(cw.input_scale.to(torch.float16))
        if bias is not None:
            mod.bias.copy_(bias)
        return mod

    # -- decompression

    def kept_positions(self) -> torch.Tensor:
        """(d_out, keep) input-column index of every stored value."""
        L = self.layout
        if L.sparsity == "nm":
            local = unpack_bits(self.indices, index_bits(L.m), L.keep).long()
            base = (torch.arange(L.keep, device=local.device) // L.n * L.m)[None, :]
            return base + local
        if L.sparsity == "unstructured":
            mask = unpack_bits(self.bitmask, 1, L.d_in).bool()
            return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : L.keep]
        return torch.arange(L.d_in, device=self.values.device).expand(L.d_out, L.d_in)

    def mask(self) -> torch.Tensor:
        L = self.layout
        m = torch.zeros(L.d_out, L.d_in, dtype=torch.bool, device=self.values.device)
        return m.scatter_(1, self.kept_positions(), True)

    def _adapter(self, name: str, cols: int) -> torch.Tensor:
        L = self.layout
        t = getattr(self, name)
        if not L.adapter_bits:
            return t.float()
        codes = unpack_codes(t, L.adapter_bits, cols).float()
        return codes * expand_groups(getattr(self, name + "_scale").float(), cols, L.adapter_group)

    def adapters(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_A, lora_B) in fp32, or None without adapters."""
        L = self.layout
        if not L.rank:
            return None
        return self._adapter("lora_A", L.d_in), self._adapter("lora_B", L.rank)

    def dequantized_weight(self) -> torch.Tensor:
        """Dense fp32 M * Q(W) in the (possibly input-scaled) space, without adapters."""
        L = self.layout
        if L.bits:
            vals = unpack_codes(self.values, L.bits, L.keep).float()
            if L.zero_point:
                zero = unpack_codes(self.zero, L.bits, n_groups(L.d_in, L.group_size)).float()
                pos = self.kept_positions()
                vals = vals - zero.gather(1, pos // L.group_size)
        else:
            vals = self.values.float()
        w = torch.zeros(L.d_out, L.d_in, device=self.values.device)
        w.scatter_(1, self.kept_positions(), vals)
        if L.bits:
            s = self.scale.float()
            w = w * (s if L.group_size == 0 else expand_groups(s, L.d_in, L.group_size))
        return w

    def effective_weight(self) -> torch.Tensor:
        """Dense fp32 weight equivalent to the whole layer on unscaled inputs (adapters merged)."""
        w = self.dequantized_weight()
        ad = self.adapters()
        if ad is not None:
            w = w + ad[1] @ ad[0]
        if self.layout.input_scale:
            w = w / self.input_scale.float()[None, :]
        return w

    def clear_cache(self) -> None:
        self._cached = None

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - keep caches in step with .to()/.half()
        self._cached = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layout
        x = layer_inputs(x, self.input_scale if L.input_scale else None, L.fp8_inputs)
        cached = self._cached
        if cached is None or cached[0].dtype != x.dtype:
            ad = self.adapters()
            cached = (self.dequantized_weight().to(x.dtype),) + (
                () if ad is None else (ad[0].to(x.dtype), ad[1].to(x.dtype))
            )
            if self.cache:
                self._cached = cached
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, cached[0], bias)
        if L.rank:
            y = y + F.linear(F.linear(x, cached[1]), cached[2])
        return y

    def stored_bytes(self) -> int:
        """Bytes of everything this layer stores (packed values, metadata, scales, adapters, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        L = self.layout
        sp = f"{L.n}:{L.m}" if L.sparsity == "nm" else L.sparsity
        return (
            f"in={L.d_in}, out={L.d_out}, sparsity={sp}, bits={L.bits or 16}, "
            f"rank={L.rank}, adapter_bits={L.adapter_bits or 16}"
        )


def layer_inputs(x: torch.Tensor, input_scale: torch.Tensor | None, fp8: bool) -> torch.Tensor:
    """What a compressed layer multiplies: x / input_scale (SLiM-Quant^O's scaled space) and, where the layout says
    so, rounded to FP8; every backend applies it the same way."""
    if input_scale is not None:
        x = x / input_scale.to(x.dtype)
    if fp8:
        x = fp8_fake_quant(x)
    return x


def set_dense_cache(model: nn.Module, on: bool) -> None:
    """Turn the reference layers' dense-weight cache on (fast repeated forwards, dense-sized memory) or off."""
    for mod in model.modules():
        if isinstance(mod, SlimLinear):
            mod.cache = on
            mod.clear_cache()
