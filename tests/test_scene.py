"""The scene loop end to end: CLI outputs, resume, panorama path, and geometric truth on a synthetic room."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import engine.settings as settings_mod
from conftest import PlaneTestDepth
from engine import generators, scene_start
from engine.cli import main as cli_main
from engine.geometry import trajectories as traj
from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.images import save_image
from engine.scene import GenerationCancelled, Scene
from engine.settings import SceneSettings
from scenefolder import assert_same_scene

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"


def _frames(path: Path) -> int:
    return iio.imread(path).shape[0]


# ---- a synthetic textured room with analytic depth -------------------------------------------------

ROOM_LO = np.array([-2.0, -1.5, -2.0])
ROOM_HI = np.array([2.0, 1.5, 4.0])


def _room_hit(cams: Cameras):
    """World hit points ``[N,H,W,3]`` of every pixel ray on the inside of the room box (float64)."""
    o, d = cams.rays()
    o, d = o.double(), d.double()
    lo, hi = torch.as_tensor(ROOM_LO), torch.as_tensor(ROOM_HI)
    bound = torch.where(d > 0, hi, lo)
    safe = torch.where(d.abs() > 1e-12, d, torch.full_like(d, 1e-12))
    t = ((bound - o) / safe).clamp(min=0).min(dim=-1).values
    return o + t[..., None] * d


def _texture(p: torch.Tensor) -> torch.Tensor:
    """A smooth colour field on world positions (a few cycles per room), values in [0.1, 0.9]."""
    r = 0.5 + 0.4 * torch.sin(1.7 * p[..., 0] + 0.9 * p[..., 2])
    g = 0.5 + 0.4 * torch.sin(1.3 * p[..., 1] - 1.1 * p[..., 2] + 1.0)
    b = 0.5 + 0.4 * torch.cos(0.8 * p[..., 0] + 1.5 * p[..., 1])
    return torch.stack([r, g, b], dim=-1)


def _room_view(cams: Cameras):
    hit = _room_hit(cams)
    cam_pts = torch.einsum("nij,nhwj->nhwi", cams.R.double(), hit) + cams.t.double()[:, None, None, :]
    image = _texture(hit).permute(0, 3, 1, 2).float()
    return image, cam_pts[..., 2].float(), hit


class RoomDepth:
    """Ground-truth depth source for the scene: exact z-depth of the room for any camera."""

    note = "ground truth"

    def __init__(self, start: Cameras):
        self.start = start

    def __call__(self, image, camera=None):
        cam = camera if camera is not None else self.start
        _, depth, _ = _room_view(cam[0:1])
        return depth[0], torch.ones_like(depth[0], dtype=torch.bool), cam.K[0].double()


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    folder = tmp_path_factory.mktemp("room")
    h, w = 240, 384  # a preview bucket exactly: no resize, so the ground-truth camera stays exact
    start = Cameras(torch.eye(4, dtype=torch.float64), intrinsics_from_fov(w, h, 70.0), w, h)
    image, _, _ = _room_view(start)
    save_image(folder / "room.png", image[0])
    return folder, start


def test_geometric_truth_on_synthetic_room(room, tmp_path):
    folder, start = room
    settings = SceneSettings(engine="preview", frames=9, keep_frames=4, point_budget=400_000)
    scene = Scene.create(tmp_path / "job", folder / "room.png", settings=settings, depth_source=RoomDepth(start),
                         announce=lambda m: None)
    assert torch.allclose(scene.start_camera.K, start.K)
    from engine.scene import TrajectoryRequest

    scene.run([TrajectoryRequest("left", amount=20.0), TrajectoryRequest("right", amount=20.0),
               TrajectoryRequest("up", amount=15.0)])

    pts = scene.cache.points.double().numpy()
    # Precision: distance of each fused point to the room's surface (analytic for points inside the box).
    inside = np.minimum(pts - ROOM_LO, ROOM_HI - pts)  # per axis: distance to the nearer wall, < 0 outside
    outside = np.linalg.norm(np.maximum(-inside, 0.0), axis=1)
    dist_to_surface = np.where((inside >= 0).all(axis=1), inside.min(axis=1), outside)
    tau = 0.05  # metres, under 1% of the 6 m room
    precision = float((dist_to_surface < tau).mean())
    # Recall: surface points seen by every camera of the run, each matched to a fused point within tau.
    cams = [start] + [Cameras.from_json(tmp_path / "job" / c["folder"] / "cameras.json") for c in scene.clips]
    seen = torch.cat([_room_hit(c.resized(96, 60)).reshape(-1, 3) for c in cams]).numpy()
    recall = float((cKDTree(pts).query(seen, k=1)[0] < tau).mean())
    f1 = 2 * precision * recall / (precision + recall)
    print(f"F1 {f1:.4f} (precision {precision:.4f}, recall {recall:.4f}, tau {tau} m)")
    assert f1 >= 0.95, (precision, recall, f1)

    # Held-out cameras between the trajectories: the cache's renders against the room's true image.
    held = traj.make_trajectory("left", start, 4.0, frames=3, amount=8.0)[1:]
    held = Cameras.cat([held, traj.make_trajectory("down", start, 4.0, frames=3, amount=6.0)[1:]])
    rendered = scene.cache.render(held, radius=1)
    truth, _, _ = _room_view(held)
    m = rendered.mask[:, None].expand_as(truth)
    assert m.float().mean() > 0.8
    mse = ((rendered.image - truth)[m] ** 2).mean().item()
    psnr = 10 * math.log10(1.0 / mse)
    print(f"held-out PSNR {psnr:.2f} dB")
    assert psnr >= 25.0, psnr


def _f1_against_room(scene, start, job, tau):
    pts = scene.cache.points.double().numpy()
    inside = np.minimum(pts - ROOM_LO, ROOM_HI - pts)
    outside = np.linalg.norm(np.maximum(-inside, 0.0), axis=1)
    precision = float((np.where((inside >= 0).all(axis=1), inside.min(axis=1), outside) < tau).mean())
    cams = [start] + [Cameras.from_json(job / c["folder"] / "cameras.json") for c in scene.clips]
    seen = torch.cat([_room_hit(c.resized(96, 60)).reshape(-1, 3) for c in cams]).numpy()
    recall = float((cKDTree(pts).query(seen, k=1)[0] < tau).mean())
    return 2 * precision * recall / (precision + recall), precision, recall


@pytest.mark.parametrize("fill_from_cache", [True, False])
def test_without_a_depth_model_generated_frames_continue_the_cached_surface(room, tmp_path, fill_from_cache):
    """Ground-truth depth for the input only; every generated frame gets the plane fallback. With the fallback
    hook, the fused cloud after 4 clips stays on the room's surface (F1 >= 0.9 at tau = 5 cm); without it (each
    new frame its own 2 m plane, the old behaviour) it fans out into cards and the same measure fails."""
    from conftest import PlaneTestDepth
    from engine.scene import TrajectoryRequest

    folder, start = room
    job = tmp_path / "job"
    settings = SceneSettings(engine="preview", frames=9, keep_frames=4, point_budget=400_000)
    Scene.create(job, folder / "room.png", settings=settings, depth_source=RoomDepth(start), announce=lambda m: None)
    plane = PlaneTestDepth()
    plane.estimator.fallback = fill_from_cache
    scene = Scene.open(job, depth_source=plane, announce=lambda m: None)
    scene.run([TrajectoryRequest("left", amount=20.0), TrajectoryRequest("right", amount=20.0),
               TrajectoryRequest("up", amount=15.0), TrajectoryRequest("down", amount=15.0)])
    tau = 0.05  # metres, as in the ground-truth test above
    f1, precision, recall = _f1_against_room(scene, start, job, tau)
    print(f"fill from cache {fill_from_cache}: F1 {f1:.4f} (precision {precision:.4f}, recall {recall:.4f}, tau {tau} m)")
    if fill_from_cache:
        assert f1 >= 0.9, (precision, recall, f1)
    else:
        assert f1 < 0.9, (precision, recall, f1)


def test_dataset_images_are_the_generated_frames_exactly(room, tmp_path, monkeypatch):
    """The 3DGS dataset's images are the generated frames pixel for pixel (kept losslessly in each clip, not
    decoded back from the H.264 clip, which would not pass this test)."""
    from engine.images import to_uint8
    from engine.outputs import read_video

    folder, start = room
    generated = []
    real_generator = generators.clip_generator

    class Recording:
        def __init__(self, inner):
            self.inner, self.has_memory, self.uses_pointmaps = inner, inner.has_memory, inner.uses_pointmaps

        def generate(self, **kwargs):
            generated.append(self.inner.generate(**kwargs))
            return generated[-1]

    monkeypatch.setattr(generators, "clip_generator", lambda *a, **k: Recording(real_generator(*a, **k)))
    job = tmp_path / "job"
    scene = Scene.create(job, folder / "room.png", settings=SceneSettings(engine="preview", frames=5, keep_frames=2),
                         depth_source=RoomDepth(start), announce=lambda m: None)
    scene.run(["left", "up"])
    files = [f["file_path"] for f in json.loads((job / "transforms.json").read_text())["frames"]]
    expected = to_uint8(torch.cat([scene.start_image[None]] + [frames[1:] for frames in generated]))
    assert len(files) == len(expected) == 1 + 2 * 4
    for rel, want in zip(files, expected):
        assert np.array_equal(iio.imread(job / rel), want), rel
    video = to_uint8(read_video(job / scene.clips[0]["folder"] / "clip.mp4"))
    assert not np.array_equal(video, to_uint8(generated[0]))  # the video is lossy: it could not have given them


def test_the_state_a_clip_leaves_in_memory_is_the_state_its_files_reopen_to(room, tmp_path):
    """After each clip the scene moves on in memory, without reading back what the clip wrote: its manifest is the
    committed manifest.json, its 3D cache exactly the committed cache file as read back (colours in 8 bits, as
    stored), and its memory bank the one a reopened folder rebuilds (images as stored, in 8 bits)."""
    from engine.geometry.cache import PointCache

    folder, start = room
    job = tmp_path / "job"
    scene = Scene.create(job, folder / "room.png", settings=SceneSettings(engine="preview", frames=5, keep_frames=2),
                         depth_source=RoomDepth(start), announce=lambda m: None)
    for trajectory in ("left", "up"):
        scene.generate(trajectory)
        assert scene.manifest == json.loads((job / "manifest.json").read_text())
        stored = PointCache.load_ply(job / scene.manifest["state"]["cache"])
        for name in ("points", "colors", "confidence", "source"):
            assert torch.equal(getattr(scene.cache, name).cpu(), getattr(stored, name)), name
        reopened = Scene.open(job, depth_source=RoomDepth(start), announce=lambda m: None)
        assert (reopened.bank.frame_ids, reopened.bank.sources) == (scene.bank.frame_ids, scene.bank.sources)
        assert torch.equal(reopened.bank.depths, scene.bank.depths)
        assert torch.equal(reopened.bank.cameras.w2c, scene.bank.cameras.w2c)
        assert torch.equal(reopened.bank.cameras.K, scene.bank.cameras.K)
        assert float((reopened.bank.images - scene.bank.images).abs().max()) <= 0.5 / 255 + 1e-7


def test_a_committed_cache_made_in_memory_equals_its_file_read_back(tmp_path):
    """``as_committed`` against the PLY round trip it stands for, on colours at and between the 8-bit levels (the
    halfway points too, where rounding decides) and at the ends."""
    from engine.geometry.cache import PointCache
    from engine.jobfolder import as_committed

    g = torch.Generator().manual_seed(0)
    levels = torch.arange(256, dtype=torch.float32) / 255
    colours = torch.cat([levels, (torch.arange(255) + 0.5) / 255, torch.rand(3000, generator=g),
                         torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-7])])
    colours = colours[torch.randperm(len(colours), generator=g)][: 3 * (len(colours) // 3)].reshape(-1, 3)
    n = len(colours)
    cache = PointCache(torch.randn(n, 3, generator=g), colours, torch.rand(n, generator=g),
                       torch.randint(-1, 10**6, (n,), generator=g))
    cache.save_ply(tmp_path / "cache.ply")
    read, made = PointCache.load_ply(tmp_path / "cache.ply"), as_committed(cache)
    for name in ("points", "colors", "confidence", "source"):
        assert torch.equal(getattr(made, name), getattr(read, name)), name
    made.save_ply(tmp_path / "again.ply")  # and saving it writes the same file
    assert (tmp_path / "again.ply").read_bytes() == (tmp_path / "cache.ply").read_bytes()


def test_a_request_comes_back_whole_from_the_resume_record(examples, tmp_path):
    """``TrajectoryRequest.to_dict`` / ``from_dict`` through JSON: a camera file's cameras (read at the input's
    size, which the file does not state), its pre-rendered folder, an amount, a frame count, its own prompt, its
    official label and start frame come back exactly."""
    from engine.scene import TrajectoryRequest

    official = examples / "perspective/photorealistic-indoor-dining_spaces-030"
    data = json.loads((official / "camera.json").read_text())
    assert "width" not in data  # the size comes from the reader, and must survive the record
    (tmp_path / "camera.json").write_text(json.dumps(data))
    cams = Cameras.from_json(tmp_path / "camera.json", width=1000, height=600)
    for request in (TrajectoryRequest("view0/traj0", cameras=cams, render_dir=str(official), prompt="a room «é»",
                                      label="view0/traj0", start_frame=str(official / "image.png")),
                    TrajectoryRequest("view2:left", amount=12.5, frames=9), TrajectoryRequest("up")):
        back = TrajectoryRequest.from_dict(json.loads(json.dumps(request.to_dict())))
        fields = ("name", "amount", "frames", "render_dir", "prompt", "label", "start_frame")
        assert [getattr(back, f) for f in fields] == [getattr(request, f) for f in fields]
        if request.cameras is None:
            assert back.cameras is None
            continue
        assert (back.cameras.width, back.cameras.height) == (1000, 600)
        assert torch.equal(back.cameras.w2c, cams.w2c) and torch.equal(back.cameras.K, cams.K)
        assert back.cameras.motion_list == cams.motion_list


def test_cli_preview_writes_every_output(examples, tmp_path, capsys):
    out = tmp_path / "scene"
    frames = 5
    rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "preview", "--frames", str(frames),
                   "--trajectories", "up,left,right,orbit", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["up", "left", "right", "orbit"]
    start = Cameras.from_json(out / "state" / "start.json")
    for clip in manifest["clips"]:
        folder = out / clip["folder"]
        for name in ("clip.mp4", "render.mp4", "render_mask.mp4", "cameras.json", "references.json"):
            assert (folder / name).is_file(), name
        assert [_frames(folder / n) for n in ("clip.mp4", "render.mp4", "render_mask.mp4")] == [frames] * 3
        written = Cameras.from_json(folder / "cameras.json")
        # The trajectory recomputed independently from the start camera and the recorded median depth.
        expected = traj.make_trajectory(clip["trajectory"], start, manifest["median_depth"], frames=frames)
        assert torch.allclose(written.w2c, expected.w2c, atol=1e-6, rtol=0)
        assert torch.allclose(written.K, expected.K, atol=1e-6, rtol=0)
        refs = json.loads((folder / "references.json").read_text())
        assert 1 <= len(refs["references"]) <= 8
    import open3d as o3d

    pcd = o3d.io.read_point_cloud(str(out / "scene.ply"))
    assert len(pcd.points) > 1000 and pcd.has_colors()
    transforms = json.loads((out / "transforms.json").read_text())
    assert len(transforms["frames"]) == 1 + 4 * (frames - 1)
    assert all((out / f["file_path"]).is_file() for f in transforms["frames"])
    all_cams = Cameras.from_json(out / "cameras.json")
    assert len(all_cams) == 1 + 4 * (frames - 1)
    with zipfile.ZipFile(out / "scene.zip") as z:
        names = set(z.namelist())
    assert {"scene.ply", "scene.glb", "cameras.json", "transforms.json", "manifest.json"} <= names
    assert any(n.endswith("clip.mp4") for n in names)
    assert "preview" in manifest["engine_note"]


def test_resume_after_an_interruption_finishes_as_an_uninterrupted_run(examples, tmp_path, monkeypatch):
    """Stopped after two of three clips, reopened and run again: clips done are not redone, and the finished folder
    equals an uninterrupted run of the same trajectories, every file but timings (a resume that reopened an older
    cache or a bank without the clips' frames would render the third clip from the wrong cloud, or give it other
    references)."""
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 0.25)  # small frames: the loop, not the pixels
    seeds = []
    real_generate = generators.PreviewGenerator.generate
    monkeypatch.setattr(generators.PreviewGenerator, "generate",
                        lambda self, **kw: seeds.append(kw["seed"]) or real_generate(self, **kw))
    planned = ["up", "left", "orbit"]  # the orbit takes references from both clips before it
    settings = SceneSettings(engine="preview", frames=5, keep_frames=2, seed=7)
    whole = Scene.create(tmp_path / "whole", examples / PHOTO, settings=settings, depth_source=PlaneTestDepth(),
                         announce=lambda m: None)
    whole.run(planned)
    assert seeds == [7, 8, 9]  # clip k is generated with seed + k
    # Each clip gave the bank the frames the release's sample_align_nframe(5, 2) keeps: 2 and 4.
    for k, clip in enumerate(whole.clips):
        index = json.loads((tmp_path / "whole" / clip["folder"] / "memory" / "index.json").read_text())
        assert [f["frame_id"] for f in index["frames"]] == [1000 * (k + 1) + 2, 1000 * (k + 1) + 4]
    out = tmp_path / "job"
    scene = Scene.create(out, examples / PHOTO, settings=settings, depth_source=PlaneTestDepth(),
                         announce=lambda m: None)

    def cancel():  # set once two clips are made: the third stops at its first step, the two are committed
        return len(scene.manifest["clips"]) >= 2

    with pytest.raises(GenerationCancelled):
        scene.run(planned, cancel=cancel)
    first = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in first["clips"]] == ["up", "left"]
    stamps = {c["folder"]: (out / c["folder"] / "clip.mp4").stat().st_mtime_ns for c in first["clips"]}
    # A leftover half-written clip from the "killed" process must not survive the restart.
    (out / "clips" / ".02_orbit.tmp-ab12cd34").mkdir()

    again = Scene.open(out, depth_source=PlaneTestDepth(), announce=lambda m: None)
    again.run(planned)
    assert seeds == [7, 8, 9, 7, 8, 9]  # the resumed third clip too
    assert {f: (out / f / "clip.mp4").stat().st_mtime_ns for f in stamps} == stamps  # not redone
    assert_same_scene(out, tmp_path / "whole")
    # Every committed cache version is kept (``revert`` goes back to them), and only those.
    assert sorted(p.name for p in (out / "state").glob("cache-*.ply")) == [f"cache-{i:04d}.ply" for i in range(4)]


def test_panorama_from_shared_bank(examples, tmp_path):
    """A panorama scene starts from the official 27-view bank, and each trajectory from its own start view: view0
    is the bank's first view (the release's start view), view1 looks to its right, view2 behind it, view3 to its
    left, all level."""
    from engine.geometry.cameras import load_camera_bank
    from engine.geometry.memory import MemoryBank
    from engine.geometry.panorama import perspective_to_equirect
    from engine.images import load_image

    bank = examples / "panorama/indoor-corridor/pano_bank"
    names, cams = load_camera_bank(bank / "cameras.json")
    images = torch.stack([load_image(bank / "images" / f"{n}.png") for n in names])
    pano, _ = perspective_to_equirect(images, cams, 256, 512)
    save_image(tmp_path / "pano.png", pano)
    out = tmp_path / "pano_scene"
    rc = cli_main(["generate", "--panorama", str(tmp_path / "pano.png"), "--engine", "preview", "--frames", "5",
                   "--trajectories", "view1:forward,view2:left", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "panorama" and len(manifest["clips"]) == 2
    # the memory bank starts as the official bank: its 27 views, their cameras
    start_bank = MemoryBank.load(out / "state" / "bank-start")
    assert len(start_bank) == len(names) == 27
    torch.testing.assert_close(start_bank.cameras.w2c, cams.w2c, rtol=0, atol=1e-5)
    # the four start views, from the official start view's own axes (columns of its c2w: right, down, forward)
    right, down, forward = (cams.c2w[0, :3, i] for i in range(3))
    looks = {0: forward, 1: right, 2: -forward, 3: -right}
    for clip, view in zip(manifest["clips"], (1, 2)):
        for frames in (_frames(out / clip["folder"] / "clip.mp4"), len(Cameras.from_json(out / clip["folder"] /
                                                                                        "cameras.json"))):
            assert frames == 5
        first = Cameras.from_json(out / clip["folder"] / "cameras.json")[0]
        assert torch.allclose(first.c2w[0, :3, 2], looks[view], atol=1e-6), (clip["name"], view)
        assert torch.allclose(first.c2w[0, :3, 1], down, atol=1e-6)  # level: the same image-down as view0
        assert torch.allclose(first.centers[0], cams.centers[0], atol=1e-6)  # from the panorama's centre
        refs = json.loads((out / clip["folder"] / "references.json").read_text())
        assert refs["bank_frames"] and all(f.split("#")[0] in ("panorama", "00_view1_forward")
                                           for f in refs["bank_frames"])
    for view, look in looks.items():
        w2c = torch.tensor(manifest["start_views"][view], dtype=torch.float64)
        assert torch.allclose(w2c[:3, :3].T[:, 2], look, atol=1e-6)
    import open3d as o3d

    assert len(o3d.io.read_point_cloud(str(out / "scene.ply")).points) > 1000


def test_every_start_view_plans_from_its_own_direction(examples, tmp_path, monkeypatch):
    """`view<k>:<preset>` starts at start view k: view0 is the official start view (the shared bank's first camera),
    view1 looks to its right, view2 behind it, view3 to its left, level and from the panorama's centre."""
    from engine.geometry.cameras import load_camera_bank

    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 0.1)  # 27 small views: the plan is what is read
    pano = tmp_path / "pano.png"
    save_image(pano, torch.rand(3, 64, 128, generator=torch.Generator().manual_seed(0)))
    scene = Scene.create(tmp_path / "job", pano, panorama=True, settings=SceneSettings(engine="preview", frames=3),
                         depth_source=PlaneTestDepth(), announce=lambda m: None)
    assert len(scene.bank) == 27
    _, official = load_camera_bank(examples / "panorama/indoor-corridor/pano_bank/cameras.json")
    right, down, forward = (official.c2w[0, :3, i] for i in range(3))
    for k, look in enumerate((forward, right, -forward, -right)):
        for preset in ("forward", "left"):
            first = scene.plan(f"view{k}:{preset}")[0]
            assert torch.allclose(first.c2w[0, :3, 2], look, atol=1e-6), (k, preset)
            assert torch.allclose(first.c2w[0, :3, 1], down, atol=1e-6) and first.centers[0].abs().max() < 1e-9


def test_cli_errors_are_one_sentence(examples, tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert cli_main(["generate", "--image", str(bad), "--engine", "preview", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars may precede it on stderr
    assert last.startswith("error:") and last.endswith(".") and "Traceback" not in err
    assert cli_main(["generate", "--image", str(examples / PHOTO), "--trajectories", "sideways",
                     "--engine", "preview", "--out", str(tmp_path / "o2")]) == 2
    assert "Unknown trajectory" in capsys.readouterr().err
    wide = tmp_path / "wide.png"
    save_image(wide, torch.rand(3, 100, 300))
    assert cli_main(["generate", "--panorama", str(wide), "--engine", "preview", "--out", str(tmp_path / "o3")]) == 2
    assert "2:1" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_render_cli_on_official_trajectory(examples, tmp_path):
    scene = examples / "perspective/photorealistic-indoor-dining_spaces-030"
    out = tmp_path / "render"
    assert cli_main(["render", "--scene", str(scene), "--out", str(out), "--max-side", "192"]) == 0
    official = Cameras.from_json(scene / "camera.json")
    written = Cameras.from_json(out / "cameras.json")
    # The 81 official cameras are subsampled to 21 keyframes as the release does (np.linspace, int).
    assert len(official) == 81
    assert len(written) == 21 == _frames(out / "render.mp4") == _frames(out / "render_mask.mp4")
    assert torch.allclose(written.w2c, official.w2c[np.linspace(0, 80, 21, dtype=int)], atol=1e-9)
    # Frame 0 is the input view, fully known: its mask frame (white = hole) is black, its render the photo.
    assert iio.imread(out / "render_mask.mp4")[0].mean() < 5


def test_render_cli_on_a_job_folder_renders_its_cache_without_a_depth_model(room, tmp_path, monkeypatch):
    from engine.geometry.render import render_points

    folder, start = room
    job = tmp_path / "job"
    scene = Scene.create(job, folder / "room.png", settings=SceneSettings(engine="preview", frames=5),
                         depth_source=RoomDepth(start), announce=lambda m: None)

    def no_model(*args, **kwargs):
        raise AssertionError("render loaded a depth model")

    monkeypatch.setattr(scene_start, "depth_source_for", no_model)
    out = tmp_path / "render"
    assert cli_main(["render", "--scene", str(job), "--trajectory", "left", "--frames", "5", "--out", str(out)]) == 0
    written = Cameras.from_json(out / "cameras.json")
    assert torch.allclose(written.w2c, scene.plan("left").w2c, atol=1e-9)
    # The mask is the job's cache seen along those cameras (white = hole), recomputed with the point renderer.
    seen = render_points(scene.cache.points, scene.cache.colors, written, radius=scene.splat_radius(written))
    mask = iio.imread(out / "render_mask.mp4")[..., 0] > 127
    assert mask.shape[0] == 5 and (mask == ~seen.mask.numpy()).mean() > 0.98


def test_cli_tiny_random_runs_the_network_loop(examples, tmp_path, capsys, monkeypatch):
    """The network loop through the CLI; clip k starts from the noise of seed + k (drawn here independently)."""
    import engine.geometry.cache as cache_module
    from engine.pipeline import ClipPipeline

    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    renders, noise = [], []
    real_render = cache_module.render_points
    monkeypatch.setattr(cache_module, "render_points",
                        lambda *a, **kw: renders.append(kw.get("pointmaps", True)) or real_render(*a, **kw))
    real_denoise = ClipPipeline.denoise
    monkeypatch.setattr(ClipPipeline, "denoise",
                        lambda self, latents, *a, **kw: noise.append(latents.clone()) or real_denoise(self, latents, *a, **kw))
    out = tmp_path / "tiny"
    rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "tiny-random", "--frames", "5",
                   "--seed", "11", "--trajectories", "up,left", "--backend", "onnxruntime", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # No exported graphs were given: the run says so in one line and falls back to eager.
    assert "onnxruntime backend unavailable, using eager" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "tiny-random" and len(manifest["clips"]) == 2
    for clip in manifest["clips"]:
        assert _frames(out / clip["folder"] / "clip.mp4") == 5
        refs = json.loads((out / clip["folder"] / "references.json").read_text())
        assert 1 <= len(refs["references"]) <= 8  # the memory variant was given references from the bank
    assert renders and not any(renders)  # the released (stitched) memory reads no pointmaps: none were made
    h, w = manifest["size"]
    assert len(noise) == 2
    for k, start in enumerate(noise):
        drawn = torch.randn((1, 16, 5, h // 8, w // 8), generator=torch.Generator().manual_seed(11 + k))
        assert torch.equal(start, drawn), f"clip {k} did not start from the noise of seed + {k}"


def test_render_cli_errors_are_one_sentence(examples, tmp_path, capsys):
    def last_error(argv):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert "does not exist" in last_error(["render", "--scene", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a truncated PNG
    assert last_error(["render", "--scene", str(broken), "--out", str(tmp_path / "o")]).startswith("error: Image file")
    scene = tmp_path / "scene"
    scene.mkdir()
    save_image(scene / "image.png", torch.rand(3, 64, 96))
    (scene / "camera.json").write_text('{"extrinsic": [[[1, 0, 0, 0]]], "intrinsic": []}')
    assert "camera" in last_error(["render", "--scene", str(scene), "--out", str(tmp_path / "o")]).lower()
    assert not (tmp_path / "o").exists()
