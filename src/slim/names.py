"""The names and limits that the configuration and the command line check against, free of torch.

Why: `slim --help` and the configuration's import must not pay for importing torch (seconds on a cold start),
yet the parser's choices and the config's limits come from torch-heavy modules (the method registry in
slim.algorithms.methods, the backends in slim.runtime, the stored layout in slim.format.packed). Those modules read
the layout's limits from here; tests/test_config.py checks that the name lists equal the registries, so they cannot
drift.
May import: nothing from slim.
"""

from __future__ import annotations

import os

# The limits of the stored layout (slim.format.packed), shared with the configuration (slim.config), which refuses
# anything outside them before any work, so that `slim compress` never writes a checkpoint `slim.load` refuses.
CODE_BITS = (2, 4, 8)  # quantized weights' and adapters' code widths: whole codes per byte
MAX_NM_M = 64  # largest M of an N:M pattern

# the built-in methods of slim.algorithms.methods, in its registries' order (a method registered there later is accepted
# by the configuration as well: it validates against the registries)
MASK_METHODS = ("wanda", "magnitude", "sparsegpt", "jsq")
QUANT_METHODS = ("slim", "slim-o", "slim-group", "absmax", "group-absmax", "gptq", "awq", "omniquant", "none")
ADAPTER_METHODS = ("slim", "naive", "fullcov", "l2qer", "none")

# slim.runtime's backends for a checkpoint's compressed layers, as `--backend` offers them
BACKEND_CHOICES = ("auto", "reference", "cpu-int4", "cuda-int4", "cuda-2of4")
# lm_head at load (slim.runtime.cpu_int4.quantize_head): as stored, int8 per channel, int4 in groups of 32.
# `slim generate` defaults to int8 (auto): on SmolLM2 it cost nothing measurable in WikiText-2 perplexity (68.31 against
# 68.40 stored, 40 windows) where int4 cost 10.8 %, and it halves the largest read of a decode step
# (docs/results/runtime). Loading and `slim eval` keep the head as stored unless asked.
# "auto": int8 where it runs (the CPU with slim's kernel), else stored.
HEAD_CHOICES = ("auto", "stored", "int8", "int4")
HEAD_DEFAULT = "auto"
# slim.runtime.generate's decode paths: slim's C++ decoder, transformers' forward, a torch.compile'd step
DECODE_PATHS = ("auto", "lean", "eager", "compile")

# Environment variables that change which kernels run, and so the last bits of what slim computes (docs/runtime.md).
# Each is recorded, when set, with every checkpoint and result (slim.format.checkpoint.versions): two runs that
# differ only in them are told apart.
NUMERICS_ENV = (
    "SLIM_NATIVE",  # 0: no C++ kernels (the CPU backend's own GEMV, the compressor's error-feedback loop)
    "SLIM_CPU_VNNI",  # 0: slim's CPU kernel built without AVX512-VNNI where the CPU has it (same results, slower)
    "SLIM_CPU_FP32_ACTIVATIONS",  # cpu-int4: auto | 1 | 0, fp32 activations around the int4 kernels
    "SLIM_CPU_INT4_GEMM_TOKENS",  # cpu-int4: token count from which torch's int4 GEMM replaces slim's GEMV
    "SLIM_CPU_SPARSE24",  # cpu-int4: 0 runs 2:4 layers as dense int4
    "SLIM_CPU_FUSE",  # cpu-int4: 0 keeps q/k/v and gate/up as separate calls
    "TRITON_INTERPRET",  # 1: the Triton kernels run in the interpreter (CPU)
)


def numerics_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The NUMERICS_ENV variables that are set, by name (empty when none is: the defaults)."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in NUMERICS_ENV if k in env}

# the adapter fits' top-r SVD (adapter.svd): exact, randomized subspace iteration, or randomized from 1024 wide
SVD_CHOICES = ("auto", "exact", "randomized")
