"""The checkpoint loader under hostile input (hypothesis): whatever slim_config.json or the safetensors header
holds, only slim's own errors escape, nothing is executed and nothing huge is allocated."""

import json
import shutil

import pytest
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slim
from slim.checkpoint import CheckpointError
from slim.config import CompressConfig
from slim.runtime import BackendError

ALLOWED = (CheckpointError, BackendError)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model("llama", layers=1)
    ids = __import__("torch").randint(0, 256, (2, 32))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 2, "seqlen": 32}})
    from slim.pipeline import compress_model

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
