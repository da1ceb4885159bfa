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
    assert {"slim", "slim.api", "slim.format.checkpoint", "slim.pipeline.stream"} <= graph.keys()
    # the reader sees the package's imports at all (the root's public names load lazily, by name)
    assert "slim._version" in graph["slim"] and "slim.format.packed" in graph["slim.format.checkpoint"]
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


# --- layers: each sub-package (and top-level module) declares in its docstring what it may import ------------------

LEAVES = ("slim._version", "slim._compat", "slim.names", "slim.phases", "slim.testing.faults")


def group_of(module: str, files: dict[str, Path]) -> str:
    """The unit that declares its imports: a sub-package (`slim.format`), a top-level module, or a leaf module."""
    if module in LEAVES:
        return module
    parts = module.split(".")
    if len(parts) >= 2 and files.get(".".join(parts[:2]), Path()).name == "__init__.py":
        return ".".join(parts[:2])
    return module


def declared(group: str, files: dict[str, Path]) -> set[str] | None:
    """The groups a unit's docstring allows after 'May import:' (None: anything in slim)."""
    doc = ast.get_docstring(ast.parse(files[group].read_text())) or ""
    assert "May import:" in doc, f"{group}'s docstring does not say what it may import ('May import: ...')"
    line = " ".join(doc.split("May import:", 1)[1].split("\n\n")[0].split())
    if line.startswith("anything in slim"):
        return None
    if line.startswith("nothing from slim"):
        return set()
    allowed = set(LEAVES) if "leaves" in line else set()
    for word in line.replace(",", " ").replace("(", " ").replace(")", " ").split():
        word = word.rstrip(".")
        if word.startswith("slim.") and word in files:
            allowed.add(group_of(word, files))
    return allowed


def layer_violations(pkg_dir: Path) -> list[str]:
    files = module_files(pkg_dir)
    graph = import_graph(pkg_dir)
    bad = []
    for mod, deps in sorted(graph.items()):
        g = group_of(mod, files)
        allowed = declared(g, files)
        for dep in sorted(deps):
            h = group_of(dep, files)
            if h != g and allowed is not None and h not in allowed:
                bad.append(f"{mod} imports {dep}, but {g} may import only {sorted(allowed)}")
    return bad


def test_each_sub_package_imports_only_what_its_docstring_allows():
    pkg = _package_dir()
    files = module_files(pkg)
    groups = {group_of(m, files) for m in files}
    assert {"slim.algorithms", "slim.format", "slim.runtime", "slim.pipeline", "slim.kernels", "slim.cli"} <= groups
    assert not layer_violations(pkg), "\n".join(layer_violations(pkg))
    # the declared layers point one way: no two units may import each other, even through others
    decl = {g: (declared(g, files) or set()) - {g} for g in groups if declared(g, files) is not None}
    decl = {g: {h for h in d if h in decl} for g, d in decl.items()}
    assert not cycles(decl), cycles(decl)


def test_the_layer_check_fails_on_an_undeclared_import(tmp_path):
    pkg = tmp_path / "slim"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text('"""Root.\n\nMay import: anything in slim.\n"""\n')
    (pkg / "low" / "__init__.py").write_text('"""Low.\n\nMay import: nothing from slim.\n"""\n')
    (pkg / "high" / "__init__.py").write_text('"""High.\n\nMay import: slim.low.\n"""\n')
    (pkg / "high" / "a.py").write_text("from ..low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from ..high import a\n")
    assert layer_violations(pkg) == ["slim.low.b imports slim.high, but slim.low may import only []",
                                     "slim.low.b imports slim.high.a, but slim.low may import only []"]
    (pkg / "low" / "b.py").write_text("")
    assert layer_violations(pkg) == []
