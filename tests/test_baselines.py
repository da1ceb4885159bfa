"""The compared methods: each checked on small random problems against a property it must have."""

import pytest
import torch
from conftest import correlated_inputs, tiny_model

import slim
from slim.algorithms.baselines import awq_search, jsq_range_sensitivity, jsq_score
from slim.algorithms.lowrank import slim_adapter
from slim.algorithms.quant import expand_groups, grouped, minmax_asym_params
from slim.algorithms.stats import InputStats, JSQStats
from slim.config import PRESETS, CompressConfig, ConfigError, merge
from slim.format.packed import SlimLinear
from slim.pipeline.loop import compress_model
from slim.pipeline.solver import compress_weight


def _layer(seed=0, d_out=64, d_in=256, outliers=True):
    torch.manual_seed(seed)
    w = torch.randn(d_out, d_in) * 0.05
    x = correlated_inputs(2048, d_in, seed)
    if outliers:  # a few channels with large activations, as in LLMs (what AWQ protects)
        x[:, :4] *= 20
    st = InputStats.empty(d_in, with_gram=True)
    st.add(x)
    return w, x, st


def out_err(x, w, w_hat):
    return float((x @ (w - w_hat).T).pow(2).sum())


def _cfg(preset, **over):
    return CompressConfig.from_dict(merge(PRESETS[preset], over))


def _eff(cw):
    """The layer's weight on unscaled inputs, adapters included."""
    w = cw.weight()
    if cw.lora_A is not None:
        w = w + cw.lora_B @ cw.lora_A
    return w if cw.input_scale is None else w / cw.input_scale[None, :]


def test_asymmetric_params_represent_zero_exactly():
    w = torch.randn(8, 256).abs() + 0.5  # all positive: the zero point clamps at the bottom of the range
    w[:, ::2] = 0.0
    scale, zero = minmax_asym_params(grouped(w, 128), 4)
    sf, zf = expand_groups(scale, 256, 128), expand_groups(zero, 256, 128)
    codes = torch.clamp(torch.round(w / sf) + zf, -8, 7)
    deq = (codes - zf) * sf
    assert torch.all(deq[:, ::2] == 0)
    assert torch.all((zero >= -8) & (zero <= 7))


def test_awq_beats_plain_asymmetric_rtn_on_outlier_channels():
    w, x, st = _layer()
    mask = torch.ones_like(w, dtype=torch.bool)
    awq = compress_weight(w, st, _cfg("wanda-awq", sparsity={"pattern": "none"}), mask=mask, name="up_proj")
    s, scale, zero, clip, info = awq_search(w, st.mean_abs, st.mean_gram, 4, 128, clip=False)
    # alpha = 0 (no scaling) is in AWQ's grid, so its search can only do as well or better
    sc, z = minmax_asym_params(grouped(w, 128), 4)
    sf, zf = expand_groups(sc, 256, 128), expand_groups(z, 256, 128)
    rtn = (torch.clamp(torch.round(w / sf) + zf, -8, 7) - zf) * sf
    assert out_err(x, w, _eff(awq)) < out_err(x, w, rtn)
    assert awq.info["awq_alpha"] > 0  # outlier channels get scaled up
    assert awq.zero is not None and awq.input_scale is not None


def test_awq_clipping_search_never_hurts_and_q_k_skip_it():
    w, x, st = _layer(1)
    no = awq_search(w, st.mean_abs, st.mean_gram, 4, 128, clip=False)
    yes = awq_search(w, st.mean_abs, st.mean_gram, 4, 128, clip=True)
    assert torch.equal(no[0], yes[0])  # same scales; clipping is searched afterwards
    mask = torch.ones_like(w, dtype=torch.bool)
    cfg = _cfg("wanda-awq", sparsity={"pattern": "none"})
    q = compress_weight(w, st, cfg, mask=mask, name="q_proj")
    up = compress_weight(w, st, cfg, mask=mask, name="up_proj")
    assert q.info["awq_clipped_groups"] == 0.0
    assert out_err(x, w, _eff(up)) <= out_err(x, w, _eff(q)) * (1 + 1e-6)


def test_awq_on_pruned_weights_keeps_the_mask_and_packs(tmp_path):
    w, x, st = _layer(2)
    cw = compress_weight(w, st, _cfg("wanda-awq"), name="down_proj")
    assert not cw.weight()[~cw.mask].any()
    lin = SlimLinear.from_compressed(cw, None, "nm", 2, 4)
    assert lin.layout.zero_point and lin.zero.dtype == torch.uint8 and lin.zero.shape == (64, 1)  # 2 groups x 4 bit
    assert torch.allclose(lin.dequantized_weight(), cw.weight(), atol=1e-6)
    assert torch.allclose(lin.effective_weight(), _eff(cw), atol=1e-5)


def test_gptq_beats_round_to_nearest_with_and_without_act_order():
    for seed in range(2):
        w, x, st = _layer(seed, outliers=False)
        mask = torch.ones_like(w, dtype=torch.bool)
        base = {"sparsity": {"pattern": "none"}}
        rtn = compress_weight(w, st, _cfg("wanda-gptq", quant={"error_feedback": False}, **base), mask=mask)
        gptq = compress_weight(w, st, _cfg("wanda-gptq", **base), mask=mask)
        act = compress_weight(w, st, _cfg("wanda-gptq", quant={"act_order": True}, **base), mask=mask)
        e_rtn, e_g, e_a = (out_err(x, w, c.weight()) for c in (rtn, gptq, act))
        assert e_g < e_rtn and e_a < e_rtn
        for c in (gptq, act):  # stored codes reproduce the weights exactly
            s = expand_groups(c.scale, 256, 128)
            assert torch.allclose(c.codes.float() * s, c.weight(), atol=1e-7)


def test_gptq_per_tensor_scale():
    w, x, st = _layer(3, outliers=False)
    cw = compress_weight(w, st, _cfg("sparsegpt-optq-tensor"))
    assert cw.scale.dim() == 0 and cw.group_size == 0


def test_sparsegpt_optq_joint_pass_beats_magnitude_rtn():
    w, x, st = _layer(4, outliers=False)
    for pattern in ("2:4", "0.5"):
        joint = compress_weight(w, st, _cfg("sparsegpt-optq", sparsity={"pattern": pattern}))
        mag = compress_weight(w, st, _cfg("magnitude-group-absmax", sparsity={"pattern": pattern}))
        assert out_err(x, w, joint.weight()) < out_err(x, w, mag.weight())
        assert not joint.weight()[~joint.mask].any()
        keep = joint.mask.sum(1)
        assert torch.all(keep == keep[0]) and int(keep[0]) == 128
        if pattern == "2:4":
            assert torch.all(joint.mask.view(64, -1, 4).sum(-1) == 2)


def test_jsq_range_sensitivity_matches_brute_force():
    torch.manual_seed(0)
    act, w = torch.randn(16, 12), torch.randn(5, 12)
    ss = jsq_range_sensitivity(act, w, budget=100)  # tiny budget: several chunks
    for i in range(12):
        w0 = w.clone()
        w0[:, i] = 0
        y = act @ w0.T
        assert torch.allclose(ss[:, i], y.amax(0) - y.amin(0), atol=1e-5)


def test_jsq_mask_without_mixing_is_wanda_on_clipped_inputs():
    w, x, _ = _layer(5)
    j = JSQStats(0.01, torch.zeros(256, dtype=torch.float64))
    j.add(x.view(8, 256, 256))
    st = InputStats.empty(256, with_gram=False)
    st.add(x)
    st.jsq = j
    wanda_clipped = compress_weight(w, InputStats(j.sum_sq, None, 2048), _cfg("wanda-group-absmax"))
    cw = compress_weight(w, st, _cfg("jsq", sparsity={"jsq_mixing": 0.0}))
    assert torch.equal(cw.mask, wanda_clipped.mask)
    mixed = compress_weight(w, st, _cfg("jsq"))
    assert not torch.equal(mixed.mask, cw.mask)  # the range term changes which weights survive
    s = jsq_score(w, j, 2.1)
    assert s.shape == w.shape and torch.all(s >= 0)


def test_l2qer_is_the_closed_form_scaled_by_mean_magnitude():
    w, x, st = _layer(6)
    cfg = _cfg("l2qer")
    cw = compress_weight(w, st, cfg)
    plain = compress_weight(w, st, _cfg("wanda-group-absmax"))
    assert out_err(x, w, _eff(cw)) < out_err(x, w, plain.weight())
    a, b = slim_adapter(w - plain.weight(), st.mean_abs, cw.lora_A.shape[0])
    assert torch.allclose(b @ a, cw.lora_B @ cw.lora_A, atol=1e-4)


def test_config_rejects_bad_baseline_options():
    with pytest.raises(ConfigError, match="act_order"):
        CompressConfig.from_dict({"quant": {"error_feedback": False, "act_order": True}})
    with pytest.raises(ConfigError, match="group_size"):
        CompressConfig.from_dict({"quant": {"method": "awq", "group_size": 0}})
    with pytest.raises(ConfigError, match="jsq"):
        CompressConfig.from_dict({"sparsity": {"method": "jsq", "jsq_clip": 1.5}})


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "paper"])
def test_every_baseline_preset_compresses_saves_and_reloads(preset, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig.from_dict(merge(PRESETS[preset], {"calib": {"n_samples": 8, "seqlen": 32, "batch_size": 4}}))
    report = compress_model(model, ids, cfg, progress=False)
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    slim.save(model, tmp_path / "ck", meta={"config": cfg.to_dict(), "report": report})
    assert torch.equal(slim.load(tmp_path / "ck", backend="reference")(ids).logits, logits)
