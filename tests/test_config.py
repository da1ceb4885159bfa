import pytest

from slim.config import AdapterConfig, CompressConfig, ConfigError, parse_pattern


def test_defaults_are_the_ablation_winner_on_the_paper_budget():
    c = CompressConfig()
    assert (c.sparsity.pattern, c.sparsity.method) == ("2:4", "wanda")
    assert (c.quant.method, c.quant.bits, c.quant.error_feedback) == ("slim", 4, True)
    assert (c.adapter.method, c.adapter.rank, c.adapter.quantize, c.adapter.refit_rounds) == ("fullcov", 0.1, True, 3)
    assert (c.calib.n_samples, c.calib.seqlen, c.calib.seed) == (128, 512, 0)
    assert c.needs_gram


@pytest.mark.parametrize("pattern,expect", [
    ("2:4", ("nm", 2, 4, 0.5)), ("1:4", ("nm", 1, 4, 0.75)), ("0.5", ("unstructured", 0, 0, 0.5)),
    ("60%", ("unstructured", 0, 0, 0.6)), ("none", ("dense", 0, 0, 0.0)),
])
def test_patterns(pattern, expect):
    assert parse_pattern(pattern) == pytest.approx(expect)


@pytest.mark.parametrize("bad,msg", [
    ({"sparsity": {"pattern": "4:4"}}, "1 <= N < M"),
    ({"sparsity": {"pattern": "5:4"}}, "1 <= N < M"),
    ({"sparsity": {"pattern": "1.5"}}, "strictly between"),
    ({"sparsity": {"pattern": "abc"}}, "not understood"),
    ({"sparsity": {"method": "random"}}, "unknown mask method"),
    ({"quant": {"bits": 3}}, "not supported"),
    ({"quant": {"method": "nf4"}}, "unknown quantizer"),
    ({"adapter": {"rank": 0}}, "rank must be > 0"),
    ({"adapter": {"rank": 2.5}}, "whole number"),
    ({"sparsity": {"patern": "2:4"}}, "unknown config key.*sparsity.patern"),
    ({"bogus": 1}, "unknown config key.*bogus"),
    ({"device": "tpu"}, "use 'cpu' or 'cuda'"),
])
def test_bad_config(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        CompressConfig.from_dict(bad)


def test_rank_rules():
    a = AdapterConfig()
    assert a.rank_for(576, 576) == 57 and a.rank_for(192, 576) == 19
    assert AdapterConfig(rank=16).rank_for(576, 1536) == 16
    assert AdapterConfig(pad_to=128).rank_for(576, 576) == 128
    assert AdapterConfig(pad_to=128).rank_for(64, 64) == 64  # capped at min dim


def test_roundtrip_dict():
    c = CompressConfig.from_dict({"sparsity": {"pattern": "0.5"}, "adapter": {"method": "naive"}})
    assert CompressConfig.from_dict(c.to_dict()) == c


def test_paper_preset_is_explicit():
    from slim.config import PRESETS

    p = CompressConfig.from_dict(PRESETS["paper"])
    assert (p.adapter.method, p.adapter.refit_rounds, p.quant.error_feedback, p.true_sequential) == (
        "slim", 0, False, False)
    assert not p.needs_gram
