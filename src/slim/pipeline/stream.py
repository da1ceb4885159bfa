"""Compress block by block with every finished block committed to disk, read from disk when the source allows it,
and resume after a kill.

`slim compress` works inside `.OUT.partial/` beside its output. Each compressed block is written there as its own
safetensors file as soon as it is done, then the hidden states the next block needs, then `progress.json` naming
the last committed block; every file goes to a temporary name, is flushed and renamed, so a kill at any moment
leaves the last committed block intact. `--resume` continues after it. The checkpoint (format 1: one
`model.safetensors`) is then assembled from the block files in chunks inside `.OUT.partial/checkpoint/`, renamed
to OUT, and the partial directory removed.

A local model stored as safetensors (one file, or shards with `model.safetensors.index.json`) is not loaded: the
skeleton is built on the meta device (accelerate's `init_empty_weights`), the embeddings, final norm and head are
read, and each block's tensors are read only when that block is compressed and dropped once it is committed, so
resident memory holds one block and the calibration activations, whatever the depth.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..format.checkpoint import (
    _ST_DTYPES,
    CheckpointError,
    FileSlice,
    OutputExistsError,
    _read_into,
    cast_dense_parts,
    model_tensors,
    read_safetensors_header,
    release_free_memory,
    write_checkpoint,
    write_json,
    write_safetensors,
)
from ..format.packed import Layout, SlimLinear
from ..models import check_finite, get_layers, layers_prefix, set_submodule
from ..testing.faults import fault
from .dist import Ranks

if TYPE_CHECKING:
    from .capture import Activations

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
INDEX = "model.safetensors.index.json"


class ResumeError(CheckpointError):
    """An interrupted run cannot be continued (or would be lost); the message says what to do."""


# ------------------------------------------------------------------ reading a model one block at a time


class SourceWeights:
    """The tensors of a local HF model stored as safetensors (one file, or shards listed by an index), read one at a
    time straight into their destination."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = p = Path(path)
        index = p / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        elif (p / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{p} has neither model.safetensors nor {INDEX}")
        self.entries: dict[str, tuple[Path, dict[str, Any]]] = {}
        for name in files:
            f = p / name
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {name}, which is missing")
            try:
                head = read_safetensors_header(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {f}: {e}") from None
            for k, e in head.items():
                self.entries[k] = (f, e)

    def read(self, key: str, dest: torch.Tensor) -> None:
        f, e = self.entries[key]
        with open(f, "rb") as fh:
            _read_into(fh, {key: e}, key, dest, f)

    def first_float_dtype(self) -> torch.dtype | None:
        from ..format.checkpoint import _ST_DTYPES

        for _f, e in self.entries.values():
            dt = _ST_DTYPES[e["dtype"]]
            if dt.is_floating_point:
                return dt
        return None


def streamable(model_arg: str | None) -> bool:
    """A local HF directory whose weights are safetensors (not GGUF, not a hub id)."""
    if not model_arg:
        return False
    p = Path(model_arg)
    has_weights = (p / "model.safetensors").is_file() or (p / INDEX).is_file()
    return p.is_dir() and (p / "config.json").is_file() and has_weights


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def skeleton(path: str | os.PathLike, weights: SourceWeights) -> nn.Module:
    """The model with its blocks on the meta device and everything else (embeddings, final norm, head) read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import family_of

    config = AutoConfig.from_pretrained(path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or weights.first_float_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    family_of(model)
    prefix = layers_prefix(model) + "."
    sd = model.state_dict(keep_vars=True)
    unexpected = [k for k in weights.entries if k not in sd]
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {unexpected[:5]}; its keys do not follow "
                              "transformers' names, so load it in memory instead (--load memory)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, t in sd.items():
        if key.startswith(prefix) or key not in weights.entries:
            continue
        real = torch.empty(t.shape, dtype=t.dtype)
        weights.read(key, real)
        _set_tensor(model, key, real)
    if tied:
        model.tie_weights()
    # a block's tensors must all be on disk; outside the blocks, only what tying did not fill
    missing = [k for k, t in model.state_dict().items()
               if k not in weights.entries and (k.startswith(prefix) or t.device.type == "meta")]
    if missing:
        raise CheckpointError(f"{path}: tensors missing from its safetensors files: {missing[:5]}")
    block0 = get_layers(model)[0]
    if any(n in m._non_persistent_buffers_set for m in block0.modules() for n in m._buffers):
        raise CheckpointError(f"{path}: its blocks hold computed buffers that a block-by-block load cannot restore; "
                              "load it in memory instead (--load memory)")
    return model


def read_block(model: nn.Module, i: int, weights: SourceWeights) -> nn.Module:
    """Block i with its tensors read from disk (it was on the meta device)."""
    block = get_layers(model)[i]
    block.to_empty(device="cpu")
    base = f"{layers_prefix(model)}.{i}."
    for k, t in block.state_dict(keep_vars=True).items():
        weights.read(base + k, t.data)
    check_finite(block.named_parameters(), base)
    return block


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """Bytes from '12G', '12GiB', '800M', '800MB', '1073741824', or a fraction of this machine's RAM ('0.5')."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        v = float(t)
    except ValueError:
        raise ValueError(f"cannot read a size from {text!r}: write e.g. 12G, 800M or 0.5 (of RAM)") from None
    return int(v * total_ram()) if 0 < v <= 1 else int(v)


# float64 d_in x d_in matrices alive at once while one linear's Gram matrix is factorized (its sum, its mean, the
# damped copy and its Cholesky factors for error feedback, the adapters' factor): what the Gram-based recipes add
GRAM_COPIES = 7


def check_budget(model: nn.Module, max_memory: int, needs_gram: bool = False) -> None:
    """Refuse, before any work, a budget below what one block needs: everything outside the blocks (held
    throughout), the largest block as stored and in fp32 for the solver, and, for recipes that use the inputs'
    Gram matrix, that matrix's float64 copies at the widest linear input (an MLP's down projection)."""
    prefix = layers_prefix(model) + "."
    outside = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if not k.startswith(prefix))
    block = max(sum(t.numel() * (t.element_size() + 4) for t in b.state_dict().values()) for b in get_layers(model))
    d_in = max((m.in_features for m in get_layers(model)[0].modules() if isinstance(m, nn.Linear)), default=0)
    gram = GRAM_COPIES * 8 * d_in**2 if needs_gram else 0
    need = outside + block + gram
    if need > max_memory:
        parts = f"{outside / 2**20:.0f} MiB outside the blocks (embeddings, head) + {block / 2**20:.0f} MiB for the " \
                "largest block"
        if gram:
            parts += (f" + {gram / 2**20:.0f} MiB for the solver's float64 Gram matrices ({GRAM_COPIES} x {d_in} x "
                      f"{d_in}; --preset paper needs none)")
        raise CheckpointError(f"--max-memory {max_memory / 2**20:.0f} MiB is below what one block needs: {parts}; "
                              f"give at least {need / 2**20:.0f} MiB")


# ------------------------------------------------------------------ committing blocks, resuming


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_partial(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a killed run's committed blocks unless told: before any work."""
    d = partial_dir(Path(out))
    if d.exists() and not resume and not overwrite:
        raise ResumeError(f"an interrupted run left {d}: continue it with --resume (the same command otherwise), or "
                          "pass --overwrite to discard it")


class BlockRun:
    """One compression run's partial output: where `compress_model` gets each dense block (from disk when
    streaming) and commits each compressed one, and what `--resume` reads back."""

    def __init__(self, out: str | os.PathLike, fingerprint: dict[str, Any], dtype: torch.dtype,
                 weights: SourceWeights | None = None, resume: bool = False, overwrite: bool = False,
                 ranks: Ranks | None = None) -> None:
        self.ranks = ranks = ranks or Ranks()
        self.out = Path(out)
        self.dir = partial_dir(self.out)
        self.dtype, self.weights = dtype, weights
        if ranks.active:  # each rank's hidden states hold its share of the batches
            fingerprint = {**fingerprint, "world_size": ranks.world}
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        self.done = -1
        self.per_layer: dict[str, Any] = {}
        self.layouts: dict[str, dict[str, Any]] = {}
        self.threads = torch.get_num_threads()
        # wall time of the committed blocks over every piece of an interrupted run (this piece's clock starts now)
        self.started, self.prior_seconds = time.perf_counter(), 0.0
        progress = self.dir / PROGRESS
        if ranks.main:  # rank 0 owns the directory; the others only add their hidden-state files
            check_partial(self.out, resume, overwrite)
            if self.dir.exists() and not resume:
                _not_locked(self.dir / ".lock")  # --overwrite must not delete a live run's files
                shutil.rmtree(self.dir)
            with _writing(self.dir):
                self.dir.mkdir(parents=True, exist_ok=True)
                self._lock = open(self.dir / ".lock", "w")  # noqa: SIM115 - held for the run; dropped on any exit
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ResumeError(f"another slim process is writing {self.dir}") from None
        ranks.barrier()
        if resume and progress.is_file():
            try:
                state = json.loads(progress.read_text())
                if not isinstance(state, dict) or not isinstance(state.get("done"), int):
                    raise ValueError("no block count")
            except (ValueError, UnicodeDecodeError) as e:
                raise ResumeError(f"{progress} is damaged ({e}); pass --overwrite to start over") from None
            if state.get("fingerprint") != self.fingerprint:
                raise ResumeError(f"{self.dir} was written by a different run (model, recipe, data, dtype, number of "
                                  "processes or slim version differ): resume with the same command, or pass "
                                  "--overwrite to start over")
            if state.get("threads") != self.threads:
                log.warning("resuming with %d threads where the run began with %s: float sums may differ in the last "
                            "bits from an uninterrupted run", self.threads, state.get("threads"))
            self.done = int(state["done"])
            self.per_layer, self.layouts = state["per_layer"], state["layouts"]
            self.prior_seconds = float(state.get("seconds", 0.0))
            log.info("resuming %s after block %d", self.dir, self.done)
        elif resume:
            log.info("nothing to resume in %s; starting from the first block", self.dir)

    def _block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:05d}.safetensors"

    def _hidden_file(self, i: int) -> Path:
        rank = f".rank{self.ranks.rank}" if self.ranks.active else ""
        return self.dir / f"hidden-{i:05d}{rank}.safetensors"

    def resume(self, model: nn.Module, hidden: Activations,
               spill: Path | None = None) -> tuple[int, Activations, Activations | None]:
        """(first block to compress, the hidden states entering it, the dense teacher's when block tuning saved
        them): committed blocks become meta skeletons of their compressed layers (sizes and layouts known,
        nothing held)."""
        if self.done < 0:
            return 0, hidden, None
        layers = get_layers(model)
        for i in range(self.done + 1):
            if not self._block_file(i).is_file():
                raise ResumeError(f"{self.dir}: block {i} is recorded as done but its file is missing; pass "
                                  "--overwrite to start over")
            layers[i].to("meta")
        with torch.device("meta"):
            for name, d in self.layouts.items():
                set_submodule(model, name, SlimLinear(Layout.from_dict(d), dtype=self.dtype))
        f = self._hidden_file(self.done)
        head = read_safetensors_header(f)
        n_teacher = sum(k.startswith("t") for k in head)
        if [(head[f"h{j}"]["shape"], head[f"h{j}"]["dtype"]) if f"h{j}" in head else None
                for j in range(len(hidden))] != hidden.signature() or len(head) - n_teacher != len(hidden) or \
                n_teacher not in (0, len(hidden)):
            raise ResumeError(f"{self.dir}: the saved calibration activations do not match this run's; pass "
                              "--overwrite to start over")
        from .capture import Activations

        n = len(hidden)
        hidden.drop()
        streams = {"h": Activations(spill, "resumed"), **({"t": Activations(spill, "resumed-t")} if n_teacher else {})}
        with open(f, "rb") as fh:
            for key, acts in streams.items():
                for j in range(n):  # one batch at a time: spilled activations never sit in memory together
                    t = torch.empty(head[f"{key}{j}"]["shape"], dtype=_ST_DTYPES[head[f"{key}{j}"]["dtype"]])
                    _read_into(fh, head, f"{key}{j}", t, f)
                    acts.append(t)
        return self.done + 1, streams["h"], streams.get("t")

    def load(self, model: nn.Module, i: int) -> nn.Module:
        layers = get_layers(model)
        return read_block(model, i, self.weights) if self.weights is not None else layers[i]

    def commit(self, model: nn.Module, i: int, hidden: Activations, per_layer: dict[str, Any],
               teacher: Activations | None = None) -> None:
        """Write compressed block i and the hidden states after it (and the dense teacher's, when block tuning
        runs one), then record it; drop the block from memory."""
        with _writing(self.dir):
            self._commit(model, i, hidden, per_layer, teacher)

    def _commit(self, model: nn.Module, i: int, hidden: Activations, per_layer: dict[str, Any],
                teacher: Activations | None) -> None:
        layers = get_layers(model)
        block = layers[i]
        cast_dense_parts(block, self.dtype)
        base = f"{layers_prefix(model)}.{i}."
        main = self.ranks.main
        if main:
            write_safetensors(self._block_file(i), {base + k: v for k, v in block.state_dict().items()}, {}, "commit")
        fault("commit")
        states = {f"h{j}": hidden.source(j) for j in range(len(hidden))}
        if teacher is not None:
            states.update({f"t{j}": teacher.source(j) for j in range(len(teacher))})
        write_safetensors(self._hidden_file(i), states, {}, "commit")
        self.per_layer.update(per_layer)
        self.layouts.update({base + n: m.layout.to_dict() for n, m in block.named_modules()
                             if isinstance(m, SlimLinear)})
        self.done = i
        self.ranks.barrier()  # every rank's hidden states are on disk before the block counts as done
        if main:
            write_json(self.dir / PROGRESS, {"fingerprint": self.fingerprint, "done": i, "threads": self.threads,
                                             "per_layer": self.per_layer, "layouts": self.layouts,
                                             "seconds": self.seconds()})
            _fsync_dir(self.dir)
        self.ranks.barrier()  # ... and it counts before any rank drops the states a resume would otherwise need
        if i > 0:
            self._hidden_file(i - 1).unlink(missing_ok=True)
        layers[i] = block.to("meta")
        release_free_memory()  # glibc keeps the freed block's pages otherwise: ~7 MB a block of resident growth

    def seconds(self) -> float:
        """Wall seconds spent on this run so far, the pieces before a resume included."""
        return self.prior_seconds + time.perf_counter() - self.started

    def finish(self, model: nn.Module, tokenizer, meta: dict[str, Any], overwrite: bool) -> Path:
        """Assemble the checkpoint from the committed blocks and rename it into place (rank 0; the others wait)."""
        if not self.ranks.main:
            self.ranks.barrier()
            return self.out
        cast_dense_parts(model, self.dtype)
        n = len(get_layers(model))
        prefix = layers_prefix(model) + "."
        tensors: dict[str, Any] = dict(model_tensors(model, skip_prefix=prefix))
        for i in range(n):
            f = self._block_file(i)
            tensors.update({k: FileSlice(f, e) for k, e in read_safetensors_header(f).items()})
        ck = self.dir / "checkpoint"
        if ck.exists():  # left by a run killed while assembling
            shutil.rmtree(ck)
        with _writing(ck):
            ck.mkdir()
            write_checkpoint(ck, model, tensors, tokenizer, meta, self.out)
        fault("rename")
        if self.out.exists():
            if not overwrite:
                raise OutputExistsError(f"output directory {self.out} appeared during the run; the finished "
                                        f"checkpoint is in {ck}")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(ck, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(ck, self.out)
        shutil.rmtree(self.dir)
        self._lock.close()
        self.ranks.barrier()
        return self.out


def _not_locked(lock: Path) -> None:
    """Refuse when another process holds a run's lock file (a missing file is no lock)."""
    try:
        f = open(lock)  # noqa: SIM115 - closed below
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ResumeError(f"another slim process is writing {lock.parent}; wait for it or stop it first") from None


@contextlib.contextmanager
def _writing(where: Path):  # noqa: ANN202
    """Disk full, a read-only or vanished directory: one clear error. Nothing half-written ever loads: a block
    counts only once progress.json names it, and the checkpoint only once it is renamed into place with its
    slim_config.json."""
    try:
        yield
    except OSError as e:
        what = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exhausted"}.get(e.errno, e.strerror)
        raise CheckpointError(f"cannot write {where}: {what}. Committed blocks are kept: free space (or choose a "
                              f"writable --out) and run the same command with --resume") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
