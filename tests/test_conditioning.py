"""What reaches the transformer, against the golden tensors the official functions computed on the shared examples
(``../shared/reference/golden``), analytic answers and independent float64 references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.spatial.transform import Rotation

from conftest import SHARED, PlaneTestDepth
from engine import conditioning as C
from engine.cli import main as cli_main
from engine.constants import KEYFRAMES
from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.geometry.cache import PointCache
from engine.images import load_image, save_image

GOLDEN = SHARED / "reference" / "golden"
CORRIDOR = "panorama/indoor-corridor/view0"
CASES = {  # golden case: (image, camera file, pre-rendered folder) under the shared examples
    "dining": ("perspective/photorealistic-indoor-dining_spaces-030/image.png",
               "perspective/photorealistic-indoor-dining_spaces-030/camera.json", None),
    "aquatic": ("perspective/stylized-outdoor-aquatic_landscape-069/image.png",
                "perspective/stylized-outdoor-aquatic_landscape-069/camera.json", None),
    "corridor_view0_traj1": (f"{CORRIDOR}/start_frame.png", f"{CORRIDOR}/traj1/camera.json", f"{CORRIDOR}/traj1"),
}
CAMERA_TOL, PLUCKER_TOL, RENDER_TOL = 1e-5, 1e-4, 2 / 255  # ../shared/reference/golden/README.md
MASK_PIXELS_OFF = 8  # "exact except a handful of pixels"


def golden(name: str):
    return load_file(str(GOLDEN / f"{name}.safetensors")), json.loads((GOLDEN / f"{name}.json").read_text())


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    err = float((a.float() - b.float()).abs().max())
    assert err <= tol, err
    return err


def official_case(examples, name: str):
    image_rel, cam_rel, _ = CASES[name]
    image = load_image(examples / image_rel)
    h0, w0 = image.shape[-2:]
    full = Cameras.from_json(examples / cam_rel, w0, h0)
    size = C.assign_bucket(h0, w0)
    return image, full, size, C.official_cameras(full, (h0, w0), size, KEYFRAMES)


# ---- the golden tensors ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_bucket_keyframes_and_intrinsics_match_golden(examples, name):
    g, meta = golden(name)
    image, full, size, cams = official_case(examples, name)
    assert list(image.shape[-2:]) == meta["origin_hw"] and list(size) == meta["hw"]
    assert (cams.width, cams.height) == (size[1], size[0]) and len(cams) == meta["nframe"]
    close(cams.w2c, g["extrinsics"], CAMERA_TOL)
    close(cams.K, g["intrinsics"], CAMERA_TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_plucker_map_matches_golden(examples, name):
    g, meta = golden(name)
    _, _, (h, w), cams = official_case(examples, name)
    close(C.camera_embedding(cams.K, cams.w2c, h, w, stride=meta["stride"]), g["camera_embedding"], PLUCKER_TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_camera_codes_match_golden_with_one_and_two_references(examples, name):
    g, meta = golden(name)
    _, full, _, cams = official_case(examples, name)
    qt, qt_ref = C.camera_qt(cams.w2c, cams.w2c[0:1])  # single view: the reference is target camera 0
    close(qt, g["camera_qt"], CAMERA_TOL)
    close(qt_ref, g["camera_qt_ref"], CAMERA_TOL)
    if meta["refs_from"]:
        refs = full.w2c[meta["refs_from"]]
        close(refs, g["refs_w2c"], CAMERA_TOL)
        qt, qt_ref = C.camera_qt(cams.w2c, refs)
        close(qt, g["camera_qt_multi"], CAMERA_TOL)
        close(qt_ref, g["camera_qt_ref_multi"], CAMERA_TOL)


def test_official_render_folder_is_read_as_the_loader_reads_it(examples):
    g, meta = golden("corridor_view0_traj1")
    image = load_image(examples / CASES["corridor_view0_traj1"][0])
    pil = C.stretch_to_bucket(image, tuple(meta["hw"]))
    video, mask = C.read_official_render(examples / CORRIDOR / "traj1", pil, KEYFRAMES)
    s = meta["stride"]
    close(video[..., ::s, ::s], g["render_video"], RENDER_TOL)
    assert torch.equal(video[0, :, 0], C.signed(C.pil_to_tensor(pil)))  # frame 0 is the start frame itself
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int((mask[..., ::s, ::s] != g["render_mask"]).sum()) <= MASK_PIXELS_OFF


# ---- the `conditions` command reproduces the golden files -----------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_conditions_command_reproduces_golden(examples, tmp_path, name):
    g, meta = golden(name)
    image_rel, cam_rel, render_rel = CASES[name]
    out = tmp_path / "c.safetensors"
    argv = ["conditions", "--image", str(examples / image_rel), "--stride", "8", "--out", str(out)]
    argv += ["--render-dir", str(examples / render_rel)] if render_rel else ["--camera-json", str(examples / cam_rel)]
    assert cli_main(argv) == 0
    ours = load_file(str(out))
    for key in ("extrinsics", "intrinsics", "camera_qt", "camera_qt_ref"):
        close(ours[key], g[key], CAMERA_TOL)
    close(ours["camera_embedding"], g["camera_embedding"], PLUCKER_TOL)
    assert torch.equal(ours["ref_index"], torch.tensor([0]))  # single view: the input view serves target 0
    f, (h, w) = meta["nframe"], meta["hw"]
    hs, ws = -(-h // meta["stride"]), -(-w // meta["stride"])
    assert ours["render_video"].shape == (1, 3, f, hs, ws) and ours["render_mask"].shape == (1, 1, f, hs, ws)
    if render_rel:
        close(ours["render_video"], g["render_video"], RENDER_TOL)
        assert int((ours["render_mask"] != g["render_mask"]).sum()) <= MASK_PIXELS_OFF
    else:
        assert float(ours["render_video"].min()) >= -1 and float(ours["render_video"].max()) <= 1
        assert (ours["render_mask"][0, 0, 0] == 0).all()


def test_conditions_command_refuses_bad_input_in_one_sentence(examples, tmp_path, capsys):
    image = str(examples / CASES["dining"][0])
    cam = str(examples / CASES["dining"][1])
    out = str(tmp_path / "c.safetensors")
    cases = [
        (["--image", image, "--out", out], "exactly one trajectory"),
        (["--image", image, "--camera-json", cam, "--trajectory", "up", "--out", out], "exactly one trajectory"),
        (["--image", image, "--trajectory", "sideways", "--out", out], "Unknown trajectory"),
        (["--image", image, "--camera-json", cam, "--stride", "0", "--out", out], "stride"),
        (["--image", image, "--camera-json", cam, "--engine", "preview", "--out", out], "preview"),
        (["--image", image, "--render-dir", str(tmp_path), "--out", out], "lacks camera.json"),
        (["--image", str(tmp_path / "none.png"), "--camera-json", cam, "--out", out], "does not exist"),
    ]
    for argv, needle in cases:
        assert cli_main(["conditions", *argv]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("error:") and needle in last, last
    assert not (tmp_path / "c.safetensors").exists()


def test_conditions_command_with_a_preset_at_a_small_engines_size(examples, tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert cli_main(["conditions", "--image", str(examples / CASES["dining"][0]), "--trajectory", "up",
                     "--engine", "tiny-random", "--depth", "plane", "--stride", "4", "--out", str(out)]) == 0
    c = load_file(str(out))
    assert c["extrinsics"].shape == (21, 4, 4) and c["camera_embedding"].shape == (1, 6, 21, 20, 32)  # 80x128 / 4
    assert torch.allclose(c["extrinsics"][0], torch.eye(4))  # a preset starts at the input view
    assert torch.allclose(c["camera_qt"][0, 0, :4], torch.tensor([1.0, 0, 0, 0]))  # camera 0: identity rotation
    assert float(c["camera_qt"][0, 0, 4:].norm()) == pytest.approx(2.0, abs=1e-5)  # at distance 2 from the mean
    assert torch.equal(c["camera_qt_ref"], c["camera_qt"][:, :1]) and c["ref_index"].tolist() == [0]


def test_camera_variant_conditions_have_no_memory_inputs(examples, tmp_path):
    out = tmp_path / "cam.safetensors"
    image_rel, _, render_rel = CASES["corridor_view0_traj1"]
    assert cli_main(["conditions", "--image", str(examples / image_rel), "--render-dir", str(examples / render_rel),
                     "--engine", "worldstereo-camera", "--stride", "16", "--out", str(out)]) == 0
    keys = set(load_file(str(out)))
    assert keys == {"extrinsics", "intrinsics", "render_video", "render_mask", "camera_embedding"}


# ---- analytic and independent references -----------------------------------------------------------

def _random_cameras(n: int, width: int, height: int, seed: int = 0, spread: float = 1.0) -> Cameras:
    g = np.random.default_rng(seed)
    w2c = np.tile(np.eye(4), (n, 1, 1))
    w2c[:, :3, :3] = Rotation.from_rotvec(0.4 * g.normal(size=(n, 3))).as_matrix()
    w2c[:, :3, 3] = spread * g.normal(size=(n, 3))
    k = intrinsics_from_fov(width, height, 60.0, n=n)
    k[:, 0, 2] += torch.as_tensor(g.uniform(-2, 2, n))
    return Cameras(torch.as_tensor(w2c), k, width, height)


def _np_center_normalized(w2c: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """The release's camera_center_normalization written out in numpy float64 (lower median, linear quantile)."""
    w2c = w2c @ np.linalg.inv(w2c[0])
    c2w = np.linalg.inv(w2c)
    centres = c2w[:, :3, 3]
    lower_median = np.sort(centres, axis=0)[(len(centres) - 1) // 2]
    dist = np.linalg.norm(centres - lower_median, axis=1)
    valid = dist <= min(np.quantile(dist, 0.97) * 10, 1e6)
    c2w[:, :3, 3] -= centres[valid].mean(axis=0)
    d0 = np.linalg.norm(c2w[0, :3, 3])
    out = np.linalg.inv(c2w)
    out[:, :3, 3] *= scale if d0 <= 1e-5 else scale / d0
    return out


@pytest.mark.parametrize("n, excluded", [(41, True), (21, False)])
def test_center_normalization_matches_a_numpy_reference_and_its_rules(n, excluded):
    cams = _random_cameras(n, 32, 24, seed=3)
    w2c = cams.w2c.clone()
    w2c[7, :3, 3] += torch.tensor([500.0, 0, 0], dtype=torch.float64)  # one camera far from the others
    ours = C.center_normalized_w2c(w2c)
    np.testing.assert_allclose(ours.numpy(), _np_center_normalized(w2c.numpy()), atol=1e-9)
    assert torch.allclose(ours[0, :3, :3], torch.eye(3, dtype=torch.float64), atol=1e-12)  # camera 0: identity
    centres = Cameras(ours, cams.K, 32, 24).centers
    assert float(centres[0].norm()) == pytest.approx(2.0, abs=1e-9)  # camera 0 at distance 2 from the mean
    # The outlier leaves the mean only when the 97th percentile falls below it (with 21 cameras it interpolates
    # 40 % of the way to the largest distance, so 10x that always keeps it).
    keep = torch.arange(n) != 7 if excluded else torch.ones(n, dtype=torch.bool)
    assert torch.allclose(centres[keep].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(centres.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-3) or not excluded
    # camera 0 already at the mean centre: translations scaled by 2
    sym = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    sym[1, 0, 3], sym[2, 0, 3] = 0.3, -0.3
    assert torch.allclose(C.center_normalized_w2c(sym)[:, 0, 3], torch.tensor([0.0, 0.6, -0.6], dtype=torch.float64))


def test_unified_normalization_centres_on_targets_only():
    tgt = _random_cameras(5, 32, 24, seed=4).w2c
    far_ref = _random_cameras(2, 32, 24, seed=5, spread=50.0).w2c
    a, _ = C.unified_normalized_w2c(tgt, far_ref[:1])
    b, refs = C.unified_normalized_w2c(tgt, far_ref)
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, C.center_normalized_w2c(tgt), atol=1e-12)
    # the references keep their pose relative to the targets (same rigid change of frame and scale)
    rel_before = far_ref[1] @ torch.linalg.inv(tgt[2])
    rel_after = refs[1] @ torch.linalg.inv(b[2])
    assert torch.allclose(rel_after[:3, :3], rel_before[:3, :3], atol=1e-9)


def test_camera_codes_are_w2c_quaternions_real_part_first():
    w2c = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    for i, deg in enumerate((60.0, 270.0)):
        w2c[i, :3, :3] = torch.as_tensor(Rotation.from_euler("z", deg, degrees=True).as_matrix())
    w2c[:, :3, 3] = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    codes = C.camera_codes(w2c)
    half = np.radians(30.0)
    assert torch.allclose(codes[0], torch.tensor([np.cos(half), 0, 0, np.sin(half), 1, 2, 3], dtype=torch.float64))
    # 270 degrees gives w = cos(135) < 0: the standard form flips the sign
    r = np.sqrt(0.5)
    assert torch.allclose(codes[1], torch.tensor([r, 0, 0, -r, -1, 0.5, 0], dtype=torch.float64))


def test_plucker_map_follows_the_official_pixel_grid_and_channel_order():
    cams = _random_cameras(3, 12, 8, seed=6)
    emb = C.plucker_map(cams.K, cams.w2c, 8, 12)
    assert emb.shape == (6, 3, 8, 12)
    c2w = np.linalg.inv(cams.w2c.numpy())
    kinv = np.linalg.inv(cams.K.numpy())
    for f, i, j in [(0, 0, 0), (1, 3, 7), (2, 7, 11)]:
        d = c2w[f, :3, :3] @ kinv[f] @ np.array([j - 0.5, i + 0.5, 1.0])  # x = j - 0.5, y = i + 0.5 (sic)
        d /= np.linalg.norm(d)
        o = c2w[f, :3, 3]
        np.testing.assert_allclose(emb[:, f, i, j].numpy(), np.concatenate([d, np.cross(o, d)]), atol=1e-6)
    # a stride keeps rows and columns 0, s, 2s, ... of the full map
    assert torch.equal(C.plucker_map(cams.K, cams.w2c, 8, 12, stride=3), emb[:, :, ::3, ::3])


def test_buckets_keyframes_and_the_bicubic_stretch(examples):
    assert C.assign_bucket(720, 1080) == (480, 768) and C.assign_bucket(1024, 1024) == (608, 608)
    # ratios compared by absolute difference: a 2:3 portrait lands in 720x512 (1.41), not 768x480 (1.6)
    assert C.assign_bucket(1080, 720) == (720, 512) and C.assign_bucket(100, 1000) == (480, 768)
    assert C.assign_bucket(1000, 1000, scale_map=[[512, 512], [256, 1024]]) == (512, 512)
    assert C.scale_bucket((480, 768), 1 / 6) == (80, 128) and C.scale_bucket((608, 608), 0.5) == (304, 304)
    assert C.keyframe_indices(81, 21).tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64,
                                                   68, 72, 76, 80]
    assert C.keyframe_indices(9, 21).tolist() == list(range(9))
    path = examples / CASES["dining"][0]
    ours = C.stretch_to_bucket(load_image(path), (480, 768))
    with Image.open(path) as im:  # the release: PIL open, then resize((w, h), BICUBIC)
        theirs = im.convert("RGB").resize((768, 480), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_example_prompts(examples):
    dining = json.loads((examples / "perspective/photorealistic-indoor-dining_spaces-030/prompt.json").read_text())
    assert C.example_prompt(examples / CASES["dining"][0]) == dining["long caption"]
    traj = json.loads((examples / CORRIDOR / "traj1/traj_caption.json").read_text())
    assert C.example_prompt(examples / CASES["corridor_view0_traj1"][0], examples / CORRIDOR / "traj1") == traj["prompt"]
    assert C.example_prompt(SHARED / "nowhere.png") is None


# ---- the engine's own renders -------------------------------------------------------------------------

def test_own_render_gives_holes_where_the_zbuffer_is_empty():
    h, w = 48, 64
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), generator=g).float() / 255
    start = Cameras(torch.eye(4, dtype=torch.float64), intrinsics_from_fov(w, h, 60.0), w, h)
    cache = PointCache.empty()
    valid = torch.rand(h, w, generator=g) > 0.2  # holes in the cache, even in the start view
    cache.add_frame(image, torch.full((h, w), 2.0), start, frame_id=0, valid=valid)
    w2c = torch.eye(4, dtype=torch.float64).repeat(4, 1, 1)
    w2c[:, 0, 3] = -0.15 * torch.arange(4)
    cams = Cameras(w2c, start.K.expand(4, 3, 3), w, h)
    render = cache.render(cams)
    empty = render.index == -1
    assert bool(empty[0].any()) and bool(empty[1:].any()) and bool((~empty).any())
    cond = C.conditions_from_render(image, cams, render.image, render.mask)
    mask, video = cond.render_mask[0, 0], cond.render_video[0].transpose(0, 1)
    assert torch.equal(mask[1:], empty[1:].float())  # 1 exactly where no point landed
    assert (mask[0] == 0).all()  # the input view is fully known
    assert (video[1:].permute(1, 0, 2, 3)[:, empty[1:]] == 0).all()  # holes: background 0 (mid-grey)
    assert torch.allclose(video[1:].permute(1, 0, 2, 3)[:, ~empty[1:]],
                          (render.image[1:] * 2 - 1).permute(1, 0, 2, 3)[:, ~empty[1:]], atol=1e-6)
    assert torch.allclose(video[0], image * 2 - 1, atol=1e-6)  # frame 0: the input image in [-1, 1]


class _Recorder:
    """A memory model stand-in for the scene loop: records the conditions and returns the renders."""

    has_memory = True
    uses_pointmaps = False

    def __init__(self):
        self.seen = []

    def generate(self, *, conditions, **_):
        self.seen.append(conditions)
        return conditions.render_frames()[0]


def test_scene_feeds_a_photos_first_clip_the_input_view_alone(tmp_path):
    from engine.scene import Scene
    from engine.settings import SceneSettings

    save_image(tmp_path / "photo.png", torch.rand(3, 240, 384, generator=torch.Generator().manual_seed(1)))
    scene = Scene.create(tmp_path / "job", tmp_path / "photo.png", settings=SceneSettings(frames=5, keep_frames=2),
                         depth_source=PlaneTestDepth(), announce=lambda m: None)
    recorder = scene._generator = _Recorder()
    cams = scene.plan("left")
    render = scene.cache.render(cams, radius=scene.splat_radius(cams))
    scene.run(["left", "right"])
    first, second = recorder.seen
    assert first.ref_index.tolist() == [0]
    assert torch.allclose(first.camera_qt_ref[0, 0], first.camera_qt[0, 0], atol=1e-6)  # reference = target camera 0
    assert torch.equal(first.reference_video[0, :, 0], first.image_tensor())
    assert torch.equal(first.render_mask[0, 0, 1:], (render.index[1:] == -1).float())
    assert (first.render_mask[0, 0, 0] == 0).all()
    refs = json.loads((tmp_path / "job" / scene.clips[1]["folder"] / "references.json").read_text())
    assert second.ref_index.tolist() == refs["ref_index"] and second.num_references == len(refs["references"])


# ---- the official examples run as released ----------------------------------------------------------

@pytest.mark.parametrize("engine", ["preview", "tiny-random"])
def test_generate_from_an_official_render_folder(examples, tmp_path, monkeypatch, capsys, engine):
    import imageio.v3 as iio

    from engine.pipeline import ClipPipeline

    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    seen = []
    original = ClipPipeline.generate

    def recording(self, conditions, **kw):
        seen.append((conditions, kw.get("prompt")))
        return original(self, conditions, **kw)

    monkeypatch.setattr(ClipPipeline, "generate", recording)
    folder = examples / CORRIDOR / "traj1"
    out = tmp_path / "job"
    rc = cli_main(["generate", "--render-dir", str(folder), "--image", str(examples / CORRIDOR / "start_frame.png"),
                   "--engine", engine, "--frames", "5", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["traj1"]
    clip = out / manifest["clips"][0]["folder"]
    for name in ("clip.mp4", "render.mp4", "render_mask.mp4", "depth.mp4", "cameras.json", "references.json"):
        assert (clip / name).is_file(), name
    assert len(list((clip / "frames").glob("*.png"))) == 5
    for name in ("scene.ply", "scene.glb", "cameras.json", "transforms.json", "scene.zip"):
        assert (out / name).is_file(), name
    # the command's closing listing names every file of the clip folder and of the scene
    said = capsys.readouterr().out
    listed = said[said.index("Written to"):].split()
    for name in ["depth.mp4", "frames/", "references.json", "scene.zip", "transforms.json", "images/", "manifest.json"]:
        assert name in listed, name
    # the loader's subsampling: 21 cameras and frames to 5 with the same linspace
    idx = C.keyframe_indices(21, 5)
    official = Cameras.from_json(folder / "camera.json")
    assert torch.allclose(Cameras.from_json(clip / "cameras.json").w2c, official.w2c[idx], atol=1e-9)
    h, w = manifest["size"]
    pil = C.stretch_to_bucket(load_image(examples / CORRIDOR / "start_frame.png"), (h, w))
    video, mask = C.read_official_render(folder, pil, 5)
    written = torch.from_numpy(iio.imread(clip / "render_mask.mp4")[..., 0] > 127)
    assert (written != mask[0, 0].bool()).float().mean() < 0.01  # the folder's mask is what the clip got
    caption = json.loads((folder / "traj_caption.json").read_text())["prompt"]
    assert manifest["settings"]["prompt"] == caption
    if engine == "tiny-random":
        cond, prompt = seen[0]
        assert prompt == caption
        assert torch.equal(cond.render_video, video) and torch.equal(cond.render_mask, mask)
        assert cond.ref_index.tolist() == [0]


def _comb_fraction(holes: torch.Tensor) -> float:
    """Share of the frames' pixels that a 3x3 morphological opening removes from the hole mask ``[F,H,W]``: the
    one-pixel gaps between splats (solid holes survive an opening but for their rims)."""
    import torch.nn.functional as Fn

    h = holes.float()[:, None]
    opened = Fn.max_pool2d(-Fn.max_pool2d(-h, 3, 1, 1), 3, 1, 1)
    return float((h - opened).clamp(min=0).mean())


def test_splat_radius_follows_the_official_render_radius():
    from engine.geometry import trajectories as traj
    from engine.geometry.panorama import bank_cameras, look_rotation, panorama_points
    from engine.scene_start import PANORAMA_CLOUD_HEIGHT

    assert C.splat_radius(480, 768) == 2 and C.splat_radius(608, 608) == 2  # 0.008 NDC ~ 1.9-2.4 px
    assert C.splat_radius(240, 384) == 1 and C.splat_radius(80, 128) == 1
    # A panorama's first cache (a 360 degree cloud lifted at PANORAMA_CLOUD_HEIGHT rows, here a 3 m sphere) seen
    # along a forward move at the full engines' size.
    hp = PANORAMA_CLOUD_HEIGHT
    colours = torch.rand(3, hp, 2 * hp, generator=torch.Generator().manual_seed(0))
    points, cols = panorama_points(colours, torch.full((hp, 2 * hp), 3.0))
    cache = PointCache.empty()
    cache.add_points(points.float(), cols.float(), frame_id=0)
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = look_rotation([0.0], [0.0])[0]
    start = Cameras(w2c, bank_cameras(width=768, height=480).K[:1], 768, 480)
    cams = traj.make_trajectory("forward", start, 3.0, frames=3)
    combs = {r: _comb_fraction(~cache.render(cams[1:], radius=r).mask) for r in (1, C.splat_radius(480, 768))}
    print(f"comb pixels: radius 1 {combs[1]:.4f}, official radius {combs[2]:.4f}")
    assert combs[1] > 0.1  # 3x3 splats leave a comb over a tenth of the frame
    assert combs[2] < 0.04


def test_a_users_depth_map_is_stretched_with_the_photo(tmp_path):
    from engine.scene import Scene
    from engine.settings import SceneSettings

    save_image(tmp_path / "photo.png", torch.rand(3, 96, 144))  # 2:3, stretched to the 240x384 preview bucket
    np.save(tmp_path / "depth.npy", np.full((96, 144), 2.5, dtype=np.float32))
    scene = Scene.create(tmp_path / "job", tmp_path / "photo.png", announce=lambda m: None,
                         settings=SceneSettings(depth=str(tmp_path / "depth.npy"), frames=3),
                         depth_source=PlaneTestDepth())  # camera guess only: the depth is the user's
    assert scene.manifest["size"] == [240, 384] and scene.manifest["input_size"] == [96, 144]
    assert scene.manifest["median_depth"] == pytest.approx(2.5)
    assert len(scene.cache) == 240 * 384  # every pixel of the stretched photo has the user's depth
