"""The lean decode path (slim.runtime.lean, kernels/csrc/decoder.cpp) and the quantized head (cpu_int4.QuantHead):
the C++ forward must give the transformers forward's logits and greedy tokens, chunked or whole, dense or compressed.
"""

import pytest
import torch
from conftest import tiny_model
from test_generate_compiled import _compress, _ids

from slim.kernels import native
from slim.runtime.cpu_int4 import QuantHead, check_head, quantize_head
from slim.runtime.generate import generate
from slim.runtime.lean import LeanDecoder, LeanUnsupported, decoder_for, supported

pytestmark = pytest.mark.skipif(native.load() is None, reason="slim's CPU kernel is not available")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("compressed", [False, True])
def test_lean_logits_match_transformers_whole_and_chunked(kind, compressed):
    model = tiny_model(kind)
    if compressed:
        model = _compress(model, "cpu-int4", rank=8)  # 2:4 int4 with int4 adapters, through slim's kernel
    ids = _ids(24)
    with torch.no_grad():
        ref = model(ids).logits[0].float()
    dec = LeanDecoder(model)
    dec.reserve(8)  # grows on demand, keeping what is cached
    whole = dec.forward(ids[0], 0, all_logits=True)
    # keys and values are cached in fp16 (as llama.cpp's default): the stated tolerance; slim's kernels quantize each
    # layer's input to int8, where a changed last bit can move one rounding step
    tol = 1.5e-2 if compressed else 3e-4
    assert _rel(whole, ref) < tol
    first = dec.forward(ids[0, :13], 0, all_logits=True)  # prefill over SDPA, then one token at a time
    rest = [dec.forward(ids[0, i:i + 1], i) for i in range(13, 24)]
    assert _rel(torch.cat([first, *rest]), ref) < tol
    assert dec.forward(ids[0, :5], 0).shape == (1, ref.shape[1])  # last token only by default


@pytest.mark.parametrize("compressed", [False, True])
def test_generate_takes_the_lean_path_with_the_eager_tokens(compressed):
    model = tiny_model("llama")
    if compressed:
        model = _compress(model, "cpu-int4", rank=8)
    ids = _ids(10)
    lean = generate(model, None, ids, max_new_tokens=20, stop_at_eos=False)
    eager = generate(model, None, ids, max_new_tokens=20, stop_at_eos=False, decode="eager")
    assert lean["decode_path"] == "lean" and eager["decode_path"] == "eager" and len(lean["tokens"]) == 20
    if not compressed:
        assert lean["tokens"] == eager["tokens"]
    # within the stated tolerance: every lean token is the eager model's argmax, or within 1 % of the logit range of
    # it (a near-tie that the fp16 cache and int8 activation rounding may break the other way), given the same prefix
    seq = torch.cat([ids, torch.tensor([lean["tokens"]])], 1)
    with torch.no_grad():
        logits = model(seq).logits[0, ids.shape[1] - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(lean["tokens"])[:, None])[:, 0]
    spread = logits.amax(1) - logits.amin(1)
    assert ((logits.amax(1) - chosen) <= 0.01 * spread).all()
    assert lean["tokens"][:8] == eager["tokens"][:8]
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    assert generate(model, None, ids, 8, **kw)["tokens"] == generate(model, None, ids, 8, decode="eager", **kw)[
        "tokens"]
    assert decoder_for(model) is decoder_for(model)  # built once per model


def test_unsupported_models_fall_back_or_refuse():
    opt = tiny_model("opt")
    assert "model type 'opt'" in supported(opt)
    res = generate(opt, None, _ids(6), max_new_tokens=3)
    assert res["decode_path"] == "eager"
    with pytest.raises(LeanUnsupported, match="model type 'opt'"):
        generate(opt, None, _ids(6), max_new_tokens=3, decode="lean")
    with pytest.raises(LeanUnsupported, match="batch of 2"):
        generate(tiny_model("llama"), None, torch.zeros(2, 4, dtype=torch.long), max_new_tokens=2, decode="lean")
    with pytest.raises(ValueError, match="unknown decode path"):
        generate(opt, None, _ids(6), max_new_tokens=3, decode="fast")


@pytest.mark.parametrize("kind,bits,tol", [("int8", 8, 0.02), ("int4", 4, 0.2)])
def test_quantized_head_is_real_and_close(kind, bits, tol):
    model = tiny_model("llama", vocab=512)
    dense = model.lm_head.weight.detach().clone()
    x = torch.randn(5, 64)
    ref = x @ dense.T
    assert quantize_head(model, kind) == kind
    head = model.lm_head
    assert isinstance(head, QuantHead)
    assert head.codes.numel() * head.codes.element_size() == dense.numel() * bits // 8  # stored at `bits` a weight
    y = head(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol
    ids = _ids(10)  # the lean path reads the same head
    with torch.no_grad():
        assert _rel(LeanDecoder(model).forward(ids[0], 0, True), model(ids).logits[0].float()) < 1e-2


def test_quantized_head_op_passes_opcheck():
    model = tiny_model("llama", vocab=256)
    quantize_head(model, "int8")
    x = torch.randn(3, 64)
    args = model.lm_head.native_args()
    torch.library.opcheck(torch.ops.slim.cpu_linear.default, (x, *args))
    torch.testing.assert_close(torch.ops.slim.cpu_linear(x, *args), model.lm_head(x))


def test_head_choices_are_checked_before_loading():
    with pytest.raises(ValueError, match="unknown head format 'int3'"):
        check_head("int3")
    with pytest.raises(ValueError, match="CPU only"):
        check_head("int8", "cuda")
    check_head("stored", "cuda")


@pytest.mark.parametrize("n,k,kw", [(64, 512, {}), (64, 512, {"group_size": 128}), (64, 96, {}),
                                    (64, 512, {"group_size": 32}), (48, 576, {"group_size": 96, "rank": 8})])
def test_paired_24_layout_is_exact(n, k, kw):
    """The 2:4 kernel's paired layout (odd block counts, pairs split by a scale group's edge): the layer dequantizes to
    the stored weight exactly and its one-token output is the int8-activation product of it."""
    from slim.runtime.cpu_int4 import Int4Linear
    from slim.testing.random_layers import random_slim_linear

    layer = random_slim_linear(n, k, seed=3, **kw)
    m = Int4Linear(layer)
    assert m.sparse24 and m.base.values.shape == (n, (k // 32 + 1) // 2 * 16)
    w = layer.dequantized_weight()
    assert torch.equal(m.base.dequantize(torch.float32), w)
    x = torch.randn(3, k)
    want = x @ w.T
    if layer.layout.rank:
        a, b = layer.adapters()
        want = want + (x @ a.float().T) @ b.float().T
    assert _rel(m(x), want) < 1e-2


def test_avx2_build_gives_the_same_layers():
    """Where the CPU has AVX512-VNNI slim builds its kernel with it (512-bit steps for 2:4 pairs, one dot instruction);
    most CPUs run the AVX2 build, so that one is built here too (SLIM_CPU_VNNI=0, cached) and must pass the layer
    tests the same."""
    import os
    import subprocess
    import sys

    if not native.VNNI:
        pytest.skip("this build is the AVX2 one already")
    env = {**os.environ, "SLIM_CPU_VNNI": "0"}
    tests = "paired or quantized_head_is_real or whole_and_chunked or dense_int4"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]


@pytest.mark.parametrize("kw", [{"group_size": 128, "zero_point": True}, {"group_size": 256}, {"group_size": 64}])
def test_dense_int4_layer_matches_its_weight(kw):
    """Dense int4 rows (adapters, non-2:4 layers): the 512-bit steps over groups of 128+ inputs and the 256-bit
    ones elsewhere give the product of the stored weight (to int8 activation rounding), odd block counts included."""
    from slim.runtime.cpu_int4 import Int4Linear
    from slim.testing.random_layers import random_slim_linear

    for k in (512, 640, 1056):
        layer = random_slim_linear(48, k, sparsity="dense", seed=k, **kw)
        x = torch.randn(2, k)
        assert _rel(Int4Linear(layer)(x), x @ layer.dequantized_weight().T) < 1e-2
