"""Hostile inputs through ``python -m engine generate``: one sentence, a non-zero exit, no traceback, no files.

The corpus comes from tests/hostile.py (generated, never downloaded). Accepted-but-odd images must become a
scene whose ``input.png`` is upright, alpha flattened on white and converted to sRGB. Numeric trajectory and
settings parameters are drawn by hypothesis: each is either accepted (and plans finite cameras) or refused
with one sentence. A summary of what was tried goes to tests/artifacts/bad_inputs.json (docs/reliability.md).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from engine.cli import main as cli_main
from engine.geometry import trajectories as traj
from conftest import PlaneTestDepth
from engine.scene import Scene, TrajectoryRequest
from engine.settings import MAX_CLIP_FRAMES, MAX_PROMPT_CHARS, MIN_CLIP_FRAMES, SceneError, SceneSettings

sys.path.insert(0, str(Path(__file__).parent))
from hostile import assert_one_sentence as _assert_one_sentence  # noqa: E402
from hostile import hostile_prompt_bytes, hostile_prompts, quadrant_image, write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUMMARY: dict = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.png"
    Image.fromarray(quadrant_image()).save(path)
    return path


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route every tempfile of this process into an empty folder, so a left-over temp file is seen."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def _files(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")}


def _refused(argv: list, out: Path, tmp_root: Path, private: Path, capsys, context: str) -> str:
    before = _files(tmp_root)
    # The case's own flags come last, so they win over these defaults (argparse keeps the last value).
    rc = cli_main(["generate", "--engine", "preview", "--depth", "plane", "--frames", "5", "--out", str(out), *argv])
    captured = capsys.readouterr()
    assert rc == 2, f"{context}: exit code {rc}, stderr: {captured.err[-500:]}"
    last = _assert_one_sentence(captured.err, context)
    assert not out.exists(), f"{context}: the --out folder was created"
    assert _files(tmp_root) == before, f"{context}: stray files {_files(tmp_root) - before}"
    assert not any(private.iterdir()), f"{context}: temp files left: {list(private.iterdir())}"
    return last


# ---- the corpus -------------------------------------------------------------------------------------

def test_every_refused_input_gets_one_sentence_and_leaves_nothing(corpus, good_image, tmp_path, private_tmp, capsys):
    refused = [h for h in corpus if h.expect == "refuse"]
    assert len(refused) >= 25  # the hostile corpus: images, camera files, panorama
    messages = {}
    for h in refused:
        if h.role == "camera_json":
            argv = ["--image", str(good_image), "--camera-json", str(h.path)]
        else:
            argv = [f"--{h.role}", str(h.path)]
        messages[h.name] = _refused(argv, tmp_path / "out", tmp_path, private_tmp, capsys, h.name)
        # The message names the input (or what was wrong with it), never a server path.
        assert str(h.path.parent) not in messages[h.name], messages[h.name]
    SUMMARY["refused_files"] = messages


def test_refusal_reasons_match_the_defect(corpus, good_image, tmp_path, private_tmp, capsys):
    """Each refusal says what was wrong (a wrong reason would send the person the wrong way)."""
    expected = {
        "truncated.png": "truncated", "truncated.jpg": "complete image", "zero_bytes.png": "not an image",
        "text_named.png": "not an image", "bomb_30000x30000.png": "too large", "over_limit_8000x8000.png": "megapixel",
        "one_pixel.png": "at least 64", "strip_10000x40.png": "at least 64", "vector.svg": "not an image",
        "video.mp4": "not an image", "not_a_panorama.png": "2:1", "camera_nan.json": "NaN",
        "camera_scaled.json": "rigid", "camera_count_mismatch.json": "one of each", "camera_one_frame.json": "from 2",
        "camera_too_many.json": f"to {MAX_CLIP_FRAMES}", "camera_latin1.json": "not valid JSON",
    }
    by_name = {h.name: h for h in corpus}
    for name, needle in expected.items():
        h = by_name[name]
        argv = (["--image", str(good_image), "--camera-json", str(h.path)] if h.role == "camera_json"
                else [f"--{h.role}", str(h.path)])
        last = _refused(argv, tmp_path / "out", tmp_path, private_tmp, capsys, name)
        assert needle in last, f"{name}: {last!r} does not say {needle!r}"


def _quadrant_colours(image: np.ndarray) -> list:
    """Mean colour of the middle of each quadrant (away from edges that resizing and JPEG blur)."""
    h, w = image.shape[:2]
    out = []
    for r in (0, 1):
        for c in (0, 1):
            y0, x0 = r * h // 2 + h // 8, c * w // 2 + w // 8
            out.append(image[y0 : y0 + h // 4, x0 : x0 + w // 4].reshape(-1, 3).mean(0))
    return out


def test_accepted_odd_images_become_upright_flattened_srgb(corpus, tmp_path):
    accepted = [h for h in corpus if h.expect == "accept"]
    assert {"exif_rotated.jpg", "rgba_alpha.png", "cmyk.jpg", "icc_swapped_primaries.png", "sixteen_bit.png",
            "greyscale.png", "animated.gif"} <= {h.name for h in accepted}
    checked = {}
    for h in accepted:
        job = tmp_path / h.name
        Scene.create(job, h.path, settings=SceneSettings(engine="preview", frames=5), depth_source=PlaneTestDepth(),
                     announce=lambda _: None)
        written = np.asarray(Image.open(job / "input.png").convert("RGB"), dtype=np.float64) / 255.0
        # The input is fitted to the preview bucket (landscape stays landscape; quadrants keep their places).
        assert written.shape[1] > written.shape[0], f"{h.name}: not upright ({written.shape})"
        got = _quadrant_colours(written)
        for i, (g, want) in enumerate(zip(got, h.quadrants)):
            assert np.abs(g - np.asarray(want)).max() < 0.06, f"{h.name} quadrant {i}: {g.round(3)} != {want}"
        checked[h.name] = h.what
    SUMMARY["accepted_files"] = checked


# ---- prompts ------------------------------------------------------------------------------------

def test_hostile_prompts_are_refused_with_the_stated_limit(good_image, tmp_path, private_tmp, capsys):
    seen = {}
    for name, prompt in hostile_prompts().items():
        seen[name] = _refused(["--image", str(good_image), "--prompt", prompt], tmp_path / "out", tmp_path,
                              private_tmp, capsys, f"prompt {name}")
    assert str(MAX_PROMPT_CHARS) in seen["100k_characters"]
    assert "UTF-8" in seen["non_utf8_bytes"]
    # At the limit a prompt is fine; one character more is refused (the limit is the stated one).
    SceneSettings(prompt="x" * MAX_PROMPT_CHARS).validate()
    with pytest.raises(SceneError):
        SceneSettings(prompt="x" * (MAX_PROMPT_CHARS + 1)).validate()
    SceneSettings(prompt="a room\nwith a window,\tat dusk (caf\u00e9 \u6e2f)").validate()  # newlines, tabs, Unicode
    SUMMARY["refused_prompts"] = seen


def test_unknown_engine_is_refused_with_the_names_there_are():
    from engine.engines import ENGINES

    with pytest.raises(SceneError) as err:
        SceneSettings(engine="worldstereo-huge").validate()
    assert str(err.value) == f"Unknown engine 'worldstereo-huge'; choose one of: {', '.join(ENGINES)}."
    for name in ENGINES:
        SceneSettings(engine=name).validate()


def test_subprocess_exit_code_and_stderr_for_non_utf8_prompt(good_image, tmp_path):
    """The real process: argv carries raw bytes; exit code 2, one sentence, no traceback, no folder, no temp."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "out"
    argv = [os.fsencode(sys.executable), b"-m", b"engine", b"generate", b"--image", os.fsencode(good_image),
            b"--engine", b"preview", b"--depth", b"plane", b"--prompt", hostile_prompt_bytes()["non_utf8_bytes"],
            b"--out", os.fsencode(out)]
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err[-800:]
    last = _assert_one_sentence(err, "subprocess")
    assert "UTF-8" in last
    assert not out.exists() and not any(tmpdir.iterdir())
    SUMMARY["subprocess_exit_code"] = proc.returncode


def test_depth_files_that_cannot_serve_are_refused(good_image, tmp_path, private_tmp, capsys):
    """A depth map that is not there is refused (not tried as a depth model); a panorama takes no depth map."""
    last = _refused(["--image", str(good_image), "--depth", str(tmp_path / "nowhere.npy")], tmp_path / "out",
                    tmp_path, private_tmp, capsys, "missing depth file")
    assert "does not exist" in last
    pano, depth = tmp_path / "pano.png", tmp_path / "pano_depth.npy"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(pano)
    np.save(depth, np.ones((32, 64)))
    last = _refused(["--panorama", str(pano), "--depth", str(depth)], tmp_path / "out", tmp_path, private_tmp, capsys,
                    "panorama with a depth file")
    assert "panorama" in last


# ---- numeric parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--frames", "0", "from 2"), ("--frames", "1", "from 2"), ("--frames", "-3", "from 2"),
    ("--frames", "1000000", f"to {MAX_CLIP_FRAMES}"), ("--seed", "-1", "seed"), ("--seed", str(10**30), "seed"),
    ("--steps", "0", "steps"), ("--steps", "-4", "steps"),
])
def test_absurd_cli_numbers_are_refused_before_anything_is_written(flag, value, needle, good_image, tmp_path,
                                                                   private_tmp, capsys):
    last = _refused(["--image", str(good_image), flag, value], tmp_path / "out", tmp_path, private_tmp, capsys,
                    f"{flag} {value}")
    assert needle in last
    SUMMARY.setdefault("refused_cli_numbers", {})[f"{flag} {value}"] = last


@pytest.fixture(scope="module")
def planned_scene(tmp_path_factory, good_image):
    return Scene.create(tmp_path_factory.mktemp("plan") / "job", good_image,
                        settings=SceneSettings(engine="preview", frames=5), depth_source=PlaneTestDepth(),
                        announce=lambda _: None)


odd_numbers = st.one_of(
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e9, -1e9, 1e-300, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12), st.floats(0.01, 1.0))
odd_frames = st.one_of(st.sampled_from([0, 1, 2, MAX_CLIP_FRAMES, MAX_CLIP_FRAMES + 1, 10**6, -1, -(2**63)]),
                       st.integers(-10**9, 10**9), st.integers(0, 200), st.integers(2, 12), st.booleans(),
                       st.floats(0, 50))


def _boundaries(name: str) -> list:
    """Amounts at the edges of what preset ``name`` takes: its maximum and the floats either side of it, the
    smallest positive floats, its own default."""
    top = traj.PRESETS[name].max_amount
    return [top, math.nextafter(top, 0.0), math.nextafter(top, math.inf), top + 1, 5e-324, 1e-300,
            traj.PRESETS[name].amount, int(top), -top]


def _expected_plan(name, amount, frames) -> bool:
    """Whether a trajectory request must be planned, decided from the documented rules alone: a preset's amount is
    a finite number above 0 and at most the preset's maximum (None: its own), frames a whole number from
    MIN_CLIP_FRAMES to MAX_CLIP_FRAMES (None: the scene's)."""
    amount_ok = amount is None or (isinstance(amount, (int, float)) and math.isfinite(amount)
                                   and 0 < amount <= traj.PRESETS[name].max_amount)
    frames_ok = frames is None or (type(frames) is int and MIN_CLIP_FRAMES <= frames <= MAX_CLIP_FRAMES)
    return amount_ok and frames_ok


@pytest.mark.parametrize("name", sorted(traj.PRESETS))
def test_every_preset_plans_at_its_maximum_and_refuses_beyond_it(planned_scene, name):
    """The edges the property test below may or may not draw, every time: the maximum plans, the float above it
    is refused in one sentence."""
    top = traj.PRESETS[name].max_amount
    assert len(planned_scene.plan(TrajectoryRequest(name=name, amount=top))) == planned_scene.settings.frames
    with pytest.raises(SceneError, match=r"^Trajectory .* takes an amount above 0 and at most .*\.$"):
        planned_scene.plan(TrajectoryRequest(name=name, amount=math.nextafter(top, math.inf)))


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(traj.PRESETS)), data=st.data(), frames=st.one_of(st.none(), odd_frames))
def test_trajectory_parameters_plan_or_refuse(planned_scene, name, data, frames):
    """Every request is planned exactly when the rules say so (a valid amount or frame count refused fails as much
    as an invalid one accepted), refusals in one sentence, plans of the asked length from the input view."""
    amount = data.draw(st.one_of(st.none(), odd_numbers, st.sampled_from(_boundaries(name))), label="amount")
    request = TrajectoryRequest(name=name, amount=amount, frames=frames)
    expected = _expected_plan(name, amount, frames)
    try:
        cams = planned_scene.plan(request)
    except SceneError as e:
        message = str(e)
        assert not expected, f"a valid request was refused: {message}"
        assert "\n" not in message and message.endswith(".") and len(message) < 300
        SUMMARY.setdefault("trajectory_refused", 0)
        SUMMARY["trajectory_refused"] += 1
        return
    assert expected, f"an invalid request was planned: amount {amount!r}, frames {frames!r}"
    want = planned_scene.settings.frames if frames is None else frames
    assert len(cams) == want and torch.isfinite(cams.w2c).all() and torch.isfinite(cams.K).all()
    assert torch.allclose(cams.w2c[0], planned_scene.start_camera.w2c[0], atol=1e-9)  # starts at the input view
    SUMMARY.setdefault("trajectory_accepted", 0)
    SUMMARY["trajectory_accepted"] += 1


@settings(max_examples=150, deadline=1000)
@given(seed=st.one_of(st.integers(), st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, -(2**70)])),
       frames=odd_frames, steps=st.one_of(st.none(), st.integers(-10, 10**6)))
def test_settings_numbers_validate_or_refuse(seed, frames, steps):
    s = SceneSettings(seed=seed, frames=frames, steps=steps)
    ok = (type(seed) is int and 0 <= seed < 2**63 and type(frames) is int and 2 <= frames <= MAX_CLIP_FRAMES
          and (steps is None or 1 <= steps <= 1000))
    if ok:
        s.validate()
        torch.Generator().manual_seed(seed + 99)  # what the engine does with it must work too
        SUMMARY.setdefault("settings_accepted", 0)
        SUMMARY["settings_accepted"] += 1
    else:
        with pytest.raises(SceneError) as info:
            s.validate()
        assert "\n" not in str(info.value) and str(info.value).endswith(".")
        SUMMARY.setdefault("settings_refused", 0)
        SUMMARY["settings_refused"] += 1


@pytest.fixture(scope="module", autouse=True)
def write_summary():
    """After the module: the counts docs/reliability.md quotes (run the whole file to refresh them)."""
    yield
    summary = {
        "hostile_files_refused": len(SUMMARY.get("refused_files", {})),
        "odd_files_accepted": len(SUMMARY.get("accepted_files", {})),
        "prompts_refused": len(SUMMARY.get("refused_prompts", {})),
        "cli_numbers_refused": len(SUMMARY.get("refused_cli_numbers", {})),
        "trajectory_examples": {"accepted": SUMMARY.get("trajectory_accepted", 0),
                                "refused": SUMMARY.get("trajectory_refused", 0)},
        "settings_examples": {"accepted": SUMMARY.get("settings_accepted", 0),
                              "refused": SUMMARY.get("settings_refused", 0)},
        "subprocess_exit_code": SUMMARY.get("subprocess_exit_code"),
        "messages": {**SUMMARY.get("refused_files", {}), **SUMMARY.get("refused_prompts", {}),
                     **SUMMARY.get("refused_cli_numbers", {})},
        "accepted": SUMMARY.get("accepted_files", {}),
        "command": ".venv/bin/python -m pytest -q tests/test_bad_inputs.py",
    }
    folder = REPO / "tests" / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad_inputs.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
