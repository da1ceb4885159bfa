"""slim: one-shot sparsity + quantization + low-rank adapters (SLiM) for Hugging Face causal LMs."""

from ._version import __version__
from .api import compress
from .checkpoint import load, save
from .config import (
    AdapterConfig,
    CalibConfig,
    CompressConfig,
    QuantConfig,
    SparsityConfig,
    TuneConfig,
)
from .packed import SlimLinear

__all__ = [
    "AdapterConfig", "CalibConfig", "CompressConfig", "QuantConfig", "SlimLinear", "SparsityConfig", "TuneConfig",
    "compress", "load", "save", "__version__",
]
