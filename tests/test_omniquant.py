"""OmniQuant's learnable weight clipping (the wanda-omniquant preset): the quantizer trained is the one stored,
gradients reach the clipping logits, training lowers the block error, the mask survives, bad combinations fail."""

import pytest
import torch
from conftest import compress_tiny, slim_layers

from slim.algorithms.quant import (
    expand_groups,
    group_minmax,
    grouped,
    lwc_fake_quant,
    lwc_fake_quant_reference,
    lwc_params,
    qrange,
)
from slim.config import PRESETS, CompressConfig, ConfigError, merge
from slim.pipeline.tune import TrainableLinear


def test_lwc_quantizer_codes_and_gradients():
    """At the start logits the factor is sigmoid(4): groups' max and min shrink by 1.8 %; codes span the
    unsigned range shifted into the signed space; the scale's gradient reaches both logits."""
    w = torch.randn(8, 256)
    up = torch.full((8, 2), 4.0, requires_grad=True)
    low = torch.full((8, 2), 4.0, requires_grad=True)
    scale, zero = lwc_params(w, 4, 128, up, low)
    g = w.view(8, 2, 128)
    want = (g.amax(-1) - g.amin(-1)) * torch.sigmoid(torch.tensor(4.0)) / 15
    torch.testing.assert_close(scale.detach(), want.half().float())
    qmin, qmax = qrange(4)
    assert bool(((zero >= qmin) & (zero <= qmax)).all())
    deq = lwc_fake_quant(w, 4, 128, up, low)
    assert len(torch.unique(deq.detach()[0, :128])) <= 16
    (deq - w).pow(2).sum().backward()
    assert up.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


def test_lwc_rounding_function_matches_its_autograd_formula():
    """The fused rounding gives the values and gradients (to the weight and both logits) of writing the
    straight-through quantizer as autograd ops, clamped codes included (the shrunk groups clamp their extremes)."""
    torch.manual_seed(0)
    w = torch.randn(16, 320)  # a shorter last group (320 = 2 x 128 + 64)
    g = torch.randn(16, 320)

    grads = []
    for fn in (lwc_fake_quant_reference, lwc_fake_quant):
        wr = w.clone().requires_grad_()
        up = (torch.randn(16, 3, generator=torch.Generator().manual_seed(1)) + 1).requires_grad_()
        low = (torch.randn(16, 3, generator=torch.Generator().manual_seed(2)) + 1).requires_grad_()
        out = fn(wr, 4, 128, up, low)
        (out * g).sum().backward()
        grads.append((out.detach(), wr.grad, up.grad, low.grad))
    qmin, qmax = qrange(4)
    scale, zero = lwc_params(w, 4, 128, up, low)
    codes = torch.round(w / expand_groups(scale, 320, 128)) + expand_groups(zero, 320, 128)
    assert bool(((codes < qmin) | (codes > qmax)).any())  # the clamped branch is exercised
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:], strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_group_extremes_gradient_matches_amax():
    """AffineQuant's transformed weights pass gradients through their groups' max and min: the scatter backward
    equals amax/amin's where the extremes are unique (a shorter, zero-padded last group included, whose padding
    is the max of an all-negative group and takes that gradient out), and keeps a tie's gradient whole."""
    w = torch.randn(8, 320)
    w[0, 256:] = -w[0, 256:].abs() - 0.1  # the padding's zero is this group's max
    gmax, gmin = torch.randn(8, 3), torch.randn(8, 3)
    grads = []
    for fn in (lambda t: (grouped(t, 128).amax(-1), grouped(t, 128).amin(-1)), lambda t: group_minmax(t, 128)):
        wr = w.clone().requires_grad_()
        mx, mn = fn(wr)
        (mx * gmax + mn * gmin).sum().backward()
        grads.append((mx.detach(), mn.detach(), wr.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    assert float(grads[1][2][0, 256:].sum()) == float(gmin[0, 2])  # the max's gradient went to the padding
    tie = torch.zeros(1, 128, requires_grad=True)  # every entry is the max and the min
    mx, mn = group_minmax(tie, 128)
    (2 * mx + 3 * mn).sum().backward()
    assert float(tie.grad.sum()) == 5.0


def test_opened_layer_equals_the_stored_one_before_and_after_training():
    model, *_ = compress_tiny("wanda-omniquant", 0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mod = slim_layers(model)[name]
        mask = mod.mask()
        x = torch.randn(2, 5, mod.in_features)
        t = TrainableLinear(mod, clip_source=torch.randn(mod.out_features, mod.in_features), lwc_init=4.0)
        with torch.no_grad():
            t.up.add_(torch.randn_like(t.up))
            t.low.sub_(torch.rand_like(t.low))
        want = t(x).detach()
        t(x).pow(2).sum().backward()
        assert t.up.grad.abs().sum() > 0
        back = t.write_back()
        torch.testing.assert_close(back(x), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(back.mask(), mask)


def test_clipping_training_lowers_the_model_error_and_keeps_the_mask():
    """Four epochs of clipping training against the dense blocks: the compressed model's hidden states move
    closer to the dense model's on the calibration windows than the closed form's (-6 % here), every block
    trained, and in block 0 (same inputs either way) only values, scales and zero points differ."""
    closed, dense, ids, _ = compress_tiny("wanda-omniquant", 0)
    tuned, _, _, rep = compress_tiny("wanda-omniquant", 4, tune={"lr": 5e-2})

    def err(m) -> float:
        with torch.no_grad():
            a = m(ids, output_hidden_states=True).hidden_states[-1]
            b = dense(ids, output_hidden_states=True).hidden_states[-1]
        return float((a - b).pow(2).sum() / b.pow(2).sum())

    assert err(tuned) < 0.98 * err(closed)
    steps = {v["block_tune"]["steps"] for v in rep["layers"].values()}
    assert steps == {4 * 16}  # 4 epochs x 16 single-window batches, no held-out share
    for n, m in slim_layers(tuned).items():
        if ".layers.0." not in n:
            continue
        c = slim_layers(closed)[n]
        assert torch.equal(m.mask(), c.mask()), n
        for k, t in m.state_dict().items():
            if k not in ("values", "scale", "zero"):
                assert torch.equal(t, c.state_dict()[k]), (n, k)


def test_bad_omniquant_options():
    with pytest.raises(ConfigError, match="omniquant"):
        CompressConfig.from_dict({"quant": {"method": "slim"}, "tune": {"steps": 4, "clipping": True}})
    with pytest.raises(ConfigError, match="error_feedback"):
        CompressConfig.from_dict({"quant": {"method": "omniquant"}})
    with pytest.raises(ConfigError, match="tune.scales"):
        CompressConfig.from_dict(merge(PRESETS["wanda-omniquant"], {"tune": {"scales": True}}))
    with pytest.raises(ConfigError, match="both"):
        CompressConfig.from_dict({"tune": {"steps": 4, "epochs": 1}})
    with pytest.raises(ConfigError, match="schedule"):
        CompressConfig.from_dict({"tune": {"schedule": "linear"}})
