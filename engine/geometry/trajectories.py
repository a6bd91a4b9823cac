"""Camera trajectories from one start camera: UI presets and the official ``motion_list`` moves.

Geometry (all moves share it):
- The *pivot* (look-at point) is the point at ``median_depth`` on the optical axis of the camera a move
  starts from.
- "Vertical" is the start camera's own y axis (OpenCV: y down), so a level start camera orbits level.
- Angles are degrees, interpolated linearly per frame (as the official files do); ``ease=True`` gives a
  smoothstep profile instead, with the same end points.
- Distances of the presets are fractions of the median depth (so one preset suits any scene scale);
  distances in official motion strings are scene units.

Official motion strings, as derived from the 81-frame perspective ``camera.json`` files of the release:
- ``<name>-phi<P>-theta<T>`` (``rotation_left``, ``pan_right``, ``left`` ... alike) is an orbit about the
  pivot: the camera position turns by ``P`` degrees about the vertical through the pivot and the view turns
  with it.  The sign of ``P`` alone sets the side (``P > 0`` moves the camera to its left); the name does
  not change the geometry (``pan_right-phi-72`` and ``left-phi-76`` both move the camera to its right).
  ``T > 0`` raises the camera over the pivot (no official file has ``T != 0``; the sign is an assumption).
- ``<name>-<D>`` (e.g. ``pan_left-7.0017``) is a straight, evenly spaced translation without rotation.
  Its direction and length are not recoverable from the string: the official ``pan_left-7.0017`` moves
  8.61 units forward and to the right.  Here it moves ``D`` scene units along the named direction.
- The frames after frame 0 are split evenly between the moves; move ``m`` frame ``k`` is at ``k/n_m`` of
  the move, its last frame is the next move's start.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.spatial.transform import Rotation, Slerp

from engine.geometry.cameras import Cameras, rigid_inverse

DEFAULT_FRAMES = 81  # one official clip: 81 video frames, 21 latent keyframes


@dataclass(frozen=True)
class TrajectorySpec:
    """A UI preset: ``kind`` says whether ``amount`` is an angle (degrees) or a distance
    (fraction of the median depth)."""

    name: str
    kind: str
    amount: float
    frames: int
    description: str
    max_amount: float = field(default=360.0, repr=False)


PRESETS: dict[str, TrajectorySpec] = {
    s.name: s
    for s in (
        TrajectorySpec("left", "angle", 45.0, DEFAULT_FRAMES, "Circle left around the look-at point, keeping it centred.", 180.0),
        TrajectorySpec("right", "angle", 45.0, DEFAULT_FRAMES, "Circle right around the look-at point, keeping it centred.", 180.0),
        TrajectorySpec("up", "angle", 30.0, DEFAULT_FRAMES, "Rise over the look-at point, looking down at it.", 180.0),
        TrajectorySpec("down", "angle", 30.0, DEFAULT_FRAMES, "Sink under the look-at point, looking up at it.", 180.0),
        TrajectorySpec("orbit", "angle", 360.0, DEFAULT_FRAMES, "Full circle to the right around the look-at point, ending where it began.", 720.0),
        TrajectorySpec("eloop", "distance", 0.3, DEFAULT_FRAMES, "Closed elliptical loop beside the start position, always looking at the look-at point.", 1.0),
        TrajectorySpec("forward", "distance", 0.5, DEFAULT_FRAMES, "Move straight ahead along the view direction.", 0.95),
        TrajectorySpec("backward", "distance", 0.5, DEFAULT_FRAMES, "Move straight back along the view direction.", 10.0),
        TrajectorySpec("pan_left", "angle", 45.0, DEFAULT_FRAMES, "Turn left in place.", 360.0),
        TrajectorySpec("pan_right", "angle", 45.0, DEFAULT_FRAMES, "Turn right in place.", 360.0),
    )
}


@dataclass(frozen=True)
class Motion:
    """One parsed official move: ``kind`` is ``'orbit'`` (``phi``, ``theta`` in degrees) or
    ``'translate'`` (``distance`` in scene units along ``direction``)."""

    kind: str
    direction: str
    phi: float = 0.0
    theta: float = 0.0
    distance: float = 0.0
    text: str = ""

    @property
    def parameters(self) -> dict:
        if self.kind == "orbit":
            return {"phi": self.phi, "theta": self.theta}
        return {"direction": self.direction, "distance": self.distance}


# Camera-frame unit vectors (OpenCV: x right, y down, z forward) of the translation names.
_DIRECTIONS = {
    "left": (-1.0, 0.0, 0.0),
    "right": (1.0, 0.0, 0.0),
    "up": (0.0, -1.0, 0.0),
    "down": (0.0, 1.0, 0.0),
    "forward": (0.0, 0.0, 1.0),
    "backward": (0.0, 0.0, -1.0),
}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ORBIT_RE = re.compile(rf"^(?P<name>[A-Za-z_]+)-phi(?P<phi>{_NUM})-theta(?P<theta>{_NUM})$")
_TRANSLATE_RE = re.compile(rf"^(?P<name>[A-Za-z_]+)-(?P<dist>{_NUM})$")


def parse_motion(motion: str) -> Motion:
    """Parse one official move string such as ``rotation_right-phi53.47-theta0`` or ``right-3.17``."""
    text = motion.strip() if isinstance(motion, str) else ""
    m = _ORBIT_RE.match(text)
    if m:
        phi, theta = float(m["phi"]), float(m["theta"])
        if not (math.isfinite(phi) and math.isfinite(theta)):
            raise ValueError(f"Motion {motion!r} has a non-finite angle; use finite degrees.")
        return Motion("orbit", m["name"].lower(), phi=phi, theta=theta, text=text)
    m = _TRANSLATE_RE.match(text)
    if m:
        name = m["name"].lower()
        direction = re.sub(r"^(pan|move|rotation|translate)_", "", name)
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"Motion {motion!r} names no known direction; use one of {', '.join(_DIRECTIONS)} (optionally with 'pan_')."
            )
        dist = float(m["dist"])
        if not math.isfinite(dist):
            raise ValueError(f"Motion {motion!r} has a non-finite distance; use a finite number.")
        return Motion("translate", direction, distance=dist, text=text)
    raise ValueError(
        f"Motion {motion!r} is not an official move; expected '<name>-phi<deg>-theta<deg>' or '<direction>-<distance>'."
    )


# ---- rigid-motion helpers (world frame, float64 numpy) --------------------------------------------
def _rig_about(pivot: np.ndarray, rot: Rotation) -> np.ndarray:
    """World transform ``[4,4]`` rotating everything about ``pivot``."""
    a = np.eye(4)
    a[:3, :3] = rot.as_matrix()
    a[:3, 3] = pivot - a[:3, :3] @ pivot
    return a


def _translation(v: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = v
    return a


def _profile(n: int, ease: bool) -> np.ndarray:
    """Fractions of a move at its frames ``1..n`` (the start is frame 0 of the move, not repeated)."""
    s = np.arange(1, n + 1, dtype=np.float64) / n
    return s * s * (3 - 2 * s) if ease else s


def _move_transforms(
    move: Motion, c2w_from: np.ndarray, up_down: np.ndarray, median_depth: float, fractions: np.ndarray
) -> list[np.ndarray]:
    """World transforms taking the move's first camera (c2w ``c2w_from``) to each of its frames."""
    if move.kind == "translate":
        v = c2w_from[:3, :3] @ np.asarray(_DIRECTIONS[move.direction]) * move.distance
        return [_translation(f * v) for f in fractions]
    pivot = c2w_from[:3, 3] + median_depth * c2w_from[:3, 2]
    right = c2w_from[:3, 0]
    out = []
    for f in fractions:
        # Rig rotations about the pivot: +phi about the down axis moves the camera left,
        # +theta about the camera's right axis (negated) raises it; pitch first, then yaw about the vertical.
        pitch = Rotation.from_rotvec(-math.radians(move.theta * f) * right)
        yaw = Rotation.from_rotvec(math.radians(move.phi * f) * up_down)
        out.append(_rig_about(pivot, yaw * pitch))
    return out


def _check_start(start: Cameras, median_depth: float) -> None:
    if not isinstance(start, Cameras) or len(start) != 1:
        raise ValueError("A trajectory starts from exactly one camera; pass a Cameras batch of length 1.")
    if not (isinstance(median_depth, (int, float)) and math.isfinite(median_depth) and median_depth > 0):
        raise ValueError(f"Median depth must be a positive finite number; got {median_depth!r}.")


def _assemble(start: Cameras, c2w: list[np.ndarray], motion_list: Optional[list[str]] = None) -> Cameras:
    w2c_t = rigid_inverse(torch.as_tensor(np.stack(c2w), dtype=torch.float64)).to(start.device, start.dtype)
    w2c_t[0] = start.w2c[0]  # frame 0 is the start camera bit for bit
    k = start.K[:1].expand(len(c2w), 3, 3).clone()
    return Cameras(w2c_t, k, start.width, start.height, motion_list=motion_list)


def _split_frames(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def cameras_from_moves(
    moves: Sequence[Motion],
    start: Cameras,
    median_depth: float,
    frames_per_move: Sequence[int],
    ease: bool = False,
    motion_list: Optional[list[str]] = None,
) -> Cameras:
    """Chain ``moves``; move ``i`` gets ``frames_per_move[i]`` frames after its start.  The result has
    ``1 + sum(frames_per_move)`` cameras, the first being ``start``."""
    _check_start(start, float(median_depth))
    if len(moves) != len(frames_per_move) or not moves:
        raise ValueError("Give one frame count per move, and at least one move.")
    if any(int(n) < 1 for n in frames_per_move):
        raise ValueError("Every move needs at least one frame; use more frames or fewer moves.")
    c2w0 = start.c2w[0].detach().cpu().double().numpy()
    up_down = c2w0[:3, 1].copy()
    poses = [c2w0]
    current = c2w0
    for move, n in zip(moves, frames_per_move):
        transforms = _move_transforms(move, current, up_down, float(median_depth), _profile(int(n), ease))
        poses.extend(a @ current for a in transforms)
        current = poses[-1]
    return _assemble(start, poses, motion_list)


def cameras_from_motion_list(
    motion_list: list[str], start: Cameras, median_depth: float, frames: int, ease: bool = False
) -> Cameras:
    """Official ``motion_list`` to ``frames`` cameras (frame 0 = ``start``; the rest split evenly)."""
    if not isinstance(motion_list, (list, tuple)) or not motion_list:
        raise ValueError("A motion list needs at least one move string.")
    moves = [parse_motion(m) for m in motion_list]
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < len(moves) + 1:
        raise ValueError(f"{len(moves)} moves need at least {len(moves) + 1} frames; got {frames!r}.")
    return cameras_from_moves(
        moves, start, median_depth, _split_frames(int(frames) - 1, len(moves)), ease=ease, motion_list=list(motion_list)
    )


# ---- presets ----------------------------------------------------------------------------------------
def _preset_moves(name: str, amount: float, d: float) -> list[Motion]:
    if name in ("left", "right", "orbit"):
        return [Motion("orbit", name, phi=amount if name == "left" else -amount)]
    if name in ("up", "down"):
        return [Motion("orbit", name, theta=amount if name == "up" else -amount)]
    if name in ("forward", "backward"):
        return [Motion("translate", name, distance=amount * d)]
    raise KeyError(name)


def _pan(start: Cameras, amount: float, frames: int, ease: bool, right: bool) -> Cameras:
    c2w0 = start.c2w[0].detach().cpu().double().numpy()
    # A fixed-axis turn: Slerp between the end rotations is exact up to 180 deg, so longer pans are
    # slerped through intermediate keys no more than 90 deg apart.
    sign = 1.0 if right else -1.0
    n_keys = max(1, math.ceil(abs(amount) / 90.0))
    key_angles = np.linspace(0.0, math.radians(amount), n_keys + 1)
    keys = Rotation.from_rotvec(sign * key_angles[:, None] * c2w0[:3, 1][None, :])
    slerp = Slerp(np.linspace(0.0, 1.0, n_keys + 1), keys)
    fr = np.concatenate([[0.0], _profile(frames - 1, ease)])
    poses = []
    for r in slerp(fr):
        p = c2w0.copy()
        p[:3, :3] = r.as_matrix() @ c2w0[:3, :3]
        poses.append(p)
    return _assemble(start, poses)


def _eloop(start: Cameras, amount: float, frames: int, d: float, ease: bool) -> Cameras:
    """Centre on an ellipse (semi-axes ``amount*d`` across, half that vertically) through the start
    position in the plane facing the pivot; the camera looks at the pivot with the start's up."""
    c2w0 = start.c2w[0].detach().cpu().double().numpy()
    a, b = amount * d, 0.5 * amount * d
    s = 2 * math.pi * np.concatenate([[0.0], _profile(frames - 1, ease)])
    pivot = np.array([0.0, 0.0, d])
    poses = []
    for ang in s:
        # In start-camera coordinates; the ellipse centre sits b above the start so frame 0 is on it.
        c = np.array([a * math.sin(ang), -b * (1 - math.cos(ang)), 0.0])
        z = pivot - c
        z /= np.linalg.norm(z)
        x = np.cross(np.array([0.0, 1.0, 0.0]), z)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        local = np.eye(4)
        local[:3, :3] = np.stack([x, y, z], axis=1)
        local[:3, 3] = c
        poses.append(c2w0 @ local)
    return _assemble(start, poses)


def amount_in_range(spec: TrajectorySpec, amount) -> bool:
    """Whether ``amount`` is one the preset takes: a finite real number above 0 and at most its ``max_amount``."""
    return isinstance(amount, (int, float)) and math.isfinite(amount) and 0 < amount <= spec.max_amount


def make_trajectory(
    name: str,
    start: Cameras,
    median_depth: float,
    frames: Optional[int] = None,
    amount: Optional[float] = None,
    *,
    ease: bool = False,
) -> Cameras:
    """Cameras of preset ``name`` (see ``PRESETS``) from ``start``; frame 0 equals ``start``.

    ``amount`` is degrees for angle presets and a fraction of ``median_depth`` for distance presets;
    ``frames`` counts every camera including the start.
    """
    spec = PRESETS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"Unknown trajectory {name!r}; choose one of: {', '.join(PRESETS)}.")
    frames = spec.frames if frames is None else frames
    amount = spec.amount if amount is None else amount
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2 or frames > 10000:
        raise ValueError(f"A trajectory needs between 2 and 10000 frames; got {frames!r}.")
    frames = int(frames)
    unit = "degrees" if spec.kind == "angle" else "times the median depth"
    if not amount_in_range(spec, amount):
        raise ValueError(f"Trajectory {name!r} takes an amount above 0 and at most {spec.max_amount:g} {unit}; got {amount!r}.")
    amount = float(amount)
    _check_start(start, median_depth)
    d = float(median_depth)
    if name in ("pan_left", "pan_right"):
        return _pan(start, amount, frames, ease, right=name == "pan_right")
    if name == "eloop":
        return _eloop(start, amount, frames, d, ease)
    return cameras_from_moves(_preset_moves(name, amount, d), start, d, [frames - 1], ease=ease)


__all__ = [
    "DEFAULT_FRAMES",
    "Motion",
    "PRESETS",
    "TrajectorySpec",
    "cameras_from_motion_list",
    "cameras_from_moves",
    "make_trajectory",
    "parse_motion",
]
