"""slim's CPU kernels (kernels/csrc, see `native`) as `torch.library` custom ops in the `slim` namespace, prefixed
`cpu_` (the Triton GPU ops use the same namespace): `torch.compile` cannot trace into a pybind call, so a compiled
model on the `cpu-int4` backend reaches the kernels through these ops, each with a fake (shapes and dtypes only)
for tracing. They own the cache of the kernel's `Linears` objects (a layer's tensors bound once in C++), keyed by
the argument tensors' addresses, shapes, strides and dtypes: a compiled graph passes tensors, not the object, and
rebuilding it per call would cost more than a decode step's kernel. Eager code keeps calling the bound objects
directly (`cpu_int4` measured the op's dispatch as a cost there); `remember` lets it share the objects it built.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import slim.kernels.native as native  # the submodule, not the package: imports point one way

# the Linears objects alive elsewhere (a layer's fused call holds its own), found again by key; held weakly so a
# dropped model frees its tensors
_LIVE: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()
# the ones the ops built for arguments nobody had registered, most recent last, held until evicted
_BUILT: OrderedDict[tuple, Any] = OrderedDict()
BUILT_MAX = 512
TENSORS_PER_LAYER = 8  # w, idx, scale, zero, a, a_scale, b, b_scale
INTS_PER_LAYER = 3  # G, Ga, Gb


def _kernel() -> Any:
    mod = native.load()
    if mod is None:
        raise RuntimeError(f"slim's CPU kernel is not available here ({native.unavailable_reason() or 'build failed'})")
    return mod


def split_args(args: Sequence) -> tuple[list[Tensor], list[int]]:
    """`Linears.add`'s arguments (w, idx, scale, zero, G, a, a_scale, Ga, b, b_scale, Gb) as (tensors, ints)."""
    w, idx, scale, zero, g, a, a_scale, ga, b, b_scale, gb = args
    return [w, idx, scale, zero, a, a_scale, b, b_scale], [g, ga, gb]


def _add_args(tensors: Sequence[Tensor], ints: Sequence[int], layer: int) -> tuple:
    w, idx, scale, zero, a, a_scale, b, b_scale = tensors[layer * TENSORS_PER_LAYER:(layer + 1) * TENSORS_PER_LAYER]
    g, ga, gb = ints[layer * INTS_PER_LAYER:(layer + 1) * INTS_PER_LAYER]
    return w, idx, scale, zero, g, a, a_scale, ga, b, b_scale, gb


def _key(k: int, tensors: Sequence[Tensor], ints: Sequence[int]) -> tuple:
    # an empty tensor's address means nothing (and its contents are never read): every empty one matches
    return (k, *ints, *((t.data_ptr() if t.numel() else 0, t.shape, t.stride(), t.dtype) for t in tensors))


def remember(k: int, tensors: Sequence[Tensor], ints: Sequence[int], linears: Any) -> Any:
    """Register a `Linears(k)` built from these arguments (as `split_args` gives them, layer after layer) so the ops
    reuse it for as long as its owner keeps it; returns it."""
    _LIVE[_key(k, tensors, ints)] = linears
    return linears


def linears(k: int, tensors: Sequence[Tensor], ints: Sequence[int]) -> Any:
    """The kernel's `Linears(k)` for these arguments: a registered or recently built one, else a new one. A hit is
    sound: the object holds its tensors, so no other tensor can have their addresses while it lives."""
    key = _key(k, tensors, ints)
    lin = _LIVE.get(key)
    if lin is not None:
        return lin
    lin = _BUILT.get(key)
    if lin is not None:
        _BUILT.move_to_end(key)
        return lin
    n = len(ints) // INTS_PER_LAYER
    if n == 0 or len(tensors) != n * TENSORS_PER_LAYER or len(ints) != n * INTS_PER_LAYER:
        raise ValueError(f"{len(tensors)} tensors and {len(ints)} ints are not {TENSORS_PER_LAYER} and "
                         f"{INTS_PER_LAYER} per layer")
    lin = _kernel().Linears(k)
    for i in range(n):
        lin.add(*_add_args(tensors, ints, i))
    _BUILT[key] = lin
    if len(_BUILT) > BUILT_MAX:
        _BUILT.popitem(last=False)
    return lin


def clear_cache() -> None:
    """Forget every `Linears` object the ops built (registered ones stay with their owners)."""
    _BUILT.clear()
    _LIVE.clear()


def _check_x(x: Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"x must be (tokens, inputs), got {x.dim()} dimensions")


# ------------------------------------------------------------------ ops


@torch.library.custom_op("slim::cpu_linear", mutates_args=())
def cpu_linear(x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, zero: Tensor, G: int, a: Tensor, a_scale: Tensor,
               Ga: int, b: Tensor, b_scale: Tensor, Gb: int) -> Tensor:
    """One fused layer (base int4 or 2:4 weight, int4 adapters if `a` is not empty) for x (M, K): (M, N) in x's
    dtype. The arguments are `Int4Linear.native_args()`; `Linears(K).add(...); forward1(x)` in one op."""
    tensors, ints = split_args((w, idx, scale, zero, G, a, a_scale, Ga, b, b_scale, Gb))
    return linears(x.shape[1], tensors, ints).forward1(x)


@cpu_linear.register_fake
def _(x: Tensor, w: Tensor, idx: Tensor, scale: Tensor, zero: Tensor, G: int, a: Tensor, a_scale: Tensor, Ga: int,
      b: Tensor, b_scale: Tensor, Gb: int) -> Tensor:
    _check_x(x)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("slim::cpu_linears", mutates_args=())
def cpu_linears(x: Tensor, tensors: list[Tensor], ints: list[int]) -> list[Tensor]:
    """Several fused layers reading the same x (q/k/v, gate/up) in one kernel call: x quantized once, one parallel
    region. `tensors`/`ints`: each layer's `split_args(native_args())`, concatenated. One (M, N_l) per layer."""
    return list(linears(x.shape[1], tensors, ints).forward(x))


@cpu_linears.register_fake
def _(x: Tensor, tensors: list[Tensor], ints: list[int]) -> list[Tensor]:
    _check_x(x)
    return [x.new_empty((x.shape[0], tensors[i].shape[0])) for i in range(0, len(tensors), TENSORS_PER_LAYER)]


@torch.library.custom_op("slim::cpu_int4_gemv", mutates_args=())
def cpu_int4_gemv(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, G: int) -> Tensor:
    """x (M, K) @ W.T for one dense int4 matrix in slim's layout: (M, N) fp32."""
    return _kernel().int4_gemv(x, w, scale, zero, G)


@cpu_int4_gemv.register_fake
def _(x: Tensor, w: Tensor, scale: Tensor, zero: Tensor, G: int) -> Tensor:
    _check_x(x)
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@torch.library.custom_op("slim::cpu_half_linear", mutates_args=())
def cpu_half_linear(x: Tensor, w: Tensor) -> Tensor:
    """fp32 x (M, K) @ W.T for a bf16/fp16 W (N, K) widened inside the kernel (`HalfWeightLinear`): (M, N) fp32."""
    return _kernel().half_linear(x, w)


@cpu_half_linear.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    _check_x(x)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("slim::cpu_int4_dequant", mutates_args=())
def cpu_int4_dequant(w: Tensor, scale: Tensor, zero: Tensor, G: int) -> Tensor:
    """The dense (N, K) fp32 weight of a dense int4 matrix (the GEMM path at many tokens)."""
    return _kernel().int4_dequant(w, scale, zero, G)


@cpu_int4_dequant.register_fake
def _(w: Tensor, scale: Tensor, zero: Tensor, G: int) -> Tensor:
    return w.new_empty((w.shape[0], w.shape[1] * 2), dtype=torch.float32)


@torch.library.custom_op("slim::cpu_sparse24_dequant", mutates_args=())
def cpu_sparse24_dequant(values: Tensor, positions: Tensor, scale: Tensor, G: int) -> Tensor:
    """The dense (N, K) fp32 weight of a 2:4 matrix (the GEMM path at many tokens)."""
    return _kernel().sparse24_dequant(values, positions, scale, G)


@cpu_sparse24_dequant.register_fake
def _(values: Tensor, positions: Tensor, scale: Tensor, G: int) -> Tensor:
    return values.new_empty((values.shape[0], positions.shape[1] * 32), dtype=torch.float32)
