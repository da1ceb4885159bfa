"""slim: one-shot sparsity + quantization + low-rank adapters (SLiM) for Hugging Face causal LMs.

The package, from the bottom up (each sub-package's docstring says what it owns and what it may import; a test
holds every import to that, and finds no cycle):

- leaves: `names` (torch-free names and limits), `phases` (timings), `_version`, `_compat` (old module paths),
  `testing.faults` (kill points for the resume tests)
- `kernels/`: C++ CPU kernels, their torch.library ops, Triton GPU kernels; no model knowledge
- `algorithms/`: the math: masks, quantizers, closed-form adapters, statistics, the method registry
- `config`, `data`, `models`: the validated configuration, calibration/evaluation text, model families and checks
- `format/`: `Layout`, bit packing, `SlimLinear`, the checkpoint's files and model card
- `runtime/`: backends (reference, cpu-int4, cuda-int4, cuda-2of4), `loader` (slim.load), `generate`
- `pipeline/`: calibration capture, the block loop, the per-layer solve, block tuning, streaming/resume, torchrun
- `eval/`, `export/`, `train/`: perplexity and zero-shot; PEFT/compressed-tensors/merged exports; `slim finetune`
- `api` (slim.compress), `cli/` (the `slim` command), `testing/` (random layers for tests and benchmarks)

May import: anything in slim (the public names, lazily).
"""

from __future__ import annotations

from typing import Any

from . import _compat
from ._version import __version__

_compat.install()  # slim 0.1's module paths (slim.checkpoint, slim.packed ...) import with a DeprecationWarning

# The public names, imported on first use (PEP 562): `import slim` (and `slim --help`) then costs no torch import.
_LAZY = {
    "compress": "api", "load": "runtime.loader", "save": "format.checkpoint", "SlimLinear": "format.packed",
    **{name: "config" for name in ("AdapterConfig", "CalibConfig", "CompressConfig", "QuantConfig", "SparsityConfig",
                                   "TuneConfig")},
}

__all__ = [
    "AdapterConfig", "CalibConfig", "CompressConfig", "QuantConfig", "SlimLinear", "SparsityConfig", "TuneConfig",
    "compress", "load", "save", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
