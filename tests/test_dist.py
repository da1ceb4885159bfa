"""Several processes under torchrun (gloo on CPU): the same checkpoint as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slim
from slim.format.checkpoint import read_slim_config
from slim.pipeline.dist import Ranks
from slim.pipeline.loop import _share

ARGS = ["--calib-samples", "8", "--calib-seqlen", "64", "--set", "calib.batch_size=2", "-q"]


def _env() -> dict[str, str]:
    # one thread per process in both runs: float sums must not depend on how BLAS splits a product
    return {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("recipe", [
    pytest.param([], id="default"),
    # the same two-process machinery on other paths (4 more processes each): in the slow suite
    pytest.param(["--preset", "paper", "--set", "true_sequential=true"], id="paper-seq", marks=pytest.mark.slow),
    pytest.param(["--set", "tune.steps=6", "--set", "tune.batch_size=1"], id="block-tune", marks=pytest.mark.slow),
])
def test_two_processes_give_the_one_process_checkpoint(tiny_llama_dir, shared_data, tmp_path, recipe):
    """`torchrun --nproc-per-node 2 -m slim compress` (batches split, statistics all-reduced, linears solved on
    both ranks and broadcast; block tuning's steps on the rank holding their batch, gradients all-reduced) writes
    the same bytes as one process."""
    args = ["compress", str(tiny_llama_dir), *ARGS, *recipe, "--data-dir", str(shared_data)]
    _run([sys.executable, "-m", "slim", *args, "--out", str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "slim", *args, "--out", str(tmp_path / "two")])
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    c1, c2 = read_slim_config(one), read_slim_config(two)
    assert c2["processes"] == 2 and c1["processes"] == 1
    assert c2["report"]["layers"].keys() == c1["report"]["layers"].keys()
    assert not list(tmp_path.glob(".*partial"))


def test_work_is_dealt_out_deterministically():
    r = Ranks(1, 3)
    assert r.batches(7) == [1, 4]
    own = Ranks(0, 2).owners([4, 1, 4, 1, 6, 6, 10])  # a Llama block: q k v o gate up down, in weight counts
    assert own == Ranks(1, 2).owners([4, 1, 4, 1, 6, 6, 10])  # every rank agrees
    loads = [sum(c for c, o in zip([4, 1, 4, 1, 6, 6, 10], own, strict=True) if o == k) for k in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 2  # 16 / 16
    ids = torch.arange(10)[:, None].repeat(1, 3)  # 10 windows, batches of 4: [0-3] [4-7] [8-9]
    assert _share(ids, 4, Ranks(0, 2))[:, 0].tolist() == [0, 1, 2, 3, 8, 9]  # the short batch stays last
    assert _share(ids, 4, Ranks(1, 2))[:, 0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="4 processes but only 3 calibration batches"):
        _share(ids, 4, Ranks(0, 4))
