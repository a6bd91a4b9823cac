"""The benchmarks run at CI size and print their tables (their figures are recorded in bench/RESULTS.md)."""
from __future__ import annotations

import json
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


def _bench(name: str, monkeypatch):
    """A benchmark script's module, imported as the script imports its neighbours (bench/ first on the path)."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module(name)


# The render and transformer benchmarks run in this process (their own main(), one torch thread): a subprocess
# would spend most of its time importing torch and diffusers again.
def test_render_bench_prints_its_table(monkeypatch, capsys, one_thread):
    _bench("render", monkeypatch).main(["--points", "20000", "--frames", "3", "--height", "48", "--width", "64",
                                        "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "render_points" in out and "numpy" in out.lower() and "|" in out


def test_transformer_bench_tiny_case(monkeypatch, capsys, one_thread):
    _bench("transformer", monkeypatch).main(["--size", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "FLOPs / forward" in out and "FLOP/s" in out


@pytest.mark.slow
def test_step_bench_ci_size(tmp_path):
    out = _run("bench/step.py", "--tiny", "--repeats", "1")
    assert "| eager | 0 |" in out and "| onnxruntime | 8 |" in out
    # The FLOP formula's check against the Wan2.1-14B figures (1.49 and 2.46 PFLOP) is printed on every run.
    assert "1.49 PFLOP at 30240 tokens, 2.46 PFLOP with 8 refs at 41760 tokens" in out


@pytest.mark.slow
def test_loading_bench_keeps_peak_memory_below_model_plus_one_shard(monkeypatch, capsys):
    """A bf16 camera-style file over a 160 MB float32 base in 6 shards, loaded in a fresh process: the growth of its
    peak resident memory stays below the model plus one shard plus 15 % (the release's way is not measured here;
    both are in bench/RESULTS.md at a few hundred MB)."""
    report = _bench("loading", monkeypatch).main(["--width", "512", "--layers", "8", "--shard-mb", "32",
                                                  "--skip-release"])
    out = capsys.readouterr().out
    assert "| load_transformer (meta, tensor by tensor) |" in out and "machine :" in out
    assert report["sizes"]["shards"] >= 4
    assert report["results"]["engine"]["growth"] < 1.15 * report["bound"]


# ---------------------------------------------------------------------------- the prepared GPU run
def test_gpu_check_says_nothing_was_measured_without_a_gpu():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if not torch_cuda():
        assert "Nothing was measured" in done.stdout and "clip-group" in done.stdout
        assert not (REPO / "bench" / "gpu_results").exists() or not any((REPO / "bench" / "gpu_results").iterdir())


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def gpu_check_on_cpu(monkeypatch, tiny_packages):
    """bench/gpu_check.py's sections at a tiny size on the CPU (the same code the GPU run executes)."""
    import torch

    gpu_check = _bench("gpu_check", monkeypatch)
    from engine.models.components import load_components
    from engine.models.loading import build_transformer, tiny_transformer_config
    from engine.offload import Placement

    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "DTYPE", "float32")
    for name, value in (("FRAMES", 3), ("HEIGHT", 64), ("WIDTH", 64), ("REFS", 2), ("TEXT_TOKENS", 16)):
        monkeypatch.setattr(gpu_check, name, value)
    monkeypatch.setattr(gpu_check, "_sync", lambda: None)
    monkeypatch.setattr(gpu_check, "matmul_rate", lambda *a, **k: 1e11)
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)

    def tiny_transformer(seed=0):
        cfg, base = tiny_transformer_config(gpu_check.VARIANT)
        return build_transformer(cfg, base, seed=seed), cfg, base

    package = tiny_packages[gpu_check.VARIANT]
    monkeypatch.setattr(gpu_check, "full_transformer", tiny_transformer)
    monkeypatch.setattr(gpu_check, "full_components",
                        lambda offload: load_components(package / "base_model", Placement(offload, "cpu")))
    return gpu_check


def test_gpu_check_sections_run_end_to_end_at_a_tiny_size(gpu_check_on_cpu, tmp_path, monkeypatch):
    gc = gpu_check_on_cpu
    monkeypatch.setattr(gc.tempfile, "gettempdir", lambda: str(tmp_path))
    results = {"date": "today", "device": "cpu", "sections": {}}
    for name in ("forward", "clip-none", "clip-group"):
        out = {}
        gc.SECTION_RUNNERS[name](out)
        results["sections"][name] = {**out, "status": "done"}
    fwd = results["sections"]["forward"]
    assert set(fwd) >= {"refs_0", "refs_2"} and fwd["refs_2"]["pflop"] > fwd["refs_0"]["pflop"] > 0
    none, group = results["sections"]["clip-none"], results["sections"]["clip-group"]
    assert set(none["cold"]["stages_s"]) == {"encode_prompt", "encode_image", "prepare_conditions", "denoise_4_steps",
                                             "decode"}
    assert "warm" in none and group["max_latent_difference_from_none"] < 1e-5
    page = gc.markdown(results)
    assert "| none |" in page and "| group |" in page and "| eager | 0 |" in page


def _torch_names(path: Path) -> set:
    """The ``torch.a.b`` names a file reads (through ``import torch``, ``import torch.x as y``, ``from torch...``)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases, names = {"torch": "torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "torch"})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update(f"{node.module}.{a.name}" for a in node.names)
    for node in ast.walk(tree):
        chain, inner = [], node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if chain and isinstance(inner, ast.Name) and inner.id in aliases:
            names.add(".".join([aliases[inner.id], *reversed(chain)]))
    return {n.split(".", 1)[1] for n in names if "." in n and n != "torch.__version__"}


def _resolve_torch_name(name: str):
    """``torch.<name>`` looked up in the installed torch, importing submodules on the way as Python would."""
    import importlib

    import torch

    obj, path = torch, "torch"
    for part in name.split("."):
        path = f"{path}.{part}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(path)  # a submodule not imported by ``import torch``
    return obj


def test_every_torch_name_the_engine_and_the_gpu_run_use_exists_in_torch():
    """Each ``torch.*`` name read by the engine and the GPU run resolves in the torch that is installed (the real
    module, not a list typed by hand): a misspelt or removed name fails here, not on the GPU machine. (The GPU
    machines' own torch is checked by bench/gpu_check.sh when it runs there.)"""
    files = sorted((REPO / "engine").rglob("*.py")) + [REPO / "bench" / f for f in
                                                         ("gpu_check.py", "transformer.py", "flops.py", "render.py")]
    used = {name: f.relative_to(REPO) for f in files for name in _torch_names(f)}
    missing = []
    for name in sorted(used):
        try:
            _resolve_torch_name(name)
        except (AttributeError, ImportError):
            missing.append(f"torch.{name} ({used[name]})")
    assert not missing, "torch names that do not exist: " + ", ".join(missing)
    assert _torch_names(REPO / "bench" / "gpu_check.py") >= {"cuda.synchronize", "cuda.max_memory_allocated"}
    with pytest.raises((AttributeError, ImportError)):  # the lookup can fail: a name torch does not have
        _resolve_torch_name("cuda.no_such_function")


def test_gpu_check_records_failed_and_timed_out_sections(gpu_check_on_cpu, tmp_path, monkeypatch):
    gc = gpu_check_on_cpu
    monkeypatch.setattr(gc, "RESULTS", tmp_path / "gpu_results")
    monkeypatch.setattr(gc, "cuda_available", lambda: (True, "Test Device 80GB"))
    assert gc.main(["--only", "env"]) == 0  # its own process has no CUDA: the section fails, and says why
    monkeypatch.setattr(gc, "SECTIONS", (("env", 1, "too short to start"), ("tests", 100, "never reached")))
    monkeypatch.setattr(gc, "DEADLINE_S", 21)
    assert gc.main([]) == 0
    [result] = (tmp_path / "gpu_results").glob("*-test-device-80gb.json")
    sections = json.loads(result.read_text())["sections"]
    assert sections["env"]["status"].startswith("stopped after 1 s")
    assert sections["tests"]["status"].startswith("not run")
    assert "| env | stopped after 1 s" in result.with_suffix(".md").read_text()


def test_loop_bench_reads_stage_numbers_and_prints_its_tables(monkeypatch):
    """bench/loop.py: the stage seconds of a clip record are its numbers only (a timeline or a flag is left out); a
    run at the real size (1 clip of 3 frames, the scene part skipped) prints the machine, the size and every stage."""
    loop = _bench("loop", monkeypatch)
    record = {"seconds": {"render": 0.5, "write": 2, "timeline": [["render", 0.0, 0.5]], "overlapped": True,
                          "steps": {"fuse": 1.0}}}
    assert loop.stage_seconds(record) == {"render": 0.5, "write": 2.0}
    assert loop.stage_seconds({}) == {}
    runs = [{"clips": [{"render": 1.0, "write": 3.0}, {"render": 2.0}], "export": 0.5},
            {"clips": [{"render": 4.0, "write": 1.0}], "export": 1.5}]
    assert loop.stage_medians(runs) == {"render": 2.0, "write": 2.0, "export": 1.0}
    out = _run("bench/loop.py", "--repeats", "1", "--clips", "1", "--frames", "3", "--skip-scene")
    assert "cores usable" in out and "load average" in out and "480x768, 3 frames" in out
    for stage in ("render", "retrieve", "generate", "fuse", "write", "export", "total"):
        assert f"| {stage} | " in out
