"""slim: one-shot sparsity + quantization + low-rank adapters (SLiM) for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .api import compress  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .config import (  # noqa: E402
    AdapterConfig,
    CalibConfig,
    CompressConfig,
    QuantConfig,
    SparsityConfig,
    TuneConfig,
)
from .packed import SlimLinear  # noqa: E402

__all__ = [
    "AdapterConfig", "CalibConfig", "CompressConfig", "QuantConfig", "SlimLinear", "SparsityConfig", "TuneConfig",
    "compress", "load", "save", "__version__",
]
