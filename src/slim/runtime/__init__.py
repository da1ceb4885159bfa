"""Run-time backends: turn a model's `SlimLinear` layers (storage format 1) into kernel layouts at load time.

One file a backend. Each exposes `NAME`, `available(device) -> reason | None`, `supports(layer) -> reason | None`
and `convert(layer) -> nn.Module`; none keeps a dense copy of a base weight. `auto` tries the backends meant for the
device in order of speed and falls back layer by layer, logging why; `reference` (the decompress-and-matmul oracle)
runs every layer. `loader.load` (slim.load) reads a checkpoint straight into a backend's layout; `generate` is the
decode loop (eager or compiled) that `slim generate` runs.
May import: slim.kernels, slim.format, slim.algorithms, slim.config, slim.models, leaves.
"""

from __future__ import annotations

import logging
from collections import Counter
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..format.packed import SlimLinear
from . import cpu_int4, cuda_2of4, cuda_int4, reference

log = logging.getLogger(__name__)

BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (reference, cpu_int4, cuda_int4, cuda_2of4)}
# fastest first, per device type; reference runs anything and closes every list. cuda-2of4 (cuSPARSELt, 16-bit
# values) is only taken when named: it is a prefill candidate that benchmarks/gpu_runtime.py measures
AUTO_ORDER: dict[str, list[str]] = {"cpu": ["cpu-int4", "reference"], "cuda": ["cuda-int4", "reference"]}
CHOICES = ("auto", *BACKENDS)


class BackendError(ValueError):
    """A backend was asked for that does not exist or cannot run here; the message says what to do."""


def resolve(backend: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends to try, in order, for `backend` on `device`; raises before any work if it cannot run."""
    dev = torch.device(device).type
    if backend == "auto":
        order = AUTO_ORDER.get(dev, ["reference"])
        chosen = []
        for name in order:
            why = BACKENDS[name].available(dev)
            if why is None:
                chosen.append(name)
            else:
                log.info("backend auto: skipping %s (%s)", name, why)
        return chosen
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(CHOICES)}")
    why = BACKENDS[backend].available(dev)
    if why is not None:
        raise BackendError(f"backend {backend!r} cannot run on {dev}: {why}; use --backend auto or reference")
    return [backend] if backend == "reference" else [backend, "reference"]


def convert_layer(layer: SlimLinear, order: list[str], name: str = "") -> tuple[nn.Module, str]:
    """Convert one layer with the first backend in `order` that supports it; logs each fallback's reason."""
    for i, bname in enumerate(order):
        mod = BACKENDS[bname]
        why = mod.supports(layer)
        if why is None:
            return mod.convert(layer), bname
        if i + 1 < len(order):
            log.info("%s: %s cannot run it (%s); falling back to %s", name or "layer", bname, why, order[i + 1])
    raise BackendError(f"no backend in {order} can run layer {name}")


def apply_backend(model: nn.Module, backend: str = "auto", device: str | torch.device = "cpu") -> dict[str, Any]:
    """Replace every SlimLinear of `model` in place by its backend module; returns which backend runs each layer."""
    from ..models import set_submodule

    order = resolve(backend, device)
    chosen: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SlimLinear):
            new, bname = convert_layer(mod, order, name)
            set_submodule(model, name, new)
            chosen[name] = bname
            del mod, new
    return finish(model, backend, order, chosen)


def finish(model: nn.Module, backend: str, order: list[str], chosen: dict[str, str]) -> dict[str, Any]:
    """After every layer is converted: let the backends that run layers adapt the rest of the model (e.g.
    `cpu_int4.prepare_model`), then report which backend runs each layer, with counts; logged once."""
    activations = None
    for bname in dict.fromkeys(chosen.values()):
        prepare = getattr(BACKENDS[bname], "prepare_model", None)
        activations = (prepare(model) if prepare is not None else None) or activations
    counts = Counter(chosen.values())
    log.info("backend %s: %s", backend, ", ".join(f"{n} layers on {b}" for b, n in counts.most_common()) or "none")
    report = {"backend": backend, "order": order, "layers": chosen, "counts": dict(counts),
              "activations": activations or "as stored"}
    model.slim_backend = report
    return report


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds in parameters and buffers, split into compressed linears (with everything inside
    them) and everything else; shared tensors count once."""
    compressed = tuple(t for m in BACKENDS.values() for t in getattr(m, "COMPRESSED_TYPES", ()))
    inside: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, compressed):
            inside.update(id(m) for m in mod.modules())
    seen: set[int] = set()
    linear = other = 0
    for mod in model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.device.type == "meta" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            n = t.numel() * t.element_size()
            if id(mod) in inside:
                linear += n
            else:
                other += n
    return {"linear_bytes": linear, "other_bytes": other, "total_bytes": linear + other}
