"""The loop writes clip k's files while clip k+1 is made (``engine.scene.ClipWriter``).

Checked against the sequential loop as the independent answer: a scene whose clips were written behind the loop is,
file for file and byte for byte, the scene written one clip at a time (only the wall-clock fields of the JSON files
differ); the manifest's timeline shows the writing beside the next clip's steps and outside its critical path; a
failed write mid-scene ends the run with one sentence and leaves the clips before it committed and resumable.
"""
from __future__ import annotations

import errno
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import engine.settings as settings_mod
from conftest import PlaneTestDepth
from engine import outputs
from engine.cli import main as cli_main
from engine.jobfolder import JobFolder
from engine.scene import Scene, TrajectoryRequest
from engine.settings import SceneSettings
from scenefolder import assert_same_scene, without_timings

TRAJECTORIES = ["up", "left", "right"]


@pytest.fixture(autouse=True)
def small_preview(monkeypatch):
    # Quarter-size preview buckets keep a clip to about a second; the writing order does not depend on the size.
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 0.25)


def _new_scene(job: Path, photo: Path) -> Scene:
    return Scene.create(job, photo, settings=SceneSettings(engine="preview", frames=5), depth_source=PlaneTestDepth(),
                        announce=lambda _: None)


def _json_without_timings(raw: bytes):
    return without_timings(json.loads(raw))


def _assert_byte_identical(a: Path, b: Path) -> int:
    """Every file of ``a`` and ``b`` equal byte for byte; JSON files and the zip's JSON members only up to their
    wall-clock fields (``scenefolder.TIMING_KEYS``). Returns the number of files compared."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name.endswith(".json"):
            assert _json_without_timings(x) == _json_without_timings(y), name
        elif name.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(x)) as za, zipfile.ZipFile(io.BytesIO(y)) as zb:
                assert za.namelist() == zb.namelist(), name
                for member in za.namelist():
                    u, v = za.read(member), zb.read(member)
                    if member.endswith(".json"):
                        assert _json_without_timings(u) == _json_without_timings(v), f"{name}: {member}"
                    else:
                        assert u == v, f"{name}: {member}"
        else:
            assert x == y, name
    return len(names)


def test_written_behind_equals_written_in_turn_byte_for_byte(noise_photo, tmp_path):
    behind, in_turn = tmp_path / "behind", tmp_path / "in-turn"
    scene = _new_scene(behind, noise_photo)
    scene.run(TRAJECTORIES)
    sequential = _new_scene(in_turn, noise_photo)
    sequential.plan_run([TrajectoryRequest.parse(t) for t in TRAJECTORIES])  # the resume record ``run`` writes
    for name in TRAJECTORIES:
        sequential.generate(name)  # one clip at a time: each written and committed before the next starts
    sequential.export()

    compared = _assert_byte_identical(behind, in_turn)
    assert compared > 40
    # Both objects hold the committed state, as reopening the folder gives it.
    reopened = Scene.open(behind, depth_source=PlaneTestDepth(), announce=lambda _: None)
    assert without_timings(scene.manifest) == without_timings(reopened.manifest)
    assert scene.manifest == json.loads((behind / "manifest.json").read_text())
    assert len(scene.bank) == len(reopened.bank) == len(sequential.bank)
    assert np.array_equal(scene.cache.points.numpy(), reopened.cache.points.numpy())


def test_writing_runs_beside_the_next_clip_and_off_its_critical_path(noise_photo, tmp_path, monkeypatch):
    """With each clip's writing made slow (0.6 s more), clip k's write span overlaps clip k+1's steps, no clip's
    ``total`` contains a write, and the loop ends well before the sum of its steps."""
    slow = 0.6
    real = JobFolder.write_clip

    def slow_write(self, name, content):
        time.sleep(slow)
        return real(self, name, content)

    monkeypatch.setattr(JobFolder, "write_clip", slow_write)
    scene = _new_scene(tmp_path / "job", noise_photo)
    t0 = time.perf_counter()
    records = scene.generate_clips(TRAJECTORIES)
    wall = time.perf_counter() - t0
    clips = json.loads((tmp_path / "job" / "manifest.json").read_text())["clips"]
    assert [c["name"] for c in clips] == [r.name for r in records] == ["00_up", "01_left", "02_right"]
    for before, after in zip(clips, clips[1:]):
        write_start, write_end = before["timeline"]["write"]
        assert before["seconds"]["write"] >= slow
        # The next clip's steps (render to fuse) ran while this one's files were written: the shorter of the two
        # spans lies (almost) wholly inside the other.
        steps_start, steps_end = after["timeline"]["render"][0], after["timeline"]["fuse"][1]
        overlap = min(write_end, steps_end) - max(write_start, steps_start)
        shorter = min(steps_end - steps_start, write_end - write_start)
        assert overlap >= 0.75 * shorter, (before["timeline"], after["timeline"])
    for clip in clips:
        s = clip["seconds"]
        steps = s["render"] + s["retrieve"] + s["generate"] + s["fuse"] + s["wait"]
        # The critical path: the steps (and the moving on between them), never the write.
        assert steps <= s["total"] + 1e-6 and s["total"] < steps + s["write"] / 2, s
    in_turn = sum(c["seconds"]["total"] + c["seconds"]["write"] for c in clips)
    assert wall < in_turn - slow, (wall, in_turn)


def test_a_failed_write_mid_scene_ends_in_one_sentence_and_resumes(noise_photo, tmp_path, monkeypatch, capsys):
    """Disk full while the second clip's video is written (in the writer's thread, while the third clip is made):
    exit 1 with one sentence; the first clip stays committed byte for byte, nothing half-written stays; the same
    command then finishes the scene as an uninterrupted run writes it."""
    out = tmp_path / "job"
    argv = ["generate", "--image", str(noise_photo), "--engine", "preview", "--depth", "plane", "--frames", "5",
            "--trajectories", ",".join(TRAJECTORIES), "--out"]
    real = outputs.write_video

    def full_disk(path, *a, **kw):
        if Path(path).name == "clip.mp4" and "01_left" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(outputs, "write_video", full_disk)
    assert cli_main(argv + [str(out)]) == 1
    monkeypatch.setattr(outputs, "write_video", real)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device") and last.endswith("resume.")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["up"]
    assert not (out / "clips" / "01_left").exists() and not (out / "clips" / "02_right").exists()
    assert not [p for p in out.rglob(".*")], "temporary files left"
    first = {p: p.read_bytes() for p in (out / "clips" / "00_up").rglob("*") if p.is_file()}

    assert cli_main(argv + [str(out)]) == 0
    assert "1 clip(s) already done" in capsys.readouterr().out
    assert all(p.read_bytes() == raw for p, raw in first.items())
    assert cli_main(argv + [str(tmp_path / "whole")]) == 0
    assert_same_scene(out, tmp_path / "whole")


def test_a_failed_write_leaves_the_scene_object_at_the_committed_state(noise_photo, tmp_path, monkeypatch):
    """The same object goes on after the failure: its manifest, cache and bank are the folder's committed ones."""
    job = tmp_path / "job"
    scene = _new_scene(job, noise_photo)
    real = JobFolder.write_clip

    def failing(self, name, content):
        if name == "01_left":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real(self, name, content)

    monkeypatch.setattr(JobFolder, "write_clip", failing)
    with pytest.raises(OSError):
        scene.generate_clips(TRAJECTORIES)
    monkeypatch.setattr(JobFolder, "write_clip", real)
    reopened = Scene.open(job, depth_source=PlaneTestDepth(), announce=lambda _: None)
    assert [c["name"] for c in scene.clips] == [c["name"] for c in reopened.clips] == ["00_up"]
    assert len(scene.bank) == len(reopened.bank)
    assert np.array_equal(scene.cache.points.numpy(), reopened.cache.points.numpy())
    scene.generate_clips(TRAJECTORIES[1:])
    whole = tmp_path / "whole"
    _new_scene(whole, noise_photo).generate_clips(TRAJECTORIES)
    assert_same_scene(job, whole)


def test_the_engine_runs_numpy_and_scipy_on_one_blas_thread():
    """OpenBLAS threads stalled the writer's and the page's numpy products when both ran at once (engine/__init__.py):
    once the engine is imported, every BLAS library threadpoolctl finds runs one thread, whether numpy was imported
    before the engine (as the app and pytest do) or scipy after it."""
    import subprocess
    import sys

    code = ("import numpy, json, threadpoolctl; import engine; import scipy.linalg; "
            "print(json.dumps([(i['user_api'], i['num_threads']) for i in threadpoolctl.threadpool_info()]))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    blas = [n for api, n in json.loads(out) if api == "blas"]
    assert len(blas) >= 1 and set(blas) == {1}, out
