"""`generate(compile=True)`: a static KV cache and a torch.compile'd decode step must give the eager loop's tokens.

Most cases compile with the "eager" / "aot_eager" backends (seconds: dynamo's tracing and guards, the same graph
and recompile behaviour as inductor's); the CLI case runs the default inductor path once, end to end.
"""

import json

import pytest
import torch
from conftest import tiny_model
from torch import nn
from torch._dynamo.utils import counters

from slim.cli.commands import build_parser, main
from slim.models import set_submodule
from slim.runtime import apply_backend
from slim.runtime.generate import StaticCacheError, generate
from slim.testing.random_layers import random_slim_linear


def _ids(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _compress(model: nn.Module, backend: str, rank: int) -> nn.Module:
    """Every linear inside the blocks replaced by a random 2:4 int4 SlimLinear, then run through `backend`."""
    lins = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    for i, (name, lin) in enumerate(lins):
        set_submodule(model.model.layers, name, random_slim_linear(lin.out_features, lin.in_features, rank=rank,
                                                                   seed=i))
    apply_backend(model, backend)
    return model


def test_compiled_greedy_and_sampling_match_eager():
    model = tiny_model("llama")
    ids = _ids()
    eager = generate(model, None, ids, max_new_tokens=12)
    comp = generate(model, None, ids, max_new_tokens=12, compile=True, _compile_backend="eager")
    assert comp["tokens"] == eager["tokens"] and len(comp["tokens"]) == 12
    assert comp["text"] is None and eager["compile_seconds"] is None
    assert comp["compile_seconds"] > 0 and comp["decode_tokens_per_s"] > 0 and comp["prefill_tokens_per_s"] > 0
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    sampled = generate(model, None, ids, max_new_tokens=12, compile=True, _compile_backend="eager", **kw)
    assert sampled["tokens"] == generate(model, None, ids, max_new_tokens=12, **kw)["tokens"]
    assert sampled["compile_seconds"] == 0.0  # same model, same length: compiled and warmed already


def test_second_call_does_not_recompile():
    model = tiny_model("llama", layers=1)
    ids = _ids(seed=1)
    counters.clear()
    first = generate(model, None, ids, max_new_tokens=8, compile=True, _compile_backend="eager")
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph for every step
    with torch.compiler.set_stance("fail_on_recompile"):
        second = generate(model, None, ids, max_new_tokens=8, compile=True, _compile_backend="eager")
        other_prompt = generate(model, None, _ids(seed=2), max_new_tokens=8, compile=True, _compile_backend="eager")
    assert second["tokens"] == first["tokens"] and second["compile_seconds"] == 0.0
    assert other_prompt["compile_seconds"] == 0.0 and counters["stats"]["unique_graphs"] == 1
    other = generate(model, None, ids, max_new_tokens=5, compile=True, _compile_backend="eager")  # another length
    assert other["tokens"] == first["tokens"][:5] and other["compile_seconds"] > 0


def test_compiled_reference_backend_matches_eager():
    model = _compress(tiny_model("llama"), "reference", rank=8)
    ids = _ids(seed=4)
    eager = generate(model, None, ids, max_new_tokens=10)
    counters.clear()
    comp = generate(model, None, ids, max_new_tokens=10, compile=True, _compile_backend="aot_eager")
    assert comp["tokens"] == eager["tokens"]
    assert not counters["graph_break"]


def test_compiled_cpu_int4_backend_traces_whole():
    from slim.runtime import cpu_int4

    if cpu_int4.available("cpu") is not None:
        pytest.skip(f"cpu-int4: {cpu_int4.available('cpu')}")
    model = _compress(tiny_model("llama"), "cpu-int4", rank=32)  # widths 64 / 128: multiples of the kernel's 32
    assert model.slim_backend["counts"] == {"cpu-int4": 14}
    ids = _ids(seed=5)
    eager = generate(model, None, ids, max_new_tokens=10)
    counters.clear()
    comp = generate(model, None, ids, max_new_tokens=10, compile=True, _compile_backend="aot_eager")
    assert comp["tokens"] == eager["tokens"]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the kernels are traced ops


@pytest.mark.gpu
def test_compiled_cuda_graphs_match_eager():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model("llama").cuda()
    ids = _ids(seed=6)
    eager = generate(model, None, ids, max_new_tokens=16)
    comp = generate(model, None, ids, max_new_tokens=16, compile=True)  # inductor, mode="reduce-overhead"
    again = generate(model, None, ids, max_new_tokens=16, compile=True)
    assert comp["tokens"] == eager["tokens"] == again["tokens"]
    assert comp["compile_seconds"] > 0 and again["compile_seconds"] == 0.0


def test_model_without_static_cache_is_refused():
    class NoConfig(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, ids: torch.Tensor, past_key_values=None, use_cache: bool = False):  # noqa: ANN001
            raise AssertionError("not reached")

    with pytest.raises(StaticCacheError, match="no transformers config"):
        generate(NoConfig(), None, _ids(), max_new_tokens=4, compile=True, _compile_backend="eager")


def test_cli_generate_compile(tiny_llama_dir, tmp_path, capsys):
    assert build_parser().parse_args(["generate", "m", "p", "--compile"]).compile
    assert not build_parser().parse_args(["generate", "m", "p"]).compile
    out = tmp_path / "res.json"
    # the one inductor case: the default compile path, end to end
    assert main(["generate", str(tiny_llama_dir), "Hello there", "--max-new-tokens", "4", "--compile",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["compile"] and res["compile_seconds"] > 0 and res["new_tokens"] >= 1
    assert "compile " in capsys.readouterr().err
    assert main(["generate", str(tiny_llama_dir), "Hello there", "--max-new-tokens", "4", "--out",
                 str(tmp_path / "eager.json")]) == 0
    eager = json.loads((tmp_path / "eager.json").read_text())
    assert eager["tokens"] == res["tokens"] and eager["compile_seconds"] is None
