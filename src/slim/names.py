"""The names and limits that the configuration and the command line check against, free of torch.

Why: `slim --help` and the configuration's import must not pay for importing torch (seconds on a cold start),
yet the parser's choices and the config's limits come from torch-heavy modules (the method registry in
slim.methods, the backends in slim.runtime, the stored layout in slim.packed). Those modules read the layout's
limits from here; tests/test_config.py checks that the name lists equal the registries, so they cannot drift.
"""

from __future__ import annotations

# The limits of the stored layout (slim.packed), shared with the configuration (slim.config), which refuses
# anything outside them before any work, so that `slim compress` never writes a checkpoint `slim.load` refuses.
CODE_BITS = (2, 4, 8)  # quantized weights' and adapters' code widths: whole codes per byte
MAX_NM_M = 64  # largest M of an N:M pattern

# the built-in methods of slim.methods, in its registries' order (a method registered there later is accepted
# by the configuration as well: it validates against the registries)
MASK_METHODS = ("wanda", "magnitude", "sparsegpt", "jsq")
QUANT_METHODS = ("slim", "slim-o", "slim-group", "absmax", "group-absmax", "gptq", "awq", "omniquant", "none")
ADAPTER_METHODS = ("slim", "naive", "fullcov", "l2qer", "none")

# slim.runtime's backends for a checkpoint's compressed layers, as `--backend` offers them
BACKEND_CHOICES = ("auto", "reference", "cpu-int4", "cuda-int4", "cuda-2of4")
