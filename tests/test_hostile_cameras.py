"""Hostile camera files through every command-line surface that reads one: ``generate --camera-json``,
``generate --render-dir``, ``render --trajectory`` (a photo folder and a job folder) and ``conditions
--camera-json``. Each must end in one sentence and exit code 2, within a few seconds, in a child process whose address
space is capped at 8 GiB (so a reader that tried to allocate without bound would fail there, not pass).

The corpus is tests/hostile.py's ``hostile_camera_files``; the demo's surfaces (plan view, editor load) take the same
files in tests/test_hostile_server.py. Figures go to tests/artifacts/hostile_cameras.json (docs/reliability.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import PlaneTestDepth
from hostile import _camera, assert_one_sentence, hostile_camera_files, quadrant_image

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_GIB = 8
SECONDS_PER_REFUSAL = 3.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A photo folder (image.png), a preview job folder of the same photo, and the corpus."""
    from engine.scene import Scene
    from engine.settings import SceneSettings

    root = tmp_path_factory.mktemp("hostile-cameras")
    photo = root / "photo"
    photo.mkdir()
    Image.fromarray(quadrant_image()).save(photo / "image.png")
    job = root / "job"
    Scene.create(job, photo / "image.png", settings=SceneSettings(engine="preview", device="cpu", frames=2),
                 depth_source=PlaneTestDepth(), announce=lambda m: None)
    good = root / "good.json"
    good.write_text(json.dumps(_camera(5)))
    return root, photo, job, good, hostile_camera_files(root / "corpus")


def _surfaces(camera: Path, photo: Path, job: Path, out: Path, render_dir: Path) -> dict[str, list[str]]:
    image = str(photo / "image.png")
    gen = ["generate", "--engine", "preview", "--depth", "plane", "--frames", "5", "--out", str(out)]
    return {
        "generate --camera-json": gen + ["--image", image, "--camera-json", str(camera)],
        "generate --render-dir": gen + ["--image", image, "--render-dir", str(render_dir)],
        "render photo folder": ["render", "--scene", str(photo), "--out", str(out), "--trajectory", str(camera),
                                "--frames", "5", "--depth", "plane"],
        "render job folder": ["render", "--scene", str(job), "--out", str(out), "--trajectory", str(camera),
                              "--frames", "5"],
        "conditions --camera-json": ["conditions", "--image", image, "--camera-json", str(camera), "--engine",
                                     "tiny-random", "--out", str(out / "conditions.safetensors")],
    }


def _render_dir(folder: Path, camera: Path) -> Path:
    """An official pre-rendered trajectory folder around ``camera`` (its videos are never reached)."""
    folder.mkdir(parents=True)
    os.symlink(camera, folder / "camera.json")
    for name in ("render.mp4", "render_mask.mp4"):
        (folder / name).write_bytes(b"")
    return folder


def _run_child(cases: list[dict], tmp: Path) -> list[dict]:
    spec, result = tmp / "spec.json", tmp / "result.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("hostile.py")), "--cli", str(spec), str(result),
                          str(ADDRESS_SPACE_GIB)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(result.read_text())


def test_every_hostile_camera_file_is_refused_in_one_sentence_by_every_cli_surface(folders, tmp_path):
    root, photo, job, good, corpus = folders
    cases, expected = [], {}
    for h in [h for h in corpus if "cli" in h.surfaces]:
        out = tmp_path / "out" / h.name
        render_dir = _render_dir(tmp_path / "dirs" / h.name, h.path)
        for surface, argv in _surfaces(h.path, photo, job, out, render_dir).items():
            name = f"{h.name} · {surface}"
            cases.append({"name": name, "argv": argv})
            expected[name] = (h, out)
    # The same surfaces accept a good file (so a refusal above is about the file, not the command).
    controls = _surfaces(good, photo, job, tmp_path / "out-good", _render_dir(tmp_path / "dirs" / "good", good))
    cases += [{"name": f"good.json · {s}", "argv": a} for s, a in controls.items() if s.startswith("render")]

    results = {r["name"]: r for r in _run_child(cases, tmp_path)}
    summary = {}
    for name, (h, out) in expected.items():
        r = results[name]
        assert r["rc"] == 2, f"{name}: exit code {r['rc']}:\n{r['stderr'][-2000:]}"
        last = assert_one_sentence(r["stderr"], name)
        assert h.needle in last, f"{name}: {last!r} does not say {h.needle!r}"
        assert r["seconds"] < SECONDS_PER_REFUSAL, f"{name}: {r['seconds']:.1f} s"
        assert not out.exists(), f"{name}: wrote {out}"
        assert str(h.path.parent) not in last  # the file's name, never the server's folders
        summary[name] = {"message": last[len("error: "):], "seconds": round(r["seconds"], 3)}
    for surface in ("render photo folder", "render job folder"):
        r = results[f"good.json · {surface}"]
        assert r["rc"] == 0, f"good.json · {surface}: {r['stderr'][-2000:]}"
    peak = max(r["peak_rss_mib"] for r in results.values())
    assert peak < 2048, f"the child's peak resident memory was {peak:.0f} MiB"

    files = len({h.name for h, _ in expected.values()})
    figures = {"files": files, "surfaces": len(controls), "refused": len(summary), "tried": len(expected),
               "address_space_gib": ADDRESS_SPACE_GIB, "slowest_s": max(s["seconds"] for s in summary.values()),
               "child_peak_rss_mib": round(peak), "refusals": summary}
    artifacts = Path(__file__).with_name("artifacts")
    artifacts.mkdir(exist_ok=True)
    (artifacts / "hostile_cameras.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"hostile camera files: {len(summary)} of {len(expected)} refused ({files} files x {len(controls)} "
          f"surfaces), slowest {figures['slowest_s']} s, child peak RSS {peak:.0f} MiB")
