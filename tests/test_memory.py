"""Memory bank and reference retrieval, checked against analytic overlaps and an independent Monte-Carlo
estimate (random points uniform in the target's frustum volume, numpy, float64)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.constants import MAX_REFERENCES
from engine.geometry.memory import MemoryBank, MemoryBankError
from engine.geometry.retrieval import overlap_matrix

W, H = 32, 24


def camera(yaw_deg=0.0, pitch_deg=0.0, center=(0.0, 0.0, 0.0), fov=60.0, width=W, height=H) -> Cameras:
    """A camera at ``center`` turned by yaw (about world y) then pitch (about its x)."""
    r_c2w = Rotation.from_euler("YX", [yaw_deg, pitch_deg], degrees=True).as_matrix()
    c2w = np.eye(4)
    c2w[:3, :3] = r_c2w
    c2w[:3, 3] = center
    return Cameras(torch.tensor(np.linalg.inv(c2w))[None], intrinsics_from_fov(width, height, fov), width, height)


# ---- the independent reference -------------------------------------------------------------------

def mc_overlap(a: Cameras, b: Cameras, near: float, far: float, n: int = 40000, seed: int = 0) -> float:
    """Share of uniformly random points of a's frustum slab [near, far] that b sees (numpy float64)."""
    rng = np.random.default_rng(seed)
    ka, kb = a.K[0].numpy(), b.K[0].numpy()
    wa, wb = a.w2c[0].numpy(), b.w2c[0].numpy()
    u = rng.uniform(0, a.width, n)
    v = rng.uniform(0, a.height, n)
    # Volume element z^2 dz: inverse CDF of z^2 on [near, far].
    z = np.cbrt(near**3 + rng.uniform(0, 1, n) * (far**3 - near**3))
    cam_a = np.linalg.solve(ka, np.stack([u, v, np.ones(n)])) * z
    world = wa[:3, :3].T @ (cam_a - wa[:3, 3:])
    cam_b = wb[:3, :3] @ world + wb[:3, 3:]
    zb = cam_b[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ub = kb[0, 0] * cam_b[0] / zb + kb[0, 2]
        vb = kb[1, 1] * cam_b[1] / zb + kb[1, 2]
    seen = (zb >= near) & (zb <= far) & (ub >= 0) & (ub < b.width) & (vb >= 0) & (vb < b.height)
    return float(seen.mean())


def bank_with(cams: list[Cameras], depth_lo=2.0, depth_hi=6.0, seed=0) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank()
    for i, c in enumerate(cams):
        depth = depth_lo + (depth_hi - depth_lo) * torch.rand(1, H, W, generator=g)
        bank.add(torch.rand(1, 3, H, W, generator=g), c, depth, frame_ids=[10 + i], source=f"s{i % 2}")
    return bank


# ---- frustum overlap -----------------------------------------------------------------------------

def frustum_overlap(a: Cameras, b: Cameras, near: float, far: float, **kw) -> float:
    """One pair's entry of the overlap matrix."""
    return float(overlap_matrix(a, b, [near], [far], **kw)[0, 0])


def test_identical_camera_overlap_is_one():
    c = camera(37.0, -12.0, (0.3, -1.2, 2.0), fov=75.0)
    assert frustum_overlap(c, c, 0.5, 7.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("turn", [(180.0, 0.0), (0.0, 180.0), (90.0, 90.0)])
def test_camera_facing_away_overlap_is_zero(turn):
    a = camera(10.0, 5.0, (1.0, 0.0, 0.0))
    b = camera(10.0 + turn[0], 5.0 + turn[1], (1.0, 0.0, 0.0))
    expected = mc_overlap(a, b, 1.0, 4.0)
    assert expected == 0.0  # the reference agrees the setup sees nothing in common
    assert frustum_overlap(a, b, 1.0, 4.0) == 0.0


@pytest.mark.parametrize("shift,fov,near,far", [(0.5, 60.0, 1.0, 5.0), (0.2, 90.0, 0.5, 2.0)])
def test_sideways_shift_matches_closed_form(shift, fov, near, far):
    # Same orientation, centre moved along x: at depth z the frustum is 2 z tan(fov/2) wide and the shifted
    # camera misses a strip of width `shift`, so the seen share is the z^2-weighted mean of 1 - shift / width.
    a = camera(fov=fov)
    b = camera(center=(shift, 0.0, 0.0), fov=fov)
    half = math.tan(math.radians(fov) / 2)
    z1 = (far**2 - near**2) / 2
    z2 = (far**3 - near**3) / 3
    expected = 1 - shift / (2 * half) * z1 / z2
    assert frustum_overlap(a, b, near, far) == pytest.approx(expected, abs=5e-3)
    assert frustum_overlap(a, b, near, far, samples=16384) == pytest.approx(expected, abs=2e-3)


def test_overlap_matches_monte_carlo_on_random_pairs():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(12):
        a = camera(*rng.uniform(-40, 40, 2), center=rng.normal(0, 0.6, 3), fov=rng.uniform(45, 90))
        b = camera(*rng.uniform(-40, 40, 2), center=rng.normal(0, 0.6, 3), fov=rng.uniform(45, 90),
                   width=40, height=20)
        near, far = 1.0, rng.uniform(2.0, 6.0)
        ref = mc_overlap(a, b, near, far)
        checked += 0.05 < ref < 0.95
        assert frustum_overlap(a, b, near, far) == pytest.approx(ref, abs=0.02)
    assert checked >= 4  # the pairs really were partial overlaps, not only the trivial 0 and 1


def test_overlap_rejects_bad_depth_range():
    c = camera()
    with pytest.raises(ValueError):
        frustum_overlap(c, c, 2.0, 1.0)
    with pytest.raises(ValueError):
        frustum_overlap(c, c, 0.0, 1.0)


# ---- the bank ------------------------------------------------------------------------------------

def test_depth_range_is_percentiles_of_valid_depth():
    g = torch.Generator().manual_seed(1)
    depth = 1 + 9 * torch.rand(1, H, W, generator=g)
    depth[0, :3] = 0.0
    depth[0, 5, :4] = float("nan")
    depth[0, 6, :2] = float("inf")
    bank = MemoryBank()
    bank.add(torch.rand(1, 3, H, W, generator=g), camera(), depth)
    d = depth[0].numpy().astype(np.float64)
    valid = d[np.isfinite(d) & (d > 0)]
    near, far = bank.depth_range(0)
    assert near == pytest.approx(np.percentile(valid, 5), rel=1e-6)
    assert far == pytest.approx(np.percentile(valid, 95), rel=1e-6)


def test_add_checks_shapes_and_fits_other_sizes():
    bank = bank_with([camera()])
    with pytest.raises(MemoryBankError):
        bank.add(torch.rand(1, 3, H, W), camera(), torch.ones(1, H, W + 1))
    with pytest.raises(MemoryBankError):
        bank.add(torch.rand(2, 3, H, W), camera(), torch.ones(2, H, W))
    # A frame twice the bank's size is brought to the bank's size with intrinsics to match.
    big = camera(width=2 * W, height=2 * H)
    idx = bank.add(torch.rand(1, 3, 2 * H, 2 * W), big, torch.full((1, 2 * H, 2 * W), 3.0))
    assert idx == [1] and bank.images.shape == (2, 3, H, W) and bank.depths.shape == (2, H, W)
    assert torch.allclose(bank.cameras.K[1], big.K[0] * torch.tensor([[0.5], [0.5], [1.0]], dtype=torch.float64))
    assert bank.frame_ids == [10, 1]


def test_retrieve_picks_the_largest_monte_carlo_overlap():
    rng = np.random.default_rng(7)
    bank_cams = [camera(yaw, rng.uniform(-15, 15), rng.normal(0, 0.4, 3), fov=rng.uniform(50, 80))
                 for yaw in np.arange(0, 360, 45)]
    bank = bank_with(bank_cams)
    targets = [camera(rng.uniform(0, 360), rng.uniform(-10, 10), rng.normal(0, 0.4, 3), fov=60.0) for _ in range(8)]
    got = bank.retrieve(Cameras.cat(targets), max_refs=8, min_overlap=0.05)
    checked = 0
    for t, tc in enumerate(targets):
        ref = np.array([mc_overlap(tc, bank.cameras[m], *bank.depth_range(m), n=20000, seed=m) for m in range(len(bank))])
        order = np.argsort(-ref)
        if ref[order[0]] - ref[order[1]] > 0.05:  # a clear winner (beyond the tie tolerance and MC noise)
            assert int(got.per_target[t]) == order[0]
            assert float(got.overlaps[t]) == pytest.approx(ref[order[0]], abs=0.03)
            checked += 1
    assert checked >= 5


def test_closer_camera_wins_a_tie_in_overlap():
    # Wide cameras beside the target see all of its frustum slab: both overlaps are exactly 1.
    target = camera(fov=50.0)
    far_cam = camera(center=(0.6, 0.0, 0.0), fov=120.0)
    near_cam = camera(center=(-0.2, 0.0, 0.0), fov=120.0)
    bank = bank_with([far_cam, near_cam], depth_lo=3.0, depth_hi=4.0)
    near, far = bank.depth_range(0)
    assert mc_overlap(target, far_cam, near, far) == 1.0 and mc_overlap(target, near_cam, near, far) == 1.0
    assert bank.retrieve(target).per_target.tolist() == [1]
    # Not an artefact of insertion order.
    assert bank_with([near_cam, far_cam], 3.0, 4.0).retrieve(target).per_target.tolist() == [0]
    # Only a tie-break: a closer camera that sees clearly less of the target does not win.
    narrow_close = camera(center=(-0.05, 0.0, 0.0), fov=30.0)
    bank = bank_with([narrow_close, far_cam], depth_lo=3.0, depth_hi=4.0)
    assert mc_overlap(target, narrow_close, *bank.depth_range(0)) < 0.8
    assert bank.retrieve(target).per_target.tolist() == [1]


def test_never_more_than_max_refs_and_each_target_gets_its_best_kept_reference():
    # A full turn of targets over a ring of 12 bank views: every target prefers a different view.
    bank = bank_with([camera(yaw) for yaw in range(0, 360, 30)])
    targets = Cameras.cat([camera(yaw + 3.0) for yaw in range(0, 360, 30)])
    full = bank.retrieve(targets, max_refs=MAX_REFERENCES)
    assert len(full.refs) <= MAX_REFERENCES
    o = bank.overlaps(targets)
    for max_refs in (1, 3, 5):
        got = bank.retrieve(targets, max_refs=max_refs)
        assert 1 <= len(got.refs) <= max_refs
        assert set(got.per_target[got.per_target >= 0].tolist()) == set(got.refs)
        for t in range(len(targets)):
            kept_best = max(float(o[t, r]) for r in got.refs)
            if int(got.per_target[t]) >= 0:
                assert float(o[t, got.per_target[t]]) >= kept_best - 0.02
            else:
                assert kept_best < 0.05
        # Each ref sits at a target it serves; refs come in time order of those targets.
        for r, i in zip(got.refs, got.ref_index):
            assert int(got.per_target[i]) == r
        assert got.ref_index == sorted(got.ref_index)
    with pytest.raises(ValueError):
        bank.retrieve(targets, max_refs=MAX_REFERENCES + 1)


def test_one_reference_goes_to_the_frame_covering_most():
    # Narrow views each match one target best; a wide view matches none best but covers all of them.
    yaws = [-30.0, 0.0, 30.0]
    bank = bank_with([camera(y, fov=35.0) for y in yaws] + [camera(0.0, fov=140.0)])
    targets = Cameras.cat([camera(y, fov=35.0) for y in yaws])
    assert bank.retrieve(targets, max_refs=8).per_target.tolist() == [0, 1, 2]
    o = bank.overlaps(targets)
    o = torch.where(o >= 0.05, o, 0.0)
    cover = o.sum(0)
    assert int(cover.argmax()) == 3 and float(cover[3]) > float(cover[:3].max()) + 0.1
    got = bank.retrieve(targets, max_refs=1)
    assert got.refs == [3] and got.per_target.tolist() == [3, 3, 3]
    assert got.ref_index == [int(o[:, 3].argmax())]


def test_min_overlap_and_exclude():
    bank = bank_with([camera(0.0), camera(20.0), camera(180.0)])
    targets = Cameras.cat([camera(2.0), camera(90.0, 0.0, fov=30.0)])
    got = bank.retrieve(targets)
    assert got.per_target.tolist() == [0, -1]
    assert got.overlaps[1] == 0.0 and got.refs == [0] and got.ref_index == [0]
    assert bank.retrieve(targets, exclude=[0]).per_target.tolist() == [1, -1]
    assert bank.retrieve(targets, max_refs=0).refs == []
    empty = MemoryBank().retrieve(targets)
    assert empty.per_target.tolist() == [-1, -1] and empty.refs == []


def test_input_view_retrieval_is_the_single_view_reference():
    bank = MemoryBank()
    bank.add(torch.rand(1, 3, H, W), camera(), torch.full((1, H, W), 2.0))
    targets = Cameras.cat([camera(yaw) for yaw in (5.0, 20.0, 170.0)])  # the last one sees nothing of it
    r = bank.input_view_retrieval(targets)
    assert r.refs == [0] and r.ref_index == [0] and r.per_target.tolist() == [0, -1, -1]
    assert r.overlaps[0].item() == pytest.approx(bank.overlaps(targets[0:1])[0, 0].item()) and r.overlaps[0] > 0
    assert bank.retrieve(targets).per_target.tolist()[2] == -1  # retrieval proper would leave the last target out
    with pytest.raises(MemoryBankError):
        bank.input_view_retrieval(targets, index=3)


def test_a_clips_retrieval_is_the_input_view_on_a_photos_first_clip_and_the_rule_otherwise():
    """``retrieve`` (what the scene loop runs): targets are the clip's frames after its start view; the first clip of
    a photo gets the input photo itself at target 0 with the clip's own first camera, any other clip the bank frames
    the rule picks (overlaps under 5% counting as none), each placed at the target it serves best."""
    from engine.geometry.retrieval import retrieve

    bank = bank_with([camera(0.0), camera(20.0), camera(180.0)])
    clip = Cameras.cat([camera(1.0), camera(2.0), camera(19.0), camera(90.0, 0.0, fov=30.0)])
    found, refs = retrieve(bank, clip, max_refs=8)
    assert found.per_target.tolist() == [0, 1, -1]  # frame 3 looks where no bank frame does
    assert found.refs == [0, 1] and found.ref_index == [0, 1]
    assert torch.equal(refs.images, bank.images[[0, 1]]) and torch.equal(refs.cameras.w2c, bank.cameras.w2c[[0, 1]])
    assert refs.ref_index.tolist() == [0, 1]
    one, refs = retrieve(bank, clip, max_refs=1)
    assert len(one.refs) == 1 and len(refs) == 1
    photo = torch.rand(3, H, W)
    first, refs = retrieve(bank, clip, max_refs=8, input_view=photo)
    assert first.refs == [0] and first.ref_index == [0] and first.per_target.tolist() == [0, -1, -1]
    assert torch.equal(refs.images, photo[None]) and torch.equal(refs.cameras.w2c, clip.w2c[0:1])
    assert refs.ref_index.tolist() == [0]
    nothing, refs = retrieve(bank, Cameras.cat([camera(0.0), camera(90.0, 0.0, fov=30.0)]))
    assert nothing.refs == [] and refs is None


def test_save_load_round_trip(tmp_path):
    bank = bank_with([camera(0.0), camera(40.0, 10.0, (0.1, 0.2, 0.3)), camera(-30.0)])
    # Images on the 8-bit grid survive PNG exactly.
    bank.images = (bank.images * 255).round() / 255
    folder = tmp_path / "bank"
    (folder).mkdir()
    (folder / "stale.txt").write_text("from an earlier save")
    bank.save(folder)
    assert not (folder / "stale.txt").exists()  # the folder is replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temporary folders left behind
    official = json.loads((folder / "camera.json").read_text())
    assert len(official["extrinsic"]) == 3 and official["width"] == W and official["height"] == H
    back = MemoryBank.load(folder)
    assert len(back) == 3
    assert torch.equal(back.images, bank.images)
    assert torch.equal(back.depths, bank.depths)
    assert torch.equal(back.cameras.w2c, bank.cameras.w2c) and torch.equal(back.cameras.K, bank.cameras.K)
    assert back.frame_ids == bank.frame_ids and back.sources == bank.sources
    assert [back.depth_range(i) for i in range(3)] == [bank.depth_range(i) for i in range(3)]
    targets = Cameras.cat([camera(5.0), camera(35.0)])
    assert back.retrieve(targets).to_json() == bank.retrieve(targets).to_json()
    MemoryBank().save(tmp_path / "empty")
    assert len(MemoryBank.load(tmp_path / "empty")) == 0
    with pytest.raises(MemoryBankError):
        MemoryBank.load(tmp_path / "missing")


def test_constant_depth_frame_is_still_retrieved_for_a_small_orbit():
    # A bank frame of constant depth (a wall, or the plane fallback) must still serve a target that orbits
    # its look-at point by a few degrees: the views share most of what they see.
    from engine.geometry.trajectories import make_trajectory

    k = intrinsics_from_fov(128, 80, 60.0)
    start = Cameras(torch.eye(4, dtype=torch.float64), k, 128, 80)
    bank = MemoryBank()
    bank.add(torch.rand(1, 3, 80, 128), start, torch.full((1, 80, 128), 3.0))
    near, far = bank.depth_range(0)
    assert near < 3.0 < far and far / near >= 1.5 - 1e-9
    targets = make_trajectory("up", start, 3.0, frames=5, amount=20.0)[1:]
    found = bank.retrieve(targets)
    assert found.per_target.tolist() == [0, 0, 0, 0]
    assert (found.overlaps > 0.5).all()


# ---- the frames a clip keeps (the release's sample_align_nframe) --------------------------------------

@pytest.mark.parametrize("n, k, frames", [
    (21, 8, [3, 6, 9, 12, 14, 16, 18, 20]),  # 12 frames left out over 8 steps: 4 steps of 3, then 4 of 2
    (81, 8, [10, 20, 30, 40, 50, 60, 70, 80]),  # 72 left out: 9 more per step, steps of 10
    (22, 8, [3, 6, 9, 12, 15, 17, 19, 21]),  # 13 left out: 5 steps of 3, then 3 of 2
    (11, 4, [3, 6, 8, 10]),  # 6 left out over 4 steps: 2 steps of 3, 2 of 2
    (25, 8, [3, 6, 9, 12, 15, 18, 21, 24]),  # 16 left out: every step 3
    (9, 8, [1, 2, 3, 4, 5, 6, 7, 8]),  # nothing left out: every frame but the first
    (5, 1, [4]),  # one step from frame 0 to the last
])
def test_sample_align_nframe_keeps_the_releases_frames(n, k, frames):
    """Expected values worked out by hand from the release's rule (release: src/general_utils.py): the n - 1 - k
    frames left out are shared over k steps (the first from frame 0), ``(n - 1 - k) % k`` steps one longer, those
    first."""
    from engine.geometry.memory import sample_align_nframe

    assert sample_align_nframe(n, k) == frames


def test_sample_align_nframe_shape_and_refusals():
    from engine.geometry.memory import sample_align_nframe

    for n in range(2, 90):
        for k in range(1, min(n, 12)):
            got = sample_align_nframe(n, k)
            steps = np.diff([0] + got)
            assert len(got) == k and got[-1] == n - 1 and (steps >= 1).all()
            assert (np.diff(steps) <= 0).all() and steps.max() - steps.min() <= 1  # wider steps first, by one at most
    for n, k in ((21, 0), (21, 21), (1, 1), (8, 9)):
        with pytest.raises(MemoryBankError):
            sample_align_nframe(n, k)


def test_sample_align_nframe_is_what_the_releases_bank_kept(examples):
    """The release's own memory bank on the shared corridor recorded the frames each 21-frame trajectory gave it
    (``../shared/reference/golden/corridor_retrieval.json``)."""
    from engine.geometry.memory import sample_align_nframe

    golden = json.loads((examples.parent / "reference/golden/corridor_retrieval.json").read_text())
    assert golden["trajectories"]
    for traj in golden["trajectories"]:
        assert sample_align_nframe(21, 8) == traj["kept_frames"], traj["trajectory"]
