"""The project's mutation check (``.ci/mutants.py``) in the suite: every planted bug is caught by the tests named
for it, and the check says which test caught each."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutants():
    spec = importlib.util.spec_from_file_location("mutants", REPO / ".ci" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_names_its_bug_and_existing_tests(mutants):
    assert len(mutants.MUTANTS) >= 8
    for name, plant in mutants.MUTANTS.items():
        doc = (plant.__doc__ or "").strip()
        assert doc and "\n" not in doc and doc.endswith("."), f"{name}: a one-line docstring says which bug it mimics"
        assert mutants.KILLERS[name], name
        for killer in mutants.KILLERS[name]:
            path, test = killer.split("::")
            test = test.split("[")[0]
            tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
            assert test in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{name}: no {killer}"


@pytest.mark.slow  # one pytest process per mutant
def test_every_mutant_is_killed(mutants, capsys):
    rc = mutants.main([])
    report = capsys.readouterr().out
    print(report)  # which test killed each mutant, shown with -rA or on failure
    assert rc == 0, report
    assert report.count("killed    ") == len(mutants.MUTANTS)
