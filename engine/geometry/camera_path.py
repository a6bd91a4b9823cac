"""Camera paths drawn by hand: keyframes (pose + field of view) splined into a trajectory.

A *keyframe* is a camera-to-world pose in the project's OpenCV axes (x right, y down, z forward) and a
vertical field of view in degrees. A path through keyframes ``0..K-1`` is sampled at ``frames`` cameras:

- Timing: every keyframe-to-keyframe segment takes the same time; frame ``i`` sits at path parameter
  ``s_i = i (K-1) / (frames-1)``, so frame 0 is keyframe 0 and the last frame the last keyframe.
- Positions: a natural cubic spline through the keyframe centres at knots ``0..K-1``
  (``scipy.interpolate.CubicSpline``); two keyframes give the straight segment between them.
- Rotations: spherical linear interpolation between consecutive keyframes (``scipy.spatial.transform.Slerp``),
  i.e. the shortest rotation from one keyframe's orientation to the next at constant angular speed.
- Field of view: linear in degrees between consecutive keyframes.
- Intrinsics: square pixels of the *base* camera's aspect: ``fy = H / (2 tan(fov/2))``, ``fx = fy * fx0/fy0``,
  the base camera's principal point. A keyframe made from the base camera gives back its ``K``.

Files: a path is saved as an official WorldStereo ``camera.json`` (``extrinsic`` / ``intrinsic`` of every
sampled frame, ``width``, ``height``) with one extra key, ``keyframes``, holding the keyframes in the same
format, so a saved path loads back exactly while the official loader and ``--camera-json`` read it as a
plain trajectory. A camera file without that key loads with up to ``MAX_PICKED_KEYFRAMES`` of its cameras,
evenly spaced and always including the first and the last, as keyframes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation, Slerp

from engine.geometry.cameras import (MAX_CENTRE, MAX_FOV, MIN_FOV, CameraFormatError, Cameras, read_camera_json,
                                     rigid_inverse)

PathLike = Union[str, Path]
MAX_KEYFRAMES = 64
MAX_PICKED_KEYFRAMES = 8
KEYFRAMES_KEY = "keyframes"


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: ``c2w`` ``[4,4]`` float64 (OpenCV camera axes) and the vertical field of view in degrees."""

    c2w: np.ndarray
    fov: float

    @classmethod
    def make(cls, position: Sequence[float], wxyz: Sequence[float], fov: float) -> "Keyframe":
        """From a centre and a unit quaternion ``(w, x, y, z)`` of the camera-to-world rotation."""
        c2w = np.eye(4)
        w, x, y, z = (float(v) for v in wxyz)
        c2w[:3, :3] = Rotation.from_quat([x, y, z, w]).as_matrix()  # scipy normalises the quaternion
        c2w[:3, 3] = np.asarray(position, dtype=np.float64)
        return cls(c2w, float(fov)).checked()

    def checked(self) -> "Keyframe":
        c2w = np.asarray(self.c2w, dtype=np.float64)
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise ValueError("A keyframe pose must be a finite 4x4 matrix.")
        with np.errstate(over="ignore"):  # a norm that overflows is inf, and refused like any other too far
            far = np.linalg.norm(c2w[:3, 3]) > MAX_CENTRE
        if far:
            raise ValueError(f"A keyframe must lie within {MAX_CENTRE:g} scene units of the world origin.")
        if not (isinstance(self.fov, (int, float)) and math.isfinite(self.fov) and MIN_FOV <= self.fov <= MAX_FOV):
            raise ValueError(f"A keyframe's field of view must be {MIN_FOV:g} to {MAX_FOV:g} degrees; got {self.fov!r}.")
        return self

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self.c2w[:3, 3], dtype=np.float64)

    @property
    def wxyz(self) -> np.ndarray:
        x, y, z, w = Rotation.from_matrix(self.c2w[:3, :3]).as_quat()
        return np.array([w, x, y, z])

    def moved(self, position=None, wxyz=None, fov=None) -> "Keyframe":
        return Keyframe.make(self.position if position is None else position, self.wxyz if wxyz is None else wxyz,
                             self.fov if fov is None else fov)


def fov_of(cameras: Cameras) -> np.ndarray:
    """Vertical field of view in degrees of each camera, ``2 atan(H / (2 fy))``."""
    fy = cameras.K[:, 1, 1].detach().cpu().double().numpy()
    return np.degrees(2 * np.arctan(0.5 * cameras.height / fy))


def keyframes_from_cameras(cameras: Cameras) -> list[Keyframe]:
    """Every camera of ``cameras`` as a keyframe (pose and vertical field of view)."""
    c2w = cameras.c2w.detach().cpu().double().numpy()
    return [Keyframe(m, float(f)).checked() for m, f in zip(c2w, fov_of(cameras))]


def _check_keyframes(keyframes: Sequence[Keyframe]) -> None:
    if len(keyframes) < 2:
        raise ValueError("A camera path needs at least two keyframes; add one more.")
    if len(keyframes) > MAX_KEYFRAMES:
        raise ValueError(f"A camera path takes at most {MAX_KEYFRAMES} keyframes; got {len(keyframes)}.")
    for k in keyframes:
        k.checked()


def path_parameters(n_keyframes: int, frames: int) -> np.ndarray:
    """Path parameter of each frame (keyframe ``k`` is at ``k``; equal time per segment)."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"A camera path needs at least 2 frames; got {frames!r}.")
    s = np.linspace(0.0, n_keyframes - 1.0, int(frames))
    s[-1] = n_keyframes - 1.0
    return s


def spline_positions(keyframes: Sequence[Keyframe], s: np.ndarray) -> np.ndarray:
    """Centres ``[len(s),3]`` on the path at parameters ``s`` (module notes: natural cubic spline)."""
    _check_keyframes(keyframes)
    knots = np.arange(len(keyframes), dtype=np.float64)
    centres = np.stack([k.position for k in keyframes])
    if len(keyframes) == 2:
        t = np.asarray(s, dtype=np.float64)[:, None]
        return (1 - t) * centres[0] + t * centres[1]
    return CubicSpline(knots, centres, axis=0, bc_type="natural")(s)


def path_cameras(keyframes: Sequence[Keyframe], frames: int, base: Cameras) -> Cameras:
    """``frames`` cameras along the keyframes (rules in the module notes); ``base`` (one camera) gives the
    image size, principal point and pixel aspect."""
    _check_keyframes(keyframes)
    if not isinstance(base, Cameras) or len(base) != 1:
        raise ValueError("A camera path needs one base camera for its image size and principal point.")
    s = path_parameters(len(keyframes), frames)
    knots = np.arange(len(keyframes), dtype=np.float64)
    rotations = Rotation.from_matrix(np.stack([k.c2w[:3, :3] for k in keyframes]))
    c2w = np.tile(np.eye(4), (len(s), 1, 1))
    c2w[:, :3, :3] = Slerp(knots, rotations)(s).as_matrix()
    c2w[:, :3, 3] = spline_positions(keyframes, s)
    fov = np.interp(s, knots, [k.fov for k in keyframes])
    k0 = base.K[0].detach().cpu().double()
    fy = 0.5 * base.height / np.tan(np.radians(fov) / 2)
    K = k0.expand(len(s), 3, 3).clone()
    K[:, 1, 1] = torch.as_tensor(fy)
    K[:, 0, 0] = torch.as_tensor(fy) * (k0[0, 0] / k0[1, 1])
    w2c = rigid_inverse(torch.as_tensor(c2w))
    return Cameras(w2c.to(base.dtype), K.to(base.dtype), base.width, base.height)


# ---- files ------------------------------------------------------------------------------------------

def _keyframe_cameras(keyframes: Sequence[Keyframe], base: Cameras) -> Cameras:
    """The keyframes themselves as cameras of the base camera's size (one per keyframe)."""
    cams = [path_cameras([k, k], 2, base)[0:1] for k in keyframes]
    return Cameras.cat(cams)


def path_json(keyframes: Sequence[Keyframe], frames: int, base: Cameras) -> dict:
    """The official ``camera.json`` of the sampled path plus the ``keyframes`` key (module notes)."""
    data = path_cameras(keyframes, frames, base).to_json_dict()
    kf = _keyframe_cameras(keyframes, base).to_json_dict()
    data[KEYFRAMES_KEY] = {"extrinsic": kf["extrinsic"], "intrinsic": kf["intrinsic"]}
    return data


def save_path(path: PathLike, keyframes: Sequence[Keyframe], frames: int, base: Cameras) -> Path:
    from engine.atomicio import atomic_write_json

    return atomic_write_json(path, path_json(keyframes, frames, base))


def load_path(path: PathLike, base: Cameras) -> list[Keyframe]:
    """Keyframes of a camera file (its ``keyframes`` key, else evenly picked cameras), at ``base``'s size."""
    path = Path(path)
    data = read_camera_json(path)  # the camera-file rule, as for every camera file
    cams = Cameras.from_json_dict(data, source=f"Camera file {path.name}")
    if KEYFRAMES_KEY in data:
        part = data[KEYFRAMES_KEY]
        if not isinstance(part, dict):
            raise CameraFormatError(f"Camera file {path.name}: '{KEYFRAMES_KEY}' must hold 'extrinsic' and 'intrinsic'.")
        keys = Cameras.from_json_dict({**part, "width": cams.width, "height": cams.height},
                                      source=f"Camera file {path.name} ({KEYFRAMES_KEY})")
    else:
        picks = np.unique(np.linspace(0, len(cams) - 1, min(MAX_PICKED_KEYFRAMES, len(cams))).round().astype(int))
        keys = cams[picks.tolist()]
    if len(keys) < 2:
        raise CameraFormatError(f"Camera file {path.name} holds one camera; a path needs at least two.")
    if len(keys) > MAX_KEYFRAMES:
        raise CameraFormatError(f"Camera file {path.name} holds {len(keys)} keyframes; at most {MAX_KEYFRAMES} are allowed.")
    if (keys.width, keys.height) != (base.width, base.height):
        keys = keys.resized(base.width, base.height)
    try:
        return keyframes_from_cameras(keys)
    except ValueError as e:
        raise CameraFormatError(f"Camera file {path.name}: {e}") from None
