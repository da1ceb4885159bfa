"""The `slim` command line: argument parsing (torch-free, so `--help` answers fast) and one function per command.

Commands print; the library underneath logs. See docs/cli.md (generated from this parser).
May import: anything in slim.
"""

from __future__ import annotations

from typing import Any

from .commands import main

__all__ = ["main"]


def __getattr__(name: str) -> Any:  # slim 0.1's names of the module this package replaced, with a warning
    from .._compat import package_getattr

    return package_getattr(__name__, name)
