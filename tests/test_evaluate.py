"""Camera accuracy and reconstruction F1 (engine.evaluate) judged against truth the tests build themselves.

The camera truth is a textured room (bench/evaluate.py's ``textured_room``, shared with the benchmark) rendered by
the project's point renderer along known cameras: structure from motion must give those cameras back. The
reconstruction truth is the room's own cloud, moved by known amounts.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from engine.cli import main as cli_main
from engine.evaluate import (
    RecoveredPoses,
    f1_auc,
    evaluate_clip,
    evaluate_reconstruction,
    judge_poses,
    read_scene_evaluation,
    recover_poses,
    similarity,
)
from engine.geometry.cameras import Cameras
from engine.geometry.cache import PointCache
from engine.images import save_image
from engine.jobfolder import FRAMES, JobFolder

REPO = Path(__file__).resolve().parents[1]
PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
W, H, N = 256, 160, 14  # small frames; enough of them that frames 10.. exist for the yaw test


def _bench():
    """bench/evaluate.py as a module (under its own name: ``evaluate`` is also a PyPI package's name), importing its
    neighbours as the script does (bench/ first on the path)."""
    if "bench_evaluate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_evaluate", REPO / "bench" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(REPO / "bench"))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(REPO / "bench"))
        sys.modules["bench_evaluate"] = module
    return sys.modules["bench_evaluate"]


@pytest.fixture(scope="module")
def room():
    bench = _bench()
    cams = bench.room_cameras(W, H, N)
    # Radius 0 on a grid finer than a pixel's footprint: every pixel shows the point nearest its ray, no splat
    # squares that would shift oblique walls by a pixel.
    render = bench.textured_room(spacing=0.01).render(cams, radius=0)
    assert render.mask.float().mean() > 0.999  # the walls fill the frames: no holes for SIFT to find edges at
    return bench, cams, render.image


@pytest.fixture(scope="module")
def recovered(room):
    """The room clip through structure from motion once; the intrinsics of the model the mapper returned."""
    import pycolmap

    _, cams, frames = room
    kept = []
    real = pycolmap.global_mapping

    def spy(*args, **kwargs):
        models = real(*args, **kwargs)
        kept.extend(m.cameras[c].params.copy() for m in models.values() for c in m.cameras)
        return models

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycolmap, "global_mapping", spy)
        return recover_poses(frames, cams, threads=2), kept


def test_recovered_cameras_are_the_rendered_ones(room, recovered):
    _, cams, _ = room
    poses, intrinsics = recovered
    result = judge_poses(cams, poses)
    print(f"per-frame RotErr {np.round(result.frame_rot_err_deg, 3)}, ATE {result.ate:.4f}, {poses.seconds}")
    assert result.registered_count == N and result.mapper == "global" and result.note == ""
    assert max(result.frame_rot_err_deg) < 0.3
    assert result.ate < 0.02
    assert result.rot_err_deg == pytest.approx(sum(result.frame_rot_err_deg))
    # The path: 13 chords of a 20-degree arc of radius 3 about the pivot.
    assert result.path_length == pytest.approx(2 * 3.0 * math.sin(math.radians(20 / 13) / 2) * 13, rel=1e-9)
    # The intrinsics stayed the clip's own: PINHOLE fx, fy, cx, cy exactly as asked.
    k = cams.K[0].numpy()
    assert intrinsics and all(np.allclose(p, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=0, atol=1e-9)
                              for p in intrinsics)


def test_a_yaw_added_from_frame_10_on_is_found_in_those_frames(room, recovered):
    _, cams, _ = room
    yaw = torch.from_numpy(Rotation.from_euler("y", 5.0, degrees=True).as_matrix())
    w2c = cams.w2c.clone()
    # Turning each camera about its own centre: R' = Y R, t' = Y t leaves the centre -R'^T t' where it was.
    w2c[10:, :3, :3] = yaw @ w2c[10:, :3, :3]
    w2c[10:, :3, 3:] = yaw @ w2c[10:, :3, 3:]
    turned = Cameras(w2c, cams.K, W, H)
    assert torch.allclose(turned.centers, cams.centers, atol=1e-12)
    clean, judged = judge_poses(cams, recovered[0]), judge_poses(turned, recovered[0])
    assert all(e >= 4.0 for e in judged.frame_rot_err_deg[10:]), judged.frame_rot_err_deg
    assert judged.frame_rot_err_deg[:10] == clean.frame_rot_err_deg[:10]
    assert judged.ate == pytest.approx(clean.ate)  # the centres did not move


def test_incremental_mapping_takes_over_when_global_mapping_registers_nothing(room, monkeypatch):
    import pycolmap

    _, cams, frames = room
    monkeypatch.setattr(pycolmap, "global_mapping", lambda *a, **k: {})
    result = evaluate_clip(frames[:6], cams[:6], threads=2)
    assert result.mapper == "incremental" and result.registered_count == 6
    assert max(result.frame_rot_err_deg) < 0.3 and result.ate < 0.02


def test_noise_frames_register_nothing_and_say_so():
    cams = _bench().room_cameras(W, H, 6)
    noise = torch.rand(6, 3, H, W, generator=torch.Generator().manual_seed(0))
    result = evaluate_clip(noise, cams, threads=2)
    assert result.registered_count == 0 and result.mapper == "none"
    assert result.rot_err_deg is None and result.trans_err is None and result.ate is None
    assert result.frame_rot_err_deg == [None] * 6 and "no frame registered" in result.note


# ---- the definitions on poses made by hand ------------------------------------------------------------------------
def _moved(cams: Cameras, s: float, rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The cameras' w2c in a world moved by ``x -> s rot x + t`` (what structure from motion may return)."""
    c2w = cams.c2w.numpy().copy()
    c2w[:, :3, :3] = rot @ c2w[:, :3, :3]
    c2w[:, :3, 3] = s * c2w[:, :3, 3] @ rot.T + t
    return np.linalg.inv(c2w)


def test_definitions_on_poses_in_another_world_frame(room):
    _, cams, _ = room
    rot = Rotation.from_euler("xyz", [30, -50, 10], degrees=True).as_matrix()
    w2c = _moved(cams, 0.37, rot, np.array([1.0, -2.0, 5.0]))
    registered = np.ones(N, dtype=bool)
    exact = judge_poses(cams, RecoveredPoses(w2c.copy(), registered, "global"))
    assert exact.rot_err_deg == pytest.approx(0.0, abs=1e-6)
    assert exact.trans_err == pytest.approx(0.0, abs=1e-9) and exact.ate == pytest.approx(0.0, abs=1e-9)
    # A recovered camera turned 2 degrees about its own centre: RotErr 2, no translation error.
    turn = Rotation.from_euler("x", 2.0, degrees=True).as_matrix()
    w2c[4, :3, :3] = turn @ w2c[4, :3, :3]
    w2c[4, :3, 3] = turn @ w2c[4, :3, 3]
    # Two frames not registered: left out of every sum, listed as None.
    registered[[7, 11]] = False
    w2c[[7, 11]] = np.nan
    judged = judge_poses(cams, RecoveredPoses(w2c, registered, "global", note="2 of 14 frames registered"))
    assert judged.rot_err_deg == pytest.approx(2.0, abs=1e-6)
    assert judged.frame_rot_err_deg[7] is None and judged.recovered_centres[11] is None
    assert judged.registered_count == 12 and judged.ate == pytest.approx(0.0, abs=1e-9)


def test_translation_figures_against_a_hand_computed_alignment(room):
    """Centre errors after the similarity, against Umeyama solved here with numpy's SVD (a second implementation)."""
    _, cams, _ = room
    rng = np.random.default_rng(1)
    w2c = _moved(cams, 2.0, np.eye(3), np.zeros(3))
    c2w = np.linalg.inv(w2c)
    c2w[:, :3, 3] += rng.normal(scale=0.05, size=(N, 3))
    judged = judge_poses(cams, RecoveredPoses(np.linalg.inv(c2w), np.ones(N, dtype=bool), "global"))
    src, dst = c2w[:, :3, 3], cams.centers.numpy()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    u, d, vt = np.linalg.svd((dst - mu_d).T @ (src - mu_s) / N)
    sign = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    r = u @ sign @ vt
    s = np.trace(np.diag(d) @ sign) / ((src - mu_s) ** 2).sum(1).mean()
    err = np.linalg.norm(s * src @ r.T + (mu_d - s * r @ mu_s) - dst, axis=1)
    length = np.linalg.norm(np.diff(dst, axis=0), axis=1).sum()
    assert judged.trans_err == pytest.approx(err.sum() / length, rel=1e-6)
    assert judged.ate == pytest.approx(np.sqrt((err ** 2).mean()) / length, rel=1e-6)
    assert judged.frame_centre_err == pytest.approx(list(err / length), rel=1e-6)


def test_too_few_registered_frames_and_a_pan_in_place_give_no_figures(room):
    _, cams, _ = room
    registered = np.zeros(N, dtype=bool)
    registered[:2] = True
    w2c = np.where(registered[:, None, None], cams.w2c.numpy(), np.nan)
    few = judge_poses(cams, RecoveredPoses(w2c, registered, "global", note="2 of 14 frames registered"))
    assert few.rot_err_deg is None and few.ate is None and "at least 3" in few.note
    pan = Cameras(cams.w2c.clone(), cams.K, W, H)
    pan.w2c[:, :3, 3] = 0  # every camera at the origin
    still = judge_poses(pan, RecoveredPoses(pan.w2c.numpy().copy(), np.ones(N, dtype=bool), "global"))
    assert still.rot_err_deg == pytest.approx(0.0, abs=1e-6) and still.trans_err is None and still.ate is None
    assert "do not move" in still.note


def test_similarity_of_a_planar_path():
    t = np.linspace(0, 1, 9)
    arc = np.stack([np.sin(t), np.zeros_like(t), np.cos(t)], axis=1)  # coplanar centres, as most camera paths
    rot = Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix()
    s, r, shift = similarity(arc, 2.5 * arc @ rot.T + [1, 2, 3])
    assert s == pytest.approx(2.5) and np.allclose(r, rot) and np.allclose(shift, [1, 2, 3])


# ---- reconstruction -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def room_cloud():
    return _bench().textured_room(spacing=0.05).points.double().numpy()


def test_f1_of_a_cloud_against_itself_and_shifted(room_cloud):
    same = evaluate_reconstruction(room_cloud, room_cloud)
    assert same.threshold == pytest.approx(0.01 * np.linalg.norm(room_cloud.max(0) - room_cloud.min(0)))
    assert (same.precision, same.recall, same.f1, same.auc) == (1.0, 1.0, 1.0, 1.0)
    # One wall (a 4 x 3 grid, 0.05 apart) moved along its normal: every distance is exactly the shift, so F1(tau) is 0
    # up to the shift and 1 beyond it, and the AUC over (0, T] is 1 - shift / T.
    u, v = np.meshgrid(np.arange(0, 4, 0.05), np.arange(0, 3, 0.05))
    wall = np.stack([u.ravel(), v.ravel(), np.zeros(u.size)], axis=1)
    tau = evaluate_reconstruction(wall, wall).threshold
    normal = np.array([0.0, 0.0, 1.0])
    far = evaluate_reconstruction(wall + 3 * tau * normal, wall)
    assert far.f1 <= 0.05 and far.auc <= 0.05
    near = evaluate_reconstruction(wall + 0.3 * tau * normal, wall)
    assert near.f1 == 1.0 and far.auc < near.auc < 1.0
    assert near.auc == pytest.approx(0.7, abs=1e-9)


def test_auc_is_the_integral_of_f1():
    rng = np.random.default_rng(2)
    ds, dr = rng.exponential(0.3, 500), rng.exponential(0.5, 700)
    p, r, f, auc = f1_auc(ds, dr, 1.0)
    grid = np.linspace(0, 1, 200001)[1:]  # a fine Riemann sum: an independent estimate of the same integral
    pg = np.searchsorted(np.sort(ds), grid) / len(ds)  # share of distances < tau
    rg = np.searchsorted(np.sort(dr), grid) / len(dr)
    fg = np.where(pg + rg > 0, 2 * pg * rg / np.maximum(pg + rg, 1e-300), 0)
    assert auc == pytest.approx(fg.mean(), abs=1e-4)
    assert (p, r) == (np.mean(ds < 1.0), np.mean(dr < 1.0)) and f == pytest.approx(2 * p * r / (p + r))


def test_align_brings_a_moved_copy_back(room_cloud):
    pts = room_cloud
    rot = Rotation.from_euler("xyz", [4, -6, 3], degrees=True).as_matrix()
    moved = 1.3 * pts @ rot.T + [0.2, -0.1, 0.3]
    plain = evaluate_reconstruction(moved, pts)
    aligned = evaluate_reconstruction(moved, pts, align=True)
    assert plain.f1 < 0.2 and aligned.f1 > 0.99 and aligned.aligned
    # The inverse of the applied similarity.
    m = np.asarray(aligned.transform)[:3, :3]
    scale = np.cbrt(np.linalg.det(m))
    assert scale == pytest.approx(1 / 1.3, rel=1e-3)
    assert Rotation.from_matrix(m / scale @ rot).magnitude() < math.radians(0.05)


# ---- the CLI on a preview scene -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preview_scene(examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "scene"
    rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "preview", "--frames", "5",
                   "--trajectories", "up,left", "--out", str(out)])
    assert rc == 0
    return out


def test_cli_writes_the_report_and_the_picture(preview_scene, tmp_path, capsys):
    out = tmp_path / "scene"
    shutil.copytree(preview_scene, out)
    assert cli_main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    assert [c["name"] for c in report["clips"]] == ["00_up", "01_left"] and "00_up" in printed
    assert report["versions"]["pycolmap"] == "4.2.1" and "rot_err_deg" in report["definitions"]
    for clip in report["clips"]:  # preview frames are renders of the cache along the asked cameras
        assert clip["registered"] >= 3
        assert max(e for e in clip["frame_rot_err_deg"] if e is not None) < 1.0
    assert report["scene"]["frames"] == 10 and report["reconstruction"] is None
    assert report["up"] == {"axis": 1, "sign": -1.0}  # photo scenes: the input camera's frame, y down
    with Image.open(out / "evaluation.png") as im:
        assert im.format == "PNG" and im.width >= 800 and len(set(im.convert("RGB").getdata())) > 20
    with zipfile.ZipFile(out / "scene.zip") as zf:  # the exported scene's zip was written again to hold them
        for name in ("evaluation.json", "evaluation.png"):
            assert zf.read(name) == (out / name).read_bytes(), name


def test_cli_reconstruction_against_a_moved_copy_of_the_scene(preview_scene, tmp_path, capsys):
    cloud = PointCache.load_ply(preview_scene / "scene.ply")
    rot = torch.from_numpy(Rotation.from_euler("y", 3.0, degrees=True).as_matrix()).float()
    moved = PointCache(0.8 * cloud.points @ rot.T + 0.05, cloud.colors, cloud.confidence, cloud.source)
    moved.save_ply(tmp_path / "reference.ply")
    report_path = tmp_path / "report.json"
    assert cli_main(["evaluate", str(preview_scene), "--clips", "00_up", "--reference-cloud",
                     str(tmp_path / "reference.ply"), "--align", "--json", str(report_path)]) == 0
    assert "F1" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert (tmp_path / "report.png").is_file() and not (preview_scene / "evaluation.json").exists()
    assert [c["name"] for c in report["clips"]] == ["00_up"]
    rec = report["reconstruction"]
    assert rec["aligned"] and rec["f1"] > 0.95 and rec["reference"] == "reference.ply"


def test_cli_noise_frames_are_reported_not_raised(preview_scene, tmp_path, capsys):
    out = tmp_path / "scene"
    shutil.copytree(preview_scene, out)
    folder = JobFolder(out)
    clip = folder.read_manifest()["clips"][1]
    frames = folder.clip_frames(clip)
    noise = torch.rand(frames.shape, generator=torch.Generator().manual_seed(0))
    for i, frame in enumerate(noise):
        save_image(out / clip["folder"] / FRAMES / f"{i:04d}.png", frame)
    assert cli_main(["evaluate", str(out), "--clips", clip["name"]]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    judged = report["clips"][0]
    assert judged["registered"] == 0 and judged["rot_err_deg"] is None and "no frame registered" in judged["note"]
    assert "0/5" in printed and "no frame registered" in printed
    assert (out / "evaluation.png").is_file()


def _zip_names(folder: Path) -> set:
    with zipfile.ZipFile(folder / "scene.zip") as zf:
        return set(zf.namelist())


def test_revert_keeps_an_evaluation_of_other_clips_and_removes_one_of_the_removed_clip(preview_scene, tmp_path):
    evaluation = ("evaluation.json", "evaluation.png")
    # Judged: 00_up only. Removing 01_left leaves it as it was, in the folder and in the zip written again.
    kept = tmp_path / "kept"
    shutil.copytree(preview_scene, kept)
    assert cli_main(["evaluate", str(kept), "--clips", "00_up", "--threads", "1"]) == 0
    before = {name: (kept / name).read_bytes() for name in evaluation}
    assert read_scene_evaluation(kept).unjudged == ["01_left"]
    assert cli_main(["revert", str(kept)]) == 0
    assert {name: (kept / name).read_bytes() for name in evaluation} == before
    assert set(evaluation) <= _zip_names(kept)
    state = read_scene_evaluation(kept)
    assert [c["name"] for c in state.report["clips"]] == ["00_up"] and state.unjudged == []

    # Judged: both clips. Removing 01_left removes the evaluation, from the folder and the zip.
    judged = tmp_path / "judged"
    shutil.copytree(preview_scene, judged)
    assert cli_main(["evaluate", str(judged), "--threads", "1"]) == 0
    assert read_scene_evaluation(judged).unjudged == []
    assert cli_main(["revert", str(judged)]) == 0
    assert not any((judged / name).exists() for name in evaluation)
    assert not set(evaluation) & _zip_names(judged) and read_scene_evaluation(judged) is None

    # A damaged evaluation names nothing that can be trusted: it goes too.
    damaged = tmp_path / "damaged"
    shutil.copytree(preview_scene, damaged)
    (damaged / "evaluation.json").write_text('{"clips": [{"na')
    assert read_scene_evaluation(damaged) is None
    assert cli_main(["revert", str(damaged)]) == 0
    assert not (damaged / "evaluation.json").exists()


@pytest.mark.parametrize("extra, words", [
    (["--clips", "nope"], "No clip named nope"),
    (["--threshold", "0.1"], "--reference-cloud"),
    (["--align"], "--reference-cloud"),
    (["--reference-cloud", "missing.ply"], "does not exist"),
    (["--threads", "0"], "--threads"),
])
def test_cli_bad_arguments_get_one_sentence(preview_scene, extra, words, capsys):
    assert cli_main(["evaluate", str(preview_scene), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and len(err.splitlines()) == 1


def test_cli_refuses_a_folder_without_a_scene(tmp_path, capsys):
    assert cli_main(["evaluate", str(tmp_path)]) == 2
    assert "holds no scene" in capsys.readouterr().err


def test_bench_prints_its_table(capsys, one_thread):
    _bench().main(["--width", "192", "--height", "120", "--frames", "5", "--spacing", "0.03", "--radius", "1",
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert "| total s (median) |" in out and "| 5/5 | global |" in out


def test_generate_evaluate_judges_each_clip_as_the_evaluate_command_does(preview_scene, examples, tmp_path, capsys):
    """``generate --evaluate`` on a scene with clips done (a resume adding one more): the clips judged beside the loop,
    the earlier ones included, carry the figures ``evaluate --threads 1`` gives for the finished scene afterwards."""
    out = tmp_path / "scene"
    shutil.copytree(preview_scene, out)
    assert cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "preview", "--frames", "5",
                     "--trajectories", "up,left,right", "--out", str(out), "--evaluate"]) == 0
    printed = capsys.readouterr().out
    beside = json.loads((out / "evaluation.json").read_text())
    assert [c["name"] for c in beside["clips"]] == ["00_up", "01_left", "02_right"] and "02_right" in printed
    with zipfile.ZipFile(out / "scene.zip") as zf:
        assert zf.read("evaluation.json") == (out / "evaluation.json").read_bytes()
    assert cli_main(["evaluate", str(out), "--threads", "1", "--json", str(tmp_path / "after.json")]) == 0
    after = json.loads((tmp_path / "after.json").read_text())
    for a, b in zip(beside["clips"], after["clips"]):
        assert a["registered"] == b["registered"] and a["registered"] >= 3, a["name"]
        for key in ("rot_err_deg", "trans_err", "ate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["name"], key)
