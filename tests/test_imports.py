"""The import graph of the `tilemesh` package, read statically from the source (every import statement,
including the lazy ones inside functions): it has no cycle, and `tilemesh.runtime`, which browsers load
inside the runtime zip, imports nothing of tilemesh outside itself and nothing but the standard library and
numpy."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tilemesh"


def module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PKG) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str], module_level_only: bool = False) -> dict[str, int]:
    """Every module an import statement in `path` names -> the first line naming it (with `module_level_only`,
    only statements outside function bodies). `from pkg import x` counts as importing the module `pkg.x`
    when that is a module, else `pkg`."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                    for n in ast.walk(f)} if module_level_only else set()
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in in_functions:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in known else mod)
        for t in targets:
            out.setdefault(t, node.lineno)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    mods = modules()
    known = set(mods)
    return {m: {t: line for t, line in imports_of(m, p, known).items() if t in known and t != m}
            for m, p in mods.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in graph:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycle_among_tilemesh_modules():
    graph = import_graph()
    assert len(graph) > 30 and "tilemesh.server.app" in graph  # the walk sees the package
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
        pytest.fail("import cycle:\n  " + "\n  ".join(steps))


def test_the_cycle_finder_finds_lazy_and_relative_cycles(tmp_path):
    """The check itself can fail: a cycle closed by a lazy import inside a function is reported."""
    pkg = tmp_path / "tilemesh"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from tilemesh.sub.c import g\n")
    (pkg / "sub" / "c.py").write_text("import os\n\ndef g():\n    import tilemesh.sub.a\n")
    mods = modules(pkg)
    graph = {m: {t: 1 for t in imports_of(m, p, set(mods)) if t in mods and t != m} for m, p in mods.items()}
    assert find_cycle(graph) == ["tilemesh.sub.a", "tilemesh.sub.b", "tilemesh.sub.c", "tilemesh.sub.a"]
    (pkg / "sub" / "c.py").write_text("import os\n")
    graph = {m: {t: 1 for t in imports_of(m, p, set(mods)) if t in mods and t != m} for m, p in mods.items()}
    assert find_cycle(graph) is None


def test_runtime_imports_only_itself_the_standard_library_and_numpy():
    """`tilemesh/runtime` is what browsers load (inside the runtime zip, beside an import-free
    `tilemesh/__init__.py`): nothing of the server, planner or models. At module level it imports only the
    standard library and numpy; scipy (BLAS, loaded by the worker too) and the optional engines (onnxruntime,
    Pyodide's `js`) only inside the functions that use them."""
    mods = modules()
    known = set(mods)
    in_functions = {"scipy", "onnxruntime", "onnx", "js", "pyodide"}
    bad = []
    for m, p in mods.items():
        if not (m == "tilemesh" or m.startswith("tilemesh.runtime")):
            continue
        top_level = imports_of(m, p, known, module_level_only=True)
        for target, line in imports_of(m, p, known).items():
            top = target.split(".")[0]
            if target.startswith("tilemesh"):
                # `tilemesh` itself is the import-free __init__ the zip carries beside runtime/.
                if not (target == "tilemesh" or target.startswith("tilemesh.runtime")):
                    bad.append(f"{m}:{line} imports {target}")
            elif top in sys.stdlib_module_names or top in ("numpy", "__future__"):
                continue
            elif top not in in_functions or target in top_level:
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "\n".join(bad)
    assert set(imports_of("tilemesh", PKG / "__init__.py", known)) <= {"__future__"}, \
        "tilemesh/__init__.py travels in the runtime zip and must import nothing"
