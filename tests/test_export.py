"""Exports loaded by the real third-party loaders: transformers + compressed-tensors, PEFT, plain transformers."""

import json

import pytest
import torch
from conftest import tiny_model

import slim
from slim.cli.commands import main
from slim.config import CompressConfig
from slim.export.formats import VLLM_RANKS, ExportError, base_only, ct_tensors, export, peft_adapter
from slim.format.checkpoint import OutputExistsError
from slim.format.packed import SlimLinear
from slim.pipeline.loop import compress_model
from slim.testing.random_layers import random_slim_linear

pytest.importorskip("compressed_tensors")
peft = pytest.importorskip("peft")


def _checkpoint(kind, tmp_path, **overrides):
    model = tiny_model(kind)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    d = {"quant": {"group_size": 32}, "calib": {"n_samples": 8, "seqlen": 32, "batch_size": 4}}
    for sec, vals in overrides.items():
        d.setdefault(sec, {}).update(vals)
    cfg = CompressConfig.from_dict(d)
    compress_model(model, ids, cfg, progress=False)
    ck = slim.save(model, tmp_path / f"ck-{kind}", meta={"config": cfg.to_dict()})
    return ck, ids


def _reference(ck, adapters=True):
    """slim's reference model in fp32; without adapters, each layer is its dequantized base alone."""
    model = slim.load(ck, backend="reference", dtype="fp32")
    return model if adapters else base_only(model)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_compressed_tensors_export_is_the_base_model(kind, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ck, ids = _checkpoint(kind, tmp_path)
    out = tmp_path / "ct"
    export(ck, out, "compressed-tensors", dtype="fp32")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    diff = (_logits(loaded, ids) - _logits(_reference(ck, adapters=False), ids)).abs().max()
    assert diff < 1e-3, diff
    # the packed 2:4 base: at most 2 non-zero codes per group of 4, exactly where slim keeps a non-zero code
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ref = _reference(ck)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = {k.rpartition(".")[0] for k in f.keys() if k.endswith("weight_packed")}
        assert names == {n for n, m in ref.named_modules() if isinstance(m, SlimLinear)}
        for name in names:
            shape = f.get_tensor(f"{name}.weight_shape")
            q = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), 4, torch.Size(shape.tolist()))
            nz = (q != 0).view(q.shape[0], -1, 4)
            assert int(nz.sum(-1).max()) <= 2
            layer = ref.get_submodule(name)
            assert torch.equal(q != 0, layer.dequantized_weight() != 0)
            assert torch.equal(nz.sum(-1) <= 2, torch.ones_like(nz[..., 0]))
    assert (out / "README.md").read_text().count("from_pretrained") >= 1


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_peft_export_reproduces_slims_model(kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    ck, ids = _checkpoint(kind, tmp_path)
    ref = _logits(_reference(ck), ids)
    for pad in (None, "vllm"):
        out = tmp_path / f"peft-{pad}"
        export(ck, out, "peft", dtype="fp32", pad_rank=pad)
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"]
        assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
        if pad:
            assert {cfg["r"], *cfg["rank_pattern"].values()} <= set(VLLM_RANKS)
        # PEFT wraps dense Linears: the base is decompressed as it loads
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(run_compressed=False))
        model = PeftModel.from_pretrained(base, out / "adapter")
        diff = (_logits(model, ids) - ref).abs().max()
        assert diff < 1e-3, (pad, diff)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_merged_export_is_slims_model(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    ck, ids = _checkpoint(kind, tmp_path)
    export(ck, tmp_path / "merged", "merged", dtype="fp32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (_logits(loaded, ids) - _logits(_reference(ck), ids)).abs().max() < 1e-3


def test_zero_points_and_channel_scales_round_trip():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for kw in (dict(group_size=32, zero_point=True), dict(sparsity="1:4"), dict(sparsity="0.5", group_size=64)):
        layer = random_slim_linear(96, 256, seed=1, **kw)
        t = ct_tensors(layer, torch.float32)
        q = unpack_from_int32(t["weight_packed"], 4, torch.Size([96, 256])).float()
        s = t["weight_scale"].float()
        if "weight_zero_point" in t:
            zp = unpack_from_int32(t["weight_zero_point"], 4, torch.Size(s.shape), packed_dim=0).float()
        else:
            zp = torch.zeros_like(s)
        g = 256 // s.shape[1]
        w = (q - zp.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
        assert torch.equal(w, layer.dequantized_weight()), kw


def test_peft_ranks_and_targets():
    layers = {f"model.layers.{i}.self_attn.{p}": random_slim_linear(64, 64, rank=r, seed=i)
              for i, (p, r) in enumerate([("q_proj", 8), ("k_proj", 8), ("q_proj", 24)])}
    layers["model.layers.3.self_attn.k_proj"] = random_slim_linear(64, 64, rank=0, seed=9)
    kw, tensors = peft_adapter(layers, torch.float16)
    assert kw["r"] == 8 and kw["rank_pattern"] == {"model.layers.2.self_attn.q_proj": 24}
    # every q_proj has adapters: the short name; k_proj only where it has them
    assert kw["target_modules"] == ["model.layers.1.self_attn.k_proj", "q_proj"]
    kw, tensors = peft_adapter(layers, torch.float16, pad_rank="vllm")
    assert kw["r"] == 8 and kw["rank_pattern"] == {"model.layers.2.self_attn.q_proj": 32}
    assert tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (32, 64)
    assert tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"][:, 24:].abs().max() == 0


def test_export_refuses_before_work(tmp_path):
    ck, _ = _checkpoint("llama", tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(ck, tmp_path / "taken", "merged")
    with pytest.raises(ExportError, match="unknown export format"):
        export(ck, tmp_path / "x", "gguf")
    cfg = json.loads((ck / "slim_config.json").read_text())
    name = next(iter(cfg["layers"]))
    cfg["layers"][name]["group_size"] = 48  # 64 inputs: a short last group
    (ck / "slim_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=f"{name}.*short last group.*merged"):
        export(ck, tmp_path / "x", "compressed-tensors")
    assert not (tmp_path / "x").exists()


def test_cli_export_and_model_cards(tmp_path, capsys):
    ck, _ = _checkpoint("llama", tmp_path)
    assert "slim.load(" in (ck / "README.md").read_text()  # every checkpoint has a card
    out = tmp_path / "p"
    assert main(["export", str(ck), "--format", "peft", "--out", str(out), "--pad-rank", "vllm"]) == 0
    assert "wrote" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in card and "max_lora_rank=8" in card and "(peft)" in card.splitlines()[0]
    assert main(["export", str(ck), "--format", "peft", "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.gpu
def test_vllm_serves_the_peft_export(tmp_path):
    """vLLM (W4A16 base + LoRA) greedy tokens against slim's. Unmeasured: no GPU was lent when it was written."""
    vllm = pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ck, ids = _checkpoint("llama", tmp_path)
    out = tmp_path / "peft"
    export(ck, out, "peft", dtype="fp16", pad_rank="vllm")
    rank = json.loads((out / "adapter" / "adapter_config.json").read_text())
    llm = vllm.LLM(str(out / "base"), enable_lora=True, dtype="float16",
                   max_lora_rank=max([rank["r"], *rank["rank_pattern"].values()]), enforce_eager=True)
    prompt = ids[0, :16].tolist()
    params = vllm.SamplingParams(max_tokens=8, temperature=0.0)
    got = llm.generate([{"prompt_token_ids": prompt}], params,
                       lora_request=LoRARequest("slim", 1, str(out / "adapter")))
    ref = _reference(ck).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, 16:].tolist()
    assert list(got[0].outputs[0].token_ids) == ref
