"""`cuda-2of4`: 2:4 layers on NVIDIA tensor cores through `torch.sparse.to_sparse_semi_structured`.

The kept values are dequantized once at load, in the model's 16-bit dtype (bf16 or fp16: cuSPARSELt takes both, so a
bf16 model's activations are never squeezed into fp16's range), plus the sparse metadata: about 9 bits a weight
instead of `cuda-int4`'s 3. Adapters run as a second small GEMM in the same dtype. An fp32 model is refused (load it
with --dtype bf16). cuSPARSELt pads a single token to 16-32 rows (0.11x dense at one token, pytorch#111339), so this
is a prefill candidate only: `auto` never picks it, and benchmarks/gpu_runtime.py measures it beside `cuda-int4`.
Needs a CUDA device with 2:4 support (sm80+); checked by the tests marked `gpu`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..format.packed import SlimLinear, layer_inputs

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
    """A 2:4 SlimLinear as a semi-structured sparse 16-bit weight plus 16-bit adapters, in `dtype` (the model's)."""

    def __init__(self, layer: SlimLinear, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"cuda-2of4 computes in bf16 or fp16, not {dtype}; load the model with --dtype bf16")
        self.layout = L = layer.layout
        self.in_features, self.out_features = L.d_in, L.d_out
        self.dtype = dtype
        dev = layer.values.device if layer.values.device.type == "cuda" else torch.device("cuda")
        w = layer.dequantized_weight().to(dev, dtype)
        self.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        ad = layer.adapters()
        self.register_buffer("lora_A", None if ad is None else ad[0].to(dev, dtype))
        self.register_buffer("lora_B", None if ad is None else ad[1].to(dev, dtype))
        self.register_buffer("input_scale", layer.input_scale.to(dev) if L.input_scale else None)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dev, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = layer_inputs(x.reshape(-1, self.in_features), self.input_scale, self.layout.fp8_inputs)
        if x2.dtype != self.dtype:
            raise TypeError(f"cuda-2of4 layer holds {self.dtype} weights but got {x2.dtype} activations; load the "
                            f"model in {self.dtype} or use --backend cuda-int4")
        y = F.linear(x2, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x2, self.lora_A), self.lora_B)
        return y.reshape(*shape[:-1], self.out_features)


COMPRESSED_TYPES = (Sparse24Linear,)


def convert(layer: SlimLinear) -> nn.Module:
    """In the dtype of the layer's bias if it has one, else bf16; `prepare_model` moves it to the model's dtype."""
    dtype = layer.bias.dtype if layer.bias is not None and layer.bias.dtype in (torch.float16, torch.bfloat16) \
        else torch.bfloat16
    return Sparse24Linear(layer, dtype)


def prepare_model(model: nn.Module) -> str | None:
    """Every converted layer in the model's own 16-bit dtype (a bf16 model is never cast to fp16); an fp32 model is
    refused, since the sparse weight is 16-bit and a per-layer cast would hide a silent precision change."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else torch.bfloat16
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"cuda-2of4 runs bf16 or fp16 models; this one is {dtype}: load it with --dtype bf16")
    for mod in model.modules():
        if isinstance(mod, Sparse24Linear) and mod.dtype != dtype:
            dense = mod.weight.to_dense().to(dtype)
            from torch.sparse import to_sparse_semi_structured

            mod.weight = nn.Parameter(to_sparse_semi_structured(dense), requires_grad=False)
            for key in ("lora_A", "lora_B", "bias"):
                if getattr(mod, key) is not None:
                    setattr(mod, key, getattr(mod, key).to(dtype))
            mod.dtype = dtype
    return None
