"""The benchmarks run at CI size and print their tables (their figures are recorded in bench/RESULTS.md)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_render_bench_prints_its_table():
    out = _run("bench/render.py", "--points", "20000", "--frames", "3", "--height", "48", "--width", "64",
               "--repeats", "1")
    assert "render_points" in out and "numpy" in out.lower() and "|" in out


def test_transformer_bench_tiny_case():
    out = _run("bench/transformer.py", "--size", "tiny", "--repeats", "1")
    assert "FLOPs / forward" in out and "FLOP/s" in out


@pytest.mark.slow
def test_step_bench_ci_size(tmp_path):
    out = _run("bench/step.py", "--tiny", "--repeats", "1")
    assert "| eager | 0 |" in out and "| onnxruntime | 8 |" in out
    # The FLOP formula's check against the Wan2.1-14B figures (1.49 and 2.46 PFLOP) is printed on every run.
    assert "1.49 PFLOP at 30240 tokens, 2.46 PFLOP with 8 refs at 41760 tokens" in out
