"""Bad input gets a clear error before any long work (the catalog in docs/bad-input.md points here)."""

import json

import pytest
import torch
from conftest import tiny_model

import slim
from slim.cli.commands import main
from slim.config import CompressConfig, ConfigError
from slim.data import DataError, calibration_ids, read_texts
from slim.format.checkpoint import CheckpointError
from slim.pipeline.loop import compress_model

FAST = ["--calib-samples", "4", "--calib-seqlen", "64", "-q"]


def test_rank_larger_than_the_layer(tiny_llama_dir, shared_data, tmp_path, capsys):
    # the tiny Llama's k_proj is 32 x 64: rank 5000 cannot fit, and nothing is compressed
    assert main(["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), "--rank", "5000", *FAST,
                 "--data-dir", str(shared_data)]) == 2
    err = capsys.readouterr().err
    assert "adapter rank 5000 is larger than min(d_out, d_in) = 32" in err and "k_proj" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_budget_below_one_block_is_refused_before_work(tiny_llama_dir, shared_data, tmp_path, capsys):
    """--max-memory below the parts outside the blocks + one block (+ the Gram matrices' float64 copies for the
    recipes that use them) is refused before anything is computed, with the figure to give."""
    from slim.pipeline.stream import check_budget

    args = ["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *FAST, "--data-dir", str(shared_data)]
    assert main([*args, "--max-memory", "10K"]) == 2
    err = capsys.readouterr().err
    assert "below what one block needs" in err and "Gram matrices" in err and "give at least" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    model = tiny_model("llama", layers=1)  # the boundary: embeddings + head + one block (as stored and in fp32)
    outside = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".layers." not in k)
    block = sum(t.numel() * (t.element_size() + 4) for t in model.model.layers[0].state_dict().values())
    gram = 7 * 8 * max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)) ** 2
    check_budget(model, outside + block, needs_gram=False)
    with pytest.raises(CheckpointError, match="below what one block needs"):
        check_budget(model, outside + block - 1, needs_gram=False)
    with pytest.raises(CheckpointError, match="Gram"):
        check_budget(model, outside + block + gram - 1, needs_gram=True)
    check_budget(model, outside + block + gram, needs_gram=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(bad):
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = bad
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj\.weight holds 1 NaN or Inf"):
        compress_model(model, torch.randint(0, 256, (2, 16)), CompressConfig(), progress=False)


def test_nan_in_a_streamed_block(sharded_tiny, shared_data, tmp_path, capsys):
    """A damaged block read from disk is named when it is read."""
    from safetensors.torch import load_file, save_file

    d = sharded_tiny
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    assert main(["compress", str(d), "--out", str(tmp_path / "o"), *FAST, "--data-dir", str(shared_data)]) == 2
    assert "model.layers.1.self_attn.o_proj.weight holds 1 NaN or Inf" in capsys.readouterr().err


@pytest.fixture
def sharded_tiny(tiny_llama_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    return d


def test_calibration_text_too_short(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    with pytest.raises(DataError, match="too few for one window of seqlen=512.*--calib-seqlen"):
        calibration_ids(tok, ["a short text"], 4, 512, 0)


def test_non_utf8_calibration_data(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_texts(str(tmp_path / "latin1.txt"))
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_texts(str(tmp_path / "d.jsonl"))


def test_tokenizer_without_eos(tiny_llama_dir, shared_data, tmp_path):
    """slim needs no EOS token: calibration joins documents with blank lines, generation stops at its budget."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.eos_token = None
    assert tok.eos_token_id is None
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 2, "seqlen": 32}})
    model, tok, _ = slim.compress(tiny_model("llama", vocab=len(tok), layers=1), cfg, tok, data_dir=shared_data,
                                  progress=False)
    from slim.runtime.generate import generate

    out = generate(model, tok, tok("Hello", return_tensors="pt").input_ids, max_new_tokens=4)
    assert out["new_tokens"] == 4


def test_dead_input_channels_singular_gram():
    """Input channels that are always zero make the Gram matrix singular: damping keeps every solve finite."""
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:16] = 0  # q/k/v never see these 16 channels
        model.model.layers[0].post_attention_layernorm.weight[5] = 0
    rep = compress_model(model, torch.randint(0, 256, (2, 32)), CompressConfig(), progress=False)
    for name, info in rep["layers"].items():
        assert all(v == v and abs(v) != float("inf") for v in info.values() if isinstance(v, float)), name
    for mod in model.modules():
        if isinstance(mod, slim.SlimLinear):
            assert torch.isfinite(mod.effective_weight()).all()


def test_newer_format_and_foreign_config(tmp_path, capsys):
    d = tmp_path / "ck"
    model = tiny_model("llama", layers=1)
    compress_model(model, torch.randint(0, 256, (2, 16)), CompressConfig(), progress=False)
    slim.save(model, d)
    cfg = json.loads((d / "slim_config.json").read_text())
    cfg["format_version"] = 99
    (d / "slim_config.json").write_text(json.dumps(cfg))
    assert main(["info", str(d)]) == 2
    assert "format version 99 is not readable" in capsys.readouterr().err


def _rewrite_header(f, change) -> None:
    """Apply `change` to a safetensors file's JSON header, keeping the data bytes."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    change(head)
    body = json.dumps(head).encode()
    body += b" " * (-len(body) % 8)
    f.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


@pytest.mark.parametrize("change,msg", [
    (lambda h: h.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda h: h.__setitem__("model.extra", dict(h["model.norm.weight"])), r"unexpected \['model.extra'\]"),
    (lambda h: h.pop("model.layers.0.mlp.up_proj.lora_A"), "does not match its config for model.layers.0.mlp.up_proj"),
    (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [0, 10**9]), "outside the file"),
    (lambda h: h["model.norm.weight"].__setitem__("shape", [3]), "has shape"),
])
def test_missing_extra_and_tampered_tensors(tmp_path, change, msg):
    from slim.format.checkpoint import CheckpointError

    model = tiny_model("llama", layers=1)
    compress_model(model, torch.randint(0, 256, (2, 16)), CompressConfig(), progress=False)
    slim.save(model, tmp_path / "ck")
    _rewrite_header(tmp_path / "ck" / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=msg):
        slim.load(tmp_path / "ck", backend="reference")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("cmd", ["finetune", "eval", "compress"])
def test_cuda_without_a_gpu_or_a_bad_device_is_refused_before_loading(cmd, tmp_path, capsys):
    """--device cuda on a machine without CUDA, or a device slim does not run on, fails at once with the fix."""
    from slim.config import check_device

    src = tmp_path / "missing-model"  # never read: the device is checked first
    args = {"finetune": ["finetune", str(src), "--out", str(tmp_path / "o")], "eval": ["eval", str(src)],
            "compress": ["compress", str(src), "--out", str(tmp_path / "o")]}[cmd]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    with pytest.raises(ConfigError, match="use 'cpu' or 'cuda'"):
        check_device("gpu")
    assert check_device("cuda:1", need=False) == "cuda:1"
