import pytest
import torch

from slim.algorithms.quant import (
    absmax_scale,
    expand_groups,
    fake_quant,
    fake_quant_grouped,
    fp8_fake_quant,
    group_absmax_scale,
    qrange,
    quantize_codes,
    slim_quant_scale,
)


def heavy_tailed(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n,)) * 0.02 if seed is None else (
        torch.randn(n, generator=g) * 0.02 * torch.exp(torch.randn(n, generator=g) * 0.5))


def exact_err(v, scale, bits):
    return float(((fake_quant(v, scale, bits) - v) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range(bits):
    w = torch.randn(64, 64)
    s = absmax_scale(w, bits)
    c = quantize_codes(w, s, bits)
    lo, hi = qrange(bits)
    assert c.dtype == torch.int8 and int(c.min()) >= lo and int(c.max()) <= hi
    assert int(c.abs().max()) == hi  # absmax maps the largest magnitude to qmax


def test_slim_quant_beats_absmax_and_matches_exact_grid():
    """The histogram objective uses the forward quantizer, so its alpha is (near) the exact optimum."""
    v = heavy_tailed()
    scale, alpha, rel = slim_quant_scale(v, 4)
    e_slim = exact_err(v, scale, 4)
    assert e_slim < 0.7 * exact_err(v, absmax_scale(v, 4), 4)
    amax = float(v.abs().max())
    grid = torch.linspace(amax / 200, amax, 400)
    best = min(exact_err(v, torch.tensor(a / 7), 4) for a in grid.tolist())
    assert e_slim <= best * 1.02
    assert abs(rel - e_slim / float((v**2).sum())) < 1e-6
    assert alpha == pytest.approx(float(scale) * 7, rel=1e-2)


def test_slim_quant_zero_tensor():
    scale, alpha, rel = slim_quant_scale(torch.zeros(100), 4)
    assert alpha == 0.0 and rel == 0.0 and float(scale) > 0


@pytest.mark.parametrize("shape,group", [((57, 576), 128), ((576, 57), 128), ((8, 64), 16), ((3, 100), 32)])
def test_fake_quant_grouped_is_what_quantize_grouped_stores(shape, group):
    """The tuning's straight-through forward sees exactly the adapter that is stored (remainder groups and an
    all-zero row included)."""
    from slim.pipeline.solver import quantize_grouped

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[1] = 0
    for bits in (2, 4, 8):
        assert torch.equal(fake_quant_grouped(w, bits, group), quantize_grouped(w, bits, group)[2])


def test_group_absmax_remainder_group():
    w = torch.randn(3, 576)  # 576 = 4 * 128 + 64: the last group is shorter
    s = group_absmax_scale(w, 4, 128)
    assert s.shape == (3, 5)
    full = expand_groups(s, 576, 128)
    assert full.shape == w.shape
    assert torch.allclose(s[:, 4], (w[:, 512:].abs().amax(1) / 7).half().float())
    assert (quantize_codes(w, full, 4).abs() <= 8).all()


def test_group_beats_tensor_absmax():
    w = torch.randn(32, 512) * torch.exp(torch.randn(1, 512))
    g = fake_quant(w, expand_groups(group_absmax_scale(w, 4, 128), 512, 128), 4)
    t = fake_quant(w, absmax_scale(w, 4), 4)
    assert ((g - w) ** 2).sum() < ((t - w) ** 2).sum()


@pytest.mark.parametrize("spread", [1e-3, 10.0, 1000.0, 1e6])
def test_fp8_inputs_are_vllm_dynamic_per_tensor_e4m3(spread):
    """vLLM's dynamic FP8: scale = max|x| / 448, x / scale rounded to E4M3 (saturating), times the scale; every
    magnitude uses E4M3's full range (no E5M2 switch), so the error is relative to the tensor's max."""
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * spread
    scale = x.abs().max() / 448.0
    want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    y = fp8_fake_quant(x)
    assert torch.equal(y, want)
    assert (y - x).abs().max() <= x.abs().max() * 2**-4  # 3 mantissa bits
    assert torch.equal(fp8_fake_quant(torch.zeros(3)), torch.zeros(3))  # the floored scale keeps zeros finite
    assert fp8_fake_quant(x.bfloat16()).dtype == torch.bfloat16


def test_fp8_inputs_do_not_synchronize_with_the_host():
    """The scale stays on the device: the quantizer traces as one graph (a float() of the max would break it)."""
    x = torch.randn(8, 64)
    compiled = torch.compile(fp8_fake_quant, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), fp8_fake_quant(x))


def test_group_slim_beats_group_absmax_and_tensor_slim():
    from slim.algorithms.quant import group_slim_scale

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 576, generator=g) * torch.exp(torch.randn(1, 576, generator=g))
    w[0, 3] = 40.0  # an outlier
    mask = torch.rand(64, 576, generator=g) > 0.5
    s = group_slim_scale(w, mask, 4, 128)
    assert s.shape == (64, 5)
    e_slim = ((fake_quant(w * mask, expand_groups(s, 576, 128), 4) - w * mask) ** 2).sum()
    e_absmax = ((fake_quant(w * mask, expand_groups(group_absmax_scale(w * mask, 4, 128), 576, 128), 4) - w * mask)
                ** 2).sum()
    t, _, _ = slim_quant_scale(w[mask], 4)
    e_tensor = ((fake_quant(w * mask, t, 4) - w * mask) ** 2).sum()
    assert e_slim < e_absmax and e_slim < e_tensor
