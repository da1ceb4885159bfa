"""slim's own CPU kernels (csrc/int4_gemv.cpp, and csrc/optq.cpp for the compressor's error-feedback loop),
compiled on first use with torch's C++ extension builder.

Optional: it needs a C++ compiler, `ninja` and an x86-64 CPU with AVX2 + FMA; without them (or with
SLIM_NATIVE=0) the cpu-int4 backend uses PyTorch's int4 kernel alone and the error-feedback loop runs in
Python. The build is cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and takes
about a minute once.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

# the build's name: change it with the sources' interface. The torch version is part of it: torch's extension cache
# is keyed by name (and CUDA tag) only, and a build against another torch fails to load (undefined symbols)
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# AVX512-VNNI (one `vpdpbusd` for a `maddubs` + `madd` pair, exact either way) where the CPU has it; SLIM_CPU_VNNI=0
# builds the AVX2 instructions only. A separate build name: a cached VNNI build never loads on a CPU without it
VNNI = os.environ.get("SLIM_CPU_VNNI", "1") != "0" and set(VNNI_FLAGS) <= _cpu_flags()
NAME = ("slim_int4_gemv_v30_torch" + "".join(c if c.isalnum() else "_" for c in torch.__version__)
        + ("_vnni" if VNNI else ""))
SOURCE = Path(__file__).parent / "csrc" / "int4_gemv.cpp"
SOURCES = (SOURCE, SOURCE.with_name("decoder.cpp"), SOURCE.with_name("optq.cpp"))
HEADERS = (SOURCE.with_name("linears.h"),)  # not hashed by torch's build cache: change NAME with them


def unavailable_reason() -> str | None:
    if os.environ.get("SLIM_NATIVE", "1") == "0":
        return "disabled by SLIM_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs x86-64, this is {platform.machine()}"
    cap = torch.backends.cpu.get_cpu_capability()
    if not cap.startswith("AVX2") and not cap.startswith("AVX512"):
        return f"needs AVX2 (torch reports {cap})"
    missing = [str(p) for p in SOURCES if not p.is_file()]
    if missing:
        return f"kernel source {missing[0]} is missing"
    return None


def build_dir() -> Path | None:
    """Where torch caches the built kernel (TORCH_EXTENSIONS_DIR, else its default), or None if unknown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: guarded

        return Path(_get_build_directory(NAME, verbose=False))
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def load() -> ModuleType | None:
    """The compiled kernel module, or None (logged once) when it cannot be built here."""
    why = unavailable_reason()
    if why is not None:
        log.info("slim's CPU kernel is off: %s", why)
        return None
    try:
        from torch.utils.cpp_extension import load as build

        from ..phases import phase

        where = build_dir()
        fresh = where is None or not any(where.glob("*.so"))
        if fresh:  # a first run on this machine is otherwise silent for a minute or more
            log.warning("building slim's CPU kernel (once per machine, about a minute on 2 cores; cached in %s)",
                        where or "torch's extension cache")
        t0 = time.perf_counter()
        with phase("build-kernel", once=True):
            mod = build(name=NAME, sources=[str(p) for p in SOURCES],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *(
                            ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"]
                            if VNNI else [])],
                        extra_ldflags=["-fopenmp"], verbose=False)
        (log.warning if fresh else log.info)("slim's CPU kernel ready (%.1f s)", time.perf_counter() - t0)
        return mod
    except Exception as e:  # no compiler, no ninja, build error: fall back, say why
        log.warning("slim's CPU kernel could not be built (%s); using PyTorch's int4 kernel only, and the "
                    "compressor's error-feedback loop in Python (slower)",
                    str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return None
