"""Compression, block by block: calibration capture, the per-layer solve (mask, quantizer, adapter), block tuning,
streaming from disk with resume, torchrun distribution, phase timings and the run report.

`slim.api.compress` and `slim compress` drive `loop.compress_model`; `stream.BlockRun` makes a run resumable.
May import: slim.runtime, slim.format, slim.algorithms, slim.kernels, slim.config, slim.data, slim.models, leaves.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # slim 0.1's names of the module this package replaced, with a warning
    from .._compat import package_getattr

    return package_getattr(__name__, name)
