"""Monocular depth: a tiny random MoGe-2 saved and loaded through the real checkpoint path, the fallbacks,
user depth files (which are one, reading them), and the one-line announcement."""
from __future__ import annotations

import math
import sys
import time
import types
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from engine.depth import (
    DEFAULT_FOV_X,
    DEFAULT_PLANE_DEPTH,
    DepthEstimate,
    MoGeEstimator,
    DepthUnavailable,
    PlaneDepth,
    SphereDepth,
    UserDepth,
    load_depth_estimator,
)
from engine.user_depth import DepthInputError, is_user_depth_file

TINY_BACKBONE = "dinov2_tiny_test"


def _tiny_backbone(*, pretrained: bool = False, **_):
    from moge.model.dinov2.layers import MemEffAttention, NestedTensorBlock
    from moge.model.dinov2.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), init_values=1.0, block_chunks=0,
    )


def _tiny_config() -> dict:
    head = lambda out: dict(dim_in=[16, 8, 8, 8, 8], dim_res_blocks=[8, 8, 4, 4, 4], dim_out=[None] * 4 + [out],
                            resamplers=["conv_transpose"] * 4, res_block_hidden_norm="layer_norm")
    return dict(
        encoder=dict(backbone=TINY_BACKBONE, intermediate_layers=2, dim_out=16),
        neck=dict(dim_in=[18, 2, 2, 2, 2], dim_res_blocks=[16, 8, 8, 8, 8], dim_out=[None] * 5,
                  resamplers=["conv_transpose"] * 4, res_block_hidden_norm="layer_norm"),
        points_head=head(3),
        mask_head=head(1),
        scale_head=dict(dims=[32, 16, 1]),
        remap_output="exp",
        num_tokens_range=[4, 6],
    )


@pytest.fixture(scope="module")
def tiny_moge(tmp_path_factory):
    """A random MoGe-2 at a tiny size, saved as the official ``model.pt`` layout (model_config + model)."""
    import moge.model.dinov2.hub.backbones as backbones
    from moge.model.v2 import MoGeModel

    backbones.__dict__[TINY_BACKBONE] = _tiny_backbone  # the encoder looks its backbone up by name
    torch.manual_seed(0)
    config = _tiny_config()
    model = MoGeModel(**config)
    with torch.no_grad():
        # Most pixels valid, some not: the mask logit gets a spatially varying offset through its bias.
        model.mask_head.output_blocks[-1].bias.fill_(0.3)
    folder = tmp_path_factory.mktemp("moge")
    torch.save({"model_config": config, "model": model.state_dict()}, folder / "model.pt")
    yield folder, model.eval()
    backbones.__dict__.pop(TINY_BACKBONE, None)


def _check_consistent(est: DepthEstimate, h: int, w: int) -> None:
    assert est.depth.shape == (h, w) and est.points.shape == (h, w, 3) and est.mask.shape == (h, w)
    assert est.mask.dtype == torch.bool and est.K.shape == (3, 3)
    torch.testing.assert_close(est.points[..., 2], est.depth)
    m = est.mask
    assert m.any()
    assert (est.depth[m] > 0).all() and (est.depth[~m] == 0).all() and (est.points[~m] == 0).all()
    # Projection with K lands every valid point on its own pixel centre (j + 0.5, i + 0.5).
    x, y, z = est.points[m].double().unbind(-1)
    K = est.K.double()
    u = K[0, 0] * x / z + K[0, 2]
    v = K[1, 1] * y / z + K[1, 2]
    ii, jj = torch.nonzero(m, as_tuple=True)
    torch.testing.assert_close(u, jj.double() + 0.5, atol=1e-3, rtol=0)
    torch.testing.assert_close(v, ii.double() + 0.5, atol=1e-3, rtol=0)


# ---- MoGe through the real loading path ----------------------------------------------------------

def test_tiny_moge_loads_and_estimates(tiny_moge):
    folder, reference_model = tiny_moge
    est = MoGeEstimator.from_pretrained(folder)  # a folder holding model.pt, like a hub snapshot
    assert est.source == "moge-2"
    for name, p in reference_model.state_dict().items():
        assert torch.equal(est.model.state_dict()[name], p), name

    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 42, 56, generator=g)
    out = est.estimate(img)
    _check_consistent(out, 42, 56)
    assert out.source == "moge-2"
    # Principal point at the image centre, square pixels (MoGe's model of the camera).
    assert float(out.K[0, 2]) == pytest.approx(28.0) and float(out.K[1, 2]) == pytest.approx(21.0)
    assert float(out.K[0, 0]) == pytest.approx(float(out.K[1, 1]), rel=1e-5)

    # Same numbers as moge's own API on the same weights (metric depth, mask from its mask head).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        ref = reference_model.infer(img[None], resolution_level=9, apply_mask=False, use_fp16=False)
    ref_mask = ref["mask"][0] & (ref["depth"][0] > 0)
    assert torch.equal(out.mask, ref_mask)
    torch.testing.assert_close(out.depth[out.mask], ref["depth"][0][out.mask])


def test_tiny_moge_known_fov_and_batch(tiny_moge):
    folder, _ = tiny_moge
    est = MoGeEstimator.from_pretrained(folder / "model.pt", batch_size=2)
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(3, 3, 28, 42, generator=g)
    out = est.estimate_batch(imgs, fov_x=[50.0, 70.0, 90.0])  # two chunks: 2 + 1
    assert out.depth.shape == (3, 28, 42) and out.K.shape == (3, 3, 3) and len(out) == 3
    torch.testing.assert_close(out.fov_x.double(), torch.tensor([50.0, 70.0, 90.0], dtype=torch.float64), atol=1e-3, rtol=0)
    for i in range(3):
        _check_consistent(out[i], 28, 42)
    single = est.estimate(imgs[1], fov_x=70.0)
    torch.testing.assert_close(single.depth, out.depth[1], atol=1e-4, rtol=1e-4)


def test_a_scene_lets_moge_estimate_its_own_field_of_view(tiny_moge, tmp_path):
    """As the release runs MoGe (``infer`` with its defaults) and unprojects its z-depth with the camera file's K: the
    scene's depth door asks MoGe with no field of view whatever the camera's, a photo started from a camera file is
    lifted along that file's rays, and the stand-ins still draw their surface through the camera's field of view."""
    from engine.depth import DepthSource
    from engine.geometry.cameras import Cameras, intrinsics_from_fov
    from engine.scene_start import start_photo

    folder, reference_model = tiny_moge
    est = MoGeEstimator.from_pretrained(folder)
    img = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(4))
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, 3] = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    camera = Cameras(w2c, intrinsics_from_fov(64, 48, 100.0), 64, 48)
    depth, valid, _ = DepthSource(est, "moge-2")(img, camera)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        ref = reference_model.infer(img[None], resolution_level=9, apply_mask=False, use_fp16=False)  # no fov_x
    torch.testing.assert_close(depth[valid], ref["depth"][0][valid])
    forced = est.estimate(img, fov_x=100.0)
    both = valid & forced.mask
    assert (forced.depth[both] - depth[both]).abs().max() > 1e-3  # forcing the camera's field of view changes depth

    camera.save_json(tmp_path / "camera.json")
    start = start_photo(img, DepthSource(est, "moge-2"), tmp_path / "camera.json", (48, 64))
    z, ok, _ = DepthSource(est, "moge-2")(start.image, start.start_camera)
    points = start.cache.points.double()
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    k = camera.K[0]
    u, v = k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 2], k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2]
    assert len(points) > 1000
    torch.testing.assert_close(u - u.floor(), torch.full_like(u, 0.5), atol=1e-3, rtol=0)  # on the file's pixel rays
    torch.testing.assert_close(v - v.floor(), torch.full_like(v, 0.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(cam[:, 2], z[v.long(), u.long()].double(), atol=1e-4, rtol=1e-4)  # MoGe's own z
    assert bool(ok[v.long(), u.long()].all())

    sphere, _, _ = DepthSource(SphereDepth(radius=4.0), "sphere")(img, camera)
    rays = camera.ray_directions_camera()[0]
    torch.testing.assert_close((sphere.double() * rays.norm(dim=-1)), torch.full((48, 64), 4.0, dtype=torch.float64),
                               atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_tiny_moge_on_cuda_matches_cpu(tiny_moge):
    folder, _ = tiny_moge
    g = torch.Generator().manual_seed(3)
    img = torch.rand(3, 42, 56, generator=g)
    cpu = MoGeEstimator.from_pretrained(folder).estimate(img, fov_x=60.0)
    gpu_est = MoGeEstimator.from_pretrained(folder, device="cuda")
    gpu = gpu_est.estimate(img.cuda(), fov_x=60.0)  # fp16 autocast on CUDA
    assert gpu.depth.device.type == "cuda"
    gpu = gpu.to("cpu")
    _check_consistent(gpu, 42, 56)
    both = cpu.mask & gpu.mask
    assert both.float().mean() > 0.9
    torch.testing.assert_close(gpu.depth[both], cpu.depth[both], rtol=5e-2, atol=1e-3)


def test_official_loader_reads_our_checkpoint_layout(tiny_moge):
    from moge.model.v2 import MoGeModel

    folder, reference_model = tiny_moge
    model = MoGeModel.from_pretrained(folder / "model.pt")
    for name, p in reference_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p)


def test_mismatched_checkpoint_refused(tiny_moge, tmp_path):
    folder, _ = tiny_moge
    ckpt = torch.load(folder / "model.pt", weights_only=True)
    ckpt["model"].pop("scale_head.0.weight")  # a learned weight: without it the model would be partly random
    ckpt["model"]["an_extra_key"] = torch.zeros(1)  # extra keys are ignored, as moge's loader does
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(DepthUnavailable, match="1 missing") as e:
        MoGeEstimator.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    ckpt = torch.load(folder / "model.pt", weights_only=True)
    ckpt["model"].pop("encoder.image_mean")  # a constant the constructor rebuilds: not a reason to refuse
    torch.save(ckpt, tmp_path / "model.pt")
    assert MoGeEstimator.from_pretrained(tmp_path).source == "moge-2"
    (tmp_path / "junk").mkdir()
    with pytest.raises(DepthUnavailable, match="no model.pt"):
        MoGeEstimator.from_pretrained(tmp_path / "junk")


def test_uncached_hub_repo_offline_is_quick_and_announced():
    t0 = time.perf_counter()
    with pytest.raises(DepthUnavailable, match="not in the Hugging Face cache"):
        MoGeEstimator.from_pretrained("nobody-here/no-such-moge", local_files_only=True)
    lines: list[str] = []
    est = load_depth_estimator("nobody-here/no-such-moge", announce=lines.append, local_files_only=True)
    assert isinstance(est, PlaneDepth)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "plane" in lines[0] and "not in the Hugging Face cache" in lines[0]
    pano = load_depth_estimator("nobody-here/no-such-moge", announce=lines.append, panorama=True, local_files_only=True)
    assert isinstance(pano, SphereDepth) and len(lines) == 2 and "sphere" in lines[1]
    assert time.perf_counter() - t0 < 5.0  # no network wait


def test_load_depth_estimator_dispatch(tiny_moge, tmp_path):
    folder, _ = tiny_moge
    lines: list[str] = []
    assert isinstance(load_depth_estimator(folder, announce=lines.append), MoGeEstimator)
    assert isinstance(load_depth_estimator("plane", announce=lines.append), PlaneDepth)
    np.save(tmp_path / "d.npy", np.full((8, 8), 2.0))
    assert isinstance(load_depth_estimator(tmp_path / "d.npy", announce=lines.append), UserDepth)
    assert lines == []  # nothing fell back, nothing to announce


def test_depth_model_loads_once_per_process(tiny_moge, tmp_path, monkeypatch):
    """Every scene, clip and plan of a process shares one MoGe per checkpoint file, device and dtype."""
    import os
    import shutil

    import engine.depth as depth_module
    from engine.settings import SceneSettings
    from engine.scene_start import depth_source_for

    folder = tmp_path / "moge"
    shutil.copytree(tiny_moge[0], folder)
    loads = []
    real = MoGeEstimator.from_pretrained.__func__
    monkeypatch.setattr(MoGeEstimator, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loads.append(a[0]) or real(cls, *a, **kw)))
    monkeypatch.setattr(depth_module, "_LOADED", {})
    settings = SceneSettings(depth=str(folder), device="cpu")
    first = depth_source_for(settings, panorama=False, announce=print)
    assert depth_source_for(settings, panorama=True, announce=print).estimator is first.estimator
    assert load_depth_estimator(folder / "model.pt") is first.estimator  # the same file named another way
    assert len(loads) == 1
    assert load_depth_estimator(folder, dtype=torch.float64) is not first.estimator and len(loads) == 2
    stat = (folder / "model.pt").stat()
    os.utime(folder / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a replaced checkpoint
    assert depth_source_for(settings, panorama=False, announce=print).estimator is not first.estimator
    assert len(loads) == 3


# ---- fallbacks -----------------------------------------------------------------------------------

def test_plane_fallback_is_a_fronto_parallel_plane():
    h, w = 30, 40
    out = PlaneDepth().estimate(torch.rand(3, h, w))
    _check_consistent(out, h, w)
    assert out.source == "plane fallback" and out.mask.all()
    f = 0.5 * w / math.tan(math.radians(DEFAULT_FOV_X) / 2)
    jj = torch.arange(w, dtype=torch.float64) + 0.5
    ii = torch.arange(h, dtype=torch.float64) + 0.5
    d = DEFAULT_PLANE_DEPTH
    torch.testing.assert_close(out.points[..., 2].double(), torch.full((h, w), d, dtype=torch.float64))
    torch.testing.assert_close(out.points[0, :, 0].double(), (jj - w / 2) * d / f, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.points[:, 0, 1].double(), (ii - h / 2) * d / f, atol=1e-5, rtol=0)
    # A plane: every point satisfies n . p = d with n = +z, and the fit of a plane through them is exact.
    p = out.points.reshape(-1, 3).double()
    centred = p - p.mean(0)
    assert torch.linalg.svdvals(centred)[-1] < 1e-4
    assert float(PlaneDepth(depth=5.0).estimate(torch.rand(3, h, w), fov_x=90).fov_x) == pytest.approx(90.0)


def test_sphere_fallback_constant_distance():
    out = SphereDepth(radius=4.0).estimate(torch.rand(3, 24, 32), fov_x=120.0)
    _check_consistent(out, 24, 32)
    torch.testing.assert_close(out.points.norm(dim=-1), torch.full((24, 32), 4.0), atol=1e-5, rtol=0)
    assert out.source == "sphere fallback"


# ---- user depth ----------------------------------------------------------------------------------

def test_user_depth_npy_metres(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 9.0, size=(20, 30))
    depth[3, 4] = 0.0  # no data
    np.save(tmp_path / "d.npy", depth)
    out = UserDepth(tmp_path / "d.npy").estimate(torch.rand(3, 20, 30))
    _check_consistent(out, 20, 30)
    assert out.source == "user depth" and not out.mask[3, 4] and out.mask.sum() == 20 * 30 - 1
    np.testing.assert_allclose(out.depth.numpy()[out.mask.numpy()], depth[depth > 0], rtol=1e-6)


def test_user_depth_png_millimetres(tmp_path):
    mm = (np.arange(16 * 24, dtype=np.uint32).reshape(16, 24) * 97 + 250).astype(np.uint16)
    mm[0, 0] = 0
    Image.fromarray(mm).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = UserDepth(tmp_path / "d.png").estimate(torch.rand(3, 16, 24))
    _check_consistent(out, 16, 24)
    expected_m = mm.astype(np.float64) / 1000.0
    np.testing.assert_allclose(out.depth.numpy(), expected_m, rtol=1e-6)
    assert not out.mask[0, 0]
    # Same aspect, double resolution: nearest-neighbour upsampling keeps the original values.
    big = UserDepth(tmp_path / "d.png").estimate(torch.rand(3, 32, 48))
    np.testing.assert_allclose(big.depth.numpy()[1::2, 1::2], expected_m, rtol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: np.save(p / "x.npy", np.array([[1.0, np.nan], [1.0, 1.0]])), "NaN"),
        (lambda p: np.save(p / "x.npy", -np.ones((4, 4))), "negative"),
        (lambda p: np.save(p / "x.npy", np.ones((2, 4, 4))), "one HxW map"),
        (lambda p: np.save(p / "x.npy", np.zeros((4, 4))), "no positive"),
        (lambda p: Image.fromarray(np.full((8, 8), 9, np.uint8)).save(p / "x.npy", format="PNG"), "16-bit"),
        (lambda p: (p / "x.npy").write_text("hello"), "neither"),
    ],
)
def test_bad_user_depth_one_line_errors(tmp_path, make, match):
    make(tmp_path)
    with pytest.raises(DepthInputError, match=match) as e:
        UserDepth(tmp_path / "x.npy")
    assert "\n" not in str(e.value) and str(e.value).endswith(".")


def test_what_is_a_user_depth_file(tmp_path, tiny_moge):
    """The one rule, which the depth loader and the scene both use: the name (.npy / .png, existing or not) or the
    content (a NumPy or PNG signature under any name); folders, model files, keywords and objects are not."""
    folder, _ = tiny_moge
    np.save(tmp_path / "d.npy", np.ones((4, 4)))
    (tmp_path / "renamed.dat").write_bytes((tmp_path / "d.npy").read_bytes())
    Image.fromarray(np.ones((4, 4), np.uint16)).save(tmp_path / "depth.bin", format="PNG")
    for spec in (tmp_path / "d.npy", str(tmp_path / "missing.PNG"), tmp_path / "renamed.dat", tmp_path / "depth.bin"):
        assert is_user_depth_file(spec), spec
    for spec in (None, "", "plane", "Ruicheng/moge-2-vitl-normal", folder, folder / "model.pt", tmp_path, PlaneDepth(),
                 "x" * 5000):
        assert not is_user_depth_file(spec), spec
    with pytest.raises(DepthInputError, match="does not exist"):  # a missing map is refused, not tried as a model
        load_depth_estimator(tmp_path / "missing.npy")


def test_user_depth_shape_mismatch(tmp_path):
    np.save(tmp_path / "d.npy", np.ones((10, 10)))
    with pytest.raises(DepthInputError, match="10x10 but the image is 20x10"):
        UserDepth(tmp_path / "d.npy").estimate(torch.rand(3, 10, 20))
    with pytest.raises(DepthInputError, match="does not exist"):
        UserDepth(tmp_path / "missing.npy")


# ---- generated frames without a depth model --------------------------------------------------------

def test_holes_of_a_rendered_plane_are_filled_with_that_plane():
    from engine.depth import depth_from_render, is_fallback, PlaneDepth, SphereDepth

    # A tilted plane n.X = 1 seen by a pinhole camera: z = 1 / (n . K^-1 (u, v, 1)), analytic per pixel.
    h, w, f = 48, 64, 50.0
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    n = torch.tensor([0.05, -0.08, 0.3], dtype=torch.float64)
    truth = 1.0 / (n[0] * (u - w / 2) / f + n[1] * (v - h / 2) / f + n[2])
    covered = torch.ones(h, w, dtype=torch.bool)
    covered[10:30, 20:40] = False  # a disocclusion inside
    covered[:, 50:] = False  # a newly revealed border strip
    covered[0, :] = False
    rendered = torch.where(covered, truth, torch.zeros_like(truth))
    depth, valid = depth_from_render(rendered, covered)
    assert bool(valid.all())
    assert torch.allclose(depth, truth, rtol=1e-9, atol=0)
    # Nothing rendered: nothing is invented.
    depth, valid = depth_from_render(torch.zeros(h, w), torch.zeros(h, w, dtype=torch.bool))
    assert not bool(valid.any())
    # A plane seen edge-on: inverse depth 0.004 (u - 32) + 0.1 is 0 at u = 7 (the horizon). Known on
    # 7 < u < 20 (inverse depth up to 0.052): the continuation stops at the horizon instead of inventing points
    # behind it, and where it would come nearer than half the nearest known depth.
    inverse = 0.2 * (u - w / 2) / f + 0.1
    known = (inverse > 0) & (u < 20)
    depth, valid = depth_from_render(torch.where(known, 1.0 / inverse, torch.zeros_like(inverse)), known)
    assert bool(valid[known].all()) and not bool(valid[inverse <= 0].any())
    assert bool(valid[(inverse > 0.002) & (inverse < 0.1)].all()) and not bool(valid[inverse > 0.11].any())
    assert torch.allclose(depth[valid], 1.0 / inverse[valid], rtol=1e-9, atol=0)
    assert is_fallback(PlaneDepth()) and is_fallback(SphereDepth()) and not is_fallback(object())
