import pytest
import torch
from conftest import correlated_inputs

from slim.algorithms.stats import InputStats
from slim.config import CompressConfig
from slim.format.packed import SlimLinear, index_bits, pack_bits, pack_codes, unpack_bits, unpack_codes
from slim.pipeline.solver import compress_weight


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_roundtrip(bits):
    x = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8)
    p = pack_bits(x, bits)
    assert p.dtype == torch.uint8 and p.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_bits(p, bits, 37), x)


def test_codes_roundtrip_and_index_bits():
    c = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(c, 4), 4, 10).to(torch.int8), c)
    assert [index_bits(m) for m in (2, 3, 4, 8, 16, 17)] == [1, 2, 2, 4, 4, 8]


def _compress(d_out, d_in, **over):
    torch.manual_seed(0)
    w = torch.randn(d_out, d_in) * 0.05
    st = InputStats.empty(d_in, with_gram=True)
    st.add(correlated_inputs(512, d_in))
    cfg = CompressConfig.from_dict(over)
    return w, st, cfg, compress_weight(w, st, cfg)


@pytest.mark.parametrize("over", [
    {},
    {"adapter": {"quantize": False}},
    {"sparsity": {"pattern": "0.5"}},
    {"sparsity": {"pattern": "1:4"}, "quant": {"method": "group-absmax"}},
    {"sparsity": {"pattern": "none"}, "quant": {"method": "absmax", "bits": 8}},
    {"quant": {"method": "none"}, "adapter": {"method": "none"}},
    {"quant": {"method": "slim-o"}, "adapter": {"method": "fullcov"}},
    {"quant": {"method": "slim-group", "error_feedback": True}, "adapter": {"refit_rounds": 2}},
])
def test_slimlinear_reproduces_compressed_weight(over):
    w, st, cfg, cw = _compress(48, 64, **over)
    kind = cfg.sparsity.kind
    n, m = cfg.sparsity.nm if kind == "nm" else (0, 0)
    mod = SlimLinear.from_compressed(cw, None, kind, n, m)
    assert torch.equal(mod.mask(), cw.mask)
    assert torch.allclose(mod.dequantized_weight(), cw.weight(), atol=1e-3 if not cw.bits else 0)
    x = torch.randn(7, 64)
    eff = mod.effective_weight()
    assert torch.allclose(mod(x), x @ eff.T, atol=1e-4)
    if cfg.sparsity.kind == "nm":
        assert (mod.mask().view(48, -1, m).sum(-1) == n).all()


def test_packed_2of4_int4_byte_counts():
    d_out, d_in = 64, 128
    w, st, cfg, cw = _compress(d_out, d_in, adapter={"method": "none"})
    mod = SlimLinear.from_compressed(cw, None, "nm", 2, 4)
    assert mod.values.dtype == torch.uint8 and mod.values.shape == (d_out, d_in // 4)  # 2 of 4 kept, 4 bits
    assert mod.indices.dtype == torch.uint8 and mod.indices.shape == (d_out, d_in // 8)  # 2 x 2-bit per 4
    assert mod.stored_bytes() == d_out * d_in * 3 // 8 + 2  # 3 bits/weight + one fp16 scale
    # int4 adapters: 4 bits per element plus one fp16 scale per group of 128
    _, _, _, cwq = _compress(d_out, d_in)
    modq = SlimLinear.from_compressed(cwq, None, "nm", 2, 4)
    r = cwq.lora_A.shape[0]
    assert modq.lora_A.dtype == torch.uint8 and modq.lora_A.shape == (r, d_in // 2)
    assert modq.lora_B.shape == (d_out, (r + 1) // 2)
    assert modq.lora_A_scale.dtype == torch.float16


def test_adapters_reduce_error_and_requantize_under_mask():
    w, st, cfg, cw = _compress(48, 64)
    assert cw.info["rel_err_final"] < cw.info["rel_err_compressed"]
    assert not (cw.weight()[~cw.mask]).any()
