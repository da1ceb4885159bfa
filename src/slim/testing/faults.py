"""Fault injection for the resume tests, called at the points where a kill must leave a resumable state.

A leaf module (it imports nothing from slim), so that capture, the pipeline, the block-by-block writer and the
checkpoint writer can all reach it without importing one another.
"""

from __future__ import annotations

import os
import signal

_FAULTS: dict[str, int] = {}


def fault(point: str) -> None:
    """Fault injection for the resume tests: SLIM_FAULT=POINT[@N] kills this process with SIGKILL the N-th time
    (default: the first) it reaches POINT: capture (before each calibration batch), block (after each compressed
    linear), commit (inside and between the writes that commit a block), save (inside the checkpoint's tensor
    file), rename (before the finished checkpoint is renamed into place), finetune (after each optimizer step)."""
    spec = os.environ.get("SLIM_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name == point:
        _FAULTS[point] = _FAULTS.get(point, 0) + 1
        if _FAULTS[point] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
