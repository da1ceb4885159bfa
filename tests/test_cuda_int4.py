"""`cuda-int4`: slim's Triton kernels match the reference backend on every stored layout, on every path (GEMV, GEMM,
dequantize + matmul) and split-K, keep 2:4 layers at 3 bits a weight, and compile whole. Without a GPU the kernels run
on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the `gpu` tests run them on CUDA."""

import copy

import pytest
import torch
from conftest import tiny_model

from slim.format.packed import SlimLinear
from slim.models import set_submodule
from slim.runtime import apply_backend, cuda_int4, resolve
from slim.testing.random_layers import random_slim_linear

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it)")
tk = pytest.importorskip("slim.kernels.triton")

on_gpu = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not tk.INTERPRET and not on_gpu,
                                       reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if on_gpu else "cpu"

# every layout option the stored format has; widths that are not multiples of the kernels' words or blocks
LAYOUTS = {
    "2:4 per-tensor": dict(),
    "2:4 groups 64 + int4 adapters": dict(group_size=64, rank=40),
    "2:4 + fp16 adapters": dict(rank=24, adapter_bits=0),
    "2:4 zero points g32": dict(group_size=32, zero_point=True),
    "2:4 groups 96 + adapter group 64": dict(group_size=96, rank=72, adapter_group=64),
    "1:4 groups 64 (dense int4)": dict(sparsity="1:4", group_size=64),
    "50% unstructured + adapters": dict(sparsity="0.5", rank=8),
    "dense groups 128, last short": dict(sparsity="dense", group_size=128, rank=20),
    "AWQ zero points g32": dict(sparsity="dense", group_size=32, zero_point=True, rank=16),
    "input_scale + bias": dict(input_scale=True, bias=True, rank=16),
    "8-bit adapters (16-bit path)": dict(rank=12, adapter_bits=8),
}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def _layer(name: str, d_out: int = 72, d_in: int = 200, seed: int = 3) -> SlimLinear:
    kw = LAYOUTS[name]
    if kw.get("sparsity") == "1:4" or kw.get("sparsity") == "dense":
        d_in = 192  # group sizes must fit; 2:4 layers take 200 (keep 100: not a whole number of kernel words)
    return random_slim_linear(d_out, d_in, seed=seed, **kw).to(DEVICE)


@needs_interpreter
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("path", ["gemv", "gemm", "dense"])
def test_matches_reference(name, path):
    layer = _layer(name)
    assert cuda_int4.supports(layer) is None
    fast = cuda_int4.convert(layer)
    fast.path = path
    for tokens in (1, 5):
        x = torch.randn(2, tokens, layer.in_features, device=DEVICE)
        ref = layer(x)
        y = fast(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        # fp32 activations: only summation order differs, and 16-bit adapters' rounding where they are dequantized
        assert _rel_err(y, ref) < (1e-5 if fast.adapter_kind != "16bit" else 2e-3), (name, path, tokens)


@needs_interpreter
@pytest.mark.parametrize("expand", ["group", "select"])
@pytest.mark.parametrize("name", ["2:4 per-tensor", "2:4 zero points g32", "2:4 groups 96 + adapter group 64"])
def test_both_tile_expansions(name, expand, monkeypatch):
    """The two ways a 2:4 tile is expanded for `tl.dot` (and for the prefill's dequantization) agree."""
    monkeypatch.setattr(tk, "EXPAND", expand)
    layer = _layer(name, seed=11)
    fast = cuda_int4.convert(layer)
    x = torch.randn(7, layer.in_features, device=DEVICE)
    for path in ("gemm", "dense"):
        fast.path = path
        assert _rel_err(fast(x), layer(x)) < 1e-5, (name, expand, path)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path,split", [("gemv", 1), ("gemv", 3), ("gemm", 1), ("gemm", 2), ("dense", 0)])
def test_16bit_activations_and_split_k(dtype, path, split):
    """bf16/fp16 in and out, split-K's atomic fp32 partial sums, bias and zero points on every path."""
    for kw in (dict(), dict(sparsity="dense", group_size=32, zero_point=True, bias=True)):
        layer = random_slim_linear(130, 256, seed=5, **kw).to(DEVICE)
        fast = cuda_int4.convert(layer)
        b = fast.base
        x = torch.randn(3, 256, device=DEVICE).to(dtype)
        bias = None if fast.bias is None else fast.bias.to(dtype)
        y = tk.int4_mm_impl(x, b.qv, b.qp, b.gscale, b.gzero, b.tscale, bias, None, b.group, tk.PATHS[path], split)
        ref = layer(x.float())
        assert y.dtype == dtype
        assert _rel_err(y, ref) < (1.5e-2 if dtype == torch.bfloat16 else 2e-3), (kw, path, split)


@needs_interpreter
def test_2of4_reads_three_bits_a_weight_and_keeps_no_dense_copy():
    d_out, d_in = 96, 512
    layer = random_slim_linear(d_out, d_in, seed=1).to(DEVICE)
    fast = cuda_int4.convert(layer)
    b = fast.base
    assert b.qv.dtype == torch.int32 and b.qp.dtype == torch.int16
    weight_bytes = b.qv.numel() * 4 + b.qp.numel() * 2
    assert weight_bytes * 8 == 3 * d_out * d_in  # 4-bit kept codes + 2-bit positions, half the weights kept
    assert all(t.numel() < d_out * d_in // 4 for t in fast.buffers())
    # the conversion is a regrouping of the stored bytes: the kernels' dequantized weight is the reference's
    wt = b.dequantize_t(torch.float32)
    assert torch.equal(wt.t(), layer.dequantized_weight())


@needs_interpreter
def test_refuses_what_it_cannot_run():
    assert "8-bit" in cuda_int4.supports(random_slim_linear(32, 64, bits=8))
    assert "fp16 values" in cuda_int4.supports(random_slim_linear(32, 64, bits=0))
    assert "multiple of 16" in cuda_int4.supports(random_slim_linear(32, 64, group_size=8))
    with pytest.raises(ValueError, match="adapters must be one of"):
        cuda_int4.convert(random_slim_linear(32, 64, rank=4), adapters="fp8")
    with pytest.raises(ValueError, match="path must be one of"):
        cuda_int4.convert(random_slim_linear(32, 64)).path = "fast"


def test_not_available_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = cuda_int4.available("cpu")
    assert why is not None and ("CUDA" in why or "Triton" in why)


@needs_interpreter
@pytest.mark.parametrize("adapters", ["int4", "16bit"])
def test_adapter_modes_agree(adapters):
    layer = random_slim_linear(64, 256, seed=7, rank=26, group_size=128).to(DEVICE)
    fast = cuda_int4.convert(layer, adapters=adapters)
    assert fast.adapter_kind == adapters
    x = torch.randn(4, 256, device=DEVICE)
    assert _rel_err(fast(x), layer(x)) < (1e-5 if adapters == "int4" else 2e-3)


def _compressed_tiny(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose linears are random 2:4 SlimLinears with int4 adapters (shapes: multiples of 32)."""
    model = tiny_model("llama", layers=2)
    for i, (name, lin) in enumerate([(n, m) for n, m in model.model.layers.named_modules()
                                     if isinstance(m, torch.nn.Linear)]):
        set_submodule(model.model.layers, name, random_slim_linear(lin.out_features, lin.in_features, rank=8,
                                                                   group_size=32, seed=seed + i))
    return model.to(DEVICE)


@needs_interpreter
def test_whole_model_through_the_backend():
    model = _compressed_tiny()
    ref = copy.deepcopy(model)
    assert resolve("cuda-int4", DEVICE) == ["cuda-int4", "reference"]
    report = apply_backend(model, "cuda-int4", DEVICE)
    assert report["counts"] == {"cuda-int4": 14}
    ids = torch.randint(0, 256, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert _rel_err(model(ids).logits, ref(ids).logits) < 1e-4


@needs_interpreter
def test_custom_op_opcheck():
    layer = random_slim_linear(48, 128, seed=2, group_size=32, zero_point=True, bias=True).to(DEVICE)
    b = cuda_int4.convert(layer).base
    x = torch.randn(3, 128, device=DEVICE)
    acc = torch.randn(3, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.slim.int4_mm.default,
                          (x, b.qv, b.qp, b.gscale, b.gzero, b.tscale, layer.bias, acc, b.group, 0))


@needs_interpreter
def test_decode_step_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break: the kernels reach torch.compile as one op each."""
    import inspect

    from transformers import DynamicCache

    model = _compressed_tiny(seed=4)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    apply_backend(model, "cuda-int4", DEVICE)
    ids = torch.randint(0, 256, (1, 5), device=DEVICE)
    with torch.no_grad():
        eager_cache, comp_cache = DynamicCache(), DynamicCache()
        model(ids, use_cache=True, **{kw: eager_cache})
        model(ids, use_cache=True, **{kw: comp_cache})
        nxt = torch.tensor([[7]], device=DEVICE)
        want = model(nxt, use_cache=True, **{kw: eager_cache}).logits
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True, backend="eager")
        got = step(nxt, use_cache=True, **{kw: comp_cache}).logits
    assert torch.equal(got, want)


# ------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_7b_shapes_match_reference(dtype, shape):
    layer = random_slim_linear(*shape, rank=410, group_size=128, seed=0).cuda()
    fast = cuda_int4.convert(layer)
    w = layer.effective_weight()
    for tokens in (1, 4, 16, 64, 256):
        x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
        ref = x.float() @ w.t()
        y = fast(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert _rel_err(y, ref) < (2e-2 if dtype == torch.bfloat16 else 5e-3), (shape, tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a CUDA device")
def test_gpu_cuda_graph_replay():
    layer = random_slim_linear(4096, 4096, rank=64, seed=1).cuda()
    fast = cuda_int4.convert(layer)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = fast(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fast(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a CUDA device")
def test_gpu_cuda_2of4_keeps_bf16():
    from slim.runtime import cuda_2of4

    if cuda_2of4.available("cuda") is not None:
        pytest.skip(cuda_2of4.available("cuda"))
    layer = random_slim_linear(256, 512, seed=2).cuda()
    mod = cuda_2of4.Sparse24Linear(layer, torch.bfloat16)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16) * 1e3  # beyond fp16's range once multiplied
    y = mod(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel_err(y, x.float() @ layer.dequantized_weight().t()) < 2e-2


@needs_interpreter
def test_compiled_decode_loop_through_the_backend():
    """The loop the GPU benchmark times: a static KV cache and a compiled one-token step (inductor here, CUDA graphs
    on a GPU) over `cuda-int4` layers gives the eager loop's greedy tokens, in one graph."""
    from torch._dynamo.utils import counters

    from slim.runtime.generate import generate

    model = _compressed_tiny(seed=8)
    apply_backend(model, "cuda-int4", DEVICE)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    eager = generate(model, None, ids, max_new_tokens=4, stop_at_eos=False)
    torch._dynamo.reset()
    counters.clear()
    comp = generate(model, None, ids, max_new_tokens=4, stop_at_eos=False, compile=True)
    assert comp["tokens"] == eager["tokens"]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
