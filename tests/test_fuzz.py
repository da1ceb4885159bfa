"""The checkpoint loader under hostile input (hypothesis): whatever slim_config.json or the safetensors header
holds, only slim's own errors escape, nothing is executed and nothing huge is allocated."""

import dataclasses
import json
import shutil

import pytest
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slim
from slim.config import CompressConfig
from slim.format.checkpoint import CheckpointError
from slim.format.packed import Layout, SlimLinear
from slim.runtime import BackendError

ALLOWED = (CheckpointError, BackendError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model("llama", layers=1)
    ids = __import__("torch").randint(0, 256, (2, 32))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 2, "seqlen": 32}})
    from slim.pipeline.loop import compress_model

    compress_model(model, ids, cfg, progress=False)
    d = tmp_path_factory.mktemp("fuzz") / "ck"
    slim.save(model, d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "ck"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _load(path) -> None:
    try:
        slim.load(path, backend="reference")
    except ALLOWED:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(path=st.lists(st.sampled_from(["layers", "model.layers.0.mlp.up_proj", "d_in", "d_out", "rank", "bits",
                                      "keep", "sparsity", "m", "n", "group_size", "adapter_group", "format_version",
                                      "dtype", "format"]), min_size=1, max_size=3),
       value=json_values)
def test_fuzzed_slim_config(checkpoint, tmp_path_factory, path, value):
    d = _copy(checkpoint, tmp_path_factory.mktemp("c"))
    cfg = json.loads((d / "slim_config.json").read_text())
    node = cfg
    for key in path[:-1]:
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            break
        node = nxt
    if isinstance(node, dict):
        node[path[-1]] = value
    (d / "slim_config.json").write_text(json.dumps(cfg))
    _load(d)


@FUZZ
@given(mutation=st.sampled_from(["shape", "dtype", "data_offsets", "drop", "extra", "raw"]), value=json_values,
       pos=st.integers(min_value=0, max_value=10**6), byte=st.integers(min_value=0, max_value=255))
def test_fuzzed_safetensors_header(checkpoint, tmp_path_factory, mutation, value, pos, byte):
    d = _copy(checkpoint, tmp_path_factory.mktemp("h"))
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    keys = sorted(k for k in head if k != "__metadata__")
    key = keys[pos % len(keys)]
    if mutation == "raw":  # any byte of the header replaced
        raw[8 + pos % n] = byte
    else:
        if mutation == "drop":
            del head[key]
        elif mutation == "extra":
            head[f"model.layers.0.{pos}"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        else:
            head[key][mutation] = value
        body = json.dumps(head).encode()
        body += b" " * (-len(body) % 8)
        raw = bytearray(len(body).to_bytes(8, "little")) + body + raw[8 + n :]
    f.write_bytes(bytes(raw))
    _load(d)


def test_a_huge_layout_is_refused_before_allocating(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path)
    cfg = json.loads((d / "slim_config.json").read_text())
    name = next(iter(cfg["layers"]))
    cfg["layers"][name]["d_out"] = 10**12
    (d / "slim_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=name):
        slim.load(d, backend="reference")


# --- layout fields: every field of every layer is reached; a mutated layout that loads must compute what it says ---

LAYOUT_FIELDS = [f.name for f in dataclasses.fields(Layout)]
IDS = __import__("torch").arange(48).reshape(2, 24) % 256


def _logits(model):
    import torch

    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def original_logits(checkpoint):
    return _logits(slim.load(checkpoint, backend="reference"))


def near(value):
    """Values a corrupted or hand-edited file plausibly holds: neighbours, halves and doubles, signs, other types."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), str(value).lower(), None])
    if isinstance(value, int):
        return st.sampled_from([value - 1, value + 1, 0, 1, 2 * value, value // 2, -value, 4, 8, 16, 32, 64, 128,
                                float(value), str(value), True])
    return st.sampled_from(["dense", "nm", "unstructured", "", value.upper(), None, 4])


def check_loaded(path, layers, original, original_logits):
    """A checkpoint that loads runs the layout its file claims: each layer's Layout is the file's, the output is
    finite, the reference and the cpu-int4 kernel agree on it, and an unchanged layout gives the original logits."""
    import torch

    try:
        ref = slim.load(path, backend="reference")
    except ALLOWED:
        return False
    for name, d in layers.items():
        layer = ref.get_submodule(name)
        assert isinstance(layer, SlimLinear) and layer.layout == Layout.from_dict(d), name
    out = _logits(ref)
    assert torch.isfinite(out).all()
    if all(Layout.from_dict(d) == Layout.from_dict(original[n]) for n, d in layers.items()):
        assert torch.equal(out, original_logits)
    try:
        fast = slim.load(path, backend="cpu-int4")
    except ALLOWED:  # a layout the kernel cannot take (it names why); the reference already ran it
        return True
    torch.testing.assert_close(_logits(fast), out, atol=0.05, rtol=0.05)
    return True


@FUZZ
@given(data=st.data())
def test_fuzzed_layout_field(checkpoint, original_logits, tmp_path_factory, data):
    d = _copy(checkpoint, tmp_path_factory.mktemp("l"))
    cfg = json.loads((d / "slim_config.json").read_text())
    original = json.loads(json.dumps(cfg["layers"]))
    name = data.draw(st.sampled_from(sorted(cfg["layers"])), label="layer")
    field = data.draw(st.sampled_from(LAYOUT_FIELDS), label="field")
    layout = cfg["layers"][name]
    old = layout.get(field, getattr(Layout(1, 1), field))
    value = data.draw(near(old) | json_values | st.just("<drop>"), label="value")
    if value == "<drop>":
        layout.pop(field, None)
    else:
        layout[field] = value
    (d / "slim_config.json").write_text(json.dumps(cfg))
    check_loaded(d, cfg["layers"], original, original_logits)


@pytest.mark.parametrize("field,value,same", [("fp8_inputs", True, False), ("adapter_group", 100, True),
                                              ("fp8_inputs", False, True)])
def test_a_mutated_layout_that_loads_computes_what_it_claims(checkpoint, original_logits, tmp_path, field, value,
                                                             same):
    """The fuzz test's loaded branch, reached on purpose: fp8 inputs switched on load and change the output the same
    way on both backends; an adapter group that yields the same group count loads and computes the same as before;
    a field rewritten with its own value (the unchanged-layout branch) gives the original logits."""
    import torch

    d = _copy(checkpoint, tmp_path)
    cfg = json.loads((d / "slim_config.json").read_text())
    original = json.loads(json.dumps(cfg["layers"]))
    name = "model.layers.0.mlp.up_proj"
    assert cfg["layers"][name][field] != value or same  # a mutation, or explicitly the same value
    cfg["layers"][name][field] = value
    (d / "slim_config.json").write_text(json.dumps(cfg))
    assert check_loaded(d, cfg["layers"], original, original_logits)
    out = _logits(slim.load(d, backend="reference"))
    assert torch.equal(out, original_logits) == same
