"""Random compressed layers of any stored layout, for backend tests and speed benchmarks.

A kernel's speed does not depend on the values, and its exactness is checked against the reference backend on
the same layer, so random codes, masks, scales and adapters in the real stored layout are all either needs.
"""

from __future__ import annotations

import torch

from ..algorithms.quant import n_groups
from ..format.packed import CompressedWeight, SlimLinear


def random_slim_linear(
    d_out: int, d_in: int, sparsity: str = "2:4", bits: int = 4, group_size: int = 0, zero_point: bool = False,
    rank: int = 0, adapter_bits: int = 4, adapter_group: int = 128, input_scale: bool = False, bias: bool = False,
    fp8_inputs: bool = False, seed: int = 0,
) -> SlimLinear:
    """A SlimLinear with random contents; `sparsity` is 'N:M', a kept fraction like '0.5', or 'dense'."""
    g = torch.Generator().manual_seed(seed)
    if sparsity == "dense":
        kind, n, m = "dense", 0, 0
        mask = torch.ones(d_out, d_in, dtype=torch.bool)
    elif ":" in sparsity:
        kind = "nm"
        n, m = (int(v) for v in sparsity.split(":"))
        pick = torch.rand(d_out, d_in // m, m, generator=g).argsort(-1)[..., :n]
        mask = torch.zeros(d_out, d_in // m, m, dtype=torch.bool).scatter_(-1, pick, True).view(d_out, d_in)
    else:
        kind, n, m = "unstructured", 0, 0
        keep = round(d_in * (1 - float(sparsity)))
        pick = torch.rand(d_out, d_in, generator=g).argsort(-1)[:, :keep]
        mask = torch.zeros(d_out, d_in, dtype=torch.bool).scatter_(1, pick, True)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    groups = n_groups(d_in, group_size) if group_size else 0
    sshape = (d_out, groups) if group_size else ()
    cw = CompressedWeight(
        mask=mask,
        codes=torch.randint(lo, hi, (d_out, d_in), generator=g, dtype=torch.int8) if bits else None,
        dense_values=None if bits else torch.randn(d_out, d_in, generator=g) * 0.02,
        scale=(torch.rand(sshape, generator=g) * 0.01 + 0.002) if bits else None,
        bits=bits, group_size=group_size,
        zero=torch.randint(lo, hi, (d_out, groups), generator=g, dtype=torch.int8) if zero_point else None,
        input_scale=(torch.rand(d_in, generator=g) + 0.5) if input_scale else None,
    )
    if rank:
        if adapter_bits:
            alo, ahi = -(2 ** (adapter_bits - 1)), 2 ** (adapter_bits - 1)
            ca = torch.randint(alo, ahi, (rank, d_in), generator=g, dtype=torch.int8)
            cb = torch.randint(alo, ahi, (d_out, rank), generator=g, dtype=torch.int8)
            sa = torch.rand(rank, n_groups(d_in, adapter_group), generator=g) * 0.01 + 0.001
            sb = torch.rand(d_out, n_groups(rank, adapter_group), generator=g) * 0.01 + 0.001
            cw.adapter_codes, cw.adapter_scales = (ca, cb), (sa, sb)
            cw.adapter_bits, cw.adapter_group = adapter_bits, adapter_group
            cw.lora_A, cw.lora_B = ca.float(), cb.float()  # only their shapes are read when packing codes
        else:
            cw.lora_A = torch.randn(rank, d_in, generator=g) * 0.02
            cw.lora_B = torch.randn(d_out, rank, generator=g) * 0.02
    b = torch.randn(d_out, generator=g) * 0.1 if bias else None
    return SlimLinear.from_compressed(cw, b, kind, n, m, fp8_inputs=fp8_inputs)
