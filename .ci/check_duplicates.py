#!/usr/bin/env python3
"""Fails when the body of a function of six or more lines stands in two modules of the project.

Two copies of one piece of logic drift apart; the second module should import the first's function. Bodies are
compared as syntax trees (``ast``; docstrings, comments and layout do not count, names and values do), methods
and nested functions included. A deliberate repetition says why in a comment inside each copy (or on the line
above its ``def``) that contains ``repeated on purpose:``, followed by the reason.

Usage: ``python .ci/check_duplicates.py [ROOT]`` (default: this repository). Exit 1 and one line per repeated body.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

FOLDERS = ("engine", "demo", "export", "bench", "tests", ".ci")
SCRIPTS = ("app.py",)
MIN_LINES = 6
MARKER = "repeated on purpose:"


def project_files(root: Path) -> list[Path]:
    files = [p for folder in FOLDERS for p in sorted((root / folder).rglob("*.py"))]
    return files + [root / s for s in SCRIPTS if (root / s).is_file()]


def function_bodies(path: Path):
    """``(key, name, line, marked)`` of every function whose body (without its docstring) spans MIN_LINES lines."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        if not body or body[-1].end_lineno - body[0].lineno + 1 < MIN_LINES:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        marked = any(MARKER in line for line in lines[max(first - 2, 0) : node.end_lineno])
        key = "\n".join(ast.dump(stmt, include_attributes=False) for stmt in body)
        yield key, node.name, node.lineno, marked


def repeated_bodies(root: Path) -> list[list[tuple[str, str, int]]]:
    """Groups of functions in two or more files with the same body, not every copy saying why."""
    groups = defaultdict(list)
    for path in project_files(root):
        for key, name, line, marked in function_bodies(path):
            groups[key].append((path.relative_to(root).as_posix(), name, line, marked))
    out = []
    for members in groups.values():
        if len({m[0] for m in members}) > 1 and not all(m[3] for m in members):
            out.append(sorted(m[:3] for m in members))
    return sorted(out)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    found = repeated_bodies(root)
    for group in found:
        print("repeated function body: " + " = ".join(f"{f}:{line} {name}" for f, name, line in group))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
