"""Trajectory presets and official motion lists, checked against analytic geometry and the official files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.geometry.trajectories import (
    PRESETS,
    Motion,
    TrajectorySpec,
    cameras_from_motion_list,
    cameras_from_moves,
    make_trajectory,
    parse_motion,
)

PERSPECTIVE = ["photorealistic-indoor-dining_spaces-030", "stylized-outdoor-aquatic_landscape-069"]


def _start(seed: int = 0) -> Cameras:
    """A tilted, off-origin start camera so no test leans on an identity pose."""
    g = np.random.default_rng(seed)
    from scipy.spatial.transform import Rotation

    c2w = np.eye(4)
    c2w[:3, :3] = Rotation.from_rotvec(g.normal(size=3) * 0.4).as_matrix()
    c2w[:3, 3] = g.normal(size=3)
    return Cameras(torch.as_tensor(np.linalg.inv(c2w)), intrinsics_from_fov(64, 48, 60.0), 64, 48)


def _look_at(cams: Cameras, d: float) -> torch.Tensor:
    return cams.centers[0] + d * cams.forward[0]


def _angle_deg(u: torch.Tensor, v: torch.Tensor) -> float:
    c = torch.dot(u, v) / (u.norm() * v.norm())
    return math.degrees(math.acos(float(c.clamp(-1, 1))))


def _official(examples, scene):
    return Cameras.from_json(examples / "perspective" / scene / "camera.json")


# ---- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_starts_at_start_with_rigid_rotations(name):
    start = _start(1)
    cams = make_trajectory(name, start, 2.0, frames=9)
    assert len(cams) == 9 and cams.width == start.width and cams.height == start.height
    assert torch.equal(cams.w2c[0], start.w2c[0])
    r = cams.R
    eye = torch.eye(3, dtype=r.dtype).expand_as(r)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(9, dtype=r.dtype), atol=1e-12)
    assert torch.equal(cams.K, start.K.expand(9, 3, 3))
    spec = PRESETS[name]
    assert isinstance(spec, TrajectorySpec) and spec.kind in ("angle", "distance") and spec.frames >= 2


@pytest.mark.parametrize("name", ["left", "right", "up", "down", "orbit", "eloop"])
def test_look_at_point_stays_at_principal_point(name):
    start, d = _start(2), 3.0
    cams = make_trajectory(name, start, d, frames=13)
    uv, z = cams.project(_look_at(start, d)[None])
    pp = cams.K[:, :2, 2]
    assert torch.allclose(uv[:, 0], pp, atol=1e-9)
    if name != "eloop":  # circles about the look-at point keep its distance
        assert torch.allclose(z[:, 0], torch.full_like(z[:, 0], d), atol=1e-12)


@pytest.mark.parametrize(
    "name, side", [("left", -1), ("right", 1), ("up", -1), ("down", 1)]
)
def test_rotation_presets_turn_by_the_asked_angle_on_the_named_side(name, side):
    start, d, angle = _start(3), 2.5, 40.0
    cams = make_trajectory(name, start, d, frames=5, amount=angle)
    p = _look_at(start, d)
    # the centre turns about the look-at point by exactly the angle, evenly per frame
    for i, frac in enumerate([0, 0.25, 0.5, 0.75, 1.0]):
        assert _angle_deg(start.centers[0] - p, cams.centers[i] - p) == pytest.approx(angle * frac, abs=1e-9)
    # and towards the named side in the start camera's frame (OpenCV: x right, y down)
    moved = start.world_to_camera(cams.centers[-1:])[0, 0]
    axis = 0 if name in ("left", "right") else 1
    assert side * moved[axis] > 0.5 * d * math.sin(math.radians(angle))
    assert abs(moved[1 - axis]) < 1e-9


def test_orbit_of_360_closes_and_turns_about_the_vertical():
    start, d = _start(4), 1.7
    cams = make_trajectory("orbit", start, d, frames=25, amount=360.0)
    assert torch.allclose(cams.w2c[-1], cams.w2c[0], atol=1e-12)
    up = start.c2w[0, :3, 1]
    p = _look_at(start, d)
    # every centre lies on the horizontal circle of radius d about the look-at point
    assert torch.allclose((cams.centers - p) @ up, torch.zeros(25, dtype=up.dtype), atol=1e-12)
    assert torch.allclose((cams.centers - p).norm(dim=-1), torch.full((25,), d, dtype=up.dtype), atol=1e-12)
    # halfway round, the camera sits opposite its start
    assert torch.allclose(cams.centers[12] - p, -(start.centers[0] - p), atol=1e-12)
    # camera 'down' stays the start's down: the orbit is level
    assert torch.allclose(cams.c2w[:, :3, 1], up.expand(25, 3), atol=1e-12)


@pytest.mark.parametrize("name, sign", [("forward", 1), ("backward", -1)])
def test_translation_presets_move_the_asked_fraction_of_median_depth(name, sign):
    start, d, frac = _start(5), 4.0, 0.3
    cams = make_trajectory(name, start, d, frames=7, amount=frac)
    steps = cams.centers - start.centers
    expected = torch.linspace(0, 1, 7, dtype=steps.dtype)[:, None] * (sign * frac * d) * start.forward
    assert torch.allclose(steps, expected, atol=1e-12)
    assert torch.allclose(cams.R, start.R.expand(7, 3, 3), atol=1e-12)


@pytest.mark.parametrize("name, sign", [("pan_left", -1), ("pan_right", 1)])
def test_pan_turns_in_place_about_the_vertical(name, sign):
    start = _start(6)
    angle = 200.0  # beyond 180 deg on purpose: slerp keys must not take the short way round
    cams = make_trajectory(name, start, 2.0, frames=11, amount=angle)
    assert torch.allclose(cams.centers, start.centers.expand(11, 3), atol=1e-12)
    right, down, fwd = start.c2w[0, :3, 0], start.c2w[0, :3, 1], start.forward[0]
    for i in range(11):
        f = cams.forward[i]
        assert float(f @ down) == pytest.approx(0.0, abs=1e-12)
        yaw = math.degrees(math.atan2(float(f @ right), float(f @ fwd)))
        wrapped = (yaw - sign * angle * i / 10 + 180) % 360 - 180
        assert wrapped == pytest.approx(0.0, abs=1e-9)


def test_eloop_is_closed_and_leaves_the_start():
    start, d = _start(7), 2.0
    cams = make_trajectory("eloop", start, d, frames=17, amount=0.4)
    assert torch.allclose(cams.w2c[-1], cams.w2c[0], atol=1e-12)
    off = start.world_to_camera(cams.centers)[0]  # centres in the start camera frame
    assert torch.allclose(off[:, 2], torch.zeros(17, dtype=off.dtype), atol=1e-12)  # plane facing the look-at point
    assert float(off[:, 0].max() - off[:, 0].min()) == pytest.approx(2 * 0.4 * d, rel=1e-9)
    assert float(off[:, 1].max() - off[:, 1].min()) == pytest.approx(0.4 * d, rel=1e-9)


def test_easing_keeps_endpoints_and_slows_the_ends():
    start, d = _start(8), 2.0
    lin = make_trajectory("right", start, d, frames=21)
    eased = make_trajectory("right", start, d, frames=21, ease=True)
    assert torch.allclose(lin.w2c[-1], eased.w2c[-1], atol=1e-12)
    first = lambda c: float((c.centers[1] - c.centers[0]).norm())  # noqa: E731
    assert first(eased) < 0.5 * first(lin)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="spiral"), "orbit"),
        (dict(name="left", frames=1), "frames"),
        (dict(name="left", amount=-10.0), "amount"),
        (dict(name="left", amount=float("nan")), "amount"),
        (dict(name="forward", amount=1.5), "median depth"),
        (dict(name="orbit", amount=1e6), "degrees"),
    ],
)
def test_bad_preset_arguments_raise_one_sentence(kwargs, words):
    with pytest.raises(ValueError) as e:
        make_trajectory(start=_start(), median_depth=2.0, **kwargs)
    msg = str(e.value)
    assert words in msg and msg.endswith(".") and "\n" not in msg


def test_bad_start_or_depth_raise():
    two = Cameras.cat([_start(0), _start(1)])
    with pytest.raises(ValueError, match="length 1"):
        make_trajectory("left", two, 2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="Median depth"):
            make_trajectory("left", _start(), bad)


# ---- official motion strings -------------------------------------------------------------------------
def test_parse_official_motion_strings():
    m = parse_motion("rotation_right-phi53.47-theta0")
    assert (m.kind, m.phi, m.theta) == ("orbit", 53.47, 0.0)
    m = parse_motion("pan_right-phi-72.25623590803207-theta0")
    assert (m.kind, m.phi, m.theta) == ("orbit", -72.25623590803207, 0.0)
    assert parse_motion("left-phi-76.03-theta0").parameters == {"phi": -76.03, "theta": 0.0}
    m = parse_motion("right-3.17")
    assert (m.kind, m.direction, m.distance) == ("translate", "right", 3.17)
    m = parse_motion("pan_left-7.0017")
    assert (m.kind, m.direction, m.distance) == ("translate", "left", 7.0017)
    assert parse_motion("up-phi0-theta1e-1").theta == pytest.approx(0.1)
    for bad in ("", "sideways-3", "left", "left-phi-theta0", "left-phi1-theta", 5):
        with pytest.raises(ValueError):
            parse_motion(bad)


@pytest.mark.parametrize("scene", PERSPECTIVE)
def test_official_rotations_reproduced(examples, scene):
    """Every rotation of both official files follows from the motion list (phi linear per frame,
    81 frames = start + 40 per move), whatever the move's name."""
    off = _official(examples, scene)
    d = float(off.t[0, 2])  # the world origin is the look-at point
    ours = cameras_from_motion_list(off.motion_list, off[0], d, len(off))
    assert ours.motion_list == off.motion_list
    assert torch.equal(ours.w2c[0], off.w2c[0])
    assert torch.allclose(ours.R, off.R, atol=1e-6)  # files hold float32-precision numbers


def _circle_centre_xz(p: np.ndarray) -> np.ndarray:
    a = np.c_[2 * p[:, 0], 2 * p[:, 2], np.ones(len(p))]
    s = np.linalg.lstsq(a, p[:, 0] ** 2 + p[:, 2] ** 2, rcond=None)[0]
    return np.array([s[0], 0.0, s[1]])


@pytest.mark.parametrize("scene", PERSPECTIVE)
def test_official_orbit_moves_turn_about_our_pivot(examples, scene):
    """Orbit moves ('*-phi*-theta*'): the official centres of each orbit lie on a circle about the pivot
    we use (the point at median depth on the axis of the move's first camera).

    Not reproduced exactly: the official frames after a move's start sit off the ideal circle by a small
    per-move constant (radius about 0.1-0.2 % short, view turned ~0.04-0.14 deg off the pivot); its rule
    cannot be recovered from the files, so centres are asserted within 0.5 % of the median depth."""
    off = _official(examples, scene)
    d = float(off.t[0, 2])
    moves = [parse_motion(m) for m in off.motion_list]
    first = 1
    for move in moves:
        last = first + 39
        if move.kind == "orbit":
            before = off[first - 1]
            pivot = (before.centers[0] + d * before.forward[0]).numpy()
            centre = _circle_centre_xz(off.centers[first : last + 1].numpy())
            assert np.abs(centre - pivot).max() < 2e-5 * d
            ours = cameras_from_moves([move], before, d, [40])
            assert torch.allclose(ours.R[1:], off.R[first : last + 1], atol=1e-6)
            err = (ours.centers[1:] - off.centers[first : last + 1]).norm(dim=-1).max()
            assert float(err) < 5e-3 * d
        first = last + 1


def test_official_translation_move_is_straight_and_even(examples):
    """'pan_left-7.0017' is a pure, evenly spaced translation in the official file (asserted), but its
    direction and length (8.61 units, forward-right) do not follow from the string; we only check that our
    translation has the same form."""
    off = _official(examples, PERSPECTIVE[1])
    d = float(off.t[0, 2])
    assert parse_motion(off.motion_list[0]).kind == "translate"
    steps = off.centers[1:41] - off.centers[:40]
    assert torch.allclose(steps, steps.mean(0).expand_as(steps), atol=1e-5)
    assert torch.allclose(off.R[:41], off.R[:1].expand(41, 3, 3), atol=1e-7)
    ours = cameras_from_motion_list(off.motion_list, off[0], d, 81)
    ours_steps = ours.centers[1:41] - ours.centers[:40]
    assert torch.allclose(ours_steps, ours_steps.mean(0).expand_as(ours_steps), atol=1e-12)
    assert float(ours_steps.norm(dim=-1).sum()) == pytest.approx(7.001735643722109, rel=1e-9)


def test_official_aerial_panorama_trajectory_reproduced(examples):
    """'up-right-aerial' (105 deg, 21 keyframes): rise 45 deg over the pivot in 9 frames, then circle
    60 deg right about the vertical through the pivot in 11 — matches the file to float precision.
    The pivot depth is the intersection of the optical axes of keyframes 0 and 9."""
    path = examples / "panorama/indoor-corridor/view0/traj2/camera.json"
    off = Cameras.from_json(path)
    assert off.meta["type"] == "up-right-aerial" and off.meta["rotation_deg"] == 105.0
    c, f = off.centers.numpy(), off.forward.numpy()
    s = np.linalg.lstsq(np.stack([f[0], -f[9]], 1), c[9] - c[0], rcond=None)[0]
    d = float(s[0])
    ours = cameras_from_moves([Motion("orbit", "up", theta=45.0), Motion("orbit", "right", phi=-60.0)], off[0], d, [9, 11])
    assert torch.allclose(ours.w2c, off.w2c, atol=1e-6)


@pytest.mark.parametrize("traj, preset", [("traj0", "right"), ("traj1", "left")])
def test_official_panorama_rotations_match_preset_side(examples, traj, preset):
    """'right-rotation'/'left-rotation' keyframes turn about the vertical and circle the same pivot as the
    aerial file, on the side our preset of that name takes.  Their per-keyframe angles (6 deg, then even
    2.39 deg steps to 51.47 deg for rotation_deg 53.33) follow no rule we could derive, so only the end
    camera of our preset (given the file's final angle) is compared, within 1 % of the pivot depth."""
    off = Cameras.from_json(examples / "panorama/indoor-corridor/view0" / traj / "camera.json")
    assert off.meta["type"] == f"{preset}-rotation"
    down = off.c2w[0, :3, 1]
    assert torch.allclose(off.c2w[:, :3, 1], down.expand(len(off), 3), atol=1e-6)  # yaw only
    aerial = Cameras.from_json(examples / "panorama/indoor-corridor/view0/traj2/camera.json")
    c, f = aerial.centers.numpy(), aerial.forward.numpy()
    d = float(np.linalg.lstsq(np.stack([f[0], -f[9]], 1), c[9] - c[0], rcond=None)[0][0])
    final = _angle_deg(off.forward[0], off.forward[-1])
    ours = make_trajectory(preset, off[0], d, frames=2, amount=final)
    assert torch.allclose(ours.R[-1], off.R[-1], atol=1e-6)
    assert float((ours.centers[-1] - off.centers[-1]).norm()) < 0.01 * d
