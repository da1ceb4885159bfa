"""Read a slim checkpoint into a ready-to-run transformers model, each compressed layer converted to a backend.

Why here and not in slim.format: loading picks kernels (slim.runtime's backends), while slim.format only knows
the stored bytes; keeping the two apart lets the format sit below the runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..format.checkpoint import (
    CheckpointError,
    _read_into,
    compact_heap,
    read_safetensors_header,
    read_slim_config,
    release_free_memory,
    resolve_dtype,
    stored_dtype,
)
from ..format.packed import CONFIG_NAME, WEIGHTS_NAME, Layout, SlimLinear
from ..models import set_submodule
from . import BACKENDS, convert_layer, finish, resolve
from .cpu_int4 import check_head, quantize_head


def load(
    path: str | os.PathLike, device: str = "cpu", backend: str = "auto", dtype: str | torch.dtype | None = None,
    cache: bool = False, head: str = "stored",
) -> nn.Module:
    """Load a slim checkpoint as a ready-to-run transformers model.

    `backend` picks the kernels ("auto", "reference", "cpu-int4", "cuda-2of4"; see `slim.runtime`): each
    compressed layer is read and converted to its backend's layout on its own, so neither a dense copy of a base
    weight nor a second copy of the checkpoint is ever held. `dtype` overrides the stored dtype of the dense parts;
    `cache` keeps a dense weight per layer on the reference backend (fast evaluation, dense-sized memory).
    `head` ("stored", "int8", "int4"; CPU only) quantizes lm_head at load for slim's kernel (`cpu_int4.QuantHead`)."""
    from transformers import AutoConfig


    p = Path(path)
    cfg = read_slim_config(p)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{p} has no {WEIGHTS_NAME}")
    order = resolve(backend, device)  # an unknown or unavailable backend fails before reading anything
    check_head(head, device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, stored_dtype(cfg))
    dtype = dtype or stored_dtype(cfg)
    try:
        header = read_safetensors_header(weights)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    try:
        hf_config = AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: cannot read its config.json ({e})") from None
    layouts = {}
    for name, d in cfg["layers"].items():  # checked before the skeleton is built
        try:
            layouts[name] = Layout.from_dict(d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{p / CONFIG_NAME}: layer {name}: {e}") from None
    with compact_heap():
        model = _build(p, layouts, hf_config, header, order, device, dtype, cache, backend)
    release_free_memory()
    model.eval()
    model = model.to(device)
    quantize_head(model, head)
    return model


def _build(p: Path, layouts: dict[str, Layout], hf_config: Any, header: dict, order: list[str], device: str,
           dtype: torch.dtype, cache: bool, backend: str) -> nn.Module:
    """The model skeleton with the dense tensors read into it and each compressed layer converted in turn."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights


    weights = p / WEIGHTS_NAME
    with no_init_weights():  # untouched allocations: the dense linears are replaced before anything writes them
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, L in layouts.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{CONFIG_NAME} names layer {name!r} that the model does not have") from None
        if not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (L.d_in, L.d_out):
            raise CheckpointError(f"{CONFIG_NAME}: layer {name} is {L.d_out} x {L.d_in} there, but the model's "
                                  f"{name} is {type(mod).__name__} {getattr(mod, 'out_features', '?')} x "
                                  f"{getattr(mod, 'in_features', '?')}")
    by_layer: dict[str, list[str]] = {}
    dense_keys = []
    for key in header:
        owner = key.rpartition(".")[0]
        (by_layer.setdefault(owner, []) if owner in layouts else dense_keys).append(key)
    unexpected = [k for k in dense_keys if not _has_tensor(model, k)]
    if unexpected:
        raise CheckpointError(f"{weights} does not match its config: unexpected {unexpected[:5]}")
    chosen: dict[str, str] = {}
    with open(weights, "rb") as f:
        sd = model.state_dict(keep_vars=True)
        for key in dense_keys:
            _read_into(f, header, key, sd[key], weights)
        missing = _not_tied(model, [k for k in sd if k not in header and k.rpartition(".")[0] not in layouts])
        del sd
        if missing:
            raise CheckpointError(f"{weights} does not match its config: missing {missing[:5]}")
        for name, layout in layouts.items():  # one compressed layer at a time: read, convert, drop the packed copy
            layer = SlimLinear(layout, dtype=dtype)
            lsd = layer.state_dict(keep_vars=True)
            got = set(by_layer.get(name, []))
            if set(lsd) != {k.rpartition(".")[2] for k in got}:
                raise CheckpointError(f"{weights} does not match its config for {name}: it stores "
                                      f"{sorted(k.rpartition('.')[2] for k in got)}, the layout needs {sorted(lsd)}")
            for key in got:
                _read_into(f, header, key, lsd[key.rpartition(".")[2]], weights)
            new, bname = convert_layer(layer.to(device), order, name)
            if bname == "reference" and cache:
                BACKENDS["reference"].convert(new, cache=True)
            set_submodule(model, name, new)
            chosen[name] = bname
            del layer, lsd, new
            release_free_memory()  # about 1 ms; keeps the load's peak near the converted model's size
    finish(model, backend, order, chosen)
    return model


def _has_tensor(model: nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    return attr in mod._parameters or (attr in mod._buffers and attr not in mod._non_persistent_buffers_set)


def _not_tied(model: nn.Module, missing: list[str]) -> list[str]:
    """Missing keys that are not tied to a loaded tensor (a tied tensor is stored once)."""
    sd = model.state_dict(keep_vars=True)
    loaded = {sd[k].data_ptr() for k in sd if k not in missing}
    return [k for k in missing if k not in sd or sd[k].data_ptr() not in loaded]
