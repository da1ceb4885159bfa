"""Streamed compression (one block in memory), committed blocks, resume after SIGKILL, content hashes."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import slim
from slim.cli.commands import main
from slim.config import CompressConfig
from slim.format.checkpoint import CheckpointError, file_sha256, read_slim_config, verify
from slim.pipeline.stream import SourceWeights, skeleton

FAST = ["--calib-samples", "4", "--calib-seqlen", "64", "--set", "calib.batch_size=2", "-q"]


def _sharded(tok_dir, d: Path, tied: bool) -> Path:
    """A tiny Llama (3 blocks) written as several safetensors shards with an index."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    m = tiny_model("llama", vocab=len(tok), layers=3)
    m.config.tie_word_embeddings = tied
    if tied:
        m.tie_weights()
    m.save_pretrained(d, max_shard_size="100KB")
    tok.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 2
    return d


@pytest.fixture(scope="module")
def sharded_llama(smollm2_tokenizer_dir, tmp_path_factory):
    return _sharded(smollm2_tokenizer_dir, tmp_path_factory.mktemp("sharded"), tied=False)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def sharded_any(smollm2_tokenizer_dir, tmp_path_factory, request):
    return _sharded(smollm2_tokenizer_dir, tmp_path_factory.mktemp("sharded"), tied=request.param)


def _weights(ck: Path) -> bytes:
    return (ck / "model.safetensors").read_bytes()


def test_skeleton_reads_only_the_dense_parts(sharded_any):
    weights = SourceWeights(sharded_any)
    model = skeleton(sharded_any, weights)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.lm_head.weight.device.type == "cpu"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # a computed buffer, not read


def test_capture_on_another_device_leaves_meta_blocks_alone(sharded_any):
    """Capturing block 0's inputs on a device other than "cpu" moves only the parts outside the blocks that hold
    data: a streamed skeleton's meta blocks made `model.to(device)` fail on CUDA (seen on an H200). "cpu:0" takes
    the same path on a machine without a GPU; the captured inputs equal those of the plain CPU path."""
    from slim.pipeline.capture import capture_block_inputs

    model = skeleton(sharded_any, SourceWeights(sharded_any))
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = capture_block_inputs(model, ids, 2)
    hidden, kwargs = capture_block_inputs(model, ids, 2, device="cpu:0")
    assert all(torch.equal(a, b) for a, b in zip(ref, hidden, strict=True)) and len(kwargs) == 2
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"  # untouched, and the catcher removed
    assert type(model.model.layers[0]).__name__ != "_Catcher"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == model.config.tie_word_embeddings


def test_streamed_equals_in_memory_and_the_api(sharded_any, shared_data, tmp_path):
    """Reading one block at a time changes nothing: the same bytes as loading the whole model, and as
    slim.compress + slim.save."""
    common = [*FAST, "--data-dir", str(shared_data)]
    assert main(["compress", str(sharded_any), "--out", str(tmp_path / "s"), "--load", "stream", *common]) == 0
    assert main(["compress", str(sharded_any), "--out", str(tmp_path / "m"), "--load", "memory", *common]) == 0
    assert _weights(tmp_path / "s") == _weights(tmp_path / "m")
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 4, "seqlen": 64, "batch_size": 2}})
    model, tok, meta = slim.compress(str(sharded_any), cfg, data_dir=shared_data, progress=False)
    slim.save(model, tmp_path / "api", tok, meta)
    assert _weights(tmp_path / "api") == _weights(tmp_path / "s")
    # the content hash is recorded and checked
    sha = read_slim_config(tmp_path / "s")["content_sha256"]
    assert sha == file_sha256(tmp_path / "s" / "model.safetensors") == verify(tmp_path / "s")
    assert not list(tmp_path.glob(".*partial"))  # nothing left behind
    loaded = slim.load(tmp_path / "s", backend="reference")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == loaded.config.tie_word_embeddings


def test_verify_catches_a_changed_byte(tiny_llama_dir, shared_data, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["compress", str(tiny_llama_dir), "--out", str(ck), *FAST, "--data-dir", str(shared_data)]) == 0
    assert main(["info", str(ck), "--verify"]) == 0
    assert "content hash OK" in capsys.readouterr().out
    f = ck / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 1
    f.write_bytes(bytes(raw))
    assert main(["info", str(ck), "--verify"]) == 2
    assert "does not match its recorded content hash" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="modified or damaged"):
        verify(ck)


KILLS = ["capture@2", "block@3", "commit@2", "block@12", "commit@3", "save", "rename"]


def test_resume_after_a_fault_at_each_point_is_bit_identical(sharded_llama, shared_data, tmp_path, monkeypatch):
    """In process, the SIGKILL matrix's seven points (below, slow): the run stops at each (`Killed` raised where the
    kill would land), `--resume` continues it, and the finished checkpoint is byte-identical to an uninterrupted
    run's. The subprocess matrix adds what only a real kill shows (no `finally`, no flushed buffers)."""
    from slim.testing import faults

    args = ["compress", str(sharded_llama), *FAST, "--data-dir", str(shared_data)]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out, partial = tmp_path / "resumed", tmp_path / ".resumed.partial"
    for i, point in enumerate(KILLS):
        monkeypatch.setenv("SLIM_FAULT", f"{point}:raise")
        faults.reset()
        with pytest.raises(faults.Killed):
            main([*args, "--out", str(out)] + (["--resume"] if i else []))
        assert not out.exists() and partial.is_dir(), point
    monkeypatch.delenv("SLIM_FAULT")
    assert main([*args, "--out", str(out)]) == 2  # a partial run is never overwritten silently
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert _weights(out) == _weights(tmp_path / "clean")
    assert read_slim_config(out)["content_sha256"] == read_slim_config(tmp_path / "clean")["content_sha256"]
    assert not partial.exists()


@pytest.mark.slow  # seven real kills of seven processes (~1 min); the in-process test above covers the default suite
def test_resume_after_sigkill_is_bit_identical(sharded_llama, shared_data, tmp_path):
    """A real SIGKILL at seven points of one run (during calibration capture, inside a block, between and inside the
    writes that commit a block, inside the checkpoint's tensor file, before the final rename), each followed by
    `--resume`: the finished checkpoint is byte-identical to an uninterrupted run's."""
    args = ["compress", str(sharded_llama), *FAST, "--data-dir", str(shared_data)]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    out = tmp_path / "resumed"
    partial = tmp_path / ".resumed.partial"
    env = {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1])}
    # 3 blocks of 7 linears; commit faults count 3 per block (block file, between, hidden states)
    for i, point in enumerate(KILLS):
        cmd = [sys.executable, "-m", "slim", *args, "--out", str(out)] + (["--resume"] if i else [])
        r = subprocess.run(cmd, env={**env, "SLIM_FAULT": point}, capture_output=True, text=True, timeout=300)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])
        assert not out.exists() and partial.is_dir(), point
        if point == "commit@3":  # killed writing block 1's hidden states: its file is there, its record not
            state = json.loads((partial / "progress.json").read_text())
            assert state["done"] == 0 and (partial / "block-00001.safetensors").is_file()
    # a partial run is never overwritten silently
    r = subprocess.run([sys.executable, "-m", "slim", *args, "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run([sys.executable, "-m", "slim", *args, "--out", str(out), "--resume"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "over every piece of the resumed run" in r.stdout
    rep = read_slim_config(out)["report"]  # the wall time of every piece, not only the last one's
    assert rep["resumed_at_block"] >= 1 and rep["compress_seconds_all_pieces"] > rep["compress_seconds"]
    assert _weights(out) == _weights(tmp_path / "clean")
    assert read_slim_config(out)["content_sha256"] == read_slim_config(tmp_path / "clean")["content_sha256"]
    assert not partial.exists()


def test_resume_refuses_another_run(tiny_llama_dir, shared_data, tmp_path, capsys):
    """The partial output of one recipe is not continued with another."""
    out = tmp_path / "o"
    partial = tmp_path / ".o.partial"
    args = ["compress", str(tiny_llama_dir), "--out", str(out), *FAST, "--data-dir", str(shared_data)]
    env = {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1]), "SLIM_FAULT": "block@10"}
    r = subprocess.run([sys.executable, "-m", "slim", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9 and (partial / "progress.json").is_file()
    assert main([*args, "--resume", "--rank", "0.2"]) == 2
    assert "different run" in capsys.readouterr().err
    with open(partial / ".lock") as held:  # a live run holds its lock: --overwrite must not delete its files
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main([*args, "--overwrite"]) == 2
        assert "another slim process" in capsys.readouterr().err
    good = (partial / "progress.json").read_text()
    (partial / "progress.json").write_text("{not json")
    assert main([*args, "--resume"]) == 2
    assert "damaged" in capsys.readouterr().err
    (partial / "progress.json").write_text(good)
    assert main([*args, "--resume"]) == 0


def test_disk_full_is_a_clear_error_and_nothing_loads(tiny_llama_dir, shared_data, tmp_path, capsys, monkeypatch):
    """ENOSPC while committing a block: a message that says what to do; no checkpoint appears, and --resume
    finishes the run once there is space again."""
    import errno

    import slim.format.checkpoint as ck

    real = ck.write_safetensors
    calls = {"n": 0}

    def full(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # block 1's tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr("slim.pipeline.stream.write_safetensors", full)
    args = ["compress", str(tiny_llama_dir), "--out", str(tmp_path / "o"), *FAST, "--data-dir", str(shared_data)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "--resume" in err
    assert not (tmp_path / "o").exists()
    assert json.loads((tmp_path / ".o.partial" / "progress.json").read_text())["done"] == 0
    monkeypatch.setattr("slim.pipeline.stream.write_safetensors", real)
    assert main([*args, "--resume"]) == 0
    slim.load(tmp_path / "o", backend="reference")


def test_spilled_activations_change_nothing(tmp_path):
    """Activations kept in files (a tiny memory budget) give exactly the layers they give in memory."""
    from slim.pipeline.loop import compress_model

    ids = torch.randint(0, 256, (4, 32))
    cfg = CompressConfig.from_dict({"calib": {"n_samples": 4, "seqlen": 32, "batch_size": 2}})
    a, b = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    compress_model(a, ids, cfg, progress=False)
    compress_model(b, ids, cfg, progress=False, max_memory=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_larger_than_its_budget(smollm2_tokenizer_dir, shared_data, tmp_path):
    """An 80-block random Llama (~630 MB of fp32 weights) compressed from disk under --max-memory 400M: the process's
    own memory (peak resident set minus the same interpreter with torch, transformers and slim imported and the
    tokenizer loaded) stays within the budget."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    src = tmp_path / "big"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=2048, num_hidden_layers=80,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="50MB")
    tok.save_pretrained(src)
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    budget = 400 * 2**20
    assert model_bytes > budget * 1.5
    env = {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1])}

    def peak(code: str, *argv: str) -> int:
        """The child's own peak resident set (VmHWM: its address space's high-water mark since exec; a fork's
        rusage would start from this test process's size)."""
        code += "\nprint('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)"
        r = subprocess.run([sys.executable, "-c", "import sys\n" + code, *argv], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stderr.rsplit("VmHWM", 1)[1].split()[0]) * 1024

    base = peak("import torch, transformers, slim.cli.commands, slim.pipeline.stream, slim.pipeline.loop\n"
                f"transformers.AutoTokenizer.from_pretrained({str(src)!r})")
    # 40 C4 documents: tokenizing the whole shipped sample at once alone peaks at ~450 MB (HF tokenizers' encodings)
    from slim.data import C4_FILE

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join((shared_data / C4_FILE).read_text().splitlines(keepends=True)[:40]))
    used = peak("from slim.cli.commands import main\nassert main(sys.argv[1:]) == 0", "compress", str(src), "--out",
                str(tmp_path / "o"), "--max-memory", "400M", "--calib-data", str(calib), "--calib-samples", "16",
                "--calib-seqlen", "128", "--preset", "paper", "-q") - base
    print(f"model {model_bytes / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB, used {used / 2**20:.0f} MiB")
    assert used < budget, used / 2**20
    assert len(read_slim_config(tmp_path / "o")["layers"]) == 80 * 7
