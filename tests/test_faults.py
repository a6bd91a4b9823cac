"""Faults during generation: nothing committed is lost, nothing half-written stays, the next run succeeds.

Injected: an exception mid-clip (after the render), a CUDA out-of-memory error, disk full at every write of
a clip, a SIGKILL of the CLI between clips, and a cancel flag during hole filling and during denoising.
A summary goes to tests/artifacts/faults.json (quoted in docs/reliability.md).
"""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

import engine.scene as scene_mod
import engine.settings as settings_mod
import engine.generators as generators
from engine.cli import main as cli_main
from conftest import PlaneTestDepth
from engine.scene import GenerationCancelled, Scene
from engine.settings import SceneSettings
from scenefolder import assert_same_scene

REPO = Path(__file__).resolve().parents[1]
PREVIEW_SCALE = settings_mod.ENGINE_SCALE["preview"]  # what a `python -m engine` process started here uses
SUMMARY: dict = {"faults": {}, "committed_files_checked": 0, "files_lost": 0}


def _survived(name: str, detail: str) -> None:
    SUMMARY["faults"][name] = detail


@pytest.fixture(autouse=True)
def small_preview(monkeypatch):
    # Quarter-size preview buckets keep each clip to a second or two on the shared CPU; the fault handling
    # under test does not depend on the frame size.
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 0.25)


@pytest.fixture(scope="module")
def photo(noise_photo) -> Path:
    return noise_photo


def _tree(job: Path) -> dict:
    """Every file under the job folder with its SHA-256 (what must survive byte for byte)."""
    return {str(p.relative_to(job)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(job.rglob("*")) if p.is_file()}


def _assert_kept(before: dict, now: dict, keep: tuple = (), exact: bool = True) -> None:
    """Every committed file (those starting with ``keep``, or all) is still there byte for byte; with ``exact``
    nothing else appeared either. Counts go to the summary (files checked, files lost)."""
    names = [n for n in before if not keep or n.startswith(keep)]
    lost = [n for n in names if now.get(n) != before[n]]
    SUMMARY["committed_files_checked"] += len(names)
    SUMMARY["files_lost"] += len(lost)
    assert not lost, f"committed files changed or lost: {lost}"
    if exact:
        assert set(now) == set(before), f"files appeared: {set(now) - set(before)}"


def _temp_leftovers(job: Path) -> list:
    # Atomic writes use ".name.*" temporary files and folders (engine.atomicio); none may outlive a failure.
    return [str(p.relative_to(job)) for p in job.rglob(".*")]


@pytest.fixture(scope="module")
def template(tmp_path_factory, photo) -> Path:
    """A job folder with one committed clip ("up"); each test works on its own copy."""
    job = tmp_path_factory.mktemp("template") / "job"
    old = settings_mod.ENGINE_SCALE["preview"]
    settings_mod.ENGINE_SCALE["preview"] = 0.25
    try:
        scene = Scene.create(job, photo, settings=SceneSettings(engine="preview", frames=3),
                             depth_source=PlaneTestDepth(), announce=lambda _: None)
        scene.generate("up")
    finally:
        settings_mod.ENGINE_SCALE["preview"] = old
    return job


@pytest.fixture(scope="module")
def uninterrupted(template, tmp_path_factory) -> Path:
    """The template's scene with its second clip ("left") generated without any fault: what every interrupted and
    then finished copy must equal, file by file."""
    job = tmp_path_factory.mktemp("uninterrupted") / "job"
    shutil.copytree(template, job)
    old = settings_mod.ENGINE_SCALE["preview"]
    settings_mod.ENGINE_SCALE["preview"] = 0.25
    try:
        Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None).generate("left")
    finally:
        settings_mod.ENGINE_SCALE["preview"] = old
    return job


def _scene_with_one_clip(job: Path, template: Path) -> Scene:
    shutil.copytree(template, job)
    return Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)


def _in_memory_state(scene: Scene) -> tuple:
    return (json.dumps(scene.manifest, sort_keys=True), scene.cache.points.clone(), scene.cache.colors.clone(),
            len(scene.bank))


def _same_memory(scene: Scene, before: tuple) -> None:
    manifest, points, colors, bank = before
    assert json.dumps(scene.manifest, sort_keys=True) == manifest
    assert torch.equal(scene.cache.points, points) and torch.equal(scene.cache.colors, colors)
    assert len(scene.bank) == bank


def _resume_and_finish(job: Path, scene: Scene, uninterrupted: Path) -> None:
    """Scene.open resumes at the committed state, and both it and the failed scene's object can go on: the failed
    object's next clip ("left") leaves the folder an uninterrupted run leaves."""
    reopened = Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)
    assert [c["trajectory"] for c in reopened.clips] == [c["trajectory"] for c in scene.clips]
    assert len(reopened.bank) == len(scene.bank)
    record = scene.generate("left")
    assert (job / record.folder / "clip.mp4").is_file()
    assert_same_scene(job, uninterrupted)


# ---- an exception, and an out-of-memory error, mid-clip ----------------------------------------------

@pytest.mark.parametrize("fault", [
    RuntimeError("injected fault in the clip generator"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"),
    RuntimeError("CUDA error: out of memory (simulated)"),
], ids=["exception", "cuda-oom", "runtime-oom"])
def test_fault_mid_clip_keeps_everything_and_the_next_clip_succeeds(fault, template, uninterrupted, tmp_path,
                                                                   monkeypatch):
    job = tmp_path / "job"
    scene = _scene_with_one_clip(job, template)
    files, state = _tree(job), _in_memory_state(scene)
    real = generators.preview_clip
    made = []

    def failing(*args, **kwargs):
        frames = real(*args, **kwargs)  # the render and hole filling ran: the clip's frames exist
        made.append(weakref.ref(frames))
        raise type(fault)(*fault.args)  # a fresh error: its traceback (and the frames in it) dies with it

    monkeypatch.setattr(generators, "preview_clip", failing)
    with pytest.raises(type(fault)) as info:
        scene.generate("left")
    del info  # the handled error goes away, as it does in the CLI and the UI
    _assert_kept(files, _tree(job))
    assert not _temp_leftovers(job)
    _same_memory(scene, state)
    # Memory: once the error is handled, nothing of the failed clip stays referenced by the scene.
    gc.collect()
    assert made and made[0]() is None, "the failed clip's frames are still referenced"
    monkeypatch.setattr(generators, "preview_clip", real)
    _resume_and_finish(job, scene, uninterrupted)
    _survived(f"mid-clip {type(fault).__name__}: {str(fault)[:40]}", "earlier clip, cache, manifest, bank unchanged; next clip done")


def test_fault_during_depth_fusion_frees_the_new_cache(template, uninterrupted, tmp_path, monkeypatch):
    """An OOM in the depth network after the frames exist: the half-grown cache copy is dropped too."""
    job = tmp_path / "job"
    scene = _scene_with_one_clip(job, template)
    files, state = _tree(job), _in_memory_state(scene)
    caches = []
    real_add = scene_mod.PointCache.add_frame

    def tracking_add(self, *args, **kwargs):
        caches.append(weakref.ref(self))
        return real_add(self, *args, **kwargs)

    calls = {"n": 0}

    def oom_depth(image, camera=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second kept frame: the new cache already holds the first one
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated in the depth network)")
        return PlaneTestDepth()(image, camera)

    monkeypatch.setattr(scene_mod.PointCache, "add_frame", tracking_add)
    monkeypatch.setattr(scene, "depth_source", oom_depth)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        scene.generate("left")
    del info
    gc.collect()
    assert caches and all(ref() is None for ref in caches), "the half-grown cache copy is still referenced"
    _assert_kept(files, _tree(job))
    assert not _temp_leftovers(job)
    _same_memory(scene, state)
    monkeypatch.setattr(scene, "depth_source", PlaneTestDepth())
    _resume_and_finish(job, scene, uninterrupted)
    _survived("out-of-memory during depth fusion", "half-grown cache freed; state unchanged; next clip done")


def test_cli_reports_out_of_memory_in_one_sentence_and_resumes(photo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "job"
    argv = ["generate", "--image", str(photo), "--engine", "preview", "--depth", "plane", "--frames", "3",
            "--trajectories", "up,left", "--out", str(out)]
    real = generators.preview_clip
    calls = {"n": 0}

    def second_clip_oom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(generators, "preview_clip", second_clip_oom)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and "out of memory" in last and last.endswith(".")
    first = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in first["clips"]] == ["up"]
    files = _tree(out)
    assert cli_main(argv) == 0  # the same command resumes (the injected fault fires once)
    final = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in final["clips"]] == ["up", "left"]
    _assert_kept(files, _tree(out), keep=("clips/00_up/", "input.png", "state/start.json"), exact=False)
    monkeypatch.setattr(generators, "preview_clip", real)
    whole = tmp_path / "whole"
    assert cli_main([*argv[:-1], str(whole)]) == 0
    assert_same_scene(out, whole)
    _survived("CLI out-of-memory on clip 2", "exit 1 with one sentence; rerun finished clip 2 without redoing clip 1")


# ---- disk full ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_disk_full_at_every_write_of_a_clip(template, uninterrupted, tmp_path, monkeypatch):
    """ENOSPC at the k-th atomic replace, for every k of one clip: the job fails, committed files stay."""
    real = os.replace
    n = {"n": 0, "fail_at": None}

    def full_disk(src, dst, *a, **kw):
        n["n"] += 1
        if n["n"] == n["fail_at"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    # A clean run first counts the writes of one clip (clip files, memory, cache, manifest, viewer clouds).
    counting = tmp_path / "count"
    shutil.copytree(template, counting)
    Scene.open(counting, depth_source=PlaneTestDepth(), announce=lambda _: None).generate("left")
    total = n["n"]
    assert total >= 8
    files = _tree(template)
    outcomes = {}
    for k in range(1, total + 1):
        job = tmp_path / f"job{k}"
        shutil.copytree(template, job)
        scene = Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)
        n.update(n=0, fail_at=k)
        with pytest.raises(OSError) as info:
            scene.generate("left")
        n["fail_at"] = None
        assert info.value.errno == errno.ENOSPC
        assert not _temp_leftovers(job), f"write {k}: temp files left: {_temp_leftovers(job)}"
        now = _tree(job)
        committed = json.loads((job / "manifest.json").read_text())
        # Every file of the committed state is whole: the first clip byte for byte, the input, the start state.
        _assert_kept(files, now, keep=("clips/00_up/", "input.png", "state/start.json", "state/bank-start/"), exact=False)
        assert (job / committed["state"]["cache"]).is_file()
        outcomes[k] = len(committed["clips"])
        if outcomes[k] == 1:  # the failure came before the commit point: nothing else moved
            _assert_kept(files, now)
        # Whatever the failure hit, the folder opens at a consistent state and can go on.
        reopened = Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)
        assert len(reopened.clips) == outcomes[k]
        if k in (1, total // 2, total):  # finishing takes a clip each time: prove it at both ends and between
            if outcomes[k] == 1:
                reopened.generate("left")
            assert_same_scene(job, uninterrupted)
    assert 1 in outcomes.values() and 2 in outcomes.values()  # failures landed on both sides of the commit
    _survived(f"disk full (ENOSPC) at each of the {total} writes of a clip",
              f"committed files intact, no temp files, reopened; {sum(v == 1 for v in outcomes.values())} before "
              f"and {sum(v == 2 for v in outcomes.values())} after the manifest commit")
    SUMMARY["disk_full_points"] = total


def test_cli_disk_full_is_one_sentence(photo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "job"
    real, n = os.replace, {"n": 0}

    def full_disk(src, dst, *a, **kw):
        n["n"] += 1
        if str(dst).endswith("clip.mp4"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    rc = cli_main(["generate", "--image", str(photo), "--engine", "preview", "--depth", "plane", "--frames", "3",
                   "--trajectories", "up", "--out", str(out)])
    monkeypatch.setattr(os, "replace", real)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 1 and "Traceback" not in err
    assert last.startswith("error: No space left on device") and last.endswith("resume.")
    assert not _temp_leftovers(out)
    _survived("CLI disk full", "exit 1 with one sentence, no temp files")


# ---- a killed process ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_between_clips_then_the_same_command_finishes(photo, tmp_path, monkeypatch):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "engine", "generate", "--image", str(photo), "--engine", "preview", "--depth",
           "plane", "--frames", "3", "--trajectories", "up,left", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if manifest.is_file():
                try:
                    if json.loads(manifest.read_text())["clips"]:
                        break
                except json.JSONDecodeError:
                    pytest.fail("manifest.json was seen half-written")
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("the first clip never reached the manifest")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = json.loads(manifest.read_text())
    assert [c["trajectory"] for c in first["clips"]] == ["up"]
    clip = out / first["clips"][0]["folder"] / "clip.mp4"
    stamp, files = clip.stat().st_mtime_ns, _tree(out)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-800:]
    assert "Resuming" in done.stdout.decode() and "1 clip(s) already done" in done.stdout.decode()
    final = json.loads(manifest.read_text())
    assert [c["trajectory"] for c in final["clips"]] == ["up", "left"]
    assert clip.stat().st_mtime_ns == stamp  # not rewritten, not merely rewritten identically
    _assert_kept(files, _tree(out), keep=(first["clips"][0]["folder"] + "/", "input.png", "state/start.json"),
                 exact=False)
    assert not _temp_leftovers(out)
    # the same command never killed, run here at the frame size the killed process used
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", PREVIEW_SCALE)
    assert cli_main([*cmd[3:-1], str(tmp_path / "whole")]) == 0
    assert_same_scene(out, tmp_path / "whole")
    _survived("SIGKILL between clips", "restart resumed; first clip untouched (same mtime and hash)")


def test_open_drops_what_a_killed_run_left_half_written(template, tmp_path):
    """The debris a kill can leave at each write (named as engine.atomicio names its temporary files and folders)
    is removed by Scene.open; the committed files are untouched."""
    job = tmp_path / "job"
    shutil.copytree(template, job)
    files = _tree(job)
    debris = [job / ".manifest.json.k1ll3d.json", job / "state" / ".cache-0002.ply.x7q2.ply", job / ".scene.glb.ab12.glb",
              job / "clips" / ".01_left.tmp-ab12cd34" / "clip.mp4", job / "clips" / "01_left" / "clip.mp4",
              job / "state" / ".bank-start.tmp-1234abcd" / "camera.json",
              job / "state" / ".bank-start.old-5678efgh" / "bank-start" / "index.json"]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)
    _assert_kept(files, _tree(job))
    assert not _temp_leftovers(job)
    _survived("debris of a killed run (temp files, temp and uncommitted clip folders)", "removed on open; state kept")


# ---- cancellation -------------------------------------------------------------------------------

def test_cancel_during_hole_filling_stops_the_clip(template, uninterrupted, tmp_path, monkeypatch):
    job = tmp_path / "job"
    scene = _scene_with_one_clip(job, template)
    files, state = _tree(job), _in_memory_state(scene)
    flag = {"cancel": False, "after": []}
    real = generators.preview_clip

    def filling(*args, **kwargs):
        flag["cancel"] = True  # the person presses cancel while holes are being filled
        return real(*args, **kwargs)

    def depth_after_cancel(image, camera=None):
        flag["after"].append("depth")
        return PlaneTestDepth()(image, camera)

    monkeypatch.setattr(generators, "preview_clip", filling)
    monkeypatch.setattr(scene, "depth_source", depth_after_cancel)
    with pytest.raises(GenerationCancelled):
        scene.generate("left", cancel=lambda: flag["cancel"])
    assert flag["after"] == []  # no depth / fusion work after the cancel
    _assert_kept(files, _tree(job))
    assert not _temp_leftovers(job)
    _same_memory(scene, state)
    monkeypatch.setattr(generators, "preview_clip", real)
    monkeypatch.setattr(scene, "depth_source", PlaneTestDepth())
    scene.generate("left")  # the same scene goes on as if nothing had been cancelled
    assert_same_scene(job, uninterrupted)
    _survived("cancel during hole filling", "stopped before depth fusion; state unchanged; next clip as uninterrupted")


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory, photo):
    cache = tmp_path_factory.mktemp("tiny-cache")
    old = os.environ.get("WORLDSTEREO_CACHE")
    os.environ["WORLDSTEREO_CACHE"] = str(cache)
    try:
        scene = Scene.create(tmp_path_factory.mktemp("tiny") / "job", photo,
                             settings=SceneSettings(engine="tiny-random", frames=3, steps=4),
                             depth_source=PlaneTestDepth(), announce=lambda _: None)
        scene._clip_generator()  # load the tiny networks while the cache variable points at the tmp folder
    finally:
        if old is None:
            os.environ.pop("WORLDSTEREO_CACHE")
        else:
            os.environ["WORLDSTEREO_CACHE"] = old
    return scene


@pytest.mark.slow  # loads the tiny networks (about 10 s on the shared CPU)
@pytest.mark.parametrize("cancel_at", [1, 3])
def test_cancel_during_denoising_stops_within_one_step(tiny_scene, cancel_at):
    """The flag turns true during the ``cancel_at``-th transformer forward: at most one more forward runs."""
    transformer = tiny_scene._clip_generator().pipeline.transformer
    forwards = {"n": 0, "at_cancel": None}
    flag = {"cancel": False}

    def count(module, args, kwargs):
        forwards["n"] += 1
        if forwards["n"] == cancel_at:
            flag["cancel"] = True
            forwards["at_cancel"] = forwards["n"]

    handle = transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        files, state = _tree(tiny_scene.job_dir), _in_memory_state(tiny_scene)
        with pytest.raises(GenerationCancelled):
            tiny_scene.generate("up", cancel=lambda: flag["cancel"])
    finally:
        handle.remove()
    assert forwards["at_cancel"] == cancel_at
    assert forwards["n"] - forwards["at_cancel"] <= 1, forwards
    _assert_kept(files, _tree(tiny_scene.job_dir))
    assert not _temp_leftovers(tiny_scene.job_dir)
    _same_memory(tiny_scene, state)
    _survived(f"cancel during denoising (step {cancel_at} of 4, tiny-random)",
              f"{forwards['n'] - forwards['at_cancel']} forward(s) after the flag; state unchanged")


@pytest.mark.slow
def test_after_cancels_the_next_clip_runs_every_step(tiny_scene, photo, tmp_path):
    """Not cancelled, the same clip runs all 4 DMD steps: the counts above really were cut short."""
    transformer = tiny_scene._clip_generator().pipeline.transformer
    counted = {"n": 0}
    handle = transformer.register_forward_pre_hook(lambda *a, **k: counted.__setitem__("n", counted["n"] + 1),
                                                   with_kwargs=True)
    try:
        record = tiny_scene.generate("up", cancel=lambda: False)
    finally:
        handle.remove()
    assert counted["n"] == 4  # DMD: 4 steps, one forward each (no CFG)
    assert (tiny_scene.job_dir / record.folder / "clip.mp4").is_file()
    # the cancelled attempts left no trace: the folder is the one a scene that was never cancelled writes
    whole = Scene.create(tmp_path / "whole", photo, settings=SceneSettings(engine="tiny-random", frames=3, steps=4),
                         depth_source=PlaneTestDepth(), announce=lambda _: None)
    whole._generator = tiny_scene._clip_generator()  # the same loaded networks
    whole.generate("up")
    assert_same_scene(tiny_scene.job_dir, whole.job_dir)


# ---- GPU memory after an out-of-memory error ------------------------------------------------------

@pytest.mark.gpu
def test_cuda_memory_is_released_after_an_out_of_memory_error(photo, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    scene = Scene.create(tmp_path / "job", photo, settings=SceneSettings(engine="tiny-random", frames=3, device="cuda"),
                         depth_source=PlaneTestDepth(), announce=lambda _: None)
    scene.generate("up")  # networks loaded, one clip done: this is the steady state
    gc.collect()
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated()

    def oom_depth(image, camera=None):
        # Hold a large block while failing, as a real OOM inside a network would.
        _ = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(scene, "depth_source", oom_depth)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        scene.generate("left")
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= steady + 8 * 2**20
    monkeypatch.setattr(scene, "depth_source", PlaneTestDepth())
    scene.generate("left")
    SUMMARY["gpu_memory_after_oom"] = {"steady_bytes": steady, "after_oom_bytes": torch.cuda.memory_allocated()}


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    yield
    folder = REPO / "tests" / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    data = {"faults_survived": len(SUMMARY["faults"]), **SUMMARY,
            "command": ".venv/bin/python -m pytest -q tests/test_faults.py"}
    (folder / "faults.json").write_text(json.dumps(data, indent=2) + "\n")
