"""Fault injection for the resume tests, called at the points where a kill must leave a resumable state.

A leaf module (it imports nothing from slim), so that capture, the pipeline, the block-by-block writer and the
checkpoint writer can all reach it without importing one another.
May import: nothing from slim.
"""

from __future__ import annotations

import os
import signal

_FAULTS: dict[str, int] = {}


class Killed(BaseException):
    """What SLIM_FAULT=POINT[@N]:raise raises instead of a SIGKILL: an in-process test's stand-in for the kill (a
    BaseException, so no `except Exception` of slim's catches it; `finally` blocks do run, unlike after a kill)."""


def fault(point: str) -> None:
    """Fault injection for the resume tests: SLIM_FAULT=POINT[@N] kills this process with SIGKILL the N-th time
    (default: the first) it reaches POINT: capture (before each calibration batch), block (after each compressed
    linear), commit (inside and between the writes that commit a block), save (inside the checkpoint's tensor
    file), rename (before the finished checkpoint is renamed into place), finetune (after each optimizer step).
    With a `:raise` suffix it raises `Killed` instead (the in-process tests; `reset()` restarts the counts)."""
    spec = os.environ.get("SLIM_FAULT")
    if not spec:
        return
    spec, _, how = spec.partition(":")
    name, _, nth = spec.partition("@")
    if name == point:
        _FAULTS[point] = _FAULTS.get(point, 0) + 1
        if _FAULTS[point] == int(nth or 1):
            if how == "raise":
                raise Killed(point)
            os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget how often each point was reached (a new in-process run counts from zero, as a new process does)."""
    _FAULTS.clear()
