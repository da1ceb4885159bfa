"""Weight tuning (tune.weights) and mask re-selection in the refit (adapter.remask): the mask survives, the stored
codes are the shadow weights' own, tuning lowers a block's error, and the checkpoint loads as before."""

import pytest
import torch
from conftest import tiny_model

from slim.algorithms.quant import qrange
from slim.config import CompressConfig, ConfigError
from slim.format.packed import SlimLinear
from slim.pipeline.loop import compress_model
from slim.pipeline.solver import compress_weight
from slim.pipeline.tune import TrainableLinear

TUNE = {"steps": 24, "eval_every": 4, "patience": 3}


def _compress(tune: dict, layers: int = 2, **recipe):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=layers)
    ids = torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 32, "seqlen": 64, "batch_size": 4}, "tune": tune,
                                    **recipe})
    return model, compress_model(model, ids, cfg, progress=False)


def _slims(model) -> dict[str, SlimLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SlimLinear)}


def test_shadow_weights_start_at_the_stored_layer_and_get_gradients():
    model, _ = _compress({"steps": 0})
    mod = _slims(model)["model.layers.0.mlp.up_proj"]
    t = TrainableLinear(mod, weights=True)
    x = torch.randn(3, 5, mod.in_features)
    torch.testing.assert_close(t(x), mod(x), rtol=1e-4, atol=1e-5)  # the same codes before any step
    t(x).pow(2).sum().backward()
    g = t.shadow.grad
    assert g is not None and g[t.keep].abs().sum() > 0
    assert not g[~t.keep].any()  # a pruned slot gets no gradient


def test_written_back_codes_are_the_shadow_weights_requantized():
    """After moving the shadow weights, the stored layer equals the trained forward, its codes are round(W / s)
    at the kept positions, and pruned slots stay zero."""
    model, _ = _compress({"steps": 0})
    mod = _slims(model)["model.layers.1.mlp.down_proj"]
    mask = mod.mask().clone()
    t = TrainableLinear(mod, weights=True)
    step = t.step_size()
    with torch.no_grad():
        t.shadow.add_(torch.randn_like(t.shadow) * 2 * step)  # far enough to change many codes
    x = torch.randn(2, 7, mod.in_features)
    want = t(x).detach()
    old = mod.dequantized_weight().clone()
    got = t.write_back()
    assert torch.equal(got.mask(), mask)
    w = got.dequantized_weight()
    assert not w[~mask].any()
    assert float((w != old).float()[mask].mean()) > 0.3  # the codes moved
    lo, hi = qrange(4)
    s = got.scale.float()
    codes = torch.clamp(torch.round(t.shadow.detach() / s), lo, hi)
    torch.testing.assert_close(w, codes * s * mask, rtol=0, atol=0)
    torch.testing.assert_close(got(x), want, rtol=1e-3, atol=1e-4)


def test_weight_tuning_keeps_the_mask_and_lowers_the_error(monkeypatch):
    """Every block's packed layers across its weight tuning: the mask is the same, pruned slots stay zero, the codes
    change, and the held-out error falls below both the closed form's and adapter-only tuning's."""
    import slim.pipeline.loop as pipeline

    real, seen = pipeline.tune_block, []

    def watched(block, *a, **kw):
        masks = {n: m.mask() for n, m in _slims(block).items()}
        before = {n: m.values.clone() for n, m in _slims(block).items()}
        info = real(block, *a, **kw)
        for n, m in _slims(block).items():
            assert torch.equal(m.mask(), masks[n]), n
            assert not m.dequantized_weight()[~masks[n]].any()
            seen.append(not torch.equal(m.values, before[n]))
        return info

    monkeypatch.setattr(pipeline, "tune_block", watched)
    _, rep = _compress({**TUNE, "steps": 40, "weights": True, "adapter_refit": True})
    monkeypatch.setattr(pipeline, "tune_block", real)
    _, adapters_only = _compress({**TUNE, "steps": 40})
    assert sum(seen) >= len(seen) // 2  # most layers' codes moved
    for v in rep["layers"].values():
        info = v["block_tune"]
        assert info["holdout_after"] < info["holdout_before"]
        assert info["adapter_refit"]["kept"] in ("tuned", "refit")
        assert info["adapter_refit"]["layers"] == 7
    mean = lambda r: sum(v["block_tune"]["holdout_after"] for v in r["layers"].values()) / len(r["layers"])  # noqa: E731
    assert mean(rep) < mean(adapters_only)


def test_weight_tuned_checkpoint_loads_with_every_backend(tmp_path):
    """The format is unchanged: a weight-tuned model saves and loads with each CPU backend to the same outputs."""
    from slim.format.checkpoint import save
    from slim.runtime.loader import load

    model, rep = _compress({"steps": 8, "eval_every": 4, "weights": True}, layers=1)
    out = save(model, tmp_path / "ck", meta={"report": {"compress_seconds": rep["compress_seconds"]}})
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits.float()
    for backend in ("reference", "cpu-int4"):
        loaded = load(out, backend=backend, dtype=torch.float32)
        with torch.no_grad():
            got = loaded(ids).logits.float()
        assert float((got - want).abs().max()) < 2e-2 * float(want.abs().max()), backend


def test_closed_form_refit_candidate_is_judged_on_held_out(monkeypatch):
    """tune.adapter_refit: the closed-form adapters are tried on each block and kept only where the held-out loss
    is lower; off, no candidate is fitted."""
    _, rep = _compress({**TUNE, "weights": True, "adapter_refit": True}, layers=1)
    info = next(iter(rep["layers"].values()))["block_tune"]["adapter_refit"]
    best = min(info["holdout_refit"], info["holdout_tuned"])
    assert info["kept"] == ("refit" if info["holdout_refit"] < info["holdout_tuned"] else "tuned")
    assert best <= info["holdout_tuned"]
    _, rep = _compress({**TUNE, "weights": True}, layers=1)
    assert "adapter_refit" not in next(iter(rep["layers"].values()))["block_tune"]


def test_bad_weight_tuning_options():
    with pytest.raises(ConfigError, match="tune.clipping"):
        CompressConfig.from_dict({"quant": {"method": "omniquant", "error_feedback": False, "group_size": 128},
                                  "adapter": {"method": "none", "refit_rounds": 0},
                                  "tune": {"steps": 4, "weights": True, "clipping": True}})
    with pytest.raises(ConfigError, match="weights_lr"):
        CompressConfig.from_dict({"tune": {"weights_lr": 0}})
    with pytest.raises(ConfigError, match="refit_rounds"):
        CompressConfig.from_dict({"adapter": {"remask": True, "refit_rounds": 0}})
    # weights alone are something to train: no adapters needed
    CompressConfig.from_dict({"adapter": {"method": "none", "refit_rounds": 0}, "tune": {"steps": 4, "weights": True}})


def _layer(seed: int = 0):
    from slim.algorithms.stats import InputStats

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    w = torch.randn(48, 64, generator=g)
    st = InputStats.empty(64, with_gram=True)
    st.add(x)
    return w, st


@pytest.mark.parametrize("mask", ["wanda", "sparsegpt"])
def test_remask_rechooses_the_mask_and_never_ends_worse(mask):
    """adapter.remask: the refit re-chooses the 2:4 mask on W - B A; the result is still 2:4, the mask differs
    from the first one somewhere, and the kept state's error is no worse than the first round's."""
    w, st = _layer()
    base = {"sparsity": {"method": mask}, "adapter": {"rank": 8}}
    plain = compress_weight(w, st, CompressConfig.from_dict(base))
    again = compress_weight(w, st, CompressConfig.from_dict({**base, "adapter": {"rank": 8, "remask": True}}))
    m = again.mask
    assert torch.equal(m.view(48, -1, 4).sum(-1), torch.full((48, 16), 2))
    assert again.info["remask_changed"] > 0
    assert not torch.equal(m, plain.mask)
    assert again.info["rel_err_final"] <= again.info["refit_rel_errs"][0] + 1e-12
    assert again.info["rel_err_final"] < plain.info["rel_err_compressed"]
    fixed = compress_weight(w, st, CompressConfig.from_dict({**base, "adapter": {"rank": 8, "remask": True}}),
                            mask=plain.mask)  # a given mask (--mask-file) is kept, and the report says so
    assert torch.equal(fixed.mask, plain.mask) and fixed.info["remask"].startswith("skipped")


def test_attention_then_mlp_units_each_train_and_lower_the_error(monkeypatch):
    """tune.units attn-mlp: the attention half trains against the dense state after attention (its own held-out
    loss falls), then the MLP half against the block output; each half's layers change only in their own unit."""
    import slim.pipeline.tune as tune

    real, moved = tune._train, []

    def watched(fwd, params, *a, **kw):
        names = {id(p): n for n, p in fwd.named_parameters()}
        before = [p.detach().clone() for p in params]
        info = real(fwd, params, *a, **kw)
        moved.append((type(fwd).__name__, {names.get(id(p), "?") for p in params},
                      any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))))
        return info

    monkeypatch.setattr(tune, "_train", watched)
    _, rep = _compress({**TUNE, "weights": True, "units": "attn-mlp"}, layers=1)
    info = next(iter(rep["layers"].values()))["block_tune"]
    assert info["attn"]["holdout_after"] < info["attn"]["holdout_before"]
    assert info["holdout_after"] < info["holdout_before"]
    assert info["steps"] == info["attn"]["steps"] + TUNE["steps"] or info.get("stopped_early")
    (k1, first, m1), (k2, second, m2) = moved
    assert k1 == "UpTo" and k2 != "UpTo" and m1 and m2
    assert all("self_attn" in n for n in first) and not any("self_attn" in n for n in second)
    with pytest.raises(ConfigError, match="tune.units"):
        CompressConfig.from_dict({"tune": {"units": "layer"}})
