"""`reference`: the stored layout as it is; each forward decompresses to a dense weight and runs a matmul.

The exactness oracle for the other backends. Its dense-weight cache is opt-in (`cache=True`): with it a layer
holds a dense copy of its weight, which is fast for evaluation but as large as the dense model.
"""

from __future__ import annotations

from torch import nn

from ..format.packed import SlimLinear

NAME = "reference"
COMPRESSED_TYPES = (SlimLinear,)


def available(device: str) -> str | None:
    return None


def supports(layer: SlimLinear) -> str | None:
    return None


def convert(layer: SlimLinear, cache: bool = False) -> nn.Module:
    layer.cache = cache
    layer.clear_cache()
    return layer
