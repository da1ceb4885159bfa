"""Wall time of a compression by phase (calibration forwards, solving and its parts, tuning, block I/O).

The report keeps it so that a slow run shows where its time goes: the mix differs by machine (on a GPU the
many small linear-algebra steps of the solver can outweigh the forwards that dominate on a CPU). On CUDA each
phase boundary synchronizes the device, so the times are the device's, not the launch queue's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_seconds: dict[str, float] = defaultdict(float)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the wall time of the `with` body to phase `name` (a dotted name is a part of its parent's time)."""
    _sync()
    t = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        _seconds[name] += time.perf_counter() - t


def reset() -> None:
    _seconds.clear()


def seconds() -> dict[str, float]:
    """Seconds by phase since the last reset, longest first."""
    return {k: round(v, 3) for k, v in sorted(_seconds.items(), key=lambda kv: -kv[1])}
