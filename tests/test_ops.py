"""slim's CPU kernels as torch.library ops (slim/kernels/ops.py): each op passes opcheck and matches the bound kernel
call it wraps, and a compiled decode step through a converted tiny Llama traces whole (fullgraph) and matches eager."""

import copy
import gc
import inspect

import pytest
import torch
from conftest import tiny_model
from torch import nn

from slim.kernels import native, ops
from slim.runtime import apply_backend, cpu_int4
from slim.testing.random_layers import random_slim_linear

needs_native = pytest.mark.skipif(native.load() is None,
                                  reason=f"slim's native CPU kernel cannot be built here "
                                         f"({native.unavailable_reason() or 'build failed, see the log'})")

# layer kinds by the paths through Int4Linear they take
FUSED_24 = dict(sparsity="2:4", group_size=32, rank=8)  # 2:4 base + int4 adapters: one fused call
FUSED_ZP = dict(sparsity="dense", group_size=64, zero_point=True, rank=8)  # dense int4 with zero points
FUSED_BIAS = dict(sparsity="2:4", bias=True, input_scale=True)  # fused, with work around the call
FP16_ADAPTERS = dict(sparsity="0.5", group_size=32, rank=8, adapter_bits=0)  # base alone through int4_gemv
FP16_ADAPTERS_24 = dict(sparsity="2:4", rank=8, adapter_bits=0)  # 2:4 base alone through a Linears
PER_TENSOR = dict(sparsity="dense")  # group 0


def _layer(d_out: int, d_in: int, seed: int = 0, **kw) -> cpu_int4.Int4Linear:
    layer = cpu_int4.convert(random_slim_linear(d_out, d_in, seed=seed, **kw))
    assert layer.kernel == "slim"
    return layer


@needs_native
@pytest.mark.parametrize("kw", [FUSED_24, FUSED_ZP, PER_TENSOR], ids=["2of4-adapters", "zero-point", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_passes_opcheck_and_matches_the_bound_call(kw, dtype):
    layer = _layer(48, 64, **kw)
    args = layer.native_args()
    for m in (1, 5):
        x = torch.randn(m, 64).to(dtype)
        torch.library.opcheck(torch.ops.slim.cpu_linear.default, (x, *args))
        y = ops.cpu_linear(x, *args)
        assert y.dtype == dtype and torch.equal(y, layer.__dict__["_fused_call"](x))


@needs_native
def test_cpu_linears_passes_opcheck_and_matches_the_shared_call():
    q, k, v = (_layer(n, 64, seed=i, **FUSED_24) for i, n in enumerate((64, 32, 32)))
    group = cpu_int4.SharedInput([q, k, v])
    tensors, ints = [], []
    for m in (q, k, v):
        t, i = ops.split_args(m.native_args())
        tensors += t
        ints += i
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.slim.cpu_linears.default, (x, tensors, ints))
    ys = ops.cpu_linears(x, tensors, ints)
    assert [y.shape for y in ys] == [(3, 64), (3, 32), (3, 32)]
    for y, want in zip(ys, group.build().forward(x), strict=True):
        assert torch.equal(y, want)
    assert ops.linears(64, tensors, ints) is group.kernel  # the group's own object, found by its arguments


@needs_native
def test_cpu_int4_gemv_and_dequant_ops():
    layer = _layer(48, 64, **FP16_ADAPTERS)
    b, kern = layer.base, native.load()
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.slim.cpu_int4_gemv.default, (x, b.packed, b.scale, b.zero, b.group))
    assert torch.equal(ops.cpu_int4_gemv(x, b.packed, b.scale, b.zero, b.group),
                       kern.int4_gemv(x, b.packed, b.scale, b.zero, b.group))
    torch.library.opcheck(torch.ops.slim.cpu_int4_dequant.default, (b.packed, b.scale, b.zero, b.group))
    assert torch.equal(ops.cpu_int4_dequant(b.packed, b.scale, b.zero, b.group), b.dequantize(torch.float32))
    s24 = _layer(48, 64, **FP16_ADAPTERS_24).base
    a24 = (s24.values, s24.positions, s24.scale, s24.group)
    torch.library.opcheck(torch.ops.slim.cpu_sparse24_dequant.default, a24)
    assert torch.equal(ops.cpu_sparse24_dequant(*a24), s24.dequantize(torch.float32))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_linear_op(dtype):
    w = torch.randn(40, 32).to(dtype)
    x = torch.randn(3, 32)
    torch.library.opcheck(torch.ops.slim.cpu_half_linear.default, (x, w))
    assert torch.equal(ops.cpu_half_linear(x, w), native.load().half_linear(x, w))


@needs_native
def test_linears_cache_follows_its_owner():
    layer = _layer(48, 64, **FUSED_24)
    t, i = ops.split_args(layer.native_args())
    assert ops.linears(64, t, i) is layer.__dict__["_fused_call"].__self__  # the layer's object: nothing rebuilt
    fresh = [x.clone() for x in t]
    assert ops.linears(64, fresh, i) is ops.linears(64, fresh, i)  # an unregistered one is built once
    key = ops._key(64, t, i)
    assert key in ops._LIVE
    del layer
    gc.collect()
    assert key not in ops._LIVE  # held weakly: a dropped layer frees its tensors


def _converted_llama(monkeypatch, fp32_activations: str = "0") -> nn.Module:
    """The tiny Llama (bf16) with every linear a random SlimLinear of one of the kinds above, converted by
    `apply_backend` (sibling groups, and fp32 activations with a 16-bit lm_head if asked)."""
    from slim.models import set_submodule

    monkeypatch.setenv("SLIM_CPU_FP32_ACTIVATIONS", fp32_activations)
    model = tiny_model("llama").to(torch.bfloat16)
    kinds = [{}, {"q_proj": FUSED_24, "k_proj": FUSED_ZP, "v_proj": FUSED_BIAS, "o_proj": FP16_ADAPTERS,
                  "gate_proj": FP16_ADAPTERS_24, "up_proj": PER_TENSOR, "down_proj": FUSED_24}]
    seed = 0
    for b, block in enumerate(model.model.layers):
        for name, lin in list(block.named_modules()):
            if isinstance(lin, nn.Linear):
                kw = kinds[b].get(name.split(".")[-1], FUSED_24)
                set_submodule(block, name, random_slim_linear(lin.out_features, lin.in_features, seed=seed, **kw))
                seed += 1
    apply_backend(model, "cpu-int4")
    mlp = model.model.layers[1].mlp
    mlp.up_proj.gemm_min_tokens = mlp.down_proj.gemm_min_tokens = 1  # the dequantize-and-GEMM path
    return model


def _compiled_and_eager_step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    """One decode step (one token after an 8-token prefill in a KV cache) through the model compiled whole
    (fullgraph: any graph break raises) and eagerly: (compiled logits, eager logits, the slim ops in the graph)."""
    from transformers import DynamicCache

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    targets: set = set()

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        targets.update(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)), use_cache=True,
                        **{cache_kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
            copied = copy.deepcopy(cache)
            compiled = torch.compile(model, fullgraph=True, backend=record)
            got = compiled(nxt, use_cache=True, **{cache_kw: copied}).logits
            want = model(nxt, use_cache=True, **{cache_kw: cache}).logits
    finally:
        torch._dynamo.reset()
    return got, want, {str(t) for t in targets if str(t).startswith("slim.")}


@needs_native
@pytest.mark.parametrize("fp32_activations", ["1", "0"], ids=["fp32-activations", "bf16-activations"])
def test_compiled_decode_step_traces_whole_and_matches_eager(monkeypatch, fp32_activations):
    model = _converted_llama(monkeypatch, fp32_activations)
    assert model.model.layers[0].self_attn.q_proj.__dict__.get("_group") is not None  # eager runs q/k/v as one
    assert isinstance(model.lm_head, cpu_int4.HalfWeightLinear) == (fp32_activations == "1")
    got, want, slim_ops = _compiled_and_eager_step(model)
    assert torch.equal(got, want)
    want_ops = {"slim.cpu_linear.default", "slim.cpu_int4_gemv.default", "slim.cpu_int4_dequant.default",
                "slim.cpu_sparse24_dequant.default"}
    assert slim_ops == want_ops | ({"slim.cpu_half_linear.default"} if fp32_activations == "1" else set())


@pytest.mark.skipif(cpu_int4.available("cpu") is not None, reason="no CPU int4 kernel in this torch")
def test_compiled_decode_step_on_torchs_kernel(monkeypatch):
    """Without slim's kernel every layer runs PyTorch's int4 kernel (an aten op): the step still traces whole."""
    monkeypatch.setattr(native, "load", lambda: None)
    model = _converted_llama(monkeypatch)
    assert all(m.kernel == "torch" for m in model.modules() if isinstance(m, cpu_int4.Int4Linear))
    got, want, slim_ops = _compiled_and_eager_step(model)
    assert torch.equal(got, want) and not slim_ops
