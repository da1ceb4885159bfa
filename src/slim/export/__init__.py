"""Checkpoints for other engines: PEFT adapters on a dense base, compressed-tensors (vLLM), and merged dense weights.

Each export reads a slim checkpoint and writes a directory the other library loads without slim installed.
May import: slim.runtime (to read checkpoints), slim.format, slim.algorithms, slim.config, slim.models, leaves.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # slim 0.1's names of the module this package replaced, with a warning
    from .._compat import package_getattr

    return package_getattr(__name__, name)
