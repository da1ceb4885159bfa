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


def test_shipped_presets_equal_the_former_in_code_dict():
    """src/slim/presets/*.yaml hold exactly the recipes PRESETS held in code before (captured by value in
    tests/data/presets.json): moving them into files changed no recipe, no value and no value's type."""
    import json
    from pathlib import Path

    from slim.config import PRESETS

    expected = json.loads((Path(__file__).parent / "data" / "presets.json").read_text())
    assert json.dumps({k: PRESETS[k] for k in expected}, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert set(PRESETS) - set(expected) == {"tuned"}  # added since (#48)
    for recipe in PRESETS.values():
        CompressConfig.from_dict(recipe)  # each one validates


def test_torch_free_names_match_the_registries():
    """slim.names (read by the parser and the config without torch) lists what the registries hold."""
    from slim import names
    from slim.algorithms.methods import ADAPTERS, MASKS, QUANTIZERS
    from slim.runtime import CHOICES

    assert names.MASK_METHODS == tuple(MASKS)
    assert names.QUANT_METHODS == tuple(QUANTIZERS)
    assert names.ADAPTER_METHODS == tuple(ADAPTERS)
    assert names.BACKEND_CHOICES == CHOICES


@pytest.mark.parametrize("items,expect", [
    (["tune.steps=128"], {"tune": {"steps": 128}}),
    (["tune.lr=1e-2", "tune.lr_relative=false"], {"tune": {"lr": 0.01, "lr_relative": False}}),
    (["sparsity.pattern=2:4", "true_sequential=true"], {"sparsity": {"pattern": "2:4"}, "true_sequential": True}),
    (["calib.data=data/my set.jsonl", "adapter.rank=0.25"], {"calib": {"data": "data/my set.jsonl"},
                                                              "adapter": {"rank": 0.25}}),
])
def test_set_values_read_as_yaml(items, expect):
    from slim.config import parse_set

    assert parse_set(items) == expect
    CompressConfig.from_dict(expect)


@pytest.mark.parametrize("items,msg", [
    (["tune.stpes=3"], "unknown config key(s) tune.stpes; allowed under tune.: adapter_refit, autocast, batch_size,"),
    (["tuning.steps=3"], "unknown config key(s) tuning; allowed under top level: adapter, calib,"),
    (["fp8=true"], "unknown config key(s) fp8; allowed under top level:"),
    (["tune.steps"], "expected SECTION.KEY=VALUE"),
    (["tune..steps=1"], "expected SECTION.KEY=VALUE"),
    (["tune.autocast=fp8"], "tune.autocast: unknown 'fp8'"),
    (["tune.steps=[1"], "not valid YAML"),
])
def test_set_is_validated_like_a_config_file(items, msg):
    from slim.config import parse_set

    with pytest.raises(ConfigError) as e:
        CompressConfig.from_dict(parse_set(items))
    assert msg in str(e.value)
