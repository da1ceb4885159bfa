"""Save and load compressed checkpoints: model.safetensors + slim_config.json (+ HF config, tokenizer).

Writes go to a temporary sibling directory that is renamed into place only when complete, so an
interrupted run never leaves a directory that loads as if it were finished.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from . import __version__
from .models import set_submodule
from .packed import FORMAT_VERSION, Layout, SlimLinear

log = logging.getLogger(__name__)

CONFIG_NAME = "slim_config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A directory is not a usable slim checkpoint; the message says why."""


class OutputExistsError(FileExistsError):
    """The output directory exists and --overwrite was not given."""


def versions() -> dict[str, str]:
    import transformers

    return {
        "slim": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory before any long work starts (unless overwriting)."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"output directory {p} already exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output path {p} exists and is not a directory")
    return p


def atomic_dir(out: Path, write, overwrite: bool) -> None:
    """Call write(tmp_dir), then move tmp_dir to `out` (replacing it only if overwrite)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"output directory {out} appeared during the run; not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save(
    model: nn.Module, out: str | os.PathLike, tokenizer=None, meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a compressed model; `meta` (config, data hashes, report) goes into slim_config.json."""
    out = Path(out)
    layers = {n: m.layout.to_dict() for n, m in model.named_modules() if isinstance(m, SlimLinear)}
    if not layers:
        raise CheckpointError("the model has no SlimLinear layers: compress it before saving")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "slim_format": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg = {
            "format": "slim", "format_version": FORMAT_VERSION, "dtype": dtype, "versions": versions(),
            **(meta or {}), "layers": layers,
        }
        write_json(tmp / CONFIG_NAME, cfg)  # written last: its presence marks a complete checkpoint

    atomic_dir(out, write, overwrite)
    log.info("saved %s", out)
    return out


def read_slim_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    f = p / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{p} has no {CONFIG_NAME}: not a slim checkpoint (or an unfinished one)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "slim":
        raise CheckpointError(f"{f} is not a slim config (missing \"format\": \"slim\")")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION or "layers" not in cfg:
        raise CheckpointError(
            f"{f}: format version {cfg.get('format_version')} is not readable by slim {__version__} "
            f"(reads up to {FORMAT_VERSION}); upgrade slim"
        )
    return cfg


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Load a slim checkpoint as a ready-to-run transformers model with SlimLinear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    p = Path(path)
    cfg = read_slim_config(p)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{p} has no {WEIGHTS_NAME}")
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    hf_config = AutoConfig.from_pretrained(p)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, layout in cfg["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{CONFIG_NAME} names layer {name!r} that the model does not have") from None
        set_submodule(model, name, SlimLinear(Layout.from_dict(layout), dtype=dtype))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # corrupt file, wrong shapes
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    missing = _not_tied(model, missing)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model.to(device)


def _not_tied(model: nn.Module, missing: list[str]) -> list[str]:
    """Missing keys that are not tied to a loaded tensor (a tied tensor is stored once)."""
    sd = model.state_dict(keep_vars=True)
    loaded = {sd[k].data_ptr() for k in sd if k not in missing}
    return [k for k in missing if k not in sd or sd[k].data_ptr() not in loaded]


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
