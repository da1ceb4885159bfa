"""`cuda-int4`: 4-bit layers on NVIDIA GPUs through slim's Triton kernels (`triton_kernels`), 2:4 layers in 3 bits.

At load each compressed layer's stored layout (format 1, unchanged on disk) becomes the kernels' K-major layout:
the stored bytes of a 2:4 layer are already 8 kept codes a 32-bit word and 8 positions a 16-bit word, so the
conversion is a view and a transpose (no dense weight is ever built); other 4-bit layouts (dense, N:M other than
2:4, unstructured) run as dense int4 with pruned slots at the zero code (4 bits a weight). Group scales and zero
points become fp32 (G, N), a per-tensor scale multiplies the output. int4 adapters run through the same kernels
(x -> A -> B, B adding onto the base's output in its epilogue); other adapters as two 16-bit GEMMs in the model's
dtype. Layers that are not 4-bit fall back to `reference`. Every call goes through the `slim::int4_mm` custom op,
so `torch.compile` traces a decode step whole.
Runs on CUDA (compute capability 8.0+, for bf16 `tl.dot`), and on CPU tensors under TRITON_INTERPRET=1, which is
how the default test suite checks it without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.quant import n_groups
from ..format.packed import SlimLinear, layer_inputs, pack_bits, unpack_codes

NAME = "cuda-int4"
ADAPTER_MODES = ("int4", "16bit")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'slim-compress[gpu]')"
    return None


def kernels():  # noqa: ANN201 - the module, imported only here so that slim imports without Triton
    import slim.kernels.triton as triton_kernels  # the submodule, not the package (no import cycle)

    return triton_kernels


def available(device: str = "cuda") -> str | None:
    dev = torch.device(device).type
    why = _triton_missing()
    if why is not None:
        return why
    if dev == "cpu" and interpreting():
        return None  # the Triton interpreter, for tests
    if dev != "cuda":
        return "runs on CUDA devices (or on CPU tensors under TRITON_INTERPRET=1, for tests)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return "needs compute capability 8.0 or newer (bf16 tensor cores)"
    return None


def _sparse24(layer: SlimLinear) -> bool:
    L = layer.layout
    return L.sparsity == "nm" and (L.n, L.m) == (2, 4)


def supports(layer: SlimLinear) -> str | None:
    L = layer.layout
    if L.bits != 4:
        return f"weights stored as {'fp16 values' if not L.bits else f'{L.bits}-bit codes'}; the kernels take 4-bit"
    per_word = 16 if _sparse24(layer) else 8
    if L.group_size and L.group_size % per_word:
        return f"group size {L.group_size} is not a multiple of {per_word} (the inputs of one kernel word)"
    return None


def _words(packed: torch.Tensor, words: int, dtype: torch.dtype, fill: int) -> torch.Tensor:
    """(rows, bytes) packed nibbles or 2-bit fields -> (words, rows) `dtype` words, K-major, padded with `fill`."""
    nbytes = words * torch.empty(0, dtype=dtype).element_size()
    if packed.shape[1] < nbytes:
        packed = F.pad(packed, (0, nbytes - packed.shape[1]), value=fill)
    return packed.contiguous().view(dtype).t().contiguous()


class Int4Matrix(nn.Module):
    """One (N, K) 4-bit matrix in the kernels' layout (see `triton_kernels`); `mm(x, acc)` is x @ W^T (+ acc)."""

    def __init__(self, n: int, k: int, qv: torch.Tensor, qp: torch.Tensor | None, scale: torch.Tensor,
                 group: int, zero: torch.Tensor | None = None) -> None:
        super().__init__()
        self.n, self.k, self.group = n, k, group
        self.register_buffer("qv", qv)
        self.register_buffer("qp", qp)
        if group:
            self.register_buffer("gscale", scale.float().t().contiguous())
            self.register_buffer("gzero", None if zero is None else zero.float().t().contiguous())
            self.register_buffer("tscale", None)
        else:
            self.register_buffer("gscale", None)
            self.register_buffer("gzero", None)
            self.register_buffer("tscale", scale.float().reshape(1).clone())

    @classmethod
    def dense(cls, q: torch.Tensor, scale: torch.Tensor, group: int, zero: torch.Tensor | None = None) -> Int4Matrix:
        """From (N, K) unsigned nibbles (code + 8)."""
        n, k = q.shape
        return cls(n, k, _words(pack_bits(q, 4), -(-k // 8), torch.int32, 0x88), None, scale, group, zero)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None, acc: torch.Tensor | None = None,
           path: int = 0) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op for the graph (and the CUDA graph) to hold
            return torch.ops.slim.int4_mm(x, self.qv, self.qp, self.gscale, self.gzero, self.tscale, bias, acc,
                                          self.group, path)
        # eager: straight to the launcher (the op's dispatch would cost more than a decode-sized kernel)
        return kernels().int4_mm_impl(x, self.qv, self.qp, self.gscale, self.gzero, self.tscale, bias, acc,
                                      self.group, path)

    def dequantize_t(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T (K, N) in `dtype` (tests and benchmarks; the layer itself never keeps one)."""
        return kernels().dequantize_t(self.qv, self.qp, self.gscale, self.gzero, self.tscale, self.k, self.group,
                                      dtype)


def base_matrix(layer: SlimLinear) -> Int4Matrix:
    """The layer's base weight in the kernels' layout: 2:4 as stored (3 bits a weight), else dense int4."""
    L = layer.layout
    zero = unpack_codes(layer.zero, 4, n_groups(L.d_in, L.group_size)).float() if L.zero_point else None
    if _sparse24(layer):
        kw = -(-L.keep // 8)
        qv = _words(layer.values, kw, torch.int32, 0x88)
        qp = _words(layer.indices, kw, torch.int16, 0)
        return Int4Matrix(L.d_out, L.d_in, qv, qp, layer.scale, L.group_size, zero)
    vals = unpack_codes(layer.values, 4, L.keep).to(torch.int16)
    if zero is None:
        q = torch.full((L.d_out, L.d_in), 8, dtype=torch.int16)
    else:  # a pruned slot holds the zero point's code: (z + 8 - 8 - z) * s = 0
        q = zero.to(torch.int16).repeat_interleave(L.group_size, 1)[:, : L.d_in] + 8
    q.scatter_(1, layer.kept_positions(), vals + 8)
    return Int4Matrix.dense(q, layer.scale, L.group_size, zero)


class Int4CudaLinear(nn.Module):
    """A SlimLinear for slim's Triton kernels: same function, kernel layout, no dense weight kept. `path` forces
    one of the kernel paths (`gemv`, `gemm`, `dense`) instead of choosing by token count (benchmarks)."""

    def __init__(self, layer: SlimLinear, adapters: str = "int4") -> None:
        super().__init__()
        if adapters not in ADAPTER_MODES:
            raise ValueError(f"adapters must be one of {ADAPTER_MODES}, not {adapters!r}")
        L = self.layout = layer.layout
        self.in_features, self.out_features = L.d_in, L.d_out
        self.base = base_matrix(layer)
        self.sparse24 = _sparse24(layer)
        self.path = "auto"  # registers the kernels' op too
        self.ad_A = self.ad_B = None
        self.register_buffer("lora_A", None)
        self.register_buffer("lora_B", None)
        self.adapter_kind = "none"
        if L.rank:
            if adapters == "int4" and L.adapter_bits == 4 and L.adapter_group % 8 == 0:
                ca = unpack_codes(layer.lora_A, 4, L.d_in).to(torch.int16) + 8
                cb = unpack_codes(layer.lora_B, 4, L.rank).to(torch.int16) + 8
                self.ad_A = Int4Matrix.dense(ca, layer.lora_A_scale, L.adapter_group)
                self.ad_B = Int4Matrix.dense(cb, layer.lora_B_scale, L.adapter_group)
                self.adapter_kind = "int4"
            else:
                a, b = layer.adapters()
                self.lora_A, self.lora_B = a.half(), b.half()  # the model's dtype in `prepare_model`
                self.adapter_kind = "16bit"
        self.register_buffer("input_scale", layer.input_scale.clone() if L.input_scale else None)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.fp8_inputs = L.fp8_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = layer_inputs(x.reshape(-1, self.in_features), self.input_scale, self.fp8_inputs)
        path = self._path_id
        if self.adapter_kind == "int4":
            t = self.ad_A.mm(x2, path=path)
            y = self.ad_B.mm(t, acc=self.base.mm(x2, self.bias, path=path), path=path)
        else:
            y = self.base.mm(x2, self.bias, path=path)
            if self.adapter_kind == "16bit":
                y = y + F.linear(F.linear(x2, self.lora_A.to(x2.dtype)), self.lora_B.to(x2.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, name: str) -> None:
        paths = kernels().PATHS
        if name not in paths:
            raise ValueError(f"path must be one of {list(paths)}, not {name!r}")
        self._path, self._path_id = name, paths[name]

    def extra_repr(self) -> str:
        L = self.layout
        return (f"in={L.d_in}, out={L.d_out}, form={'2:4 (3 bits)' if self.sparse24 else 'dense int4'}, "
                f"group={L.group_size or 'tensor'}, adapters={self.adapter_kind}")


COMPRESSED_TYPES = (Int4CudaLinear,)


def convert(layer: SlimLinear, adapters: str = "int4") -> nn.Module:
    return Int4CudaLinear(layer, adapters)


def prepare_model(model: nn.Module) -> str | None:
    """16-bit adapters take the model's dtype (bf16 or fp16) once, not a cast per forward."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else None
    if dtype is None or not dtype.is_floating_point:
        return None
    for mod in model.modules():
        if isinstance(mod, Int4CudaLinear) and mod.adapter_kind == "16bit":
            mod.lora_A, mod.lora_B = mod.lora_A.to(dtype), mod.lora_B.to(dtype)
    return None


def describe() -> dict[str, Any]:
    """The crossovers in force (saved with benchmark results)."""
    k = kernels()
    return {"gemv_max_tokens": k.GEMV_MAX_TOKENS, "gemm_max_tokens": k.GEMM_MAX_TOKENS, "expand": k.EXPAND,
            "gemv_config": k.GEMV_CONFIG, "gemm_config": k.GEMM_CONFIG, "dequant_config": k.DEQUANT_CONFIG}
