"""Undo, splats, depth videos and the input check of a scene folder, through the command line."""
from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import read_vertex_ply
from engine.cli import main as cli_main
from engine.outputs import SH_C0, SPLAT_OPACITY, depth_to_colors
from engine.jobfolder import SPLAT_SIGMA
from scenefolder import assert_same_scene, scene_files as _tree

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
OTHER = "perspective/stylized-outdoor-aquatic_landscape-069/image.png"
SPLAT_FIELDS = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def _generate(examples, out, trajectories, image=PHOTO):
    return cli_main(["generate", "--image", str(examples / image), "--engine", "preview", "--frames", "5",
                     "--trajectories", trajectories, "--out", str(out)])


@pytest.fixture(scope="module")
def two_clips(examples, tmp_path_factory):
    """A scene generated with `up`, its files kept, then continued with `left` (the same command line a person
    would use); returns ``(folder, files after the first clip)``."""
    out = tmp_path_factory.mktemp("revert") / "scene"
    assert _generate(examples, out, "up") == 0
    first = _tree(out)
    assert _generate(examples, out, "up,left") == 0
    return out, first


def test_scene_splats_have_the_3dgs_layout(two_clips):
    out, _ = two_clips
    names, v = read_vertex_ply(out / "scene_splats.ply")
    assert names == SPLAT_FIELDS
    plain_names, plain = read_vertex_ply(out / "scene.ply")
    assert plain_names[:6] == ["x", "y", "z", "red", "green", "blue"] and len(plain) == len(v) > 1000
    xyz = np.stack([v["x"], v["y"], v["z"]], 1)
    np.testing.assert_array_equal(xyz, np.stack([plain["x"], plain["y"], plain["z"]], 1))
    rgb = 0.5 + SH_C0 * np.stack([v["f_dc_0"], v["f_dc_1"], v["f_dc_2"]], 1)
    np.testing.assert_allclose(rgb * 255, np.stack([plain["red"], plain["green"], plain["blue"]], 1), atol=1e-3)
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"].astype(np.float64))), SPLAT_OPACITY, rtol=1e-6)
    np.testing.assert_array_equal(v["rot_0"], 1.0)
    for k in ("rot_1", "rot_2", "rot_3"):
        np.testing.assert_array_equal(v[k], 0.0)
    np.testing.assert_array_equal(v["scale_0"], v["scale_1"])
    np.testing.assert_array_equal(v["scale_0"], v["scale_2"])
    # Scale: SPLAT_SIGMA times the mean distance to the 4 nearest other points, by brute force on a sample.
    rng = np.random.default_rng(0)
    pts = xyz.astype(np.float64)
    for i in rng.choice(len(pts), 50, replace=False):
        d = np.sort(np.linalg.norm(pts - pts[i], axis=1))[1:5]
        assert np.exp(float(v["scale_0"][i])) == pytest.approx(SPLAT_SIGMA * d.mean(), rel=1e-4, abs=1e-7)


def test_revert_puts_back_every_file_of_the_first_clip_byte_for_byte(two_clips, capsys):
    out, first = two_clips
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["up", "left"]
    assert _tree(out) != first
    assert cli_main(["revert", str(out)]) == 0
    assert "Removed clip 01_left" in capsys.readouterr().out
    after = _tree(out)
    assert sorted(after) == sorted(first)
    changed = [name for name in first if after[name] != first[name]]
    assert not changed, changed
    # Everything the person downloads was compared, the state too.
    assert {"scene.zip", "scene_splats.ply", "scene.glb", "scene.ply", "cameras.json", "transforms.json",
            "manifest.json", "state/cache-0001.ply"} <= set(after)


def test_revert_down_to_no_clip_and_refusals(examples, tmp_path, capsys):
    from engine.scene import Scene
    from engine.settings import SceneSettings

    out = tmp_path / "scene"
    scene = Scene.create(out, examples / PHOTO, settings=SceneSettings(engine="preview", frames=5),
                         announce=lambda m: None)
    created = _tree(out)
    scene.run(["up"])
    assert cli_main(["revert", str(out)]) == 0
    after = _tree(out)
    assert sorted(after) == sorted(created) and all(after[k] == created[k] for k in created)
    assert not any((out / n).exists() for n in ("scene.zip", "scene.ply", "scene_splats.ply", "images", "clips/00_up"))
    capsys.readouterr()
    assert cli_main(["revert", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: This scene has no clip to remove."
    assert cli_main(["revert", str(tmp_path / "nowhere")]) == 2
    assert "holds no scene" in capsys.readouterr().err
    # The scene goes on from its start after the undo.
    assert _generate(examples, out, "left") == 0
    assert [c["name"] for c in json.loads((out / "manifest.json").read_text())["clips"]] == ["00_left"]


def test_continuing_a_folder_with_another_input_is_refused(two_clips, examples, capsys):
    out, _ = two_clips
    before = _tree(out)
    capsys.readouterr()
    assert _generate(examples, out, "right", image=OTHER) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "another input (image.png, a photo)" in err[0], err
    assert _tree(out) == before
    assert cli_main(["generate", "--panorama", str(examples / PHOTO), "--engine", "preview", "--out", str(out)]) == 2
    assert "another input" in capsys.readouterr().err


def test_each_clip_has_a_depth_video(two_clips):
    out, _ = two_clips
    for clip in json.loads((out / "manifest.json").read_text())["clips"]:
        video = iio.imread(out / clip["folder"] / "depth.mp4")
        assert video.shape[0] == clip["frames"] == iio.imread(out / clip["folder"] / "clip.mp4").shape[0]
        assert video[..., 0].max() > 100  # near surfaces are warm (red channel high)


def test_depth_colours_run_from_red_near_to_blue_far_with_one_range_for_all_frames():
    depth = torch.linspace(1.0, 4.0, 64).expand(2, 8, 64).clone()
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[1, :, :4] = False
    rgb = depth_to_colors(depth, valid)
    near, far = rgb[0, :, 4, 8], rgb[0, :, 4, 60]
    assert near[0] > 0.5 and near[2] < 0.3 and far[2] > near[2] and far[0] < near[0]
    assert torch.equal(rgb[0, :, :, 4:], rgb[1, :, :, 4:])  # same depth, same colour in every frame
    assert torch.equal(rgb[1, :, :, :4], torch.zeros(3, 8, 4))  # no depth: black


def test_revert_within_one_run_restores_the_first_clips_files(examples, tmp_path):
    """`generate --trajectories up,left` in one go, then `revert`: every file the scene had right after its first
    clip (the cache, memory, manifest, scene.ply/.glb/splats) comes back byte for byte, and the exports are
    written for that one clip."""
    from engine.scene import Scene
    from engine.settings import SceneSettings

    out = tmp_path / "scene"
    scene = Scene.create(out, examples / PHOTO, settings=SceneSettings(engine="preview", frames=5),
                         announce=lambda m: None)
    first = {}

    def after_first_clip(committed):  # in the writer's thread, before the second clip can be written
        if len(committed.clips) == 1:
            assert (out / "state" / "manifest-0001.json").is_file()
            first.update(_tree(out))

    scene.run(["up", "left"], on_commit=after_first_clip)
    assert first and len(json.loads((out / "manifest.json").read_text())["clips"]) == 2
    both = _tree(out)
    assert cli_main(["revert", str(out)]) == 0
    after = _tree(out)
    changed = [name for name in first if after.get(name) != first[name]]
    assert not changed, changed
    assert {"cameras.json", "transforms.json", "scene.zip"} <= set(after)
    assert not any(name.startswith("clips/01_left") or name == "state/cache-0002.ply" for name in after)
    # the same command again puts the removed clip back as the uninterrupted run made it, every file but timings
    assert _generate(examples, out, "up,left") == 0
    assert_same_scene(out, both)
