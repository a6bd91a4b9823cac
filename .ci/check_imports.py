#!/usr/bin/env python3
"""Fails when the project's modules import one another in a circle, imports inside functions included, when
a room imports what it must not (``engine`` no UI or export code, ``engine.geometry`` no model code), or when
``engine`` names what belongs to the page's views (``VIEWER``: the engine writes the downloadable scene files and
knows nothing of the views the demo makes of them).

A circle hidden behind function-level imports still ties the modules together: neither can be read, tested or
moved without the other. Every ``import`` statement anywhere in a module counts (parsed with ``ast``; nothing is
imported or run). Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``, so they count as imported too,
except the packages the importing module itself lives in.

Usage: ``python .ci/check_imports.py [ROOT]`` (default: this repository). Exit 1 and one line per circle,
forbidden import or viewer name found.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("engine", "demo", "export", "bench")
SCRIPTS = ("app.py",)
# Circles allowed on purpose (each with its reason); none today.
ALLOWED: tuple[frozenset, ...] = ()
# Rooms and what they never import (module-name prefixes).
FORBIDDEN = {
    "engine": ("demo", "export", "bench", "app"),
    "engine.geometry": ("engine.models", "engine.runtime", "engine.pipeline", "engine.sampling", "engine.depth",
                        "engine.offload", "engine.distributed"),
}
# The page's views of a scene: every name this module defines at its top level stays out of ``engine`` (which
# imports no demo module anyway: FORBIDDEN).
VIEWER = "demo/viewer.py"


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project (packages by their ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in SCRIPTS:
        if (root / script).is_file():
            modules[Path(script).stem] = root / script
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from pkg import mod`` imports the module pkg.mod when there is one
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    own = set(_ancestors(name)) | ({name} if is_package else set())
    found = set()
    for target in targets:
        while target and target not in modules:  # ``import a.b.func``-like names: the module that holds them
            target = target.rpartition(".")[0]
        if target:
            found.update(m for m in _ancestors(target) + [target] if m in modules and m not in own)
    found.discard(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted, in sorted order."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, imported)`` pairs that break a rule of ``FORBIDDEN``."""
    return sorted((m, t) for m, targets in graph.items() for room, banned in FORBIDDEN.items() if _within(m, room)
                  for t in targets if any(_within(t, b) for b in banned))


def _defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assigned names)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def _used_names(path: Path) -> set[str]:
    """Every identifier a module's code names: variables, attributes, definitions, imports, arguments."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).rpartition(".")[2])
        elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
            names.add(node.arg)
    return names


def viewer_names_in_engine(root: Path) -> list[tuple[str, str]]:
    """``(engine module, name)`` pairs where ``engine`` names something ``VIEWER`` defines."""
    viewer = root / VIEWER
    if not viewer.is_file():
        return []
    banned = _defined_names(viewer)
    return sorted((name, used) for name, path in project_modules(root).items() if _within(name, "engine")
                  for used in _used_names(path) & banned)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    graph = import_graph(root)
    found = [c for c in cycles(graph) if frozenset(c) not in ALLOWED]
    for group in found:
        print("import cycle: " + " -> ".join(group + group[:1]))
    banned = forbidden_imports(graph)
    for module, target in banned:
        print(f"forbidden import: {module} imports {target}")
    viewer = viewer_names_in_engine(root)
    for module, name in viewer:
        print(f"viewer name in the engine: {module} names {name} ({VIEWER})")
    return 1 if found or banned or viewer else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
