"""The release's retrieval rule (engine.geometry.retrieval.retrieve_as_release), its selector, the frame features
and the official scene reader: against the release's own answer on the corridor example
(../shared/reference/golden/corridor_retrieval.json), an independent float64 scorer and selector written here from
the release's formulas, analytic cases, and a tiny random DINOv2."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.spatial.transform import Rotation

from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.geometry.memory import sample_align_nframe
from engine.geometry.retrieval import (FrameFeatures, RetrievalError, release_scores, retrieval_targets,
                                       retrieve_as_release, select_frames, shortcut_bonus)
from engine.official_scene import OfficialSceneError, read_official_scene

from conftest import SHARED

CORRIDOR = "panorama/indoor-corridor"
W, H = 64, 48


def camera(yaw=0.0, pitch=0.0, center=(0.0, 0.0, 0.0), fov=60.0, width=W, height=H) -> Cameras:
    """One camera at ``center`` turned by yaw (about world y) then pitch (about its x)."""
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_euler("YX", [yaw, pitch], degrees=True).as_matrix()
    c2w[:3, 3] = center
    return Cameras(torch.tensor(np.linalg.inv(c2w))[None], intrinsics_from_fov(width, height, fov), width, height)


def cat(*cams: Cameras) -> Cameras:
    return Cameras.cat(list(cams))


# ---- independent references (numpy float64, from the release's formulas) ----------------------------

def ref_iou_angle(targets: Cameras, bank: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """IoU of the boxes around the frustum corners (near 0.1, far 10 along the unit corner rays; 0 unless the boxes
    overlap on every axis) and the angle in degrees between the optical axes, ``[T,M]`` each."""
    def boxes(c: Cameras):
        out = []
        for w2c, k in zip(c.w2c.numpy(), c.K.numpy()):
            c2w = np.linalg.inv(w2c)
            corners = []
            for u, v in ((0, 0), (c.width, 0), (c.width, c.height), (0, c.height)):
                d = np.linalg.solve(k, [u, v, 1.0])
                d /= np.linalg.norm(d)
                corners += [c2w[:3, :3] @ (d * depth) + c2w[:3, 3] for depth in (0.1, 10.0)]
            corners = np.array(corners)
            out.append((corners.min(0), corners.max(0), c2w[:3, 2]))
        return out

    bt, bb = boxes(targets), boxes(bank)
    iou, angle = np.zeros((len(bt), len(bb))), np.zeros((len(bt), len(bb)))
    for i, (lo1, hi1, a1) in enumerate(bt):
        for j, (lo2, hi2, a2) in enumerate(bb):
            angle[i, j] = math.degrees(math.acos(max(-1.0, min(1.0, float(a1 @ a2)))))
            lo, hi = np.maximum(lo1, lo2), np.minimum(hi1, hi2)
            if (hi > lo).all():
                inter = np.prod(hi - lo)
                iou[i, j] = inter / (np.prod(hi1 - lo1) + np.prod(hi2 - lo2) - inter)
    return iou, angle


def ref_scores(targets: Cameras, bank: Cameras) -> np.ndarray:
    """The release's score: IoU times clip(exp((90 - angle) / 36), 0, 1)."""
    iou, angle = ref_iou_angle(targets, bank)
    return iou * np.minimum(1.0, np.exp((90 - angle) / 36))


def ref_select(w2c: np.ndarray, image, quality, k: int) -> list[int]:
    """The release's CameraSelector.select in plain loops: [0.3 * z(pose), 0.7 * z(image)], quality-aware FPS."""
    def z(x):
        x = np.asarray(x, dtype=np.float64)
        return (x - x.mean(0)) / (x.std(0) + 1e-8)

    feats = []
    for m in w2c:
        r, t = m[:3, :3].astype(np.float64), m[:3, 3].astype(np.float64)
        q = Rotation.from_matrix(r).as_quat()
        feats.append(np.concatenate([-r.T @ t, -q if q[3] < 0 else q]))
    x = z(feats) * 0.3
    if image is not None:
        x = np.concatenate([x, z(image) * 0.7], axis=1)
    q = np.asarray(quality, dtype=np.float64)
    qn = (q - q.min()) / (q.max() - q.min() + 1e-8)
    start = [-np.linalg.norm(x[i] - x.mean(0)) + 0.1 * qn[i] for i in range(len(x))]
    chosen = [int(np.argmax(start))]
    dist = [math.inf] * len(x)
    for _ in range(k - 1):
        last = x[chosen[-1]]
        best, best_i = -math.inf, None
        for i in range(len(x)):
            dist[i] = min(dist[i], float(np.linalg.norm(x[i] - last)))
            score = -math.inf if i in chosen else dist[i] * (1 + 0.1 * (qn[i] - 0.5))
            if score > best:
                best, best_i = score, i
        chosen.append(best_i)
    return chosen


def ref_quality(rgb: np.ndarray) -> float:
    """Grey with OpenCV's BGR-to-grey weights read on RGB (0.114 R, 0.587 G, 0.299 B), Laplacian with the 4-neighbour
    kernel and mirrored borders, entropy of the 256-bin histogram in bits, standard deviation / 128."""
    grey = np.floor(rgb[..., 0] * 0.114 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.299 + 0.5)
    lap = ndimage.convolve(grey, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float), mode="mirror")
    hist = np.bincount(grey.astype(int).ravel(), minlength=256) / grey.size + 1e-10
    return 0.4 * math.log1p(lap.var()) + 0.3 * -(hist * np.log2(hist)).sum() + 0.3 * grey.std() / 128


def first_picks(per_target):
    first = {}
    for t, m in enumerate(per_target):
        first.setdefault(m, t)
    return list(first), list(first.values())


# ---- THE test: the release's answer on the corridor ---------------------------------------------------

def test_corridor_retrieval_is_the_releases(examples):
    golden = json.loads((SHARED / "reference/golden/corridor_retrieval.json").read_text())
    scene = read_official_scene(examples / CORRIDOR)
    assert len(scene.bank_files) == 27 and (scene.bank_cameras.width, scene.bank_cameras.height) == (832, 480)
    assert [p.name for p in scene.bank_files] == [f"{i:04d}.png" for i in range(27)]
    bank, labels = scene.bank_cameras, scene.bank_labels
    assert [t.label for t in scene.trajectories] == [g["trajectory"] for g in golden["trajectories"]]
    for traj, expected in zip(scene.trajectories, golden["trajectories"]):
        n_targets = len(retrieval_targets(len(traj.cameras)))
        got = retrieve_as_release(traj.cameras, bank, bonus=traj.bonus(labels, n_targets))
        assert len(bank) == expected["bank_size_before"]
        assert got.per_target == expected["per_target"], traj.label
        assert got.ref_index == expected["ref_index"], traj.label
        assert got.references == expected["references"], traj.label
        kept = sample_align_nframe(len(traj.cameras), 8)
        assert kept == expected["kept_frames"]
        bank = Cameras.cat([bank, traj.cameras[kept]])
        labels = labels + [traj.label] * len(kept)


def test_corridor_shortcuts_decide_some_targets(examples):
    """Without the shortcut rule traj0 takes other frames: the golden answer holds the rule, not only geometry."""
    golden = json.loads((SHARED / "reference/golden/corridor_retrieval.json").read_text())
    scene = read_official_scene(examples / CORRIDOR)
    traj2, traj0 = scene.trajectories[:2]
    bank = Cameras.cat([scene.bank_cameras, traj2.cameras[sample_align_nframe(21, 8)]])
    plain = retrieve_as_release(traj0.cameras, bank)
    assert plain.per_target != golden["trajectories"][1]["per_target"]
    labels = scene.bank_labels + [traj2.label] * 8
    assert traj0.bonus(labels, 21) == {1: {30}, 2: {30}, 3: {30}, 5: {30}, 7: {32}, 9: {32}, 13: {32}, 17: {34}}


# ---- the rule on hand-made cameras ------------------------------------------------------------------

def test_scores_and_argmax_equal_an_independent_float64_computation():
    rng = np.random.default_rng(0)
    cams = [camera(yaw=rng.uniform(-180, 180), pitch=rng.uniform(-30, 30), center=rng.normal(0, 1.5, 3),
                   fov=rng.uniform(40, 100)) for _ in range(40)]
    targets, bank = cat(*cams[:16]), cat(*cams[16:])
    ours, ref = release_scores(targets, bank).double().numpy(), ref_scores(targets, bank)
    assert np.abs(ours - ref).max() < 1e-5
    assert (ref > 0).mean() > 0.3  # the random cameras overlap often enough to test something
    got = retrieve_as_release(targets, bank, max_refs=len(bank))  # the first pass alone, no selector
    top2 = np.sort(ref[1:], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() >= 10
    assert np.array_equal(np.array(got.per_target)[clear], ref[1:].argmax(1)[clear])


def test_angle_factor_is_one_up_to_90_degrees_then_falls_exponentially():
    rng = np.random.default_rng(1)
    cams = [camera(yaw=rng.uniform(-180, 180), center=rng.normal(0, 0.5, 3), fov=100.0) for _ in range(30)]
    targets, bank = cat(*cams[:15]), cat(*cams[15:])
    scores = release_scores(targets, bank).double().numpy()
    iou, angle = ref_iou_angle(targets, bank)
    factor = np.array([[min(1.0, math.exp((90 - a) / 36)) for a in row] for row in angle])
    seen = iou > 1e-3
    assert (seen & (angle > 100)).sum() >= 5 and (seen & (angle < 80)).sum() >= 5
    assert np.allclose(scores[seen] / iou[seen], factor[seen], rtol=1e-4)
    assert math.isclose(math.exp(-30 / 36), 0.4346, abs_tol=1e-4)  # 120 degrees keeps 43 % of the overlap


def test_identical_frames_tie_to_the_lowest_bank_index():
    far = camera(center=(100.0, 0, 0))
    target = camera(yaw=10)
    bank = cat(far, target, far, target)  # frames 1 and 3 are the same camera: an exact tie
    got = retrieve_as_release(cat(camera(), target), bank)
    assert got.per_target == [1] and got.references == [1] and got.ref_index == [0]


def test_a_target_that_sees_no_frame_still_gets_one():
    bank = cat(camera(center=(100.0, 0, 0)), camera(center=(0, 100.0, 0)))
    got = retrieve_as_release(cat(camera(), camera(yaw=5), camera(yaw=-5)), bank)
    assert release_scores(cat(camera(yaw=5)), bank).abs().max() == 0
    assert got.per_target == [0, 0] and got.references == [0] and got.ref_index == [0]


def test_ref_index_is_the_first_target_that_took_each_frame():
    b0, b1, b2 = camera(yaw=0), camera(yaw=40), camera(yaw=80)
    # A target equal to a bank camera scores IoU 1 with it and less with any other.
    got = retrieve_as_release(cat(camera(yaw=-20), b1, b1, b0, b2, b0), cat(b0, b1, b2))
    assert got.per_target == [1, 1, 0, 2, 0]
    assert got.references == [1, 0, 2] and got.ref_index == [0, 2, 3]
    assert got.selected is None


def test_a_shortcut_adds_one_to_the_frames_score():
    near, away = camera(yaw=20), camera(center=(100.0, 0, 0))
    targets = cat(camera(), camera(yaw=10), camera(yaw=12))
    plain = retrieve_as_release(targets, cat(near, away))
    assert plain.per_target == [0, 0]
    got = retrieve_as_release(targets, cat(near, away), bonus={2: {1}})
    assert got.per_target == [0, 1] and got.references == [0, 1] and got.ref_index == [0, 1]
    with pytest.raises(RetrievalError):
        retrieve_as_release(targets, cat(near, away), bonus={3: {1}})
    with pytest.raises(RetrievalError):
        retrieve_as_release(targets, cat(near, away), bonus={1: {2}})


def test_shortcut_rules_as_the_release_writes_them():
    pano = ["scene/pano_bank"] * 27
    traj2 = ["view0/traj2"] * 8  # bank indices 27..34
    # view*/traj0: every other traj2 frame from the 4th (30, 32, 34) at targets 1 2 3 5 7 9 13 17, int(t / 21 * 3).
    assert shortcut_bonus("view0", "traj0", pano + traj2, 21) == {
        1: {30}, 2: {30}, 3: {30}, 5: {30}, 7: {32}, 9: {32}, 13: {32}, 17: {34}}
    # view*/traj1: the first half of traj2's frames only (27..30), from the 4th: 30 alone.
    assert shortcut_bonus("view0", "traj1", pano + traj2, 21) == {t: {30} for t in (1, 2, 3, 5, 7, 9, 13, 17)}
    assert shortcut_bonus("view0", "traj2", pano + traj2, 21) == {}
    assert shortcut_bonus("view1", "traj0", pano + traj2, 21) == {}  # another view's traj2 does not count
    # wonder*/target* after traj0: every other frame of their traj0 from the 4th, at every target but 4 8 12 16.
    wonder = pano + ["wonder0/traj0"] * 8  # 27..34
    got = shortcut_bonus("wonder0", "traj1", wonder, 21)
    assert sorted(got) == [t for t in range(1, 21) if t not in (4, 8, 12, 16)]
    assert all(got[t] == {[30, 32, 34][int(t / 21 * 3)]} for t in got)
    assert shortcut_bonus("wonder0", "traj0", wonder, 21) == {}
    assert shortcut_bonus("target_2", "traj1", pano + ["target_2/traj0"] * 3, 21) == {}  # fewer than 4 frames
    assert shortcut_bonus("reconstruct_0", "traj1", pano, 21) == {}


def test_long_camera_files_are_retrieved_at_every_fourth_camera():
    assert retrieval_targets(81) == list(range(0, 81, 4)) and retrieval_targets(21) == list(range(21))
    assert retrieval_targets(41) == list(range(0, 41, 4))  # not the 21 keyframes: the release's stride, as it is
    path = cat(*[camera(yaw=1.5 * i, center=(0.02 * i, 0, 0)) for i in range(81)])
    bank = cat(*[camera(yaw=y) for y in (0, 30, 60, 90, 120)])
    got = retrieve_as_release(path, bank)
    assert got.targets == list(range(0, 81, 4)) and len(got.per_target) == 20
    assert got.per_target == retrieve_as_release(path[list(range(0, 81, 4))], bank).per_target
    assert len(set(got.per_target)) >= 3


def test_refusals_are_sentences():
    with pytest.raises(RetrievalError, match="empty"):
        retrieve_as_release(cat(camera(), camera(yaw=5)), Cameras(torch.zeros(0, 4, 4), torch.zeros(0, 3, 3), W, H))
    with pytest.raises(RetrievalError, match="two cameras"):
        retrieve_as_release(camera(), camera())


# ---- more than 8 frames: the selector -------------------------------------------------------------------

def fan(n: int = 20):
    """A bank of ``n`` cameras turning by 18 degrees, and targets equal to them: every target takes its own frame."""
    bank = cat(*[camera(yaw=18.0 * i, center=(0.05 * math.sin(i), 0.0, 0.03 * i)) for i in range(n)])
    return cat(camera(yaw=-30.0), bank), bank


def expected_after_selection(targets: Cameras, bank: Cameras, image, quality):
    """The release's path on the independent pieces: first picks, selection over one entry per target, then the
    argmax among the kept frames in selection order."""
    first = ref_scores(targets[1:], bank).argmax(1)
    sel = ref_select(bank.w2c.float().numpy()[first], None if image is None else image[first], quality[first], 8)
    kept = [int(first[e]) for e in sel]
    picks = ref_scores(targets[1:], bank[kept]).argmax(1)
    return kept, [kept[j] for j in picks]


def test_more_than_eight_frames_pose_only_fallback():
    targets, bank = fan()
    quality = np.random.default_rng(2).uniform(5, 8, len(bank))
    asked = []

    def features(idx):
        asked.append(list(idx))
        return FrameFeatures(None, quality[idx])

    got = retrieve_as_release(targets, bank, frame_features=features)
    assert asked == [list(range(20))]  # asked once, for the distinct first picks in order of pick
    kept, per_target = expected_after_selection(targets, bank, None, quality)
    assert got.selected == kept and len(set(kept)) == 8
    assert got.per_target == per_target
    assert (got.references, got.ref_index) == tuple(first_picks(per_target))
    assert 1 <= len(got.references) <= 8
    with pytest.raises(RetrievalError, match="frame features"):
        retrieve_as_release(targets, bank)


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64)).eval()


def test_more_than_eight_frames_with_a_tiny_random_dinov2():
    from transformers import BitImageProcessor

    from engine.frame_features import DINOV2_PROCESSOR, FrameDescriber

    targets, bank = fan()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(len(bank), 3, 40, 56, generator=g) ** torch.linspace(0.5, 3, len(bank))[:, None, None, None]
    model, processor = tiny_dinov2(), BitImageProcessor(**DINOV2_PROCESSOR)
    describer = FrameDescriber(model, processor)
    got = retrieve_as_release(targets, bank, frame_features=lambda idx: describer(images[idx]))

    # The release's features: each frame alone, as 8-bit RGB, through the processor and the model's pooler_output.
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        feats = np.concatenate([model(pixel_values=processor(images=Image.fromarray(p), return_tensors="pt")
                                      ["pixel_values"]).pooler_output.numpy() for p in pixels])
    quality = np.array([ref_quality(p.astype(np.float64)) for p in pixels])
    described = describer(images)
    assert np.allclose(described.image, feats, atol=1e-5) and np.allclose(described.quality, quality, rtol=1e-3)
    kept, per_target = expected_after_selection(targets, bank, feats, quality)
    assert got.selected == kept and got.per_target == per_target
    assert (got.references, got.ref_index) == tuple(first_picks(per_target))
    # The image features decide here: pose and quality alone keep other frames.
    assert expected_after_selection(targets, bank, None, quality)[0] != kept


def test_select_frames_equals_the_independent_selector():
    rng = np.random.default_rng(4)
    w2c = np.stack([camera(yaw=rng.uniform(-90, 90), pitch=rng.uniform(-20, 20), center=rng.normal(0, 1, 3)).w2c[0]
                    .numpy() for _ in range(15)])
    image, quality = rng.normal(size=(15, 12)), rng.uniform(3, 9, 15)
    for k in (1, 5, 8, 15):
        assert select_frames(w2c, FrameFeatures(image, quality), k) == ref_select(w2c, image, quality, k)
        assert select_frames(w2c, FrameFeatures(None, quality), k) == ref_select(w2c, None, quality, k)
    with pytest.raises(RetrievalError):
        select_frames(w2c, FrameFeatures(None, quality), 16)


def test_image_quality_matches_an_independent_computation():
    from engine.frame_features import image_quality

    rng = np.random.default_rng(5)
    frames = np.stack([rng.integers(0, 256, (30, 44, 3)) // d for d in (1, 4, 16)]).astype(np.uint8)
    frames[2, :, :, 2] = 255  # a strong blue: the release's grey weighs it 0.299, red 0.114
    got = image_quality(frames)
    assert np.allclose(got, [ref_quality(f.astype(np.float64)) for f in frames], rtol=1e-3)
    assert got[0] > got[1] > got[2]  # sharper, richer frames score higher


def test_describer_loads_a_folder_and_falls_back_in_one_line(tmp_path, monkeypatch):
    from transformers import BitImageProcessor

    import engine.frame_features as ff

    monkeypatch.setattr(ff, "_LOADED", {})
    model = tiny_dinov2()
    model.save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(**ff.DINOV2_PROCESSOR).save_pretrained(tmp_path / "dinov2")
    lines = []
    loaded = ff.load_frame_describer(tmp_path / "dinov2", announce=lines.append)
    assert lines == [] and loaded.model is not None
    assert ff.load_frame_describer(tmp_path / "dinov2") is loaded  # once per process
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pixels = loaded.processor(images=list(ff.to_uint8(images)), return_tensors="pt")["pixel_values"]
        assert np.allclose(loaded(images).image, model(pixel_values=pixels).pooler_output.numpy(), atol=1e-5)

    fallback = ff.load_frame_describer("worldstereo-tests/no-such-dinov2", announce=lines.append)
    assert len(lines) == 1 and "pose" in lines[0] and "\n" not in lines[0]
    described = fallback(images)
    assert described.image is None and described.quality.shape == (2,)


def test_describer_without_weights_does_not_import_transformers(tmp_path):
    """Weights absent from the cache: the pose-only describer and its one line, without importing transformers (seconds
    of a preview scene's first retrieval); a folder holding the weights still loads them (the test above)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, engine.frame_features as ff; lines = [];"
            "d = ff.load_frame_describer(announce=lines.append);"
            "print(d.model is None, len(lines), 'transformers' in sys.modules)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "1", "False"]


# ---- the official scene reader --------------------------------------------------------------------------

def write_traj(folder, prompt=None, n=3):
    folder.mkdir(parents=True)
    cams = cat(*[camera(yaw=5.0 * i) for i in range(n)])
    cams.save_json(folder / "camera.json")
    if prompt is not None:
        (folder / "traj_caption.json").write_text(json.dumps({"prompt": prompt}))


def test_reader_lists_trajectories_in_the_releases_order(tmp_path):
    root = tmp_path / "scene-a"
    (root / "pano_bank/images").mkdir(parents=True)
    bank = cat(camera(yaw=0), camera(yaw=40))
    names = ["0001", "0000"]
    json.dump({n: {"extrinsic": bank.w2c[i].tolist(), "intrinsic": bank.K[i].tolist()} for i, n in enumerate(names)},
              (root / "pano_bank/cameras.json").open("w"))
    for n in names:
        Image.new("RGB", (96, 64)).save(root / "pano_bank/images" / f"{n}.png")
    for traj in ("traj0", "traj1", "traj2"):
        write_traj(root / "view1" / traj, prompt=f"view1 {traj}")
        write_traj(root / "view0" / traj)
    Image.new("RGB", (W, H)).save(root / "view1/start_frame.png")
    write_traj(root / "view2/traj2")
    (root / "view2/valid_analysis.json").write_text(json.dumps({"valid": "no"}))
    for group, trajs in {"wonder0": ("traj1", "traj0"), "reconstruct_0": ("traj1", "traj0"),
                         "target-1": ("traj0", "traj10", "traj2"), "reconstruct_1": ("traj0",)}.items():
        for traj in trajs:
            write_traj(root / group / traj)
    (root / "view0/traj3").mkdir()  # no camera file: not a trajectory
    scene = read_official_scene(root)
    assert [t.label for t in scene.trajectories] == [
        "view0/traj2", "view0/traj0", "view0/traj1", "view1/traj2", "view1/traj0", "view1/traj1",
        "target_1/traj0", "target_1/traj10", "target_1/traj2", "reconstruct_0/traj0", "reconstruct_1/traj0",
        "wonder0/traj0", "wonder0/traj1", "reconstruct_0/traj1"]
    assert (root / "target-1").is_dir()  # the folder is not renamed
    first = scene.trajectories[3]
    assert first.prompt == "view1 traj2" and first.start_frame == root / "view1/start_frame.png"
    assert scene.trajectories[0].prompt is None and scene.trajectories[-1].start_frame is None
    # Bank order is the images' name order, each with the camera of its name.
    assert [p.stem for p in scene.bank_files] == ["0000", "0001"]
    assert torch.equal(scene.bank_cameras.w2c, bank.w2c[[1, 0]]) and scene.bank_labels == ["scene-a/pano_bank"] * 2
    assert scene.bank_images().shape == (2, 3, 64, 96)
    assert (scene.bank_cameras.width, scene.bank_cameras.height) == (96, 64)  # the images' size
    labels = scene.bank_labels + ["view1/traj2"] * 8
    assert scene.trajectories[4].bonus(labels, 21) == shortcut_bonus("view1", "traj0", labels, 21) != {}


def test_reader_refusals(tmp_path):
    with pytest.raises(OfficialSceneError, match="pano_bank"):
        read_official_scene(tmp_path)
    (tmp_path / "pano_bank/images").mkdir(parents=True)
    one = camera()
    (tmp_path / "pano_bank/cameras.json").write_text(json.dumps(
        {"0001": {"extrinsic": one.w2c[0].tolist(), "intrinsic": one.K[0].tolist()}}))
    Image.new("RGB", (W, H)).save(tmp_path / "pano_bank/images/0000.png")
    with pytest.raises(OfficialSceneError, match="no camera for view 0000"):
        read_official_scene(tmp_path)
