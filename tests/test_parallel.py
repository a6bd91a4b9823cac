"""More than one GPU, checked on a CPU with two processes over gloo.

The multi-process runs import ``tests/cpu_parallel/sitecustomize.py`` (on their PYTHONPATH): two test-only shims that
let diffusers' context parallelism build its device mesh without an accelerator. Everything else is the engine as a
GPU machine runs it: torchrun, the process group, rank 0 sending every forward's inputs, the sequence-parallel plan.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, tiny_clip_inputs

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SHIMS = REPO / "tests" / "cpu_parallel"
PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
LAUNCH_TIMEOUT_S = 600


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WORLDSTEREO_TEST_FAULT_RANK"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(SHIMS), str(REPO)]), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args, cwd: Path, logs: Path, **env) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` with each rank's stdout/stderr kept in ``logs``."""
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "3", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _rank_logs(logs: Path) -> dict:
    """{rank: stdout + stderr} of the (single) torchrun attempt under ``logs``."""
    out = {}
    for rank_dir in logs.glob("*/attempt_0/*"):
        out[int(rank_dir.name)] = "".join((rank_dir / name).read_text(errors="replace")
                                          for name in ("stdout.log", "stderr.log"))
    assert sorted(out) == [0, 1], out
    return out


def _generate_args(examples: Path, out: str) -> list:
    return ["-m", "engine", "generate", "--engine", "tiny-random", "--image", str(examples / PHOTO),
            "--trajectories", "up", "--frames", "5", "--out", out]


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_two_way_ulysses_gives_the_one_process_transformer_output(tmp_path):
    result = tmp_path / "diffs.json"
    run = _torchrun([str(REPO / "tests" / "parallel_model_check.py"), str(result)], tmp_path, tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    diffs = json.loads(result.read_text())
    for case in ("camera", "memory", "memory-update-ref", "memory-cfg-batch", "after-refusal"):
        assert diffs[case] <= 1e-5, (case, diffs[case])
    # 45 target / 15 reference tokens do not split in two equal shares: refused alike on both ranks, in one sentence
    assert diffs["refused"] and diffs["refused"].count(". ") == 0 and "2 ranks cannot share equally" in diffs["refused"]
    assert diffs["threads_left"] <= 0  # the groups' threads ended before interpreter shutdown (stop_group's notes)


def test_torchrun_generate_writes_the_single_process_clip_from_rank_0_only(tmp_path, examples, monkeypatch,
                                                                          one_thread):
    from engine import cli, generators

    cache = {"WORLDSTEREO_CACHE": os.environ.get("WORLDSTEREO_CACHE", str(tmp_path / "cache"))}
    monkeypatch.setenv("WORLDSTEREO_CACHE", cache["WORLDSTEREO_CACHE"])
    # The one-process clip: `python -m engine generate` run in this process (one thread, as each rank), with a
    # pipeline of its own: one an earlier test left resident is let go before and after.
    generators.resident_for("cpu").release()
    try:
        assert cli.main(_generate_args(examples, str(tmp_path / "single"))[2:]) == 0
    finally:
        generators.resident_for("cpu").release()
    before, cached = set(os.listdir(tmp_path)), _files(Path(cache["WORLDSTEREO_CACHE"]))
    run = _torchrun(_generate_args(examples, "sp"), tmp_path, tmp_path / "logs", **cache)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = _rank_logs(tmp_path / "logs")
    assert "Done in" in logs[0] and "denoising step" in logs[0]  # rank 0 prints progress and the summary
    assert logs[1] == ""  # the other rank prints nothing ...
    assert set(os.listdir(tmp_path)) - before == {"sp", "logs"}  # ... and writes nothing besides rank 0's job folder
    assert _files(Path(cache["WORLDSTEREO_CACHE"])) == cached  # (the tiny package was written by the first run)
    assert _files(tmp_path / "sp") == _files(tmp_path / "single")

    # The generated frames as written before video encoding (the memory bank keeps every target frame of a 5-frame
    # clip as PNG): equal up to the last bit's rounding.
    pngs = sorted((tmp_path / "single" / "clips" / "00_up" / "memory" / "images").glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        a = np.asarray(Image.open(png), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "sp" / png.relative_to(tmp_path / "single")), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, png.name
    # The decoded clip.mp4: H.264 decides its blocks anew when one input pixel rounds the other way, so single pixels
    # may move by several levels; on average the clips agree to well within one level.
    from engine.outputs import read_video

    va = read_video(tmp_path / "single" / "clips" / "00_up" / "clip.mp4")
    vb = read_video(tmp_path / "sp" / "clips" / "00_up" / "clip.mp4")
    assert va.shape == vb.shape and float((va - vb).abs().mean()) <= 1 / 255


def test_a_failure_on_rank_1_ends_both_ranks_with_one_sentence(tmp_path, examples):
    cache = os.environ.get("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    run = _torchrun(_generate_args(examples, "job"), tmp_path, tmp_path / "logs", WORLDSTEREO_CACHE=cache,
                    WORLDSTEREO_TEST_FAULT_RANK="1")
    assert run.returncode != 0  # torchrun ended (no hang) and reports the failure
    logs = _rank_logs(tmp_path / "logs")
    said = [line for text in logs.values() for line in text.splitlines() if line.startswith("error:")]
    assert said == ["error: rank 1 failed (RuntimeError: injected fault in the attention kernel); all ranks stop."]
    assert not any("Traceback" in text for text in logs.values())
    assert not (tmp_path / "job" / "clips").exists()  # the clip was never committed; the scene resumes from its start


def test_an_input_error_on_rank_0_stops_the_other_rank_quietly(tmp_path):
    run = _torchrun(["-m", "engine", "generate", "--engine", "tiny-random", "--image", str(tmp_path / "absent.png"),
                     "--out", "job"], tmp_path, tmp_path / "logs")
    assert run.returncode != 0
    logs = _rank_logs(tmp_path / "logs")
    assert [ln for ln in logs[0].splitlines() if ln.startswith("error:")] == [
        "error: Image file 'absent.png' does not exist; check the path."]
    assert logs[1] == ""


def test_the_app_starts_and_stops_a_group_whose_clip_equals_the_one_process_clip(tmp_path):
    result = tmp_path / "app.json"
    run = subprocess.run([PYTHON, str(REPO / "tests" / "parallel_app_check.py"), str(result)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["backend"] == "sequence-parallel" and got["frames"] == 5
    assert got["frame_max_diff"] <= 1 / 255
    assert got["worker_exit"] == 0
    # Every thread the group started (gloo's among them) has ended before the process does: left to interpreter
    # shutdown, their teardown could abort the process (stop_group's notes).
    assert got["threads_left"] <= 0


def test_app_gpus_without_cuda_is_refused_in_one_sentence(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = [subprocess.Popen([PYTHON, str(REPO / "app.py"), *flags, "--output-dir", str(tmp_path / "out")],
                             cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for flags in (["--gpus", "0,1"], ["--workers-per-gpu", "2"])]  # side by side: each is a torch start-up
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 2
            assert stderr.strip() == "error: --gpus and --workers-per-gpu need CUDA GPUs and this machine has none."
            assert stdout == ""
    finally:
        for run in runs:
            run.kill()  # only one still running after a failure above


def test_one_pipeline_per_device_serves_clips_side_by_side(monkeypatch, one_thread):
    """The throughput mode's pool, with two CPU "devices": two clips at once land on different devices, each
    device loads its own pipeline once, and each clip is the one a plain pipeline makes."""
    from dataclasses import replace

    from engine import generators
    from engine.conditioning import conditions_from_render
    from engine.settings import SceneSettings

    args, refs = tiny_clip_inputs(frames=3, height=48, width=64, seed=1)
    cond = conditions_from_render(args["image"], args["cameras"], args["render"], args["render_mask"], refs,
                                  memory=True)
    loads = []

    tiny = generators.GENERATORS["tiny-random"]

    def load(settings, announce):
        loads.append(settings.device)
        return tiny.make(settings, announce)

    monkeypatch.setitem(generators.GENERATORS, "tiny-random", replace(tiny, make=load))
    monkeypatch.setattr(generators, "_POOL", generators.GpuPool(["cpu", "cpu:0"]))
    pooled = generators.clip_generator(SceneSettings(engine="tiny-random", device="cpu"), lambda _: None)
    assert loads == ["cpu"]  # the first device at once (the scene asks it about memory), the others on first use
    plain = load(SceneSettings(engine="tiny-random", device="cpu"), lambda _: None)
    want = {seed: plain.generate(conditions=cond, prompt="p", seed=seed) for seed in (5, 6)}

    got, started = {}, threading.Barrier(2)

    def clip(seed):
        started.wait()
        got[seed] = pooled.generate(conditions=cond, prompt="p", seed=seed)

    threads = [threading.Thread(target=clip, args=(seed,)) for seed in (5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(pooled._generators) == ["cpu", "cpu:0"] and loads.count("cpu:0") == 1
    for seed in (5, 6):
        assert float((got[seed] - want[seed]).abs().max()) <= 1e-5, float((got[seed] - want[seed]).abs().max())


# ---- refusals of the multi-GPU set-up, each sentence checked against a verdict decided here ------------------------

def test_check_degree_refuses_rank_counts_that_do_not_divide_every_head_count():
    """The released 14B layout: 40 backbone heads and 16 in the camera branch, so 2, 4 or 8 ranks (README)."""
    from accelerate import init_empty_weights

    from engine.models.loading import full_size_transformer_config, tiny_transformer_config
    from engine.models.parallel import ParallelError, check_degree
    from engine.models.transformer import WorldStereoTransformer

    with init_empty_weights():
        model = WorldStereoTransformer.from_checkpoint_config(*full_size_transformer_config("worldstereo-memory-dmd"))
    for degree in range(2, 17):
        if 40 % degree == 0 and 16 % degree == 0:
            check_degree(model, degree)
            continue
        family, heads = ("backbone", 40) if 40 % degree else ("camera branch", 16)
        with pytest.raises(ParallelError) as info:
            check_degree(model, degree)
        assert str(info.value) == (f"{degree} ranks do not divide the {heads} attention heads of the {family}; use "
                                   "one of these rank counts: 2, 4, 8.")
    with init_empty_weights():
        branch = WorldStereoTransformer.from_checkpoint_config(*tiny_transformer_config("worldstereo-memory",
                                                                                         memory_mode="branch"))
    with pytest.raises(ParallelError, match=r"^The paper's branch-form memory .* run it on one GPU\.$"):
        check_degree(branch, 2)


def test_group_settings_are_refused_in_one_sentence(monkeypatch):
    """Inside a sequence-parallel group: a compiled or exported backend, whole-model offload and another device
    are refused; eager, the other offload options and the group's device run."""
    from engine import distributed, generators
    from engine.settings import SceneSettings

    generators.check_group_settings(SceneSettings(engine="tiny-random", backend="compile"))  # no group: none refused
    group = SimpleNamespace(rank=0, world=2, device=torch.device("cpu"))  # what check_settings reads of a Group
    monkeypatch.setattr(distributed, "current", lambda: group)
    for ok in (dict(), dict(offload="text-encoder"), dict(offload="group"), dict(engine="preview", backend="compile")):
        generators.check_group_settings(SceneSettings(**{"engine": "tiny-random", **ok}))
    refused = {
        "backend": (dict(backend="onnxruntime"), "The 'onnxruntime' backend runs the transformer on one GPU; a "
                    "sequence-parallel group runs it eagerly, so drop --backend."),
        "offload": (dict(offload="model"), "--offload model moves the transformer between CPU and GPU, which a "
                    "sequence-parallel group cannot do; give each rank a GPU that holds it, or use --offload "
                    "text-encoder."),
        "device": (dict(device="meta"), "Every rank of this group computes on cpu; drop --device meta."),
    }
    for what, (change, sentence) in refused.items():
        with pytest.raises(distributed.GroupError) as info:
            generators.check_group_settings(SceneSettings(engine="tiny-random", **change))
        assert str(info.value) == sentence, what


@pytest.mark.parametrize("text, verdict", [
    (None, [0, 1, 2, 3]), ("0,1", [0, 1]), ("3", [3]), (" 2 , 0 ", [2, 0]), ("0,1,", [0, 1]),
    ("", "distinct"), (",", "distinct"), ("0,0", "distinct"), ("4", "distinct"), ("-1", "distinct"),
    ("1,5", "distinct"), ("a", "indices"), ("0;1", "indices"), ("0.5", "indices"), ("cuda:0", "indices"),
])
def test_gpus_flag_is_parsed_or_refused_in_one_sentence(monkeypatch, text, verdict):
    """`--gpus` on a machine with 4 GPUs: distinct indices among 0..3, comma-separated."""
    import app
    from engine import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if isinstance(verdict, list):
        assert app.parse_gpus(text) == verdict
        return
    with pytest.raises(distributed.GroupError) as info:
        app.parse_gpus(text)
    assert str(info.value) == {
        "distinct": f"--gpus must name distinct GPUs among 0..3; got {text!r}.",
        "indices": f"--gpus takes comma-separated GPU indices such as 0,1; got {text!r}.",
    }[verdict]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.GroupError, match=r"^--gpus and --workers-per-gpu need CUDA GPUs and this "
                                                     r"machine has none\.$"):
        app.parse_gpus(text)
