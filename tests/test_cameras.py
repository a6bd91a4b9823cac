"""Camera batches and the official camera.json format, checked against the official files and analytic geometry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.geometry.cameras import (
    CameraFormatError,
    Cameras,
    intrinsics_from_fov,
    pixel_centers,
    rigid_inverse,
)


def _official_files(examples):
    files = sorted(examples.glob("perspective/*/camera.json")) + sorted(examples.glob("panorama/*/view*/traj*/camera.json"))
    assert len(files) == 5, files
    return files


def _random_cameras(n: int = 3, width: int = 12, height: int = 8, seed: int = 0) -> Cameras:
    from scipy.spatial.transform import Rotation

    g = np.random.default_rng(seed)
    w2c = np.tile(np.eye(4), (n, 1, 1))
    w2c[:, :3, :3] = Rotation.from_rotvec(g.normal(size=(n, 3))).as_matrix()
    w2c[:, :3, 3] = g.normal(size=(n, 3))
    k = np.tile(np.eye(3), (n, 1, 1))
    k[:, 0, 0] = g.uniform(8, 20, n)
    k[:, 1, 1] = g.uniform(8, 20, n)
    k[:, 0, 2] = width / 2 + g.uniform(-1, 1, n)
    k[:, 1, 2] = height / 2 + g.uniform(-1, 1, n)
    return Cameras(torch.as_tensor(w2c), torch.as_tensor(k), width, height)


# ---- official files ------------------------------------------------------------------------------------
def test_official_files_read_and_write_back_identically(examples, tmp_path):
    for i, path in enumerate(_official_files(examples)):
        original = json.loads(path.read_text())
        cams = Cameras.from_json(path)
        # same keys, same order, same values (incl. -0.0 and number types): compare the serialised text
        assert json.dumps(cams.to_json_dict()) == json.dumps(original), path
        out = cams.save_json(tmp_path / f"cam{i}.json")
        assert json.dumps(json.loads(out.read_text())) == json.dumps(original), path
        assert len(cams) == len(original["extrinsic"])
        if "width" in original:
            assert (cams.width, cams.height) == (original["width"], original["height"])
            assert cams.meta["type"] == original["type"] and cams.meta["rotation_deg"] == original["rotation_deg"]
        else:  # official perspective files centre the principal point
            k = original["intrinsic"][0]
            assert (cams.width, cams.height) == (round(2 * k[0][2]), round(2 * k[1][2]))
            assert cams.motion_list == original["motion_list"]


def test_perspective_size_matches_its_image(examples):
    import imageio.v3 as iio

    for path in sorted(examples.glob("perspective/*/camera.json")):
        h, w = iio.improps(path.parent / "image.png").shape[:2]
        cams = Cameras.from_json(path)
        assert (cams.width, cams.height) == (w, h)


def test_official_poses_are_consistent(examples):
    for path in _official_files(examples):
        cams = Cameras.from_json(path)
        eye = torch.eye(4, dtype=torch.float64).expand(len(cams), 4, 4)
        assert torch.allclose(cams.c2w @ cams.w2c, eye, atol=1e-6)
        # second implementation: general matrix inverse
        assert torch.allclose(cams.centers, torch.linalg.inv(cams.w2c)[:, :3, 3], atol=1e-6)


# ---- pose algebra --------------------------------------------------------------------------------------
def test_inverse_centres_and_axes():
    cams = _random_cameras(5)
    eye = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    assert torch.allclose(cams.c2w @ cams.w2c, eye, atol=1e-12)
    assert torch.allclose(cams.w2c @ cams.c2w, eye, atol=1e-12)
    assert torch.allclose(rigid_inverse(cams.w2c), torch.linalg.inv(cams.w2c), atol=1e-12)
    r, t = cams.w2c[:, :3, :3].numpy(), cams.w2c[:, :3, 3].numpy()
    assert np.allclose(cams.centers.numpy(), -np.einsum("nji,nj->ni", r, t), atol=1e-12)
    # the centre maps to the camera origin, and the optical axis to +z
    cam = cams.world_to_camera(cams.centers[:, None, :])
    assert torch.allclose(cam, torch.zeros_like(cam), atol=1e-12)
    ahead = cams.world_to_camera((cams.centers + 2 * cams.forward)[:, None, :])[:, 0]
    assert torch.allclose(ahead, torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64).expand(5, 3), atol=1e-12)


def test_project_unproject_round_trip_float64():
    cams = _random_cameras(3, width=12, height=8)
    g = torch.Generator().manual_seed(0)
    depth = 0.5 + 4 * torch.rand(3, 8, 12, generator=g, dtype=torch.float64)
    pts = cams.unproject(depth)
    for n in range(3):
        uv, z = cams[n].project(pts[n].reshape(-1, 3))
        assert torch.allclose(uv[0], pixel_centers(8, 12, dtype=torch.float64).reshape(-1, 2), atol=1e-10)
        assert torch.allclose(z[0], depth[n].reshape(-1), atol=1e-12)
    # analytic check of one pixel: (row 2, column 5) centre at u = 5.5, v = 2.5
    k = cams.K[0]
    x = (5.5 - k[0, 2]) / k[0, 0] * depth[0, 2, 5]
    y = (2.5 - k[1, 2]) / k[1, 1] * depth[0, 2, 5]
    expected = cams.c2w[0, :3, :3] @ torch.stack([x, y, depth[0, 2, 5]]) + cams.c2w[0, :3, 3]
    assert torch.allclose(pts[0, 2, 5], expected, atol=1e-12)


def test_unproject_at_another_resolution_scales_intrinsics():
    cams = _random_cameras(1, width=12, height=8)
    depth = torch.full((1, 4, 6), 2.0, dtype=torch.float64)
    pts = cams.unproject(depth)
    uv, z = cams.resized(6, 4).project(pts[0].reshape(-1, 3))
    assert torch.allclose(uv[0], pixel_centers(4, 6, dtype=torch.float64).reshape(-1, 2), atol=1e-10)


# ---- rays ------------------------------------------------------------------------------------------------
def test_rays_pass_through_unprojected_points():
    cams = _random_cameras(2, width=12, height=8)
    o, d = cams.rays()
    assert o.shape == d.shape == (2, 8, 12, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 8, 12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(o, cams.centers[:, None, None, :].expand_as(o))
    # a world point seen through a pixel centre lies on that pixel's ray, in front of the camera
    depth = 0.5 + torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    to_p = cams.unproject(depth) - o
    assert torch.allclose(to_p / to_p.norm(dim=-1, keepdim=True), d, atol=1e-10)


# ---- intrinsics edits --------------------------------------------------------------------------------
def test_resized_keeps_projections_consistent():
    cams = _random_cameras(2, width=12, height=8)
    pts = torch.tensor([[0.3, -0.2, 3.0], [1.0, 0.5, 2.0]], dtype=torch.float64) @ cams.R[0] - (cams.R[0].T @ cams.t[0])
    uv, _ = cams.project(pts)
    # resizing the image maps continuous pixel position (u, v) to (u * W'/W, v * H'/H)
    big = cams.resized(30, 10)
    uv_big, _ = big.project(pts)
    assert torch.allclose(uv_big, uv * torch.tensor([30 / 12, 10 / 8], dtype=torch.float64), atol=1e-12)
    assert (big.width, big.height) == (30, 10)
    # a pixel centre of the resized image is the centre of the corresponding source area
    small = cams.resized(6, 4)
    src = cams.unproject(torch.full((2, 8, 12), 2.0, dtype=torch.float64))
    block_mean = src.reshape(2, 4, 2, 6, 2, 3).mean(dim=(2, 4))
    uv_s, _ = small.project(block_mean[0].reshape(-1, 3))
    assert torch.allclose(uv_s[0], pixel_centers(4, 6, dtype=torch.float64).reshape(-1, 2), atol=1e-10)


def test_resized_and_cropped_official_camera_keep_meta(examples):
    path = examples / "panorama/indoor-corridor/view0/traj0/camera.json"
    cams = Cameras.from_json(path)
    half = cams.resized(416, 240)
    assert half.meta["width"] == 416 and half.meta["height"] == 240
    assert cams.meta["width"] == 832  # the original is untouched
    d = half.to_json_dict()
    assert list(d) == ["extrinsic", "intrinsic", "width", "height", "type", "rotation_deg"]


def test_intrinsics_from_fov():
    k = intrinsics_from_fov(64, 48, 90.0)[0]
    assert float(k[0, 0]) == pytest.approx(32.0) and float(k[1, 1]) == pytest.approx(32.0)
    assert (float(k[0, 2]), float(k[1, 2])) == (32.0, 24.0)


# ---- malformed files ---------------------------------------------------------------------------------------
def _good():
    return {"extrinsic": [np.eye(4).tolist()] * 2, "intrinsic": [[[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]]] * 2}


def _rotated_bad():
    bad = _good()
    m = np.eye(4)
    m[:3, :3] *= 1.5  # scaled, not a rotation
    bad["extrinsic"] = [np.eye(4).tolist(), m.tolist()]
    return bad


def _mirrored():
    bad = _good()
    m = np.eye(4)
    m[0, 0] = -1  # orthogonal but a reflection
    bad["extrinsic"] = [m.tolist()] * 2
    return bad


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ("\xff\xfe", "not valid JSON"),
        (json.dumps([1, 2]), "extrinsic"),
        (json.dumps({"extrinsic": _good()["extrinsic"]}), "intrinsic"),
        (json.dumps({"intrinsic": _good()["intrinsic"]}), "extrinsic"),
        (json.dumps({**_good(), "intrinsic": _good()["intrinsic"][:1]}), "one of each per frame"),
        (json.dumps({**_good(), "extrinsic": []}), "non-empty"),
        (json.dumps({**_good(), "extrinsic": [[[1, 2], [3]]]}), "numeric"),
        (json.dumps({**_good(), "extrinsic": [np.eye(3).tolist()] * 2}), "4x4"),
        (json.dumps({**_good(), "intrinsic": [np.eye(4).tolist()] * 2}), "3x3"),
        (json.dumps(_good()).replace("10.0", "NaN", 1), "NaN"),
        (json.dumps(_good()).replace("10.0", "Infinity", 1), "infinite"),
        (json.dumps(_rotated_bad()), "rigid"),
        (json.dumps(_mirrored()), "rigid"),
        (json.dumps({**_good(), "intrinsic": [[[-10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]]] * 2}), "focal"),
        (json.dumps({**_good(), "motion_list": "left-3"}), "motion_list"),
    ],
)
def test_malformed_files_raise_readable_errors(tmp_path, text, words):
    path = tmp_path / "camera.json"
    if text == "\xff\xfe":
        path.write_bytes(b"\xff\xfe\x00")
    else:
        path.write_text(text)
    with pytest.raises(CameraFormatError) as e:
        Cameras.from_json(path)
    msg = str(e.value)
    assert words in msg, msg
    assert "\n" not in msg and msg.rstrip().endswith("."), msg
    assert isinstance(e.value, ValueError)  # user errors are ValueErrors


def test_missing_file_raises_readable_error(tmp_path):
    with pytest.raises(CameraFormatError, match="does not exist"):
        Cameras.from_json(tmp_path / "nope.json")


def test_good_minimal_file_loads(tmp_path):
    path = tmp_path / "camera.json"
    path.write_text(json.dumps(_good()))
    cams = Cameras.from_json(path)
    assert len(cams) == 2 and (cams.width, cams.height) == (8, 6)
    # no size keys in the file: the size comes from the principal point and none is written back
    assert cams.to_json_dict() == _good()
    made = Cameras(cams.w2c, cams.K, 8, 6)  # cameras made in code write their size
    assert made.to_json_dict() == {**_good(), "width": 8, "height": 6}


def test_batch_shape_errors():
    with pytest.raises(CameraFormatError, match="same N"):
        Cameras(torch.eye(4).expand(3, 4, 4), torch.eye(3).expand(2, 3, 3), 8, 6)
    with pytest.raises(CameraFormatError, match="positive"):
        Cameras(torch.eye(4), torch.eye(3), 0, 6)
