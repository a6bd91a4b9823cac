"""Camera batches in the official WorldStereo convention, and the official ``camera.json`` format.

Conventions (fixed here, used everywhere):
- OpenCV axes: x right, y down, z forward. ``w2c`` is world-to-camera ``[N,4,4]``; ``K`` is ``[N,3,3]``
  in pixels of a ``width`` x ``height`` image.
- Pixel ``(row i, column j)`` covers ``u in [j, j+1)``, ``v in [i, i+1)``; its centre is ``(j+0.5, i+0.5)``.
  The official files put the principal point at ``(W/2, H/2)``, the exact image centre in this convention.
- A point projects to pixel ``(floor(v), floor(u))`` with ``u = fx*x/z + cx``, ``v = fy*y/z + cy``.

The camera-file rule: every camera file a person hands in (CLI ``generate``/``render``/``conditions`` with
``--camera-json``, ``--trajectory FILE`` or ``--render-dir``, the demo's camera.json, its plan view and the 3D
editor's load) is read by ``read_camera_json`` and checked by ``Cameras.from_json_dict``; nothing else parses one.
The file is bounded before it is parsed (size, nesting depth, digits per number, no NaN/Infinity literals) and its
cameras after (count, finite float32 values, rigid poses, pinhole intrinsics without skew, image size, field of
view, principal point, distance of the centres from the origin). Each refusal is one sentence.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, Path]

# ---- the camera-file rule's bounds (module notes) ------------------------------------------------------------
MAX_CAMERA_FILE_BYTES = 4 * 1024 * 1024  # 1000 cameras pretty-printed take about 2 MB
MAX_CAMERAS = 1000
MAX_JSON_DEPTH = 8  # an official file nests 4 deep (object, list, matrix, row); a path file's keyframes 5
MAX_NUMBER_DIGITS = 40  # digits in a row in one number (a float64 needs 17 significant ones)
MIN_FOV, MAX_FOV = 5.0, 170.0  # degrees, across each image axis
MAX_CENTRE = 1.0e4  # how far a camera centre may lie from the world origin, in scene units (metres for MoGe depth)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # every value must survive the renderer's float32
# The image size a file declares is bounded like an input photo's: engine.images.MAX_PIXELS.

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (MAX_NUMBER_DIGITS + 1))


class CameraFormatError(ValueError):
    """A camera file or camera batch that cannot be used; the message is one readable sentence."""


def read_camera_json(path: PathLike, what: str = "Camera file") -> Any:
    """A camera file's JSON, bounded before it is parsed (module notes): at most ``MAX_CAMERA_FILE_BYTES`` read,
    nesting at most ``MAX_JSON_DEPTH`` deep, at most ``MAX_NUMBER_DIGITS`` digits in a row, no NaN or Infinity
    literal. So no file reaches Python's recursion limit, its int-size limit or an unbounded allocation."""
    path = Path(path)
    name = f"{what} {path.name}"  # the name only: a server must not echo its own folder layout
    try:
        if not path.is_file():
            raise FileNotFoundError
        with open(path, "rb") as f:
            raw = f.read(MAX_CAMERA_FILE_BYTES + 1)
    except OSError:
        raise CameraFormatError(f"{name} does not exist or is not a readable file.") from None
    if len(raw) > MAX_CAMERA_FILE_BYTES:
        raise CameraFormatError(f"{name} is larger than {MAX_CAMERA_FILE_BYTES >> 20} MB, more than a camera file "
                                f"of at most {MAX_CAMERAS} cameras needs.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CameraFormatError(f"{name} is not valid JSON (UnicodeDecodeError).") from None
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)  # brackets and digits outside strings
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int8) - np.isin(bare, (ord("]"), ord("}")))
    if len(step) and int(np.cumsum(step, dtype=np.int32).max()) > MAX_JSON_DEPTH:
        raise CameraFormatError(f"{name} nests lists or objects more than {MAX_JSON_DEPTH} levels deep; an "
                                "official camera file nests them 4 deep.")
    if _LONG_NUMBER.search(bare.tobytes()):
        raise CameraFormatError(f"{name} holds a number of more than {MAX_NUMBER_DIGITS} digits; write plain "
                                "floating-point numbers.")

    def no_constant(literal: str):
        raise CameraFormatError(f"{name} holds the literal {literal}; its values must be finite numbers, not NaN or "
                                "infinite.")

    try:
        return json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise CameraFormatError(f"{name} is not valid JSON ({e.__class__.__name__}).") from None


def _check_image_size(width: int, height: int, source: str) -> None:
    from engine.images import MAX_PIXELS

    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise CameraFormatError(f"{source}: an image size of {width}x{height} is outside what the engine renders "
                                f"(1 to {MAX_PIXELS // 1_000_000} megapixels).")


def _check_camera_values(w2c: np.ndarray, k: np.ndarray, width: int, height: int, source: str) -> None:
    """The camera-file rule's checks of the cameras themselves (module notes); ``w2c`` and ``k`` are finite float32
    values of the right shapes, ``width`` x ``height`` the size the intrinsics are pixels of."""
    r = w2c[:, :3, :3]
    ortho = np.abs(r @ r.transpose(0, 2, 1) - np.eye(3)).max()
    det = np.linalg.det(r)
    if ortho > 1e-3 or (det < 0).any() or np.abs(w2c[:, 3] - [0, 0, 0, 1]).max() > 1e-6:
        raise CameraFormatError(f"{source}: extrinsics must be rigid world-to-camera transforms "
                                "(rotation + translation).")
    centres = np.linalg.norm(np.einsum("nji,nj->ni", r, w2c[:, :3, 3]), axis=1)
    if centres.max() > MAX_CENTRE:
        i = int(centres.argmax())
        raise CameraFormatError(f"{source}: camera {i} sits {centres[i]:.3g} scene units from the origin; camera "
                                f"centres must lie within {MAX_CENTRE:g} of it.")
    fx, fy, cx, cy = k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2]
    if (fx <= 0).any() or (fy <= 0).any():
        raise CameraFormatError(f"{source}: intrinsics must have positive focal lengths.")
    if np.abs(k[:, 2] - [0, 0, 1]).max() > 1e-6 or np.abs(k[:, 1, 0]).max() > 1e-6:
        raise CameraFormatError(f"{source}: intrinsics must be pinhole matrices with last row (0, 0, 1).")
    if (np.abs(k[:, 0, 1]) > 1e-6 * fx).any():
        raise CameraFormatError(f"{source}: intrinsics must have zero skew (the engine renders skew-free cameras).")
    _check_image_size(width, height, source)
    outside = (cx < 0) | (cx > width) | (cy < 0) | (cy > height)
    if outside.any():
        i = int(outside.argmax())
        raise CameraFormatError(f"{source}: camera {i} has its principal point ({cx[i]:.6g}, {cy[i]:.6g}) outside "
                                f"its {width}x{height} image.")
    for axis, size, f in (("width", width, fx), ("height", height, fy)):
        fov = np.degrees(2 * np.arctan(0.5 * size / f))
        bad = (fov < MIN_FOV) | (fov > MAX_FOV)
        if bad.any():
            i = int(bad.argmax())
            raise CameraFormatError(f"{source}: camera {i} sees {fov[i]:.3g} degrees across the image {axis}; the "
                                    f"field of view must be {MIN_FOV:g} to {MAX_FOV:g} degrees.")


def _as_tensor(x: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype or torch.float64)


def rigid_inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4x4 transforms ``[...,4,4]`` (exact, no general matrix inverse)."""
    r = m[..., :3, :3]
    t = m[..., :3, 3:]
    out = torch.zeros_like(m)
    rt = r.transpose(-1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = -rt @ t
    out[..., 3, 3] = 1
    return out


def intrinsics_matrix(fx, fy, cx, cy, n: int = 1, dtype=torch.float64) -> torch.Tensor:
    k = torch.zeros(n, 3, 3, dtype=dtype)
    k[:, 0, 0] = fx
    k[:, 1, 1] = fy
    k[:, 0, 2] = cx
    k[:, 1, 2] = cy
    k[:, 2, 2] = 1
    return k


def intrinsics_from_fov(width: int, height: int, fov_x_deg: float, n: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Square-pixel intrinsics with the principal point at the image centre."""
    f = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return intrinsics_matrix(f, f, width / 2, height / 2, n=n, dtype=dtype)


def pixel_centers(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[H,W,2]`` pixel-centre coordinates ``(u, v)``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


@dataclass
class Cameras:
    """A batch of N pinhole cameras sharing one image size.

    ``meta`` keeps every other key of an official ``camera.json`` (``width``, ``height``, ``type``,
    ``rotation_deg`` ...) in file order so a read-then-write reproduces the file (``None`` for cameras made
    in code: they are written with ``width`` and ``height``); ``motion_list`` keeps the official moves.
    """

    w2c: torch.Tensor
    K: torch.Tensor
    width: int
    height: int
    motion_list: Optional[list[str]] = None
    meta: Optional[dict] = None

    def __post_init__(self) -> None:
        self.w2c = _as_tensor(self.w2c)
        self.K = _as_tensor(self.K, self.w2c.dtype).to(self.w2c.device)
        if self.w2c.dim() == 2:
            self.w2c = self.w2c.unsqueeze(0)
        if self.K.dim() == 2:
            self.K = self.K.unsqueeze(0)
        if self.K.shape[0] == 1 and self.w2c.shape[0] > 1:
            self.K = self.K.expand(self.w2c.shape[0], 3, 3).clone()
        if self.w2c.shape[1:] != (4, 4) or self.K.shape[1:] != (3, 3) or self.w2c.shape[0] != self.K.shape[0]:
            raise CameraFormatError(
                f"Camera batch needs extrinsics [N,4,4] and intrinsics [N,3,3] with the same N; "
                f"got {tuple(self.w2c.shape)} and {tuple(self.K.shape)}."
            )
        self.width = int(self.width)
        self.height = int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise CameraFormatError(f"Camera image size must be positive; got {self.width}x{self.height}.")

    # ---- batch basics -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.w2c.shape[0]

    @property
    def device(self) -> torch.device:
        return self.w2c.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w2c.dtype

    def to(self, device=None, dtype=None) -> "Cameras":
        return replace(self, w2c=self.w2c.to(device=device, dtype=dtype), K=self.K.to(device=device, dtype=dtype))

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return replace(self, w2c=self.w2c[idx], K=self.K[idx], motion_list=None)

    @staticmethod
    def cat(batches: Sequence["Cameras"]) -> "Cameras":
        if not batches:
            raise CameraFormatError("Cannot concatenate an empty list of camera batches.")
        first = batches[0]
        for b in batches[1:]:
            if (b.width, b.height) != (first.width, first.height):
                raise CameraFormatError("Camera batches with different image sizes cannot be concatenated.")
        return Cameras(
            torch.cat([b.w2c.to(first.device, first.dtype) for b in batches]),
            torch.cat([b.K.to(first.device, first.dtype) for b in batches]),
            first.width,
            first.height,
        )

    # ---- poses ----------------------------------------------------------------------------------
    @property
    def c2w(self) -> torch.Tensor:
        return rigid_inverse(self.w2c)

    @property
    def R(self) -> torch.Tensor:
        return self.w2c[:, :3, :3]

    @property
    def t(self) -> torch.Tensor:
        return self.w2c[:, :3, 3]

    @property
    def centers(self) -> torch.Tensor:
        """Camera centres in world coordinates ``[N,3]``."""
        return -(self.R.transpose(1, 2) @ self.t.unsqueeze(-1)).squeeze(-1)

    @property
    def forward(self) -> torch.Tensor:
        """Optical axes (camera +z) in world coordinates ``[N,3]``."""
        return self.R[:, 2, :]

    # ---- intrinsics -----------------------------------------------------------------------------
    def resized(self, width: int, height: int) -> "Cameras":
        """The same cameras for the image resized to ``width`` x ``height`` (intrinsics scaled per axis)."""
        sx, sy = width / self.width, height / self.height
        k = self.K.clone()
        k[:, 0, :] *= sx
        k[:, 1, :] *= sy
        k[:, 2, :] = self.K[:, 2, :]
        return self._with_size(k, width, height)

    def _with_size(self, k: torch.Tensor, width: int, height: int) -> "Cameras":
        meta = None if self.meta is None else dict(self.meta)
        if meta is not None and "width" in meta:
            meta["width"] = int(width)
        if meta is not None and "height" in meta:
            meta["height"] = int(height)
        return replace(self, K=k, width=int(width), height=int(height), meta=meta)

    # ---- projection -----------------------------------------------------------------------------
    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """``points [P,3]`` (or ``[N,P,3]``) to camera coordinates ``[N,P,3]``."""
        pts = points.to(self.w2c.dtype)
        if pts.dim() == 2:
            return pts @ self.R.transpose(1, 2) + self.t[:, None, :]
        return torch.einsum("nij,npj->npi", self.R, pts) + self.t[:, None, :]

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points; returns ``uv [N,P,2]`` (pixels) and ``z [N,P]`` (camera depth)."""
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        safe = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
        fx, fy = self.K[:, 0, 0, None], self.K[:, 1, 1, None]
        cx, cy = self.K[:, 0, 2, None], self.K[:, 1, 2, None]
        uv = torch.stack([fx * cam[..., 0] / safe + cx, fy * cam[..., 1] / safe + cy], dim=-1)
        return uv, z

    def ray_directions_camera(self, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """Camera-frame directions ``[N,H,W,3]`` through pixel centres with z = 1 (so depth * dir = point)."""
        cams = self if height is None else self.resized(width, height)
        uv = pixel_centers(cams.height, cams.width, cams.device, cams.dtype)
        fx, fy = cams.K[:, 0, 0], cams.K[:, 1, 1]
        cx, cy = cams.K[:, 0, 2], cams.K[:, 1, 2]
        x = (uv[None, ..., 0] - cx[:, None, None]) / fx[:, None, None]
        y = (uv[None, ..., 1] - cy[:, None, None]) / fy[:, None, None]
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)

    def unproject(self, depth: torch.Tensor) -> torch.Tensor:
        """Depth maps ``[N,H,W]`` (z-depth) to world points ``[N,H,W,3]``."""
        n, h, w = depth.shape
        if h != self.height or w != self.width:
            return self.resized(w, h).unproject(depth)
        d = self.ray_directions_camera().to(depth.dtype)
        cam = d * depth[..., None]
        c2w = self.c2w.to(depth.dtype)
        return torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], cam) + c2w[:, None, None, :3, 3]

    def rays(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space ray origins and unit directions through pixel centres, each ``[N,H,W,3]``."""
        d_cam = self.ray_directions_camera(height, width)
        d = torch.einsum("nij,nhwj->nhwi", self.R.transpose(1, 2), d_cam)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.centers[:, None, None, :].expand_as(d)
        return o, d

    # ---- official camera.json -------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        out: dict = {}
        if self.motion_list is not None:
            out["motion_list"] = list(self.motion_list)
        out["extrinsic"] = self.w2c.detach().cpu().double().tolist()
        out["intrinsic"] = self.K.detach().cpu().double().tolist()
        out.update(self.meta if self.meta is not None else {"width": self.width, "height": self.height})
        return out

    def save_json(self, path: PathLike) -> Path:
        from engine.atomicio import atomic_write_json

        return atomic_write_json(path, self.to_json_dict())

    @classmethod
    def from_json_dict(
        cls, data: Any, width: Optional[int] = None, height: Optional[int] = None, source: str = "camera data"
    ) -> "Cameras":
        if not isinstance(data, dict) or "extrinsic" not in data or "intrinsic" not in data:
            raise CameraFormatError(f"{source} is not an official camera file: it needs 'extrinsic' and 'intrinsic' lists.")
        counts = [len(v) if isinstance(v, list) else 0 for v in (data["extrinsic"], data["intrinsic"])]
        if max(counts) > MAX_CAMERAS:
            raise CameraFormatError(f"{source} holds {max(counts)} cameras; a camera file may hold at most "
                                    f"{MAX_CAMERAS}.")
        try:
            w2c = np.asarray(data["extrinsic"], dtype=np.float64)
            k = np.asarray(data["intrinsic"], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise CameraFormatError(f"{source}: 'extrinsic' and 'intrinsic' must be lists of numeric matrices.") from None
        if w2c.ndim != 3 or w2c.shape[1:] != (4, 4) or w2c.shape[0] == 0:
            raise CameraFormatError(f"{source}: 'extrinsic' must be a non-empty list of 4x4 matrices; got shape {w2c.shape}.")
        if k.ndim != 3 or k.shape[1:] != (3, 3):
            raise CameraFormatError(f"{source}: 'intrinsic' must be a list of 3x3 matrices; got shape {k.shape}.")
        if k.shape[0] != w2c.shape[0]:
            raise CameraFormatError(
                f"{source}: {w2c.shape[0]} extrinsics but {k.shape[0]} intrinsics; there must be one of each per frame."
            )
        if not (np.isfinite(w2c).all() and np.isfinite(k).all()):
            raise CameraFormatError(f"{source}: camera matrices contain NaN or infinite values.")
        if max(np.abs(w2c).max(), np.abs(k).max()) > FLOAT32_MAX:
            raise CameraFormatError(f"{source}: camera matrices hold values beyond the float32 range (3.4e38).")
        meta = {key: v for key, v in data.items() if key not in ("extrinsic", "intrinsic", "motion_list")}
        for key in ("width", "height"):
            if key in meta and not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and meta[key] > 0):
                raise CameraFormatError(f"{source}: '{key}' must be a positive whole number of pixels.")
        _check_image_size(meta.get("width", 1), meta.get("height", 1), source)  # as declared, even when overridden
        if width is not None and height is not None and "width" in meta:
            meta.update(width=int(width), height=int(height))  # an explicit size wins, and is what gets written
        width = int(width or meta.get("width") or round(2 * k[0, 0, 2]))
        height = int(height or meta.get("height") or round(2 * k[0, 1, 2]))
        _check_camera_values(w2c, k, width, height, source)
        motion = data.get("motion_list")
        if motion is not None and not (isinstance(motion, list) and all(isinstance(m, str) for m in motion)):
            raise CameraFormatError(f"{source}: 'motion_list' must be a list of strings.")
        return cls(torch.from_numpy(w2c), torch.from_numpy(k), width, height, motion_list=motion, meta=meta)

    @classmethod
    def from_json(cls, path: PathLike, width: Optional[int] = None, height: Optional[int] = None) -> "Cameras":
        """Read an official ``camera.json``. Without ``width``/``height`` keys the size is taken from the
        arguments or, failing those, from the principal point (official files centre it)."""
        path = Path(path)
        return cls.from_json_dict(read_camera_json(path), width, height, source=f"Camera file {path.name}")


def load_camera_bank(path: PathLike) -> tuple[list[str], Cameras]:
    """Read a panorama bank ``cameras.json`` (``{"0000": {"intrinsic", "extrinsic"}, ...}``) in key order."""
    path = Path(path)
    data = read_camera_json(path, "Camera bank")
    try:
        names = sorted(data)
        merged = {"extrinsic": [data[n]["extrinsic"] for n in names], "intrinsic": [data[n]["intrinsic"] for n in names]}
    except (TypeError, KeyError, AttributeError):
        raise CameraFormatError(
            f"Camera bank {path.name} must map frame names to {{'intrinsic', 'extrinsic'}} objects."
        ) from None
    return names, Cameras.from_json_dict(merged, source=f"Camera bank {path.name}")
