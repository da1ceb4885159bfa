"""Old module paths (slim 0.1's flat layout) keep importing, with a DeprecationWarning naming the new path.

Why: scripts written against `slim.checkpoint`, `slim.packed`, `slim.quant` ... should keep running for a release
while they move to the sub-packages. An old path is an alias of the new module (the same object), except where
a name moved to another module (`slim.checkpoint.load` -> `slim.runtime.loader.load`): those aliases are a thin
module that forwards every attribute. The old paths go in slim 0.3.
May import: nothing from slim (it resolves names by string, on first use).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {  # old module -> new module
    "slim.affine": "slim.algorithms.affine",
    "slim.baselines": "slim.algorithms.baselines",
    "slim.lowrank": "slim.algorithms.lowrank",
    "slim.methods": "slim.algorithms.methods",
    "slim.optq": "slim.algorithms.optq",
    "slim.prune": "slim.algorithms.prune",
    "slim.quant": "slim.algorithms.quant",
    "slim.stats": "slim.algorithms.stats",
    "slim.capture": "slim.pipeline.capture",
    "slim.dist": "slim.pipeline.dist",
    "slim.solver": "slim.pipeline.solver",
    "slim.stream": "slim.pipeline.stream",
    "slim.tune": "slim.pipeline.tune",
    "slim.report": "slim.pipeline.report",
    "slim.packed": "slim.format.packed",
    "slim.card": "slim.format.card",
    "slim.checkpoint": "slim.format.checkpoint",
    "slim.finetune": "slim.train.finetune",
    "slim.evaluate": "slim.eval.perplexity",
    "slim.zeroshot": "slim.eval.zeroshot",
    "slim.generate": "slim.runtime.generate",
    "slim.runtime.native": "slim.kernels.native",
    "slim.runtime.ops": "slim.kernels.ops",
    "slim.runtime.triton_kernels": "slim.kernels.triton",
    "slim.runtime.random": "slim.testing.random_layers",
}
# names that left their module's new home for another module: (old module, name) -> new module
MOVED_NAMES = {
    ("slim.checkpoint", "load"): "slim.runtime.loader",
}
# old modules whose path is now a package: their names resolve through the package's __getattr__ (see below)
PACKAGE_NAMES = {
    "slim.pipeline": "slim.pipeline.loop",
    "slim.export": "slim.export.formats",
    "slim.cli": "slim.cli.commands",
}


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes in slim 0.3)", DeprecationWarning,
                  stacklevel=stacklevel)


class _Forward(ModuleType):
    """An old path whose names now live in two modules: every attribute is looked up where it went."""

    def __init__(self, old: str) -> None:
        super().__init__(old)
        self.__dict__["_old"] = old

    def __getattr__(self, name: str) -> Any:
        old = self.__dict__["_old"]
        target = MOVED_NAMES.get((old, name), MOVED[old])
        return getattr(importlib.import_module(target), name)

    def __dir__(self) -> list[str]:
        old = self.__dict__["_old"]
        names = set(dir(importlib.import_module(MOVED[old])))
        return sorted(names | {n for (o, n) in MOVED_NAMES if o == old})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to its new module on import."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, MOVED[spec.name])
        if any(o == spec.name for (o, _) in MOVED_NAMES):
            return _Forward(spec.name)
        return _Alias(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        if isinstance(module, _Alias):  # the alias becomes the new module itself
            sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


class _Alias(ModuleType):
    """Placeholder replaced in sys.modules by the new module once the import machinery is done with it."""


def package_getattr(package: str, name: str) -> Any:
    """`slim.pipeline.compress_model` and the like, for a package that replaced a module of the same name."""
    target = PACKAGE_NAMES[package]
    module = importlib.import_module(target)
    if not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{target}.{name}", stacklevel=4)
    value = getattr(module, name)
    setattr(sys.modules[package], name, value)  # warned once; later lookups are plain attributes
    return value


def install() -> None:
    """Put the finder ahead of the path finders (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
