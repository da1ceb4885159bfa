"""Run a model block by block: capture the inputs of block 0, then feed blocks one at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import get_layers


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


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, ids: torch.Tensor, batch_size: int, device: str = "cpu"
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering block 0 (on CPU), per batch, with the keyword arguments blocks receive."""
    layers = get_layers(model)
    first = layers[0]
    layers[0] = _Catcher(first)
    if device != "cpu":  # only the embedding side moves: swap the blocks out while moving
        parent_name, _, attr = _layers_attr(model)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, nn.ModuleList([layers[0]]))
        model.to(device)
        setattr(parent, attr, layers)
    hidden, kwargs = [], []
    try:
        for b in range(0, ids.shape[0], batch_size):
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
            model.to("cpu")
    return hidden, kwargs


def _layers_attr(model: nn.Module) -> tuple[str, str, str]:
    from .models import layers_prefix

    return layers_prefix(model).rpartition(".")


@torch.no_grad()
def run_block(
    block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], device: str, keep: bool = True
) -> list[torch.Tensor]:
    """Run one block over every calibration batch; returns the outputs on CPU (or nothing)."""
    outs = []
    for h, kw in zip(hidden, kwargs, strict=True):
        out = block(h.to(device), **_to(kw, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if keep:
            outs.append(out.cpu())
    return outs
