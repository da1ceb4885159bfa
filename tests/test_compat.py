"""slim 0.1's module paths keep working for a release: each imports as its new module, with a DeprecationWarning
that names where it went."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slim
from slim._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    if old == "slim.runtime.triton_kernels":
        pytest.importorskip("triton")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(MOVED[old]) or old == "slim.checkpoint"


def test_names_that_moved_out_of_their_module_still_resolve():
    sys.modules.pop("slim.checkpoint", None)
    with pytest.warns(DeprecationWarning):
        from slim.checkpoint import load, save
    from slim.format.checkpoint import save as new_save
    from slim.runtime.loader import load as new_load

    assert load is new_load and save is new_save and slim.load is new_load


def test_a_package_that_replaced_a_module_forwards_its_names():
    import slim.pipeline

    slim.pipeline.__dict__.pop("compress_model", None)
    with pytest.warns(DeprecationWarning, match="slim.pipeline.loop.compress_model"):
        from slim.pipeline import compress_model
    from slim.pipeline.loop import compress_model as new

    assert compress_model is new
    with pytest.raises(AttributeError):
        slim.pipeline.no_such_name  # noqa: B018


def test_new_paths_import_without_warnings():
    """In a fresh interpreter (re-importing here would make second copies of the classes other tests hold)."""
    news = sorted(set(MOVED.values()) - {"slim.kernels.triton"})
    code = "import importlib, warnings\nwarnings.simplefilter('error', DeprecationWarning)\n" + "".join(
        f"importlib.import_module({n!r})\n" for n in news)
    env = {**os.environ, "PYTHONPATH": str(Path(slim.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
