"""Run-time backends: each matches the reference backend on every stored layout, falls back where it must, and
keeps no dense copy of a base weight."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import slim
from slim.cli.commands import main
from slim.config import CompressConfig
from slim.format.packed import SlimLinear
from slim.kernels import native
from slim.pipeline.loop import compress_model
from slim.runtime import BackendError, apply_backend, cpu_int4, model_bytes, resolve
from slim.testing.random_layers import random_slim_linear

needs_int4 = pytest.mark.skipif(cpu_int4.available("cpu") is not None, reason="no CPU int4 kernel in this torch")
needs_native = pytest.mark.skipif(native.load() is None, reason="slim's CPU kernel cannot be built here")

# every layout option the stored format has, on shapes the kernel takes
LAYOUTS = {
    "2:4 per-tensor": dict(),
    "2:4 + int4 adapters": dict(rank=40),
    "2:4 + fp16 adapters": dict(rank=24, adapter_bits=0),
    "1:4 groups 64": dict(sparsity="1:4", group_size=64),
    "50% unstructured": dict(sparsity="0.5", rank=8),
    "dense groups 128 (last group short)": dict(sparsity="dense", group_size=128, rank=20),
    "AWQ zero points g32": dict(group_size=32, zero_point=True, rank=16),
    "input_scale + bias": dict(input_scale=True, bias=True, rank=16),
    "fp8 inputs": dict(fp8_inputs=True, rank=8),
    "adapter group 64": dict(rank=72, adapter_group=64),
    "2:4 groups 96 (odd blocks a group)": dict(group_size=96, rank=8),
}


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


@needs_int4
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 7, 160])
def test_cpu_int4_matches_reference(name, tokens):
    layer = random_slim_linear(96, 576, seed=3, **LAYOUTS[name])
    assert cpu_int4.supports(layer) is None
    x = torch.randn(2, tokens, 576)
    ref = layer(x)
    fast = cpu_int4.convert(layer)
    assert fast.base.dense_ok  # the kernel's packed layout was decoded, so both paths run
    for threshold in (1, 1 << 30):  # dequantize + GEMM, and the int4 kernel
        fast.gemm_min_tokens = threshold
        y = fast(x)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        # bf16 activations in the kernel: ~2^-8 relative; nothing else may differ
        assert _rel_err(y, ref) < 1.5e-2, (name, threshold)
    # bf16 inputs, as a bf16 model feeds them (against the reference on the same bf16-rounded inputs)
    xb = x.bfloat16()
    assert _rel_err(fast(xb), layer(xb.float())) < 2e-2


@needs_int4
@pytest.mark.parametrize("name", ["2:4 + int4 adapters", "AWQ zero points g32", "dense groups 128 (last group short)"])
def test_torch_kernel_path_without_slims_kernel(name, monkeypatch):
    """Where slim's own kernel cannot be built, PyTorch's int4 kernel runs every layout."""
    from slim.kernels import native

    monkeypatch.setattr(native, "load", lambda: None)
    layer = random_slim_linear(96, 576, seed=4, **LAYOUTS[name])
    fast = cpu_int4.convert(layer)
    assert fast.kernel == "torch" and fast.base.dense_ok
    x = torch.randn(9, 576)
    for threshold in (1, 1 << 30):
        fast.gemm_min_tokens = threshold
        assert _rel_err(fast(x), layer(x)) < 1.5e-2


@needs_int4
def test_cpu_int4_per_tensor_scale_is_exact_on_the_gemm_path():
    """Codes and the fp32 per-tensor scale reach the GEMM unrounded: with fp32 inputs it equals the reference."""
    layer = random_slim_linear(64, 256, seed=1)
    fast = cpu_int4.convert(layer)
    fast.gemm_min_tokens = 1
    if fast.gemm_dtype != torch.float32:
        pytest.skip("this CPU runs the GEMM path in bf16")
    x = torch.randn(5, 256)
    assert torch.allclose(fast(x), layer(x), rtol=1e-5, atol=1e-5)


@needs_int4
@pytest.mark.parametrize("n", [16, 48, 80, 576, 1536])
def test_unpack_int4pack_inverts_the_kernel_packing(n):
    q = torch.randint(0, 16, (n, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(cpu_int4.unpack_int4pack(packed, n, 64).to(torch.int32), q)


@pytest.mark.parametrize("kw,why", [
    (dict(bits=8), "8-bit"),
    (dict(bits=0), "fp16 values"),
    (dict(sparsity="dense", group_size=48), "no kernel group size"),
])
def test_cpu_int4_refuses_what_it_cannot_run(kw, why):
    d_out = 64
    layer = random_slim_linear(d_out, 96, **kw)
    assert why in cpu_int4.supports(layer)
    assert "multiple of 16" in cpu_int4.supports(random_slim_linear(40, 64))


@needs_int4
def test_auto_falls_back_layer_by_layer(caplog):
    model = torch.nn.Sequential(random_slim_linear(64, 128, seed=0), random_slim_linear(64, 64, bits=8, seed=1),
                                random_slim_linear(40, 64, seed=2))
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = model[2](model[1](model[0](x)))
    with caplog.at_level(logging.INFO, logger="slim.runtime"):
        rep = apply_backend(model, "auto")
    assert rep["layers"] == {"0": "cpu-int4", "1": "reference", "2": "reference"}
    assert "8-bit" in caplog.text and "falling back to reference" in caplog.text
    assert isinstance(model[0], cpu_int4.Int4Linear) and isinstance(model[1], SlimLinear)
    with torch.no_grad():
        assert _rel_err(model(x), ref) < 2e-2


def test_backend_errors_before_work():
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        resolve("fast")
    with pytest.raises(BackendError, match="CUDA"):
        resolve("cuda-2of4", "cpu")
    assert resolve("reference") == ["reference"]
    assert resolve("auto", "cpu")[-1] == "reference"


def test_reference_dense_cache_is_opt_in():
    layer = random_slim_linear(32, 64, rank=4)
    layer(torch.randn(2, 64))
    assert layer._cached is None
    layer.cache = True
    layer(torch.randn(2, 64))
    assert layer._cached is not None


def _tiny_checkpoint(tmp_path, dtype=None):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 8, "seqlen": 32, "batch_size": 4}})
    compress_model(model, ids, cfg, progress=False)
    slim.save(model, tmp_path / "ck", meta={"config": cfg.to_dict()}, dtype=dtype)
    return tmp_path / "ck", ids


@needs_int4
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tiny_model_logits_auto_vs_reference(tmp_path, dtype):
    ck, ids = _tiny_checkpoint(tmp_path, dtype)
    ref = slim.load(ck, backend="reference")
    fast = slim.load(ck)  # auto
    assert fast.slim_backend["counts"] == {"cpu-int4": 14}
    assert not any(isinstance(m, SlimLinear) for m in fast.modules())
    with torch.no_grad():
        a, b = ref(ids).logits.float(), fast(ids).logits.float()
    assert _rel_err(b, a) < 3e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # no dense copy of any base weight: about 4 bits a weight (+ adapters, scales), far below bf16
    n_weights = sum(m.layout.d_in * m.layout.d_out for m in ref.modules() if isinstance(m, SlimLinear))
    assert model_bytes(fast)["linear_bytes"] < 0.6 * 2 * n_weights  # (rank padding weighs much at width 64)
    for t in list(fast.parameters()) + list(fast.buffers()):
        assert t.dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float16, torch.int32, torch.int64)
        if t.dim() == 2 and t.is_floating_point() and t.numel() >= 32 * 64:  # as large as the smallest weight
            assert 256 in t.shape, t.shape  # only the embedding / lm_head are dense


@needs_native
@pytest.mark.parametrize("kw", [dict(), dict(group_size=128), dict(group_size=96), dict(rank=40)])
def test_sparse24_kernel_equals_dense_int4_kernel(kw, monkeypatch):
    """The 2:4 kernel (3 bits a weight, gathered activations, two blocks a step) computes what the dense-int4 kernel
    computes from the same int8-quantized activations: equal up to float summation order."""
    layer = random_slim_linear(192, 576, seed=3, **kw)
    fast = cpu_int4.convert(layer)
    monkeypatch.setenv("SLIM_CPU_SPARSE24", "0")
    dense = cpu_int4.convert(layer)
    assert fast.sparse24 and not dense.sparse24
    for tokens in (1, 2, 3, 5, 8, 17):
        x = torch.randn(tokens, 576)
        assert _rel_err(fast(x), dense(x)) < 2e-6, (kw, tokens)


def _int8_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernel sees it: int8 with one scale (max |x| / 127) per `block` inputs, dequantized."""
    xb = x.view(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).view_as(x)


@needs_native
@pytest.mark.parametrize("zero_point", [False, True])
def test_kernel_quantizes_activations_per_16_inputs(zero_point):
    """The kernel's one approximation is int8 activations with a scale per 16 inputs: emulated in torch, it agrees
    to float summation order, and a scale per 32 (llama.cpp's Q8_0) would not."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 64, 256, 64
    nibbles = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // group, generator=g) + 0.5
    zero = torch.randn(n, k // group, generator=g) if zero_point else None
    mat = cpu_int4.NativeInt4Matrix(nibbles, scale, zero, group)
    w = (nibbles.float() - 8) * scale.repeat_interleave(group, 1)
    if zero_point:
        w = w + zero.repeat_interleave(group, 1)
    x = torch.randn(5, k, generator=g)
    x[:, 5] *= 40  # an outlier channel, as LLM activations have
    y = mat.mm(x)
    assert _rel_err(y, _int8_rows(x, 16) @ w.T) < 2e-6
    assert _rel_err(y, _int8_rows(x, 32) @ w.T) > 1e-4


@needs_int4
def test_fp32_activations_keep_16bit_weights(tmp_path, monkeypatch):
    """Where the CPU has no bf16 arithmetic a bf16 model runs fp32 activations; its dense weights stay bf16."""
    ck, ids = _tiny_checkpoint(tmp_path, torch.bfloat16)
    monkeypatch.setenv("SLIM_CPU_FP32_ACTIVATIONS", "1")
    fast = slim.load(ck)
    assert fast.slim_backend["activations"] == "fp32"
    head, emb = fast.get_output_embeddings(), fast.get_input_embeddings()
    assert isinstance(head, cpu_int4.HalfWeightLinear) and head.weight.dtype == torch.bfloat16
    assert emb.weight.dtype == torch.bfloat16
    if fast.config.tie_word_embeddings:
        assert head.weight is emb.weight
    assert fast.model.norm.weight.dtype == torch.float32
    ref = slim.load(ck, backend="reference", dtype="fp32")  # the same bf16 values, computed in fp32
    with torch.no_grad():
        y, r = fast(ids).logits, ref(ids).logits
    assert y.dtype == torch.float32
    assert _rel_err(y, r) < 3e-2 and (y.argmax(-1) == r.argmax(-1)).float().mean() > 0.9
    monkeypatch.setenv("SLIM_CPU_FP32_ACTIVATIONS", "0")
    off = slim.load(ck)
    assert off.slim_backend["activations"] == "as stored" and off(ids[:1]).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_half_weight_linear(dtype, tokens, monkeypatch):
    monkeypatch.setattr(cpu_int4, "HALF_GEMM_ROWS", 48)  # the many-token path in several slices
    lin = torch.nn.Linear(64, 100).to(dtype)
    half = cpu_int4.HalfWeightLinear(lin)
    assert half.weight is lin.weight
    x = torch.randn(2, tokens, 64)
    y = half(x)
    assert y.dtype == torch.float32 and y.shape == (2, tokens, 100)
    torch.testing.assert_close(y, F.linear(x, lin.weight.float(), lin.bias.float()), rtol=1e-5, atol=1e-5)


@needs_native
def test_shared_input_groups_are_exact(tmp_path, monkeypatch):
    ck, ids = _tiny_checkpoint(tmp_path)
    fused = slim.load(ck)
    monkeypatch.setenv("SLIM_CPU_FUSE", "0")
    plain = slim.load(ck)
    attn, mlp, pa = fused.model.layers[0].self_attn, fused.model.layers[0].mlp, plain.model.layers[0].self_attn
    group = attn.q_proj.__dict__.get("_group")
    assert group is not None and group is attn.v_proj.__dict__["_group"] and group.members[1] is attn.k_proj
    assert mlp.gate_proj.__dict__["_group"] is mlp.up_proj.__dict__["_group"]
    assert pa.q_proj.__dict__.get("_group") is None
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)  # the same per-row arithmetic, one call
        # what a sibling kept is handed out only for the same, unmodified tensor
        x, other = torch.randn(3, attn.q_proj.in_features), torch.randn(3, attn.q_proj.in_features)
        attn.q_proj(x)
        assert torch.equal(attn.k_proj(other), pa.k_proj(other))
        attn.q_proj(x)
        x.add_(1.0)
        assert torch.equal(attn.k_proj(x), pa.k_proj(x))
        assert torch.equal(attn.v_proj(x), pa.v_proj(x))
        before = group.kernel
        fused.float()  # moving the model rebuilds the kernel objects from the new tensors at once
        assert group.kernel is not before
        assert torch.equal(attn.q_proj(x), pa.q_proj(x))


def test_save_dtype_casts_only_dense_parts(tmp_path):
    ck, _ = _tiny_checkpoint(tmp_path, torch.bfloat16)
    meta = json.loads((ck / "slim_config.json").read_text())
    assert meta["dtype"] == "bfloat16"
    model = slim.load(ck, backend="reference")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].mlp.up_proj
    assert layer.scale.dtype == torch.float16 and layer.values.dtype == torch.uint8


def test_generate_matches_transformers_greedy():
    from slim.runtime.generate import generate

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    res = generate(model, None, ids, max_new_tokens=10)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert res["tokens"] == hf[0, 12:].tolist()
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0 and res["peak_rss_bytes"] > 0
    sampled = generate(model, None, ids, max_new_tokens=10, do_sample=True, seed=1)
    assert sampled["tokens"] == generate(model, None, ids, max_new_tokens=10, do_sample=True, seed=1)["tokens"]


def test_cli_generate_and_backend(tiny_llama_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["compress", str(tiny_llama_dir), "--out", str(out), "--calib-samples", "4", "--calib-seqlen", "64",
                 "-q", "--data-dir", str(shared_data), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "whole model" in printed
    for backend in ("auto", "reference"):
        assert main(["generate", str(out), "Hello there", "--max-new-tokens", "5", "--backend", backend,
                     "--out", str(tmp_path / f"{backend}.json")]) == 0
        res = json.loads((tmp_path / f"{backend}.json").read_text())
        assert res["new_tokens"] >= 1 and res["prefill_tokens_per_s"] > 0
        assert res["decode_path"] == ("lean" if backend == "auto" else "eager")  # reference layers: transformers
    err = capsys.readouterr().err
    assert "tokens/s" in err and "memory" in err
    assert main(["generate", str(out), "Hello there", "--max-new-tokens", "5", "--head", "int8", "--decode", "lean",
                 "--out", str(tmp_path / "int8.json")]) == 0
    res = json.loads((tmp_path / "int8.json").read_text())
    assert res["head"] == "int8" and res["decode_path"] == "lean"
    assert "lean decode path, head int8" in capsys.readouterr().err
    assert main(["generate", str(out), "x", "--head", "int8", "--device", "cuda"]) == 2  # before loading anything
    assert "cuda" in capsys.readouterr().err.lower()
    assert main(["generate", str(tiny_llama_dir), "Hello", "--max-new-tokens", "3"]) == 0  # dense models too
    with pytest.raises(SystemExit):
        main(["generate", str(out), "x", "--backend", "fast"])
    assert main(["generate", str(out), "x", "--backend", "cuda-2of4"]) == 2
    assert "cannot run on cpu" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16" and info["model_bytes"] == info["linear_bytes_stored"] + info["other_bytes"]


@pytest.mark.gpu
def test_cuda_2of4_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from slim.runtime import cuda_2of4

    if cuda_2of4.available("cuda") is not None:
        pytest.skip(cuda_2of4.available("cuda"))
    layer = random_slim_linear(256, 512, rank=32, bias=True)
    x = torch.randn(64, 512)
    ref = layer(x)
    fast = cuda_2of4.convert(layer.cuda())  # in bf16 (the layer's bias is fp32): the model's dtype comes later
    assert _rel_err(fast(x.cuda().to(fast.dtype)).float().cpu(), ref) < 2e-2
    with pytest.raises(TypeError, match="holds torch.bfloat16 weights"):
        fast(x.cuda().half())
