"""slim: one-shot sparsity + quantization + low-rank adapters (SLiM) for Hugging Face causal LMs."""

from __future__ import annotations

from typing import Any

from ._version import __version__

# The public names, imported on first use (PEP 562): `import slim` (and `slim --help`) then costs no torch import.
_LAZY = {
    "compress": "api", "load": "checkpoint", "save": "checkpoint", "SlimLinear": "packed",
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
