"""The memory bank (frames, cameras, labels, saved form) and the retrieval the scene loop runs over it
(``engine.geometry.retrieval.retrieve``), checked against the rule on cameras alone (``retrieve_as_release``, itself
checked against the release's own answer and an independent float64 scorer in tests/test_retrieval_release.py) and
analytic cases; and the frames a clip keeps (the release's ``sample_align_nframe``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.geometry.memory import MemoryBank, MemoryBankError
from engine.geometry.retrieval import RetrievalError, release_scores, retrieve, retrieve_as_release

W, H = 32, 24


def camera(yaw_deg=0.0, pitch_deg=0.0, center=(0.0, 0.0, 0.0), fov=60.0, width=W, height=H) -> Cameras:
    """A camera at ``center`` turned by yaw (about world y) then pitch (about its x)."""
    r_c2w = Rotation.from_euler("YX", [yaw_deg, pitch_deg], degrees=True).as_matrix()
    c2w = np.eye(4)
    c2w[:3, :3] = r_c2w
    c2w[:3, 3] = center
    return Cameras(torch.tensor(np.linalg.inv(c2w))[None], intrinsics_from_fov(width, height, fov), width, height)


def bank_with(cams: list[Cameras], depth_lo=2.0, depth_hi=6.0, seed=0) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank()
    for i, c in enumerate(cams):
        depth = depth_lo + (depth_hi - depth_lo) * torch.rand(1, H, W, generator=g)
        bank.add(torch.rand(1, 3, H, W, generator=g), c, depth, frame_ids=[10 + i], source=f"s{i % 2}",
                 labels=[f"view{i}/traj0"])
    return bank


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


# ---- the retrieval the loop runs ------------------------------------------------------------------

def test_the_loops_retrieval_is_the_rule_over_the_banks_frames():
    """``retrieve`` hands the rule the bank's cameras and the clip's keyframes (all of them: a clip is at its
    keyframes already, so no every-4th stride), and gives the picked frames' images and cameras in pick order."""
    bank = bank_with([camera(0.0), camera(20.0), camera(180.0), camera(-25.0, 5.0, (0.2, 0.0, 0.1))])
    clip = Cameras.cat([camera(1.0), camera(2.0), camera(19.0), camera(-24.0, 4.0, (0.2, 0.0, 0.1)), camera(175.0)])
    found, refs = retrieve(bank, clip)
    assert found.per_target == [0, 1, 3, 2]  # each target takes the frame it shares a frustum and a direction with
    assert found.references == [0, 1, 3, 2] and found.ref_index == [0, 1, 2, 3]
    assert found.to_json() == retrieve_as_release(clip, bank.cameras).to_json()
    assert torch.equal(refs.images, bank.images[[0, 1, 3, 2]])
    assert torch.equal(refs.cameras.w2c, bank.cameras.w2c[[0, 1, 3, 2]]) and refs.ref_index.tolist() == [0, 1, 2, 3]
    long = Cameras.cat([camera(2.0 * i) for i in range(25)])  # more than 21 keyframes: every target is retrieved
    assert len(retrieve(bank, long)[0].per_target) == 24


def test_a_clip_always_gets_a_reference():
    """The release's argmax never leaves a target without a frame: a clip looking where no bank frame looks takes the
    lowest bank index, and max_refs below 1 is refused rather than giving none."""
    bank = bank_with([camera(0.0), camera(20.0)])
    clip = Cameras.cat([camera(0.0), camera(0.0, 0.0, (50.0, 0.0, 0.0)), camera(90.0, 0.0, (0.0, 40.0, 0.0))])
    assert float(release_scores(clip[1:], bank.cameras).abs().max()) == 0.0
    found, refs = retrieve(bank, clip)
    assert found.per_target == [0, 0] and found.references == [0] and len(refs) == 1
    with pytest.raises(RetrievalError, match="at least one reference"):
        retrieve(bank, clip, max_refs=0)
    with pytest.raises(RetrievalError, match="empty"):
        retrieve(MemoryBank(), clip)


def test_a_photos_first_clip_is_the_input_view_by_the_rule_alone():
    """A photo's bank holds the photo alone at the start camera: every target takes it, so the one reference is the
    photo at target 0 with the start camera, which is the release's single-view input (reference = the image,
    ref_index [0], camera = the trajectory's first) without a rule of its own."""
    from engine.geometry.trajectories import make_trajectory

    start = Cameras(torch.eye(4, dtype=torch.float64), intrinsics_from_fov(W, H, 60.0), W, H)
    photo = torch.rand(3, H, W, generator=torch.Generator().manual_seed(3))
    bank = MemoryBank()
    bank.add(photo[None], start, torch.full((1, H, W), 2.0), frame_ids=[0], source="input")
    for preset in ("left", "orbit", "forward"):
        clip = make_trajectory(preset, start, 2.0, frames=6)
        found, refs = retrieve(bank, clip)
        assert found.references == [0] and found.ref_index == [0] and found.per_target == [0] * 5
        assert torch.equal(refs.images, photo[None])
        assert torch.allclose(refs.cameras.w2c, clip.w2c[0:1], atol=1e-12)  # the trajectory's first camera


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
    assert back.labels == bank.labels == ["view0/traj0", "view1/traj0", "view2/traj0"]
    assert [f["label"] for f in json.loads((folder / "index.json").read_text())["frames"]] == back.labels
    targets = Cameras.cat([camera(5.0), camera(35.0), camera(-20.0)])
    assert retrieve(back, targets)[0] == retrieve(bank, targets)[0]
    # A bank saved before frames had labels reads each frame's source as its label.
    index = json.loads((folder / "index.json").read_text())
    for frame in index["frames"]:
        del frame["label"]
    (folder / "index.json").write_text(json.dumps(index))
    assert MemoryBank.load(folder).labels == ["s0", "s1", "s0"]
    grown = MemoryBank()
    grown.extend(back)
    assert (grown.labels, grown.sources, grown.frame_ids) == (back.labels, back.sources, back.frame_ids)
    assert torch.equal(grown.images, back.images) and torch.equal(grown.cameras.w2c, back.cameras.w2c)
    MemoryBank().save(tmp_path / "empty")
    assert len(MemoryBank.load(tmp_path / "empty")) == 0
    with pytest.raises(MemoryBankError):
        MemoryBank.load(tmp_path / "missing")


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
