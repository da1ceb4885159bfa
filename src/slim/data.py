"""Calibration and evaluation data: one place that knows where data lives and how it is cut.

May import: leaves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_VAR = "SLIM_DATA_DIR"
C4_FILE = "c4/c4-train.00000-of-01024.head1000.jsonl"
WIKITEXT_FILE = "wikitext-2-raw-v1/test.jsonl"


class DataError(FileNotFoundError):
    """A data file or directory is missing or empty."""


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: `override`, else $SLIM_DATA_DIR, else a `shared/data` beside the working tree."""
    if override:
        p = Path(override)
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist")
        return p
    if os.environ.get(ENV_VAR):
        p = Path(os.environ[ENV_VAR])
        if not p.is_dir():
            raise DataError(f"${ENV_VAR}={p} does not exist")
        return p
    here = Path(__file__).resolve()
    for c in (Path.cwd() / "../shared/data", Path.cwd() / "shared/data", *(q / "shared/data" for q in here.parents)):
        if c.is_dir():
            return c.resolve()
    raise DataError(f"no data directory found: pass --data-dir or set ${ENV_VAR} to a folder holding {C4_FILE}")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    out.append(json.loads(line)[field])
                except (json.JSONDecodeError, KeyError):
                    raise DataError(f"{path}:{i + 1}: expected JSON lines with a {field!r} field") from None
    return out


# a hub dataset is streamed until it has given this many characters per calibration token wanted (about 4
# characters a token in English, times 4: the windows are drawn from a pool several times their size, as they
# are from the bundled 1000-document C4 sample)
HUB_CHARS_PER_TOKEN = 16


def read_texts(spec: str, data_root: str | os.PathLike | None = None,
               tokens_needed: int | None = None) -> tuple[list[str], dict]:
    """Texts for calibration: 'c4' (the bundled sample), a .jsonl/.txt file, a folder of them, or a hub id.

    A hub dataset is streamed and read only as far as the calibration windows need (`tokens_needed`, e.g.
    n_samples x seqlen), never downloaded whole. Returns (texts, provenance) where provenance records files and
    their sha256, or the hub id and how much of it was read.
    """
    if spec == "c4":
        path = data_dir(data_root) / C4_FILE
        if not path.is_file():
            raise DataError(f"calibration file {path} is missing")
        files = [path]
    else:
        p = Path(spec)
        if p.is_dir():
            files = sorted([*p.glob("*.jsonl"), *p.glob("*.txt")])
            if not files:
                raise DataError(f"calibration folder {p} holds no .jsonl or .txt files")
        elif p.is_file():
            files = [p]
        elif spec.startswith((".", "/")) or p.suffix in (".jsonl", ".txt", ".json"):
            raise DataError(f"calibration data {spec} does not exist")
        else:
            texts, docs = _hub_texts(spec, (tokens_needed or DEFAULT_HUB_TOKENS) * HUB_CHARS_PER_TOKEN)
            return texts, {"hub_dataset": spec, "split": "train", "streamed_documents": docs}
    texts: list[str] = []
    for f in files:
        try:
            texts += _read_jsonl_texts(f) if f.suffix in (".jsonl", ".json") else [f.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. with "
                            f"`iconv -f latin1 -t utf-8`") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration data {spec} is empty")
    return texts, {"files": {str(f): sha256(f) for f in files}}


DEFAULT_HUB_TOKENS = 128 * 2048  # the paper's calibration budget, when the caller does not say


def _hub_texts(name: str, max_chars: int) -> tuple[list[str], int]:
    """The first documents of a hub dataset's train split, streamed until they hold `max_chars` characters
    (a C4-sized dataset is hundreds of GB: only what the windows need is read). Returns (texts, documents read)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            f"{name!r} is neither a local file nor folder; hub datasets need `pip install datasets`"
        ) from None
    texts: list[str] = []
    chars = docs = 0
    for row in load_dataset(name, split="train", streaming=True):
        docs += 1
        text = row.get("text") if isinstance(row, dict) else None
        if text is None:
            raise DataError(f"hub dataset {name!r} has no 'text' field (fields: {sorted(row)})")
        if text.strip():
            texts.append(text)
            chars += len(text)
        if chars >= max_chars:
            break
    if not texts:
        raise DataError(f"hub dataset {name!r} gave no text")
    log.info("calibration: read %d documents (%d characters) of %s, streamed", docs, chars, name)
    return texts, docs


def _calibration_windows(tokenizer, texts: list[str], n_samples: int, seqlen: int,
                         seed: int) -> tuple[torch.Tensor, list[int]]:
    """The joined token stream and the start of each calibration window in it."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, too few for one window of seqlen={seqlen}; give "
                        "more text (--calib-data) or shorter windows (--calib-seqlen)")
    g = torch.Generator().manual_seed(seed)
    return ids, torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g).tolist()


def calibration_ids(tokenizer, texts: list[str], n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """n random windows of `seqlen` tokens from the documents joined by blank lines (one seed).

    Joining makes windows longer than most C4 documents possible without repeating the few long ones.
    """
    ids, starts = _calibration_windows(tokenizer, texts, n_samples, seqlen, seed)
    return torch.stack([ids[s : s + seqlen] for s in starts])


def heldout_ids(tokenizer, texts: list[str], n_samples: int, seqlen: int, seed: int, windows: int,
                length: int = 2048) -> torch.Tensor:
    """Up to `windows` windows of `length` tokens of the same calibration text that no calibration window (of
    `calibration_ids` with these arguments) touches, first ones first: held-out text of the calibration's own
    distribution, to tell fitting the calibration text from fitting the language (the tokens are one stream)."""
    ids, starts = _calibration_windows(tokenizer, texts, n_samples, seqlen, seed)
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in starts:
        used[s : s + seqlen] = True
    free = [a for a in range(0, ids.numel() - length + 1, length) if not bool(used[a : a + length].any())]
    if not free:
        raise DataError(f"the calibration text has no {length}-token window that calibration does not touch")
    return torch.stack([ids[a : a + length] for a in free[:windows]])


def wikitext2_rows(data_root: str | os.PathLike | None = None) -> tuple[list[str], dict]:
    """WikiText-2 raw test rows (HF layout); falls back to the hub through `datasets` when no local copy."""
    try:
        path = data_dir(data_root) / WIKITEXT_FILE
    except DataError:
        if data_root:
            raise
        path = None
    if path is not None and path.is_file():
        return _read_jsonl_texts(path), {"file": str(path), "sha256": sha256(path)}
    if path is not None and data_root:
        raise DataError(f"evaluation file {path} is missing")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            f"WikiText-2 test not found locally ({WIKITEXT_FILE} under --data-dir / ${ENV_VAR}) "
            "and `datasets` is not installed to fetch it"
        ) from None
    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]), {"hub": "wikitext-2-raw-v1"}


def wikitext2_ids(tokenizer, data_root: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict]:
    """The whole test set as one token stream: rows joined by "\\n\\n", tokenized once."""
    rows, prov = wikitext2_rows(data_root)
    if not any(r.strip() for r in rows):
        raise DataError("WikiText-2 test data is empty")
    return tokenizer("\n\n".join(rows), return_tensors="pt").input_ids, prov
