"""Block-wise tuning: only adapters (and scales) change, the mask survives, gradients pass the STE, the held-out
loss never gets worse, and a killed tuning run resumes to the same bytes."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import slim
from slim.cli.commands import build_parser, config_from_args, main
from slim.config import CompressConfig, ConfigError, TuneConfig
from slim.format.checkpoint import read_safetensors_header
from slim.format.packed import SlimLinear
from slim.pipeline.capture import capture_block_inputs, run_block
from slim.pipeline.dist import Ranks
from slim.pipeline.loop import compress_model
from slim.pipeline.tune import TrainableLinear, _Batches, ste, tune_block

FAST = ["--calib-samples", "8", "--calib-seqlen", "32", "--set", "calib.batch_size=2", "-q"]
TUNE = {"steps": 24, "eval_every": 4, "patience": 3, "lr": 3e-2}


def _compress(tune: dict, scales: bool = False, **recipe):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=2)
    ids = torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 32, "seqlen": 64, "batch_size": 4},
                                    "tune": {**tune, "scales": scales}, **recipe})
    rep = compress_model(model, ids, cfg, progress=False)
    return model, rep


def _slims(model) -> dict[str, SlimLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SlimLinear)}


@pytest.mark.parametrize("scales", [False, True], ids=["adapters", "adapters+scales"])
def test_tuning_changes_only_adapters_and_scales(scales, monkeypatch):
    """Every block's packed layers before and after its tuning: the mask and the codes stay, adapters (and, when
    asked, scales) change, and no pruned slot holds a base weight."""
    import slim.pipeline.loop as pipeline

    real, changed = pipeline.tune_block, {}

    def watched(block, *a, **kw):
        before = {n: {k: t.clone() for k, t in m.state_dict().items()} for n, m in _slims(block).items()}
        masks = {n: m.mask() for n, m in _slims(block).items()}
        info = real(block, *a, **kw)
        for n, m in _slims(block).items():
            assert torch.equal(m.mask(), masks[n]), n  # the mask survives: no pruned slot comes back
            assert bool((m.dequantized_weight()[~masks[n]] == 0).all())
            for k, t in m.state_dict().items():
                if not torch.equal(t, before[n][k]):
                    changed.setdefault(k, set()).add(n)
        return info

    monkeypatch.setattr(pipeline, "tune_block", watched)
    _, rep = _compress(TUNE, scales=scales)
    allowed = {"lora_A", "lora_B", "lora_A_scale", "lora_B_scale"} | ({"scale"} if scales else set())
    assert changed and set(changed) <= allowed, changed
    assert ("scale" in changed) == scales
    assert len(changed["lora_A"]) >= 7  # most layers' adapters moved
    for v in rep["layers"].values():
        info = v["block_tune"]
        assert info["holdout_after"] <= info["holdout_before"]
        assert info["steps"] >= 1 and info["seconds"] > 0


def test_norm_tuning_changes_the_norms_and_nothing_packed(monkeypatch):
    """tune.norms: the block's norm weights move; the packed layers change only in their adapters."""
    import slim.pipeline.loop as pipeline

    real, moved = pipeline.tune_block, []

    def watched(block, *a, **kw):
        norms = {n: p.detach().clone() for n, p in block.named_parameters() if "norm" in n}
        packed = {n: {k: t.clone() for k, t in m.state_dict().items() if not k.startswith("lora_")}
                  for n, m in _slims(block).items()}
        info = real(block, *a, **kw)
        assert norms and all(p.dtype == norms[n].dtype for n, p in block.named_parameters() if n in norms)
        moved.extend(n for n, p in block.named_parameters() if n in norms and not torch.equal(p, norms[n]))
        for n, m in _slims(block).items():
            for k, t in packed[n].items():
                assert torch.equal(m.state_dict()[k], t), (n, k)
        return info

    monkeypatch.setattr(pipeline, "tune_block", watched)
    _compress({**TUNE, "norms": True})
    assert len(moved) == 4  # both norms of both blocks


def test_tuning_lowers_the_block_output_error():
    """On random models the held-out block error after tuning is lower than the closed form's, in every block."""
    _, rep = _compress({**TUNE, "steps": 40})
    blocks = {k.rsplit(".", 2)[0]: v["block_tune"] for k, v in rep["layers"].items()}
    assert len(blocks) == 2
    for info in blocks.values():
        assert info["holdout_after"] < info["holdout_before"]


def test_tuning_steps_show_in_the_block_bar(capsys):
    """A block's tuning steps (minutes a block for OmniQuant's 2,560 on a CPU) show in the progress bar."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 8, "seqlen": 32, "batch_size": 2},
                                    "tune": {"steps": 5, "holdout": 0.0}})
    compress_model(model, ids, cfg, progress=True)
    err = capsys.readouterr().err
    assert "tune 1/5 loss=" in err and "tune 5/5 loss=" in err


@pytest.mark.parametrize("mode", ["bf16", "bf16-base"])
def test_bf16_tuning_lowers_the_error_and_keeps_the_mask(mode):
    """Tuning steps under bf16 autocast (or with bf16 base matmuls) still win on the held-out (float32) error,
    keep every pruned slot zero, and take a different path from float32 (the low precision is on)."""
    base, _ = _compress({**TUNE, "steps": 0})
    model, rep = _compress({**TUNE, "steps": 40, "autocast": mode})
    ref, _ = _compress({**TUNE, "steps": 40})
    blocks = {k.rsplit(".", 2)[0]: v["block_tune"] for k, v in rep["layers"].items()}
    for info in blocks.values():
        assert info["holdout_after"] < info["holdout_before"]
    got, closed, fp32 = _slims(model), _slims(base), _slims(ref)
    for n, m in got.items():  # block 1's mask is chosen on block 0's tuned outputs; block 0's is the closed form's
        assert not torch.any(m.dequantized_weight()[~m.mask()])
        assert torch.equal(m.mask().view(m.mask().shape[0], -1, 4).sum(-1), torch.full_like(
            m.mask().view(m.mask().shape[0], -1, 4).sum(-1), 2))
        if ".layers.0." in n:
            assert torch.equal(m.mask(), closed[n].mask())
    assert any(not torch.equal(m.lora_A, fp32[n].lora_A) for n, m in got.items())
    with pytest.raises(ConfigError, match="autocast"):
        CompressConfig.from_dict({"tune": {"autocast": "fp8"}})


def test_ste_gradient_reaches_the_adapters():
    model, _ = _compress({"steps": 0})
    mod = _slims(model)["model.layers.0.mlp.down_proj"]
    t = TrainableLinear(mod, scales=True)
    x = torch.randn(3, 5, mod.in_features)
    t(x).pow(2).sum().backward()
    for p in (t.A, t.B, t.gain):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # forward of the opened layer = the stored layer, before any step
    torch.testing.assert_close(t(x), mod(x), rtol=1e-4, atol=1e-5)
    # the STE's forward is the quantized tensor, its backward the identity
    a = torch.randn(4, 256, requires_grad=True)
    q = ste(a, 4, 128)
    assert len(torch.unique(q.detach()[0, :128])) <= 16
    q.sum().backward()
    assert torch.equal(a.grad, torch.ones_like(a))


def test_bf16_base_matmul_and_its_exact_switch():
    """base_dtype: the frozen weight's matmul runs in bfloat16 (close to, not equal to, float32), gradients still
    reach the adapters, and `exact` (the held-out check) gives the float32 forward bit for bit."""
    model, _ = _compress({"steps": 0})
    mod = _slims(model)["model.layers.0.mlp.down_proj"]
    ref, low = TrainableLinear(mod), TrainableLinear(mod, base_dtype=torch.bfloat16)
    assert low.base_low.dtype == torch.bfloat16 and ref.base_low is None
    x = torch.randn(3, 5, mod.in_features)
    want, got = ref(x), low(x)
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    assert float((got - want).detach().pow(2).sum() / want.detach().pow(2).sum()) < 1e-4
    got.pow(2).sum().backward()
    assert low.A.grad.abs().sum() > 0 and low.B.grad.abs().sum() > 0
    low.exact = True
    assert torch.equal(low(x), want)
    with_gain = TrainableLinear(mod, scales=True, base_dtype=torch.bfloat16)  # scaled weights cast per step
    assert with_gain.base_low is None
    with_gain(x).pow(2).sum().backward()
    assert with_gain.gain.grad.abs().sum() > 0
    # under autocast (finetune's "bf16") the whole layer, adapters included, computes and returns bfloat16
    low.exact = False
    low.A.grad = low.B.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        auto = low(x)
    assert auto.dtype == torch.bfloat16
    assert float((auto.float() - want).detach().pow(2).sum() / want.detach().pow(2).sum()) < 1e-3
    auto.float().pow(2).sum().backward()
    assert low.A.grad.dtype == torch.float32 and low.A.grad.abs().sum() > 0 and low.B.grad.abs().sum() > 0


def test_written_back_layer_matches_the_trained_one():
    model, _ = _compress({"steps": 0})
    mod = _slims(model)["model.layers.1.self_attn.q_proj"]
    t = TrainableLinear(mod)
    with torch.no_grad():
        t.A.add_(0.01 * torch.randn_like(t.A))
        t.B.add_(0.01 * torch.randn_like(t.B))
    x = torch.randn(2, 7, mod.in_features)
    want = t(x).detach()
    got = t.write_back()(x)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_teachers_differ_and_compressed_needs_no_second_stream():
    dense_teacher, _ = _compress(TUNE)
    comp_teacher, _ = _compress({**TUNE, "teacher": "compressed"})
    a = _slims(dense_teacher)["model.layers.1.mlp.up_proj"].lora_A
    b = _slims(comp_teacher)["model.layers.1.mlp.up_proj"].lora_A
    assert not torch.equal(a, b)  # block 1's targets differ: the dense stream vs the compressed one
    a0 = _slims(dense_teacher)["model.layers.0.mlp.up_proj"].lora_A
    b0 = _slims(comp_teacher)["model.layers.0.mlp.up_proj"].lora_A
    assert torch.equal(a0, b0)  # block 0 sees the same inputs either way


def test_bad_tuning_options():
    with pytest.raises(ConfigError, match="none of them"):
        CompressConfig.from_dict({"adapter": {"method": "none"}, "tune": {"steps": 5}})
    with pytest.raises(ConfigError, match="teacher"):
        CompressConfig.from_dict({"tune": {"steps": 5, "teacher": "student"}})
    with pytest.raises(ConfigError, match="holdout"):
        CompressConfig.from_dict({"tune": {"holdout": 1.0}})
    with pytest.raises(ConfigError, match="eval_every"):
        config_from_args(build_parser().parse_args(["compress", "m", "--out", "o", "--set", "tune.eval_every=0"]))
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_args(build_parser().parse_args(["compress", "m", "--out", "o", "--set", "tune.batch_size=-1"]))


def test_tuning_set_keys_reach_the_config():
    args = build_parser().parse_args(["compress", "m", "--out", "o", "--set", "tune.steps=64",
                                      "--set", "tune.eval_every=32", "--set", "calib.batch_size=2",
                                      "--set", "tune.batch_size=1"])
    cfg = config_from_args(args)
    assert (cfg.tune.steps, cfg.tune.eval_every, cfg.calib.batch_size, cfg.tune.batch_size) == (64, 32, 2, 1)


def test_sliced_steps_match_small_calibration_batches():
    """Steps of one window sliced from batches of 4 (`tune.batch_size`) train as steps on calibration batches of
    one window do: the same windows in the same seeded order, the held-out batches kept whole."""
    model, _ = _compress({"steps": 0})
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(2))
    block = model.model.layers[0]
    runs = {}
    for calib_batch, tune_batch in ((4, 1), (1, 0)):
        h, kw = capture_block_inputs(model, ids, calib_batch)
        targets = run_block(block, h, kw, "cpu")
        targets = [1.05 * t + 0.01 for t in targets]  # somewhere the closed form does not already sit
        b = copy.deepcopy(block)
        info = tune_block(b, h, targets, kw, "cpu", TuneConfig(steps=12, holdout=0.0, batch_size=tune_batch))
        assert info["steps"] == 12
        runs[calib_batch] = {n: m.state_dict() for n, m in _slims(b).items()}
    before = {n: m.state_dict() for n, m in _slims(block).items()}
    for n, sd in runs[4].items():
        assert not torch.equal(sd["lora_A"], before[n]["lora_A"])  # it trained
        for k, t in sd.items():
            torch.testing.assert_close(t, runs[1][n][k], rtol=0, atol=1e-3 if t.is_floating_point() else 0, msg=k)
    # held out: the last of two batches of 4, whole; the first one in steps of one window
    where = _Batches([torch.zeros(4, 3), torch.zeros(4, 3)], Ranks(), size=1, holdout=0.125)
    assert where.units == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4), (1, 0, 4)]
    assert (where.train, where.hold) == ([0, 1, 2, 3], [4])


def test_tuning_resumes_bit_identical(tiny_llama_dir, shared_data, tmp_path):
    """A SIGKILL after block 0 of a tuned run (the dense teacher's stream committed beside the compressed one), then
    --resume: the same bytes as an uninterrupted run."""
    args = ["compress", str(tiny_llama_dir), *FAST, "--data-dir", str(shared_data), "--set", "tune.steps=4"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "slim", *args, "--out", str(out)], env={**env, "SLIM_FAULT": "block@8"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    saved = read_safetensors_header(tmp_path / ".resumed.partial" / "hidden-00000.safetensors")
    assert any(k.startswith("t") for k in saved)  # the dense stream was committed too
    r = subprocess.run([sys.executable, "-m", "slim", *args, "--out", str(out), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
