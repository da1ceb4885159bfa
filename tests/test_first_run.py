"""What a first run meets: a hub calibration set is streamed, not downloaded whole; the bundled sample's windows stay
exactly what they were; the one-time build of slim's CPU kernel says what it is doing and is its own phase."""

import hashlib
import logging
import sys
import types

import pytest
import torch

from slim import phases
from slim.data import HUB_CHARS_PER_TOKEN, calibration_ids, read_texts


class _Endless:
    """A stand-in for a streamed hub dataset: endless documents, counting how many were read."""

    def __init__(self) -> None:
        self.read = 0

    def __iter__(self):
        while True:
            self.read += 1
            yield {"text": f"document {self.read} " + "lorem ipsum " * 50, "url": "x"}


def test_hub_dataset_is_streamed_and_read_only_as_far_as_the_windows_need(monkeypatch):
    calls = []
    stream = _Endless()

    def load_dataset(name, split=None, streaming=False, **kw):
        calls.append((name, split, streaming))
        if not streaming:
            raise AssertionError("a hub dataset must be streamed, not downloaded whole")
        return stream

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    texts, prov = read_texts("someone/big-corpus", tokens_needed=4 * 64)
    assert calls == [("someone/big-corpus", "train", True)]
    chars = sum(len(t) for t in texts)
    assert 4 * 64 * HUB_CHARS_PER_TOKEN <= chars < 4 * 64 * HUB_CHARS_PER_TOKEN + 700  # stops at the budget
    assert stream.read == len(texts) == prov["streamed_documents"] and prov["hub_dataset"] == "someone/big-corpus"


def test_hub_dataset_without_text_is_a_clear_error(monkeypatch):
    from slim.data import DataError

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: iter([{"content": "no text field"}])))
    with pytest.raises(DataError, match="no 'text' field"):
        read_texts("someone/code-corpus", tokens_needed=10)


# sha256 of the int64 ids of the bundled C4 sample's calibration windows with the SmolLM2 tokenizer, seed 0, as
# slim has drawn them since the sample was bundled: the defaults' numbers depend on them
SHIPPED_WINDOWS = {
    (128, 512): "88e880d821cfea11053bc2be86d3541d884f4c21c92c8950d50ab6665edc3646",
    (8, 64): "dcc6bc61678acd6ad19ec53e72af948fe228347e8e0c9eb79a221ac88aaa8393",
}


def test_shipped_sample_calibration_windows_unchanged(smollm2_tokenizer_dir, shared_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    texts, prov = read_texts("c4", shared_data)
    assert list(prov) == ["files"]
    for (n, seqlen), want in SHIPPED_WINDOWS.items():
        ids = calibration_ids(tok, texts, n, seqlen, 0)
        assert hashlib.sha256(ids.numpy().tobytes()).hexdigest() == want, (n, seqlen)


def test_heldout_windows_never_touch_calibration(smollm2_tokenizer_dir, shared_data):
    """The C4 held-out windows (`--c4-heldout`) share no token position with the calibration windows."""
    from transformers import AutoTokenizer

    from slim.data import heldout_ids

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    texts, _ = read_texts("c4", shared_data)
    ids = tok("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - 512, (128,), generator=g).tolist()
    held = heldout_ids(tok, texts, 128, 512, 0, 32)
    assert held.shape == (32, 2048)
    for w in held:
        hits = [a for a in range(0, ids.numel() - 2047, 2048) if torch.equal(ids[a : a + 2048], w)]
        assert len(hits) == 1
        a = hits[0]
        assert all(s + 512 <= a or s >= a + 2048 for s in starts)


def test_kernel_build_is_announced_and_timed_as_its_own_phase(monkeypatch, tmp_path, caplog):
    import torch.utils.cpp_extension as cpp

    from slim.kernels import native

    if native.unavailable_reason() is not None:
        pytest.skip(native.unavailable_reason())
    built = []
    monkeypatch.setattr(native, "build_dir", lambda: tmp_path)  # nothing cached there: a first build
    monkeypatch.setattr(cpp, "load", lambda **kw: built.append(kw["name"]) or types.SimpleNamespace())
    phases.reset()
    with caplog.at_level(logging.INFO, logger="slim.kernels.native"):
        mod = native.load.__wrapped__()
    assert mod is not None and built == [native.NAME]
    first = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "building slim's CPU kernel" in first[0].getMessage() and str(tmp_path) in first[0].getMessage()
    phases.reset()  # a compression starting after the build still reports it, once
    assert "build-kernel" in phases.seconds() and "build-kernel" not in phases.seconds()
    (tmp_path / "x.so").write_bytes(b"")  # cached now: no warning the second time
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slim.kernels.native"):
        native.load.__wrapped__()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
