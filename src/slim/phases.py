"""Wall time of a compression by phase (calibration forwards, solving and its parts, tuning, block I/O).

The report keeps it so that a slow run shows where its time goes: the mix differs by machine (on a GPU the
many small linear-algebra steps of the solver can outweigh the forwards that dominate on a CPU). On CUDA each
phase boundary synchronizes the device, so the times are the device's, not the launch queue's.
May import: nothing from slim.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_seconds: dict[str, float] = defaultdict(float)
_once: set[str] = set()  # one-time phases (the kernel build): kept through `reset` until one report shows them


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str, once: bool = False) -> Iterator[None]:
    """Add the wall time of the `with` body to phase `name` (a dotted name is a part of its parent's time). A
    `once` phase happens before a compression starts counting (the one-time kernel build) and survives its
    `reset`, to be reported by the next `seconds`."""
    if once:
        _once.add(name)
    _sync()
    t = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        _seconds[name] += time.perf_counter() - t


def reset() -> None:
    for k in [k for k in _seconds if k not in _once]:
        del _seconds[k]


def seconds() -> dict[str, float]:
    """Seconds by phase since the last reset, longest first (one-time phases once, then forgotten)."""
    out = {k: round(v, 3) for k, v in sorted(_seconds.items(), key=lambda kv: -kv[1])}
    for k in _once & set(_seconds):
        del _seconds[k]
    return out
