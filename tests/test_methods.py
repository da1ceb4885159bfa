"""The method registries: names, constraints and statistics come from one entry per method, and a method added
there plugs into validation and the solver without touching either."""

import pytest
import torch
from conftest import correlated_inputs

from slim.algorithms.methods import ADAPTERS, MASKS, QUANTIZERS, Quantizer
from slim.algorithms.quant import absmax_scale
from slim.algorithms.stats import InputStats
from slim.config import CompressConfig, ConfigError, QuantConfig
from slim.pipeline.solver import compress_weight


def test_every_registered_method_validates_and_unknown_names_list_the_registry():
    for name, qz in QUANTIZERS.items():
        QuantConfig(method=name, group_size=128, error_feedback=qz.feedback)
    for name in MASKS:
        CompressConfig.from_dict({"sparsity": {"method": name}})
    for name in ADAPTERS:
        CompressConfig.from_dict({"adapter": {"method": name}})
    with pytest.raises(ConfigError, match="omniquant"):  # the message lists the registry's names
        QuantConfig(method="nope")


def test_statistics_needed_follow_the_entries():
    paper = CompressConfig.from_dict({"quant": {"error_feedback": False}, "adapter": {"method": "slim"}})
    assert not paper.needs_gram and not paper.needs_abs and not paper.needs_jsq
    awq = CompressConfig.from_dict({"quant": {"method": "awq", "error_feedback": False}, "adapter": {"method": "slim"}})
    assert awq.needs_gram and awq.needs_abs
    jsq = CompressConfig.from_dict({"sparsity": {"method": "jsq"}})
    assert jsq.needs_jsq
    with pytest.raises(ConfigError, match="rounds to nearest"):  # an entry that takes no error feedback
        CompressConfig.from_dict({"quant": {"method": "omniquant"}})


def test_a_registered_quantizer_plugs_in(monkeypatch):
    """A new quantizer is one registry entry: config accepts it, the solver uses its scale fit."""
    calls = []

    def half_absmax(w, mask, q):
        calls.append(q.bits)
        return absmax_scale(w * mask, q.bits) * 0.5, 0, {"custom": True}

    monkeypatch.setitem(QUANTIZERS, "half-absmax", Quantizer("half-absmax", half_absmax))
    cfg = CompressConfig.from_dict({"quant": {"method": "half-absmax", "error_feedback": False},
                                    "adapter": {"method": "none", "refit_rounds": 0}})
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    st = InputStats.empty(32, with_gram=False)
    st.add(correlated_inputs(64, 32))
    cw = compress_weight(w, st, cfg)
    assert calls == [4] and cw.info["custom"]
    ref = absmax_scale(w * cw.mask, 4) * 0.5
    assert torch.allclose(cw.scale.float(), ref.float())
