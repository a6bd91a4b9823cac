"""The 3D cache against analytic geometry, numpy references, Open3D and trimesh."""
from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation

from engine.geometry.cache import (
    CacheError,
    PointCache,
    count_voxels,
    depth_edges,
    unproject_frame,
    voxel_downsample,
)
from engine.geometry.cameras import Cameras, intrinsics_from_fov

H, W = 24, 32


def _camera(rotvec=(0.1, -0.2, 0.05), center=(0.3, -0.1, -1.0), w=W, h=H, fov=60.0) -> Cameras:
    r = Rotation.from_rotvec(rotvec).as_matrix()  # world-to-camera rotation
    w2c = np.eye(4)
    w2c[:3, :3] = r
    w2c[:3, 3] = -r @ np.asarray(center, dtype=np.float64)
    return Cameras(torch.from_numpy(w2c)[None], intrinsics_from_fov(w, h, fov), w, h)


def _pixel_rays_world(cam: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """Camera-z = 1 rays through pixel centres, in world axes, built with numpy from K and w2c."""
    k = cam.K[0].numpy()
    w2c = cam.w2c[0].numpy()
    j, i = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
    pix = np.stack([j, i, np.ones_like(j)], axis=-1)
    d_cam = pix @ np.linalg.inv(k).T
    r = w2c[:3, :3]
    return d_cam @ r, -r.T @ w2c[:3, 3]  # rows of d_cam times R = R^T d for each pixel; camera centre


def _plane_depth(cam, normal, offset):
    """Camera z of the plane ``normal . X = offset`` at every pixel (analytic ray-plane intersection)."""
    d_world, c = _pixel_rays_world(cam)
    return (offset - normal @ c) / (d_world @ normal)


# ---- unprojection -------------------------------------------------------------------------------

def test_unprojected_plane_lies_on_the_plane_float64():
    cam = _camera()
    normal = np.array([0.2, -0.3, 1.0]) / np.linalg.norm([0.2, -0.3, 1.0])
    offset = 2.5
    depth = torch.from_numpy(_plane_depth(cam, normal, offset))
    assert (depth > 0).all()
    image = torch.rand(3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points, colors, pix = unproject_frame(image, depth, cam)
    assert points.dtype == torch.float64
    assert len(points) == H * W  # a plane seen at a moderate angle has no depth edges
    np.testing.assert_allclose(points.numpy() @ normal, offset, atol=1e-12, rtol=0)
    # Every point comes from its own pixel: it projects back to that pixel's centre, with that colour.
    uv, z = cam.project(points)
    np.testing.assert_allclose(uv[0, :, 0].numpy(), (pix % W).numpy() + 0.5, atol=1e-9)
    np.testing.assert_allclose(uv[0, :, 1].numpy(), (pix // W).numpy() + 0.5, atol=1e-9)
    np.testing.assert_allclose(z[0].numpy(), depth.reshape(-1)[pix].numpy(), rtol=1e-12)
    torch.testing.assert_close(colors, image.reshape(3, -1)[:, pix].T)


def test_valid_mask_and_bad_depth_are_skipped():
    cam = _camera()
    depth = torch.full((H, W), 3.0, dtype=torch.float64)
    depth[0, 0] = 0.0
    depth[1, 1] = float("nan")
    depth[2, 2] = -1.0
    depth[3, 3] = float("inf")
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[5:7, :] = False
    _, _, pix = unproject_frame(torch.zeros(3, H, W), depth, cam, valid=valid, drop_edges=False)
    expect = valid.clone()
    for i in range(4):
        expect[i, i] = False
    assert set(pix.tolist()) == set(torch.nonzero(expect.reshape(-1)).squeeze(1).tolist())


def _step_depth(ramp: int = 2) -> torch.Tensor:
    """Two fronto-parallel planes (z = 2 left, z = 4 right) joined by ``ramp`` interpolated "flying" columns."""
    depth = torch.full((H, W), 2.0, dtype=torch.float64)
    depth[:, W // 2 + ramp:] = 4.0
    for k in range(ramp):
        depth[:, W // 2 + k] = 2.0 + 2.0 * (k + 1) / (ramp + 1)
    return depth


def test_depth_step_edges_are_dropped_and_no_flying_pixels_remain():
    cam = _camera(rotvec=(0, 0, 0), center=(0, 0, 0))  # identity pose: world z is camera depth
    depth = _step_depth(ramp=2)
    image = torch.rand(3, H, W)
    loose, _, _ = unproject_frame(image, depth, cam, drop_edges=False)
    flying = ((loose[:, 2] - 2).abs() > 1e-9) & ((loose[:, 2] - 4).abs() > 1e-9)
    assert int(flying.sum()) == 2 * H  # the test scene really has flying pixels to remove
    points, _, pix = unproject_frame(image, depth, cam)
    on_a_plane = ((points[:, 2] - 2).abs() < 1e-9) | ((points[:, 2] - 4).abs() < 1e-9)
    assert bool(on_a_plane.all())
    # Only the step's neighbourhood goes: every column two or more pixels from the ramp survives.
    cols = set((pix % W).tolist())
    assert cols == set(range(W // 2 - 1)) | set(range(W // 2 + 3, W))


def test_depth_edges_rule():
    depth = _step_depth(ramp=0)
    edges = depth_edges(depth)
    expect = torch.zeros(H, W, dtype=torch.bool)
    expect[:, W // 2 - 1: W // 2 + 1] = True  # both sides of a one-pixel step
    assert torch.equal(edges, expect)
    assert torch.equal(depth_edges(depth * 7.3), edges)  # scale invariant
    assert torch.equal(depth_edges(1.0 / depth), edges)  # the same rule on disparity
    # A jump below the threshold is not an edge; one above it is (log(1.04) < 0.05 < log(1.06)).
    small = torch.ones(H, W)
    small[:, W // 2:] = 1.04
    assert not depth_edges(small).any()
    small[:, W // 2:] = 1.06
    assert depth_edges(small).any()
    # Invalid pixels neither are edges nor make their neighbours edges.
    holes = torch.full((H, W), 2.0)
    holes[5, 5] = 0.0
    holes[8, 8] = float("nan")
    assert not depth_edges(holes).any()


def test_frame_with_wrong_camera_count_or_image_size_raises():
    cam = _camera()
    depth = torch.ones(H, W)
    with pytest.raises(CacheError):
        unproject_frame(torch.zeros(3, H, W), depth, Cameras.cat([cam, cam]))
    with pytest.raises(CacheError):
        unproject_frame(torch.zeros(3, H, W + 1), depth, cam)


# ---- add, render --------------------------------------------------------------------------------

def _bumpy_depth(cam) -> torch.Tensor:
    normal = np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0])
    base = _plane_depth(cam, normal, 3.0)
    i, j = np.meshgrid(np.arange(cam.height), np.arange(cam.width), indexing="ij")
    return torch.from_numpy(base * (1 + 0.02 * np.sin(j / 3.0) * np.cos(i / 4.0))).float()


def test_add_frame_then_render_reproduces_the_frame():
    cam = _camera()
    depth = _bumpy_depth(cam)
    depth[10:14, 10:14] *= 1.6  # a box in front of the background: its outline gets dropped
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, H, W, generator=g)
    conf = torch.rand(H, W, generator=g)
    cache = PointCache.empty()
    added = cache.add_frame(image, depth, cam, frame_id=7, confidence=conf)
    _, _, pix = unproject_frame(image, depth, cam)
    assert added == len(cache) == len(pix) < H * W
    out = cache.render(cam)
    kept = torch.zeros(H * W, dtype=torch.bool)
    kept[pix] = True
    kept = kept.reshape(H, W)
    assert torch.equal(out.mask[0], kept)
    torch.testing.assert_close(out.image[0][:, kept], image[:, kept])
    torch.testing.assert_close(out.depth[0][kept], depth[kept], rtol=1e-5, atol=0)
    # Per-point attributes went to the right points: the pixel's own confidence and the frame id.
    idx = out.index[0][kept]
    torch.testing.assert_close(cache.confidence[idx], conf[kept])
    assert bool((cache.source[idx] == 7).all())


def test_add_points_scalars_and_validation():
    cache = PointCache.empty()
    assert cache.add_points(torch.zeros(4, 3), torch.full((4, 3), 2.0), confidence=0.25, frame_id=3) == 4
    assert cache.colors.max() == 1.0  # clamped into [0,1]
    assert torch.equal(cache.confidence, torch.full((4,), 0.25))
    assert torch.equal(cache.source, torch.full((4,), 3))
    cache.add_points(torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.equal(cache.source[-2:], torch.tensor([-1, -1])) and torch.equal(cache.confidence[-2:], torch.ones(2))
    assert cache.points.dtype == torch.float32 and cache.source.dtype == torch.int64
    with pytest.raises(CacheError):
        cache.add_points(torch.zeros(3, 3), torch.zeros(2, 3))
    with pytest.raises(CacheError):
        cache.add_points(torch.zeros(3, 3), torch.zeros(3, 3), confidence=torch.ones(2))


# ---- downsampling -------------------------------------------------------------------------------

def _numpy_voxels(points, colors, conf, src, voxel):
    """Reference voxel grid in numpy (Open3D's grid: origin min - voxel/2), cell by cell."""
    p = points.astype(np.float64)
    cells = np.floor((p - (p.min(axis=0) - voxel / 2)) / voxel).astype(np.int64)
    keys, inverse = np.unique(cells, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    for k in range(len(keys)):
        members = np.nonzero(inverse == k)[0]
        best = members[np.argmax(conf[members])]  # argmax: first of the equals, i.e. smallest index
        out.append((p[members].mean(0), colors[members].astype(np.float64).mean(0), conf[best], src[best]))
    return out


def _sorted_rows(points, *cols):
    order = np.lexsort(np.asarray(points, dtype=np.float64).T[::-1])
    return [np.asarray(c)[order] for c in (points, *cols)]


def test_voxel_downsample_matches_numpy_and_open3d():
    g = torch.Generator().manual_seed(2)
    n = 600
    points = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5])
    colors = torch.rand(n, 3, generator=g)
    conf = torch.randint(0, 3, (n,), generator=g).float()  # many ties: the smallest index must win
    src = torch.arange(n) * 10
    voxel = 0.2
    pts, cols, cf, sc = voxel_downsample(points, colors, conf, src, voxel)
    ref = _numpy_voxels(points.numpy(), colors.numpy(), conf.numpy(), src.numpy(), voxel)
    assert len(pts) == len(ref) == count_voxels(points, voxel) < n
    got = _sorted_rows(pts.numpy(), cols.numpy(), cf.numpy(), sc.numpy())
    want = _sorted_rows(np.array([r[0] for r in ref]), np.array([r[1] for r in ref]),
                        np.array([r[2] for r in ref]), np.array([r[3] for r in ref]))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Open3D's own voxel_down_sample gives the same cells, positions and colour averages.
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.double().numpy()))
    pc.colors = o3d.utility.Vector3dVector(colors.double().numpy())
    down = pc.voxel_down_sample(voxel)
    o3d_rows = _sorted_rows(np.asarray(down.points), np.asarray(down.colors))
    np.testing.assert_allclose(o3d_rows[0], got[0], atol=1e-6)
    np.testing.assert_allclose(o3d_rows[1], got[1], atol=1e-6)


def _surface_cache(n=20000, seed=3) -> tuple[PointCache, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(n, 2, generator=g)
    points = torch.stack([4 * uv[:, 0], 2 * uv[:, 1], 0.5 * torch.sin(5 * uv[:, 0])], dim=1)
    # Colours affine in position: any average of positions must come with the same average of colours.
    a = torch.tensor([[0.15, 0.1, 0.0], [0.0, 0.3, 0.1], [0.05, 0.05, 0.4]])
    b = torch.tensor([0.05, 0.1, 0.2])
    colors = points @ a.T + b
    assert colors.min() >= 0 and colors.max() <= 1
    cache = PointCache(points, colors, torch.rand(n, generator=g), torch.randint(0, 50, (n,), generator=g))
    return cache, a, b


def test_downsample_to_budget_keeps_averages():
    cache, a, b = _surface_cache()
    before_src = set(cache.source.tolist())
    budget = 1500
    cache.downsample(budget)
    assert budget // 2 <= len(cache) <= budget
    torch.testing.assert_close(cache.colors, cache.points @ a.T + b, atol=2e-6, rtol=0)
    assert set(cache.source.tolist()) <= before_src
    assert cache.points.dtype == torch.float32 and cache.confidence.dtype == torch.float32


def test_downsample_within_budget_is_a_no_op_unless_a_voxel_is_given():
    cache, _, _ = _surface_cache(n=2000)
    pts = cache.points.clone()
    cache.downsample(5000)
    assert torch.equal(cache.points, pts)
    cache.downsample(5000, voxel_size=0.1)
    assert len(cache) == count_voxels(pts, 0.1) < 2000
    cache, _, _ = _surface_cache(n=2000)
    cache.downsample(100, voxel_size=0.01)  # too fine for the budget: the search takes over
    assert len(cache) <= 100
    with pytest.raises(CacheError):
        cache.downsample(0)


def test_downsample_of_coincident_points():
    cache = PointCache(torch.ones(50, 3), torch.rand(50, 3), torch.ones(50), torch.arange(50))
    mean = cache.colors.mean(0)
    cache.downsample(10)
    assert len(cache) == 1
    torch.testing.assert_close(cache.colors[0], mean)
    assert cache.source.tolist() == [0]


# ---- median depth -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [401, 400])
def test_median_depth_matches_numpy(n):
    cam = _camera()
    g = torch.Generator().manual_seed(n)
    points = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([8.0, 8.0, 10.0])  # some behind, some outside
    cache = PointCache(points, torch.zeros(n, 3), torch.ones(n), torch.zeros(n, dtype=torch.int64))
    p = points.double().numpy()
    w2c, k = cam.w2c[0].numpy(), cam.K[0].numpy()
    c = p @ w2c[:3, :3].T + w2c[:3, 3]
    z = c[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * c[:, 0] / z + k[0, 2]
        v = k[1, 1] * c[:, 1] / z + k[1, 2]
    seen = (z >= 1e-3) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    assert 20 < seen.sum() < n // 2
    assert cache.median_depth(cam) == pytest.approx(float(np.median(z[seen])), rel=1e-6)


def test_median_depth_without_visible_points_is_nan():
    cam = _camera(rotvec=(0, 0, 0), center=(0, 0, 0))
    cache = PointCache(torch.tensor([[0.0, 0.0, -1.0]]), torch.zeros(1, 3), torch.ones(1), torch.zeros(1, dtype=torch.int64))
    assert np.isnan(cache.median_depth(cam))
    assert np.isnan(PointCache.empty().median_depth(cam))


# ---- files --------------------------------------------------------------------------------------

def test_ply_round_trip_and_standard_readers(tmp_path):
    cache, _, _ = _surface_cache(n=500, seed=4)
    cache.source[:3] = torch.tensor([-1, 2**31 - 1, 123456789])
    path = cache.save_ply(tmp_path / "cache.ply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.ply"]  # no temp file left behind
    back = PointCache.load_ply(path)
    assert torch.equal(back.points, cache.points)
    assert torch.equal(back.confidence, cache.confidence)
    assert torch.equal(back.source, cache.source)
    assert (back.colors - cache.colors).abs().max() <= 0.5 / 255 + 1e-6
    # Open3D reads positions and colours of the same file.
    pc = o3d.io.read_point_cloud(str(path))
    np.testing.assert_array_equal(np.asarray(pc.points), cache.points.double().numpy())
    np.testing.assert_allclose(np.asarray(pc.colors), back.colors.double().numpy(), atol=1e-6)
    # So does trimesh, colours as uint8.
    tm = trimesh.load(path)
    np.testing.assert_array_equal(np.asarray(tm.vertices, dtype=np.float32), cache.points.numpy())
    np.testing.assert_array_equal(np.asarray(tm.colors)[:, :3], np.round(cache.colors.numpy() * 255).astype(np.uint8))


def test_load_ply_written_by_open3d_and_empty_cache(tmp_path):
    g = torch.Generator().manual_seed(5)
    xyz, rgb = torch.rand(40, 3, generator=g).double().numpy(), torch.rand(40, 3, generator=g).double().numpy()
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pc.colors = o3d.utility.Vector3dVector(rgb)
    for ascii_ in (False, True):
        path = tmp_path / f"o3d-{ascii_}.ply"
        assert o3d.io.write_point_cloud(str(path), pc, write_ascii=ascii_)
        back = PointCache.load_ply(path)
        np.testing.assert_allclose(back.points.numpy(), xyz, atol=1e-6)
        np.testing.assert_allclose(back.colors.numpy(), rgb, atol=0.5 / 255 + 1e-6)
        assert torch.equal(back.confidence, torch.ones(40)) and torch.equal(back.source, torch.full((40,), -1))
    empty = PointCache.load_ply(PointCache.empty().save_ply(tmp_path / "empty.ply"))
    assert len(empty) == 0


def test_load_ply_bad_files_raise(tmp_path):
    with pytest.raises(CacheError):
        PointCache.load_ply(tmp_path / "missing.ply")
    (tmp_path / "junk.ply").write_bytes(b"not a ply")
    with pytest.raises(CacheError):
        PointCache.load_ply(tmp_path / "junk.ply")
    cache, _, _ = _surface_cache(n=50)
    data = cache.save_ply(tmp_path / "ok.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-40])
    with pytest.raises(CacheError):
        PointCache.load_ply(tmp_path / "cut.ply")


@pytest.mark.gpu
def test_cache_on_cuda_matches_cpu():
    cam = _camera()
    depth = _bumpy_depth(cam)
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(6))
    results = []
    for device in ("cpu", "cuda"):
        cache = PointCache.empty(device=device)
        cache.add_frame(image.to(device), depth.to(device), cam, frame_id=1, confidence=torch.rand(H, W))
        out = cache.render(cam)
        median = cache.median_depth(cam)
        cache.downsample(200)
        results.append((out.mask.cpu(), out.image.cpu(), median, cache.points.cpu(), cache.colors.cpu()))
    (m0, i0, d0, p0, c0), (m1, i1, d1, p1, c1) = results
    assert torch.equal(m0, m1)
    torch.testing.assert_close(i0, i1)
    assert d0 == pytest.approx(d1, rel=1e-5)
    assert p0.shape == p1.shape
    torch.testing.assert_close(p0, p1, atol=1e-5, rtol=0)
    torch.testing.assert_close(c0, c1, atol=1e-5, rtol=0)


def test_viewer_confidence_is_stored_confidence_fading_beyond_the_far_radius():
    from demo.viewer import FAR_FACTOR, viewer_confidence
    from engine.geometry.cache import point_spacing

    origin = torch.tensor([1.0, -2.0, 0.5])
    direction = torch.tensor([0.6, 0.0, 0.8])
    median = 2.0
    reach = FAR_FACTOR * median
    dist = torch.tensor([0.5, reach, 2 * reach, 4 * reach])
    points = origin + dist[:, None] * direction
    conf = torch.tensor([0.5, 1.0, 1.0, 0.5])
    out = viewer_confidence(points, conf, origin, median)
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 0.5, 0.125]), atol=1e-6)
    # Spacing: a regular grid of step 0.1 has its 4 nearest neighbours at 0.1 (inside the grid).
    g = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 2) * 0.1
    grid = torch.cat([g, torch.zeros(25, 1)], 1)
    spacing = point_spacing(grid)
    assert spacing[12] == pytest.approx(0.1)
    duplicate = torch.cat([grid, grid[:1].expand(6, 3)])
    assert (point_spacing(duplicate) > 0).all()


def test_cache_spacing_follows_the_cloud_as_it_grows():
    """The memoised spacing equals a fresh neighbour search before and after the cloud grows."""
    from engine.geometry.cache import PointCache, point_spacing

    g = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1).reshape(-1, 2) * 0.1
    cache = PointCache.empty()
    cache.add_points(torch.cat([g, torch.zeros(36, 1)], 1), torch.rand(36, 3))
    first = cache.spacing()
    assert first[14] == pytest.approx(0.1) and np.array_equal(first, point_spacing(cache.points))
    assert cache.spacing() is first  # asked again for the same cloud: not searched again
    cache.add_points(torch.cat([g + 0.05, torch.zeros(36, 1)], 1), torch.rand(36, 3))  # a grid between the grid
    grown = cache.spacing()
    assert len(grown) == 72 and np.array_equal(grown, point_spacing(cache.points))
    assert grown[14] == pytest.approx(0.05 * 2 ** 0.5)
