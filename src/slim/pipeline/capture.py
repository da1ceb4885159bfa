"""Run a model block by block: capture the inputs of block 0, then feed blocks one at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import get_layers
from ..testing.faults import fault


class Activations:
    """Calibration activations, one tensor per batch: held in memory, or, with `spill` set, each batch written to its
    own file there and read back when a block runs over it (plain reads and writes, not a memory map: mapped pages
    would count in resident memory again). Results are the same either way."""

    def __init__(self, spill: Path | None = None, tag: str = "act") -> None:
        self.spill, self.tag = spill, tag
        self._items: list[Any] = []

    def append(self, t: torch.Tensor) -> None:
        if self.spill is None:
            self._items.append(t)
            return
        from ..format.checkpoint import _ST_NAMES

        t = t.detach().cpu().contiguous()
        path = self.spill / f"{self.tag}-{len(self._items):05d}.bin"
        with open(path, "wb") as f:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        nbytes = t.numel() * t.element_size()
        self._items.append((path, {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [0, nbytes]}))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        from ..format.checkpoint import _ST_DTYPES, _read_into

        path, e = item
        t = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
        with open(path, "rb") as f:
            _read_into(f, {"t": e}, "t", t, path)
        return t

    def __iter__(self):  # noqa: ANN204
        return (self[i] for i in range(len(self)))

    def source(self, i: int) -> Any:
        """Batch i as `write_safetensors` takes it: the tensor, or its file (copied without being loaded)."""
        from ..format.checkpoint import FileSlice

        item = self._items[i]
        return item if isinstance(item, torch.Tensor) else FileSlice(*item)

    def signature(self) -> list[tuple[list[int], str]]:
        """(shape, dtype) of every batch, without reading spilled ones."""
        from ..format.checkpoint import _ST_NAMES

        return [(list(t.shape), _ST_NAMES[t.dtype]) if isinstance(t, torch.Tensor) else (t[1]["shape"], t[1]["dtype"])
                for t in self._items]

    def drop(self) -> None:
        """Delete the spilled files (the activations of a block that has been run)."""
        for item in self._items:
            if not isinstance(item, torch.Tensor):
                item[0].unlink(missing_ok=True)
        self._items = []


class BlockInputsCaptured(Exception):
    """Raised by the stand-in for block 0 to stop the forward pass once its inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("block inputs captured")
        self.hidden, self.kwargs = hidden, kwargs


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str) -> Any:  # families read attributes such as `attention_type`
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if args:  # older transformers pass the mask positionally
            kwargs = {"attention_mask": args[0], **kwargs}
        raise BlockInputsCaptured(hidden, kwargs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`fn` applied to every tensor in a block's nested arguments (tuples, lists, dicts); the rest as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device | str) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, ids: torch.Tensor, batch_size: int, device: str = "cpu", spill: Path | None = None,
) -> tuple[Activations, list[dict[str, Any]]]:
    """Hidden states entering block 0 (on CPU, or in files under `spill`), per batch, with the keyword arguments
    blocks receive."""
    layers = get_layers(model)
    first = layers[0]
    layers[0] = _Catcher(first)
    if device != "cpu":
        move_outside_blocks(model, device)
    hidden, kwargs = Activations(spill, "in"), []
    try:
        for b in range(0, ids.shape[0], batch_size):
            fault("capture")
            try:
                model(ids[b : b + batch_size].to(device), use_cache=False)
            except BlockInputsCaptured as c:
                hidden.append(c.hidden.cpu())
                kw = {k: v for k, v in c.kwargs.items() if k not in ("past_key_value", "past_key_values")}
                kwargs.append(_to(kw, "cpu"))
            else:
                raise RuntimeError("the model's forward never reached its first decoder block")
    finally:
        layers[0] = first
        if device != "cpu":
            move_outside_blocks(model, "cpu")
    return hidden, kwargs


def move_outside_blocks(model: nn.Module, device: torch.device | str) -> None:
    """The embeddings, rotary tables, final norm and head to `device`, in place; the decoder blocks stay where they
    are (the pipeline moves one at a time), and so does anything on the meta device (a streamed model's blocks and
    unread parts), which `model.to` would refuse to copy."""
    parent_name, _, attr = _layers_attr(model)
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None and not p.is_meta:
                    p.data = p.data.to(device)  # the same Parameter: tied weights stay tied
            for k, b in m._buffers.items():
                if b is not None and not b.is_meta:
                    m._buffers[k] = b.to(device)
    finally:
        setattr(parent, attr, layers)


def _layers_attr(model: nn.Module) -> tuple[str, str, str]:
    from ..models import layers_prefix

    return layers_prefix(model).rpartition(".")


def block_forward(block: nn.Module, h: torch.Tensor, kw: dict[str, Any], device: str,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """One batch through one block (hidden states moved to `device`, and cast to `dtype` when given)."""
    out = block(h.to(device) if dtype is None else h.to(device, dtype), **_to(kw, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: Sequence[torch.Tensor], kwargs: list[dict[str, Any]], device: str, keep: bool = True,
    spill: Path | None = None, tag: str = "act", into: Activations | None = None,
    autocast: torch.dtype | None = None,
) -> Activations:
    """Run one block over every calibration batch; returns the outputs on CPU or in files under `spill` (or
    nothing), appended to `into` when given. With `autocast` (a dtype), under torch.autocast in that dtype
    (`calib.autocast`); outputs keep the dtype of the inputs."""
    outs = Activations(spill, tag) if into is None else into
    with torch.autocast(torch.device(device).type, autocast or torch.bfloat16, enabled=autocast is not None):
        for h, kw in zip(hidden, kwargs, strict=True):
            out = block_forward(block, h, kw, device)
            if keep:
                outs.append(out.to("cpu", h.dtype))
    return outs
