"""`cuda-2of4`: 2:4 layers on NVIDIA tensor cores through `torch.sparse.to_sparse_semi_structured`.

The kept values are dequantized once at load (fp16 values + the sparse metadata: about 9 bits a weight instead of
16), adapters run as a second small fp16 GEMM. Needs a CUDA device with 2:4 support (sm80+). Untested on a GPU in
this project's CI (tests marked `gpu`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..packed import SlimLinear
from ..quant import fp8_fake_quant

NAME = "cuda-2of4"


@functools.lru_cache(maxsize=4)
def available(device: str = "cuda") -> str | None:
    if torch.device(device).type != "cuda":
        return "runs on CUDA devices only"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return "semi-structured sparsity needs compute capability 8.0 or newer"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no to_sparse_semi_structured"
    return None


def supports(layer: SlimLinear) -> str | None:
    L = layer.layout
    if L.sparsity != "nm" or (L.n, L.m) != (2, 4):
        return f"sparsity is {L.sparsity if L.sparsity != 'nm' else f'{L.n}:{L.m}'}, not 2:4"
    if L.d_out % 64 or L.d_in % 64:
        return f"shape ({L.d_out}, {L.d_in}) is not a multiple of 64 in both dimensions"
    return None


class Sparse24Linear(nn.Module):
    """A 2:4 SlimLinear as a semi-structured sparse fp16 weight plus fp16 adapters."""

    def __init__(self, layer: SlimLinear) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.layout = L = layer.layout
        self.in_features, self.out_features = L.d_in, L.d_out
        dev = layer.values.device if layer.values.device.type == "cuda" else torch.device("cuda")
        w = layer.dequantized_weight().to(dev, torch.float16)
        self.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        ad = layer.adapters()
        self.register_buffer("lora_A", None if ad is None else ad[0].to(dev, torch.float16))
        self.register_buffer("lora_B", None if ad is None else ad[1].to(dev, torch.float16))
        self.register_buffer("input_scale", layer.input_scale.to(dev) if L.input_scale else None)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dev, torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2 = x2 / self.input_scale.to(x2.dtype)
        if self.layout.fp8_inputs:
            x2 = fp8_fake_quant(x2)
        xh = x2.to(torch.float16)
        y = F.linear(xh, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(xh, self.lora_A), self.lora_B)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


COMPRESSED_TYPES = (Sparse24Linear,)


def convert(layer: SlimLinear) -> nn.Module:
    return Sparse24Linear(layer)
