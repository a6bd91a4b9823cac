"""Hand-drawn camera paths: keyframes splined into cameras, checked against analytic paths and a second
(hand-solved) natural cubic spline; saving and loading as an official camera.json."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from engine.geometry.camera_path import (
    KEYFRAMES_KEY,
    MAX_PICKED_KEYFRAMES,
    Keyframe,
    fov_of,
    keyframes_from_cameras,
    load_path,
    path_cameras,
    save_path,
)
from engine.geometry.cameras import CameraFormatError, Cameras, intrinsics_matrix


def _base(width=96, height=64) -> Cameras:
    """A tilted, off-origin camera with non-square pixels, so nothing leans on an identity pose."""
    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_rotvec([0.2, -0.5, 0.1]).as_matrix()
    c2w[:3, 3] = [0.3, -0.2, 1.1]
    return Cameras(torch.as_tensor(np.linalg.inv(c2w)), intrinsics_matrix(70.0, 66.0, 47.0, 33.5), width, height)


def _natural_spline(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """A natural cubic spline through ``y[k]`` at knots ``k`` (unit spacing), solved by hand: the second
    derivatives M satisfy M[k-1] + 4 M[k] + M[k+1] = 6 (y[k-1] - 2 y[k] + y[k+1]), M[0] = M[-1] = 0."""
    n = len(y)
    a = np.zeros((n, n))
    rhs = np.zeros_like(y)
    a[0, 0] = a[-1, -1] = 1.0
    for k in range(1, n - 1):
        a[k, k - 1], a[k, k], a[k, k + 1] = 1.0, 4.0, 1.0
        rhs[k] = 6 * (y[k - 1] - 2 * y[k] + y[k + 1])
    m = np.linalg.solve(a, rhs)
    out = []
    for t in s:
        k = min(int(np.floor(t)), n - 2)
        u = t - k
        out.append((1 - u) * y[k] + u * y[k + 1]
                   + ((1 - u) ** 3 - (1 - u)) * m[k] / 6 + (u ** 3 - u) * m[k + 1] / 6)
    return np.array(out)


def _keyframes(n: int, seed: int = 0) -> list[Keyframe]:
    g = np.random.default_rng(seed)
    return [Keyframe.make(g.normal(size=3), Rotation.random(random_state=seed + i).as_quat()[[3, 0, 1, 2]],
                          float(g.uniform(30, 90))) for i in range(n)]


def test_base_camera_as_keyframe_gives_it_back():
    base = _base()
    (key,) = keyframes_from_cameras(base)
    cams = path_cameras([key, key.moved(position=key.position + [0.5, 0, 0])], 5, base)
    assert torch.allclose(cams.w2c[0], base.w2c[0], atol=1e-12)
    assert torch.allclose(cams.K[0], base.K[0], atol=1e-9)
    # Non-square pixels keep their aspect; the principal point stays.
    assert torch.allclose(cams.K[:, 0, 0] / cams.K[:, 1, 1], base.K[:, 0, 0] / base.K[:, 1, 1])
    assert torch.equal(cams.K[:, :2, 2], base.K[:, :2, 2].expand(5, 2))


def test_positions_follow_a_hand_solved_natural_spline_and_pass_through_keyframes():
    keys = _keyframes(4)
    cams = path_cameras(keys, 13, _base())  # s = 0, 0.25, ..., 3: frames 0, 4, 8, 12 are the keyframes
    centres = cams.centers.numpy()
    s = np.linspace(0, 3, 13)
    expected = np.stack([_natural_spline(np.array([k.position[i] for k in keys]), s) for i in range(3)], axis=1)
    np.testing.assert_allclose(centres, expected, atol=1e-10)
    for j, k in enumerate(keys):
        np.testing.assert_allclose(centres[4 * j], k.position, atol=1e-12)
        np.testing.assert_allclose(cams.c2w[4 * j, :3, :3].numpy(), k.c2w[:3, :3], atol=1e-12)
    np.testing.assert_allclose(fov_of(cams)[::4], [k.fov for k in keys], atol=1e-9)


def test_keyframes_on_a_line_give_evenly_spaced_centres():
    # A natural cubic spline reproduces linear data exactly: evenly spaced keyframes on a line are travelled
    # at constant speed.
    q = [1.0, 0.0, 0.0, 0.0]
    keys = [Keyframe.make([0.5 * i, 0.1 * i, -0.2 * i], q, 60.0) for i in range(5)]
    centres = path_cameras(keys, 9, _base()).centers.numpy()
    np.testing.assert_allclose(centres, np.linspace(keys[0].position, keys[-1].position, 9), atol=1e-12)


def test_rotation_is_slerped_at_constant_angular_speed_about_the_fixed_axis():
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    r0 = Rotation.from_rotvec([0.3, 0.1, -0.2])
    theta = math.radians(100.0)
    r1 = Rotation.from_rotvec(theta * axis) * r0
    keys = [Keyframe.make([0, 0, 0], r.as_quat()[[3, 0, 1, 2]], 50.0) for r in (r0, r1)]
    cams = path_cameras(keys, 6, _base())
    for i, t in enumerate(np.linspace(0, 1, 6)):
        expected = (Rotation.from_rotvec(t * theta * axis) * r0).as_matrix()
        np.testing.assert_allclose(cams.c2w[i, :3, :3].numpy(), expected, atol=1e-12)


def test_field_of_view_is_linear_between_keyframes():
    q = [1.0, 0.0, 0.0, 0.0]
    keys = [Keyframe.make([0, 0, 0], q, 30.0), Keyframe.make([0, 0, 1], q, 90.0), Keyframe.make([0, 0, 2], q, 60.0)]
    base = _base()
    cams = path_cameras(keys, 5, base)
    fov = np.array([30.0, 60.0, 90.0, 75.0, 60.0])
    np.testing.assert_allclose(cams.K[:, 1, 1].numpy(), 0.5 * base.height / np.tan(np.radians(fov) / 2), rtol=1e-12)


def test_saved_path_is_an_official_camera_json_and_loads_back_exactly(tmp_path):
    base = _base()
    keys = _keyframes(3, seed=4)
    save_path(tmp_path / "path.json", keys, 11, base)
    data = json.loads((tmp_path / "path.json").read_text())
    assert {"extrinsic", "intrinsic", "width", "height", KEYFRAMES_KEY} <= set(data)
    official = Cameras.from_json(tmp_path / "path.json")  # what --camera-json and the official loader read
    expected = path_cameras(keys, 11, base)
    assert len(official) == 11 and (official.width, official.height) == (base.width, base.height)
    assert torch.allclose(official.w2c, expected.w2c, atol=1e-12)
    assert torch.allclose(official.K, expected.K, atol=1e-12)
    loaded = load_path(tmp_path / "path.json", base)
    assert len(loaded) == 3
    for a, b in zip(loaded, keys):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)
        assert a.fov == pytest.approx(b.fov, abs=1e-9)


def test_official_trajectory_loads_as_evenly_picked_keyframes(examples):
    path = examples / "perspective/photorealistic-indoor-dining_spaces-030/camera.json"
    official = Cameras.from_json(path)
    base = _base(64, 40)
    keys = load_path(path, base)
    assert len(keys) == MAX_PICKED_KEYFRAMES < len(official)
    np.testing.assert_allclose(keys[0].c2w, official.c2w[0].numpy(), atol=1e-9)
    np.testing.assert_allclose(keys[-1].c2w, official.c2w[-1].numpy(), atol=1e-9)
    # Resized to the scene's image: the vertical field of view is kept.
    assert keys[0].fov == pytest.approx(float(fov_of(official[0:1])[0]), abs=1e-9)


def test_bad_paths_are_refused_with_a_sentence(tmp_path):
    base = _base()
    key = keyframes_from_cameras(base)[0]
    with pytest.raises(ValueError, match="at least two keyframes"):
        path_cameras([key], 5, base)
    with pytest.raises(ValueError, match="field of view"):
        key.moved(fov=179.0)
    one = tmp_path / "one.json"
    base.save_json(one)
    with pytest.raises(CameraFormatError, match="one camera"):
        load_path(one, base)
    bad = tmp_path / "bad.json"
    data = base.to_json_dict()
    data.update(extrinsic=data["extrinsic"] * 2, intrinsic=data["intrinsic"] * 2, keyframes=[1, 2])
    bad.write_text(json.dumps(data))
    with pytest.raises(CameraFormatError, match="keyframes"):
        load_path(bad, base)
