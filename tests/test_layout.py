"""
The package's shape: no import cycle between its modules (every import
counts, including those inside functions and under TYPE_CHECKING), and
modules grouped by concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kumoauth"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from pkg import submodule" imports the submodule.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_are_grouped_by_concern():
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"}
    # Cross-cutting modules only at the top; everything else in a concern.
    assert top <= {
        "__init__.py",
        "checks.py",
        "config.py",
        "meta.py",
        "policy.py",
        "tap.py",
        "testing.py",
        "textsafe.py",
        "stamps.py",
        "moved.py",  # 0.1's module names: the package's own namespace
    }
    for concern in ("smtp", "auth", "backends", "storage", "tls", "ops", "cli", "relay", "stores"):
        assert (PACKAGE / concern / "__init__.py").is_file()


def test_setup_cfg_installs_every_package():
    """A package missing from setup.cfg works editable and breaks `pip install .`."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(PACKAGE.parent / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, packages - listed
