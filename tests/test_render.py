"""Point-cloud z-buffer rendering, checked against analytic geometry (float64) and a per-point reference loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.geometry.cameras import Cameras, intrinsics_from_fov, intrinsics_matrix
from engine.geometry.render import RenderInputError, render_points


# ---- helpers ------------------------------------------------------------------------------------------
def look_at(center, target) -> torch.Tensor:
    """World-to-camera (OpenCV axes, world +y down) for a camera at ``center`` looking at ``target``."""
    c = np.asarray(center, dtype=np.float64)
    f = np.asarray(target, dtype=np.float64) - c
    f /= np.linalg.norm(f)
    r = np.cross([0.0, 1.0, 0.0], f)
    r /= np.linalg.norm(r)
    rot = np.stack([r, np.cross(f, r), f])
    w2c = np.eye(4)
    w2c[:3, :3] = rot
    w2c[:3, 3] = -rot @ c
    return torch.from_numpy(w2c)


def make_cameras(centers, target, width, height, fov=60.0) -> Cameras:
    w2c = torch.stack([look_at(c, target) for c in centers])
    return Cameras(w2c, intrinsics_from_fov(width, height, fov, len(centers)), width, height)


def reference_render(points, colors, cams: Cameras, radius=0, near=1e-3, far=None):
    """Per-point loop in float64 with the textbook projection: nearest (z, index) wins each pixel."""
    pts = points.double().numpy()
    n, h, w = len(cams), cams.height, cams.width
    index = -np.ones((n, h, w), dtype=np.int64)
    best = np.full((n, h, w), np.inf)
    for f in range(n):
        r = cams.w2c[f, :3, :3].double().numpy()
        t = cams.w2c[f, :3, 3].double().numpy()
        k = cams.K[f].double().numpy()
        for i, x in enumerate(pts):
            cam = r @ x + t
            z = cam[2]
            if not (z > 0 and z >= near and (far is None or z <= far)):
                continue
            u = k[0, 0] * cam[0] / z + k[0, 1] * cam[1] / z + k[0, 2]
            v = k[1, 1] * cam[1] / z + k[1, 2]
            j0, i0 = math.floor(u), math.floor(v)
            for di in range(-radius, radius + 1):
                for dj in range(-radius, radius + 1):
                    ii, jj = i0 + di, j0 + dj
                    # Points come in index order, so a strict < keeps the smaller index on depth ties.
                    if 0 <= ii < h and 0 <= jj < w and z < best[f, ii, jj]:
                        best[f, ii, jj] = z
                        index[f, ii, jj] = i
    return index


def camera_depth(cams: Cameras, world: torch.Tensor) -> torch.Tensor:
    """Float64 camera z of world points ``[N,...,3]`` in each camera."""
    r = cams.w2c[:, 2, :3].double()
    t = cams.w2c[:, 2, 3].double()
    shape = (len(cams),) + (1,) * (world.dim() - 2) + (3,)
    return (world.double() * r.view(shape)).sum(-1) + t.view(shape[:-1])


def pixel_corner_rays(cams: Cameras, f: int):
    """Float64 world ray directions through the 4 corners and the centre of every pixel: [5,H,W,3]."""
    h, w = cams.height, cams.width
    k = cams.K[f].double()
    c2w = cams.c2w[f].double()
    offs = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]
    jj, ii = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    out = []
    for du, dv in offs:
        x = (jj + du - k[0, 2]) / k[0, 0]
        y = (ii + dv - k[1, 2]) / k[1, 1]
        d_cam = torch.stack([x, y, torch.ones_like(x)], -1)
        out.append(d_cam @ c2w[:3, :3].T)
    return torch.stack(out), c2w[:3, 3]


# ---- analytic scenes ----------------------------------------------------------------------------------
def test_plane_depth_and_pointmap_match_ray_plane_intersection():
    # A tilted plane z-facing the cameras, sampled at ~1/4 of a pixel footprint.
    normal = torch.tensor([0.2, -0.1, 1.0], dtype=torch.float64)
    normal /= normal.norm()
    offset = 3.0  # plane: normal . x = offset
    a = torch.linspace(-2.5, 2.5, 400, dtype=torch.float64)
    gx, gy = torch.meshgrid(a, a, indexing="ij")
    gz = (offset - normal[0] * gx - normal[1] * gy) / normal[2]
    pts = torch.stack([gx, gy, gz], -1).reshape(-1, 3)
    cols = torch.rand(pts.shape[0], 3, generator=torch.Generator().manual_seed(1))
    cams = make_cameras([(0.0, 0.0, -1.0), (0.4, 0.2, -0.6)], (0.0, 0.0, 3.0), 48, 32, fov=50)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        out = render_points(pts.to(dtype), cols, cams)
        assert out.mask.all(), "every pixel sees the dense plane"
        for f in range(len(cams)):
            dirs, origin = pixel_corner_rays(cams, f)
            # Ray-plane intersection in float64 at the pixel corners and centre: world points and z-depths.
            t = (offset - origin @ normal) / (dirs @ normal)
            hits = origin + t[..., None] * dirs
            z_hits = camera_depth(cams[f], hits.reshape(1, -1, 3)).reshape(5, cams.height, cams.width)
            depth = out.depth[f].double()
            # 1/z is affine across a plane's image, so the pixel's depth range is spanned by its corners.
            assert (depth >= z_hits[:4].min(0).values - tol * depth).all()
            assert (depth <= z_hits[:4].max(0).values + tol * depth).all()
            # Pointmap within the pixel's footprint on the plane (distance to the centre hit <= to a corner).
            world = out.pointmap[f].double()
            reach = (hits[:4] - hits[4]).norm(dim=-1).max(0).values
            assert ((world - hits[4]).norm(dim=-1) <= reach + tol).all()
            assert ((world @ normal - offset).abs() <= 10 * tol * offset).all()
            # Depth is the exact camera z of the returned world point (not a quantised key).
            z_of_world = camera_depth(cams[f], world[None])[0]
            assert torch.allclose(depth, z_of_world, rtol=tol, atol=0)
            # Dense sampling: the winner is the nearest sample, so it sits near the pixel's nearest corner.
            spacing = float(a[1] - a[0]) * 1.5
            assert (depth - z_hits[:4].min(0).values <= spacing + tol).all()


def _ray_box_entry(origin, dirs, lo, hi):
    """Slab-method entry parameter along rays (float64); +inf where the ray misses the box."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo - origin) / dirs
        t2 = (hi - origin) / dirs
    t_near = np.minimum(t1, t2).max(-1)
    t_far = np.maximum(t1, t2).min(-1)
    return np.where((t_near <= t_far) & (t_far > 0), t_near, np.inf)


def test_box_winners_are_the_visible_surface():
    lo, hi = np.array([-1.0, -0.7, 2.0]), np.array([1.0, 0.7, 3.5])
    s = 0.02
    faces = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        g0 = np.arange(lo[others[0]], hi[others[0]] + 1e-9, s)
        g1 = np.arange(lo[others[1]], hi[others[1]] + 1e-9, s)
        m0, m1 = np.meshgrid(g0, g1, indexing="ij")
        for value in (lo[axis], hi[axis]):
            face = np.zeros(m0.shape + (3,))
            face[..., axis] = value
            face[..., others[0]] = m0
            face[..., others[1]] = m1
            faces.append(face.reshape(-1, 3))
    pts = torch.from_numpy(np.concatenate(faces))
    # Shuffle so far faces are not consistently before or after near ones in point order.
    pts = pts[torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(0))]
    cols = torch.rand(pts.shape[0], 3, generator=torch.Generator().manual_seed(2))
    cams = make_cameras([(2.5, -1.5, -0.5), (-1.8, 1.2, 0.0)], (0.0, 0.0, 2.75), 40, 30, fov=55)
    out = render_points(pts, cols, cams)
    for f in range(len(cams)):
        dirs, origin = pixel_corner_rays(cams, f)
        dirs, origin = dirs.numpy(), origin.numpy()
        t_rays = _ray_box_entry(origin, dirs, lo, hi)  # [5,H,W]: 4 corners and the centre of each pixel
        interior = torch.from_numpy(np.isfinite(t_rays).all(0))  # convex box: whole pixel inside silhouette
        hits = torch.from_numpy(origin + np.where(np.isfinite(t_rays), t_rays, 0.0)[..., None] * dirs)
        assert interior.sum() > 200
        assert out.mask[f][interior].all(), "pixels fully inside the box silhouette are covered"
        covered = out.mask[f]
        world = out.pointmap[f].double()
        lo_t, hi_t = torch.from_numpy(lo), torch.from_numpy(hi)
        on_face = ((world - lo_t).abs().min(-1).values < 1e-12) | ((world - hi_t).abs().min(-1).values < 1e-12)
        assert on_face[covered].all()
        # Visible: along the winner's own ray from the camera centre, the box is entered exactly at the winner.
        t_entry = _ray_box_entry(origin, world.numpy() - origin, lo, hi)
        assert np.abs(t_entry - 1.0)[interior.numpy()].max() < 1e-9
        # Depth against the analytic hit through the pixel centre: |dz| <= 3D distance <= footprint size.
        depth = out.depth[f].double()
        z_centre = camera_depth(cams[f], hits[4][None])[0]
        reach = (hits[:4] - hits[4]).norm(dim=-1).max(0).values
        assert ((depth - z_centre).abs()[interior] <= 2 * reach[interior] + 2 * s).all()
        assert torch.allclose(depth[covered], camera_depth(cams[f], world[None])[0][covered], rtol=1e-12, atol=0)


# ---- exact agreement with the reference loop ----------------------------------------------------------
@pytest.mark.parametrize("radius", [0, 1])
def test_matches_per_point_reference_loop(radius):
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(300, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.8, 1.5], dtype=torch.float64)
    pts[:, 2] += 3.0
    pts[10] = pts[20]  # an exact depth tie: the smaller index must win
    pts = torch.cat([pts, pts[:5] - torch.tensor([0, 0, 5.0], dtype=torch.float64)])  # some behind the cameras
    cols = torch.rand(pts.shape[0], 3, generator=g)
    cams = make_cameras([(0.0, 0.0, 0.0), (0.5, -0.3, 0.2), (-0.6, 0.1, 0.4)], (0.0, 0.0, 3.0), 12, 9, fov=70)
    ref = torch.from_numpy(reference_render(pts, cols, cams, radius=radius, near=0.5, far=4.5))
    out = render_points(pts, cols, cams, radius=radius, near=0.5, far=4.5)
    assert (ref >= 0).any() and (ref < 0).any()
    assert torch.equal(out.index, ref)
    assert torch.equal(out.mask, ref >= 0)
    safe = ref.clamp(min=0)
    assert torch.equal(out.image, torch.where(ref[:, None] >= 0, cols[safe].permute(0, 3, 1, 2), 0.0))
    assert torch.equal(out.pointmap, torch.where(ref[..., None] >= 0, pts[safe], 0.0))
    expected_depth = torch.where(ref >= 0, camera_depth(cams, pts[safe]), 0.0)
    assert torch.allclose(out.depth, expected_depth, rtol=1e-13, atol=0)


def test_float32_cloud_matches_reference_away_from_pixel_edges():
    # Points built in float64 at sub-pixel offsets in [0.2, 0.8] and well-separated depths, so float32
    # rounding can move neither a pixel assignment nor a depth order.
    g = torch.Generator().manual_seed(4)
    cams = make_cameras([(0.0, 0.0, 0.0)], (0.2, 0.1, 3.0), 10, 8, fov=60)
    n = 400
    uv = torch.stack([torch.randint(0, 10, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)], -1).double()
    uv += 0.2 + 0.6 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    z = 1.0 + 0.01 * torch.randperm(n, generator=g).double()
    k = cams.K[0]
    cam_pts = torch.stack([(uv[:, 0] - k[0, 2]) / k[0, 0] * z, (uv[:, 1] - k[1, 2]) / k[1, 1] * z, z], -1)
    c2w = cams.c2w[0]
    pts = cam_pts @ c2w[:3, :3].T + c2w[:3, 3]
    cols = torch.rand(n, 3, generator=g)
    ref = torch.from_numpy(reference_render(pts, cols, cams))
    out = render_points(pts.float(), cols, cams)
    assert torch.equal(out.index, ref)
    assert out.depth.dtype == torch.float32 and out.pointmap.dtype == torch.float32
    assert torch.equal(out.pointmap, pts.float()[ref.clamp(min=0)] * (ref >= 0)[..., None])


# ---- semantics ----------------------------------------------------------------------------------------
def identity_camera(width=8, height=6, f=1.0, cx=0.0, cy=0.0) -> Cameras:
    """Identity pose, u = f*x/z + cx: with f = 1, cx = 0 and z = 1 the pixel coordinate is x exactly."""
    return Cameras(torch.eye(4, dtype=torch.float64)[None], intrinsics_matrix(f, f, cx, cy), width, height)


@pytest.mark.parametrize("near_first", [True, False])
def test_near_point_hides_far_point_in_either_order(near_first):
    cam = identity_camera()
    near_pt, far_pt = [2.5, 3.5, 1.0], [5.0, 7.0, 2.0]  # both land in pixel (3, 2)
    pts = torch.tensor([near_pt, far_pt] if near_first else [far_pt, near_pt], dtype=torch.float64)
    cols = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]] if near_first else [[0, 1.0, 0], [1.0, 0, 0]])
    out = render_points(pts, cols, cam)
    assert out.mask.sum() == 1 and out.mask[0, 3, 2]
    assert out.depth[0, 3, 2] == 1.0
    assert torch.equal(out.image[0, :, 3, 2], torch.tensor([1.0, 0, 0]))
    assert out.index[0, 3, 2] == (0 if near_first else 1)
    assert torch.equal(out.pointmap[0, 3, 2], torch.tensor(near_pt, dtype=torch.float64))


def test_empty_cloud_gives_all_holes():
    cams = make_cameras([(0, 0, 0), (1, 0, 0)], (0, 0, 5), 7, 5)
    for dtype in (torch.float32, torch.float64):
        out = render_points(torch.zeros(0, 3, dtype=dtype), torch.zeros(0, 3), cams)
        assert out.image.shape == (2, 3, 5, 7) and out.pointmap.shape == (2, 5, 7, 3)
        assert not out.mask.any()
        assert (out.index == -1).all()
        assert not out.image.any() and not out.depth.any() and not out.pointmap.any()


def test_image_borders_follow_the_pixel_convention():
    w, h = 8, 6
    cam = identity_camera(w, h)
    pts = torch.tensor(
        [
            [0.0, 0.0, 1.0],  # u = 0, v = 0: inside, pixel (0, 0)
            [w - 1e-9, h - 1e-9, 1.0],  # just inside the far corner: pixel (h-1, w-1)
            [float(w), 2.5, 1.0],  # u = W: outside
            [3.5, float(h), 1.0],  # v = H: outside
            [-1e-9, 2.5, 1.0],  # just left of the image: outside (floor, not truncation)
            [4.5, -1e-9, 1.0],  # just above the image: outside
        ],
        dtype=torch.float64,
    )
    out = render_points(pts, torch.ones(len(pts), 3), cam)
    expected = torch.zeros(1, h, w, dtype=torch.bool)
    expected[0, 0, 0] = expected[0, h - 1, w - 1] = True
    assert torch.equal(out.mask, expected)
    assert out.index[0, 0, 0] == 0 and out.index[0, h - 1, w - 1] == 1


def test_points_behind_camera_or_before_near_plane_are_dropped():
    cam = identity_camera(8, 6, f=1.0, cx=4.0, cy=3.0)  # principal point mid-image: u = x/z + 4
    pts = torch.tensor(
        [
            [0.5, 0.5, -2.0],  # behind
            [0.0, 0.0, 0.0],  # at the centre
            [0.01, 0.01, 0.05],  # in front but before near = 0.1
            [0.1, 0.1, 0.1],  # exactly on the near plane: kept
            [-2.0, -2.0, 10.0],  # beyond far = 5
            [-1.0, 1.0, 4.0],  # kept
        ],
        dtype=torch.float64,
    )
    out = render_points(pts, torch.ones(len(pts), 3), cam, near=0.1, far=5.0)
    kept = set(out.index[out.mask].tolist())
    assert kept == {3, 5}
    assert (out.depth[out.mask] >= 0.1).all()
    # Without far everything in front of near is kept.
    assert set(render_points(pts, torch.ones(len(pts), 3), cam, near=0.1).index[0].unique().tolist()) == {-1, 3, 4, 5}


def test_radius_splat_covers_the_clipped_square():
    w, h, r = 12, 10, 2
    cam = identity_camera(w, h)
    pts = torch.tensor([[5.5, 4.5, 1.0], [0.5, 9.5, 1.0], [-1.5, 0.5, 1.0]], dtype=torch.float64)
    cols = torch.eye(3)
    out = render_points(pts, cols, cam, radius=r)
    expected = -torch.ones(h, w, dtype=torch.int64)
    expected[2:7, 3:8] = 0  # square around pixel (4, 5)
    expected[7:10, 0:3] = 1  # corner square clipped to the image
    expected[0:3, 0:1] = 2  # point left of the image: its square still reaches column 0
    assert torch.equal(out.index[0], expected)
    assert torch.equal(out.depth[0][expected >= 0], torch.ones(int((expected >= 0).sum()), dtype=torch.float64))
    assert torch.equal(out.pointmap[0][expected == 0], pts[0].expand(25, 3))
    # A nearer splat overlapping a farther one wins where they overlap, the far one keeps the rest.
    pair = torch.tensor([[10.0, 8.0, 2.0], [6.5, 5.5, 1.0]], dtype=torch.float64)  # pixels (4,5) and (5,6)
    out = render_points(pair, cols[:2], cam, radius=1)
    assert (out.index[0, 4:7, 5:8] == 1).all()
    assert out.index[0, 3, 4] == 0 and out.index[0, 3, 6] == 0 and out.index[0, 5, 4] == 0


RENDER_FIELDS = ("image", "mask", "depth", "pointmap", "index")


def random_cloud(n: int, seed: int):
    """``n`` points with random colours, uniform in the box [-1,1] x [-1,1] x [3,5] that the test cameras look at;
    returns the generator too, for draws that must follow."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g) * 2 - 1
    pts[:, 2] += 4
    return pts, torch.rand(n, 3, generator=g), g


def assert_same_render(a, b, fields=RENDER_FIELDS) -> None:
    for name in fields:
        assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name


def test_deterministic_and_independent_of_point_order_and_chunking():
    pts, cols, g = random_cloud(5000, seed=5)
    cams = make_cameras([(0, 0, 0), (0.5, 0, 0.5), (-0.5, 0.3, 0.2)], (0, 0, 4), 32, 24)
    a = render_points(pts, cols, cams, radius=1)
    assert_same_render(a, render_points(pts, cols, cams, radius=1))
    assert_same_render(a, render_points(pts, cols, cams, radius=1, chunk=2))
    perm = torch.randperm(5000, generator=g)
    d = render_points(pts[perm], cols[perm], cams, radius=1)
    assert_same_render(a, d, ("image", "mask", "depth", "pointmap"))
    assert torch.equal(perm[d.index.clamp(min=0)] * d.mask, a.index.clamp(min=0) * a.mask)


def test_uint8_colours_and_bad_inputs():
    cam = identity_camera()
    out = render_points(torch.tensor([[1.5, 1.5, 1.0]]), torch.tensor([[255, 0, 51]], dtype=torch.uint8), cam)
    assert torch.allclose(out.image[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.2]))
    with pytest.raises(RenderInputError):
        render_points(torch.zeros(4, 2), torch.zeros(4, 3), cam)
    with pytest.raises(ValueError):
        render_points(torch.zeros(4, 3), torch.zeros(3, 3), cam)
    with pytest.raises(ValueError):
        render_points(torch.zeros(4, 3), torch.zeros(4, 3), cam, radius=-1)
    with pytest.raises(ValueError):
        render_points(torch.zeros(4, 3), torch.zeros(4, 3), cam, near=1.0, far=0.5)


def test_non_finite_points_are_dropped():
    cam = identity_camera()
    pts = torch.tensor([[1.5, 1.5, 1.0], [float("nan"), 1.5, 1.0], [2.5, 1.5, float("inf")], [2.5, 1.5, 2.0]])
    out = render_points(pts, torch.ones(4, 3), cam)
    assert set(out.index[out.mask].tolist()) == {0, 3}
    assert torch.isfinite(out.depth).all() and torch.isfinite(out.pointmap).all()


def test_large_frame_index_fallback_gives_the_same_render(monkeypatch):
    # Frames too large for exact float32 pixel indices switch the index arithmetic to float64; force that
    # switch on a small frame and compare with the float32 path.
    import engine.geometry.render as render_module

    pts, cols, _ = random_cloud(3000, seed=6)
    cams = make_cameras([(0, 0, 0), (0.5, 0.2, 0.3)], (0, 0, 4), 40, 30)
    for radius in (0, 1):
        plain = render_points(pts, cols, cams, radius=radius)
        monkeypatch.setattr(render_module, "_EXACT_FLOAT32_INDEX", 16)
        wide = render_points(pts, cols, cams, radius=radius)
        monkeypatch.undo()
        assert_same_render(plain, wide)


def test_render_without_pointmaps_gives_the_same_render():
    pts, cols, _ = random_cloud(5000, seed=8)
    cams = make_cameras([(0, 0, 0), (0.4, 0.1, 0.2)], (0, 0, 4), 40, 30)
    for radius in (0, 2):
        full = render_points(pts, cols, cams, radius=radius)
        bare = render_points(pts, cols, cams, radius=radius, pointmaps=False)
        assert bare.pointmap is None and full.pointmap is not None
        assert_same_render(full, bare, ("image", "mask", "depth", "index"))
    assert render_points(pts[:0], cols[:0], cams, pointmaps=False).pointmap is None


@pytest.mark.gpu
def test_cuda_render_matches_cpu_bit_for_bit():
    # Projection is separate IEEE multiplies/adds/divides and the z-buffer compares integer keys, so a
    # CUDA render must equal the CPU one exactly (including with all frames in one pass).
    pts, cols, _ = random_cloud(20000, seed=7)
    cams = make_cameras([(0, 0, 0), (0.5, 0, 0.5), (-0.5, 0.3, 0.2)], (0, 0, 4), 64, 48)
    for radius in (0, 1):
        cpu = render_points(pts, cols, cams, radius=radius)
        gpu = render_points(pts.cuda(), cols.cuda(), cams.to(device="cuda"), radius=radius)
        assert_same_render(cpu, gpu)
