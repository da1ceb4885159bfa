"""Imports inside the package point one way: no module imports, directly or through others, a module that imports it.

The graph is read from the source with `ast`: module-level imports and the lazy ones inside functions alike (a lazy
import still closes a loop: it only postpones it), but not those under `if TYPE_CHECKING:` (never run). A submodule's
implicit import of its parent packages is not an edge (every submodule would then import the root); an explicit one
is: `from . import x` imports the package itself as well as `x`, so a module the root imports must not write it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slim


def _package_dir() -> Path:
    here = Path(__file__).resolve().parents[1] / "src" / "slim"
    return here if (here / "__init__.py").is_file() else Path(slim.__file__).resolve().parent


def module_files(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package directory (a package is its __init__)."""
    out = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        parts = [pkg_dir.name, *f.relative_to(pkg_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all nesting levels, skipping the bodies of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    files = module_files(pkg_dir)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            deps.update(t for t in targets if t in files and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each one a set of modules importing in a loop),
    by Tarjan's algorithm without recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def test_the_package_has_no_import_cycle():
    graph = import_graph(_package_dir())
    assert {"slim", "slim.api", "slim.checkpoint", "slim.stream"} <= graph.keys()
    # the reader sees the package's imports at all (the root's public names load lazily, by name)
    assert "slim._version" in graph["slim"] and "slim.packed" in graph["slim.checkpoint"]
    found = cycles(graph)
    assert not found, "import cycles (each: modules that import one another, lazily or not):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_the_reader_counts_lazy_and_package_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import g\n"
                              "else:\n    import os\n\ndef f():\n    from .c import h\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("import p.sub.d\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from .. import c\nfrom ..b import x\n")
    graph = import_graph(pkg)
    assert graph == {"p": {"p.a"}, "p.a": {"p.c"}, "p.b": {"p", "p.a"}, "p.c": {"p.sub.d"},
                     "p.sub": set(), "p.sub.d": {"p", "p.c", "p.b"}}
    # p -> p.a -> (lazily) p.c -> p.sub.d -> p.b -> p, and p.sub.d -> p: one loop through all five
    assert cycles(graph) == [["p", "p.a", "p.b", "p.c", "p.sub.d"]]
    (pkg / "sub" / "d.py").write_text("from .. import c\n")  # p.b imports p, but nothing imports p.b now
    assert cycles(import_graph(pkg)) == [["p", "p.a", "p.c", "p.sub.d"]]
    (pkg / "sub" / "d.py").write_text("from ..c import h\n")  # p.c alone is no loop; p.sub.d -> p.c -> p.sub.d is
    assert cycles(import_graph(pkg)) == [["p.c", "p.sub.d"]]
    (pkg / "sub" / "d.py").write_text("")
    assert cycles(import_graph(pkg)) == []
