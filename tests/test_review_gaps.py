"""Correctness gaps found in review (#45 item 4): limits that the config, the packer and the loader must share,
silent damping, calibration windows beyond the model's context, repeated pre-compression checks."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

import slim
from slim.config import CompressConfig, ConfigError, SparsityConfig
from slim.format.packed import Layout
from slim.testing.random_layers import random_slim_linear

SMALL = {"calib": {"n_samples": 2, "seqlen": 16, "batch_size": 2}}


class ByteTokenizer:
    """Bytes as token ids (vocab 256): enough for `slim.compress` without a tokenizer on disk."""

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())], dtype=torch.long))


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(p)


# ---------------------------------------------------------------- 1: N:M limits


def test_config_refuses_m_beyond_loader_limit():
    with pytest.raises(ConfigError, match="at most 64"):
        CompressConfig.from_dict({"sparsity": {"pattern": "2:128"}})
    with pytest.raises(ConfigError, match="at most 64"):
        SparsityConfig(pattern="1:65")


def test_nm_limits_of_config_and_loader_agree():
    """Every M the config accepts, the loader accepts, and the first M the config refuses the loader refuses."""
    SparsityConfig(pattern="2:64")
    layer = random_slim_linear(8, 128, sparsity="2:64")
    again = Layout.from_dict(layer.layout.to_dict())
    assert (again.n, again.m, again.keep) == (2, 64, 4)
    with pytest.raises(ValueError, match="M <= 64"):
        Layout(d_in=128, d_out=8, sparsity="nm", n=2, m=128, keep=2).check()


def test_nm_2_64_round_trip(tmp_path):
    """A 2:64 checkpoint compressed, saved and loaded back (the tiny model's widths 64 and 128 divide by 64)."""
    from slim.pipeline.loop import compress_model

    model = tiny_model("llama", layers=1)
    cfg = CompressConfig.from_dict({**SMALL, "sparsity": {"pattern": "2:64"}})
    compress_model(model, torch.randint(0, 256, (2, 16)), cfg, progress=False)
    ids = torch.randint(0, 256, (1, 8))
    want = model(ids).logits
    slim.save(model, tmp_path / "ckpt", meta={"config": cfg.to_dict()})
    back = slim.load(tmp_path / "ckpt", backend="reference")
    assert torch.allclose(back(ids).logits.float(), want.float(), atol=1e-2)


# ---------------------------------------------------------------- 2: 3-bit codes


@pytest.mark.parametrize("over", [{"bits": 3}, {"rank": 8, "adapter_bits": 3}])
def test_three_bit_layers_refused_with_a_clear_message(over):
    with pytest.raises(ValueError, match="inconsistent layout: .*bits in 0, 2, 4, 8"):
        random_slim_linear(16, 64, **over)


def test_bits_of_config_and_layout_agree():
    for b in range(1, 9):
        layout_ok = config_ok = True
        try:
            Layout(d_in=64, d_out=8, keep=64, bits=b).check()
        except ValueError:
            layout_ok = False
        try:
            CompressConfig.from_dict({"quant": {"bits": b}, "adapter": {"bits": b}})
        except ConfigError:
            config_ok = False
        assert layout_ok == config_ok, b


# ---------------------------------------------------------------- 3: damping raised on a failed Cholesky


def _indefinite(d: int) -> torch.Tensor:
    """Eigenvalues 3 and -1 per 2 x 2 block, unit diagonal: its Cholesky fails until ~1.0 x mean(diag) is added."""
    return torch.kron(torch.eye(d // 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])).double()


def test_feedback_damping_raise_is_logged_and_kept(caplog):
    from slim.algorithms.optq import Feedback

    with caplog.at_level(logging.WARNING, logger="slim.algorithms.optq"):
        fb = Feedback.build(_indefinite(8), 0.01, False)
    assert fb.damping == pytest.approx(1.01)
    assert any("damping" in r.getMessage() and "1.01" in r.getMessage() for r in caplog.records)
    assert Feedback.build(torch.eye(8, dtype=torch.double), 0.01, False).damping == pytest.approx(0.01)


def test_gram_factor_damping_raise_is_logged_and_kept(caplog):
    from slim.algorithms.lowrank import gram_factor

    with caplog.at_level(logging.WARNING, logger="slim.algorithms.lowrank"):
        f = gram_factor(_indefinite(8), 0.01)
    assert f.damping == pytest.approx(1.01)
    assert any("damping" in r.getMessage() and "1.01" in r.getMessage() for r in caplog.records)
    assert gram_factor(torch.eye(8, dtype=torch.double), 0.01).damping == pytest.approx(0.01)


def test_raised_damping_recorded_per_layer():
    """The layer's report record says how far each factorization's damping had to be raised."""
    from slim.algorithms.stats import InputStats
    from slim.pipeline.solver import compress_weight

    d_in = 16
    h = _indefinite(d_in)
    stats = InputStats(sum_sq=torch.diagonal(h).float().clone(), gram=h.clone(), n_tokens=1)
    w = torch.randn(12, d_in, generator=torch.Generator().manual_seed(0))
    cw = compress_weight(w, stats, CompressConfig.from_dict({"adapter": {"rank": 2}}), name="q_proj")
    assert cw.info["damping_raised"] == {"hessian": pytest.approx(1.01), "adapter": pytest.approx(1.01)}
    ok = InputStats(sum_sq=torch.ones(d_in), gram=torch.eye(d_in, dtype=torch.double), n_tokens=1)
    assert "damping_raised" not in compress_weight(w, ok, CompressConfig.from_dict({"adapter": {"rank": 2}})).info


# ---------------------------------------------------------------- 4: calibration window beyond the context


def test_calibration_window_longer_than_context_refused_before_calibration(calib_file, monkeypatch):
    import slim.api

    def no_calibration(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(slim.api, "calibration_ids", no_calibration)
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 2, "seqlen": 300, "data": calib_file}})
    with pytest.raises(ConfigError, match=r"seqlen 300 .*256"):
        slim.compress(tiny_model("llama", layers=1, context=256), cfg, ByteTokenizer(), progress=False)


# ---------------------------------------------------------------- 5: one compressibility check per compress


def test_check_compressible_runs_once_per_compress(calib_file, monkeypatch):
    import slim.api
    import slim.models
    import slim.pipeline.loop

    calls = []
    real = slim.models.check_compressible

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for mod in (slim.models, slim.api, slim.pipeline.loop):
        if hasattr(mod, "check_compressible"):
            monkeypatch.setattr(mod, "check_compressible", counting)
    cfg = CompressConfig.from_dict({"calib": {**SMALL["calib"], "data": calib_file}})
    slim.compress(tiny_model("llama", layers=1), cfg, ByteTokenizer(), progress=False)
    assert len(calls) == 1


def test_compress_model_alone_still_checks():
    """Called directly (no `slim.compress` in front), the pipeline still refuses what it cannot compress."""
    from slim.pipeline.loop import compress_model

    cfg = CompressConfig.from_dict({**SMALL, "sparsity": {"pattern": "2:3"}})
    with pytest.raises(ConfigError, match="divisible"):
        compress_model(tiny_model("llama", layers=1), torch.randint(0, 256, (2, 16)), cfg, progress=False)



def test_cli_refuses_calibration_window_longer_than_context(tiny_llama_dir, shared_data, tmp_path, capsys,
                                                              monkeypatch):
    import slim.api
    from slim.cli.commands import main

    monkeypatch.setattr(slim.api, "calibration_ids", lambda *a, **k: pytest.fail("calibration started"))
    rc = main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--calib-seqlen", "4096",
               "--data-dir", str(shared_data)])
    assert rc == 2
    assert "calib.seqlen 4096 is longer than the model's context of 2048 positions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_checks_compressible_once(tiny_llama_dir, shared_data, tmp_path, monkeypatch):
    import slim.api
    import slim.models
    import slim.pipeline.loop
    from slim.cli.commands import main

    calls = []
    real = slim.models.check_compressible

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for mod in (slim.models, slim.api, slim.pipeline.loop):
        monkeypatch.setattr(mod, "check_compressible", counting)
    rc = main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--calib-samples", "2",
               "--calib-seqlen", "16", "--data-dir", str(shared_data), "--quiet"])
    assert rc == 0 and len(calls) == 1


# --- environment variables that change numerics are recorded with every checkpoint and result -------------------


def test_numerics_env_is_recorded_with_checkpoints(tmp_path, monkeypatch):
    import json

    from slim.format.checkpoint import versions
    from slim.names import NUMERICS_ENV
    from slim.pipeline.loop import compress_model

    for k in NUMERICS_ENV:
        monkeypatch.delenv(k, raising=False)
    assert "environment" not in versions()  # the defaults: nothing recorded, nothing changes
    monkeypatch.setenv("SLIM_CPU_FP32_ACTIVATIONS", "1")
    monkeypatch.setenv("SLIM_NATIVE", "0")
    assert versions()["environment"] == {"SLIM_NATIVE": "0", "SLIM_CPU_FP32_ACTIVATIONS": "1"}
    model = tiny_model("llama", layers=1)
    compress_model(model, torch.randint(0, 256, (2, 32)),
                   CompressConfig.from_dict({"calib": {"n_samples": 2, "seqlen": 32}}), progress=False)
    slim.save(model, tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "slim_config.json").read_text())
    assert saved["versions"]["environment"] == {"SLIM_NATIVE": "0", "SLIM_CPU_FP32_ACTIVATIONS": "1"}


def test_every_environment_variable_slim_reads_is_classified():
    """A new SLIM_* switch must be added to NUMERICS_ENV (recorded) or named here as not changing numerics."""
    import re
    from pathlib import Path

    from slim.names import NUMERICS_ENV

    not_numerics = {"SLIM_FAULT", "SLIM_DATA_DIR", "SLIM_MALLOC_TUNING"}  # test hook, data location, allocator
    src = Path(slim.__file__).parent
    read = set()
    for f in src.rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get)?\(\s*\"(SLIM_\w+|TRITON_INTERPRET)\"", f.read_text()))
        read |= set(re.findall(r"environ\[\"(SLIM_\w+)\"\]", f.read_text()))
    read.add("SLIM_DATA_DIR")  # read through data.ENV_VAR
    assert read, "the scan found no environment reads at all"
    assert read - not_numerics == set(NUMERICS_ENV), (read - not_numerics) ^ set(NUMERICS_ENV)
