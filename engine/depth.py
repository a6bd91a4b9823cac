"""Monocular depth: MoGe-2 (``moge`` package) when its weights can be had, a stated fallback when not.

Every estimator returns a ``DepthEstimate`` in the project's camera convention (OpenCV axes, pixel-centre
intrinsics in pixels, z-depth): ``points[..., i, j] = depth[..., i, j] * K^-1 (j+0.5, i+0.5, 1)``.
Pixels outside ``mask`` (sky, no data) carry depth 0 and point (0, 0, 0), so nothing downstream mistakes
them for geometry.

Fallbacks, used when MoGe weights are missing (offline, not in the cache) and always announced in one line:

- ``PlaneDepth`` for photos: a fronto-parallel plane at ``DEFAULT_PLANE_DEPTH`` metres with a
  ``DEFAULT_FOV_X``-degree horizontal field of view. Camera moves then parallax like a postcard, which is
  honest about knowing nothing of the scene's shape.
- ``SphereDepth`` for panoramas (applied to the perspective views cut from them): every pixel at the same
  distance ``DEFAULT_SPHERE_RADIUS`` from the centre, so all views of one panorama agree on one sphere.
- ``UserDepth``: the person's own depth map of the input photo (``engine.user_depth``: which files are one,
  their formats and reading).

The plane and the sphere say nothing about a *generated* frame: giving each new frame its own plane 3 m
away would fan the cloud out into one flat card per frame. So when a scene's depth is a fallback
(``is_fallback``), a generated frame's depth is the 3D cache's own rendered depth, with the holes of the
render filled by ``depth_from_render``: each hole pixel continues the local plane of the nearest covered
pixel. A plane's inverse depth is an affine function of the pixel position (``1/z = a u + b v + c``), so
per covered pixel an affine function is fitted to the inverse depth of the covered pixels in its
``(2r+1)^2`` window (``FILL_RADIUS``), and a hole pixel takes the value of its nearest covered pixel's fit
at its own position: planar surfaces continue exactly and the cloud stays one surface. Where a window is
degenerate (fewer than three covered pixels, or all on a line) the nearest covered depth is used as is,
and a continuation that would leave ``[depth_min / 2, 2 depth_max]`` of the covered depths (a surface
seen edge-on, running off to infinity) is left as a hole.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from engine.geometry.cameras import Cameras, intrinsics_from_fov
from engine.hub import MOGE_REPO, HubFileUnavailable, hub_file, looks_like_repo_id
from engine.user_depth import DepthInputError, is_user_depth_file, read_user_depth

PathLike = Union[str, Path]

MOGE_CHECKPOINT_FILE = "model.pt"
DEFAULT_FOV_X = 60.0  # degrees; a typical phone / compact-camera photo
DEFAULT_PLANE_DEPTH = 3.0  # metres; a room-scale distance
DEFAULT_SPHERE_RADIUS = 3.0  # metres


class DepthUnavailable(RuntimeError):
    """MoGe weights or code that cannot be had here; the message says why in one sentence."""


# ---- result type ---------------------------------------------------------------------------------

@dataclass
class DepthEstimate:
    """Depth of one image (``[H,W]``) or of a batch (leading ``F``), all in the camera frame of each image.

    depth  ``[...,H,W]``   z-depth in metres (MoGe-2 is metric; fallbacks use their stated scale); 0 where invalid
    points ``[...,H,W,3]`` camera-frame points (OpenCV axes); ``points[..., 2] == depth``
    mask   ``[...,H,W]``   bool, True where the depth is real geometry
    K      ``[...,3,3]``   intrinsics in pixels (pixel-centre convention)
    source  'moge-2', 'moge-1', 'plane fallback', 'sphere fallback' or 'user depth'
    """

    depth: torch.Tensor
    points: torch.Tensor
    mask: torch.Tensor
    K: torch.Tensor
    source: str

    @property
    def intrinsics(self) -> torch.Tensor:
        return self.K

    @property
    def height(self) -> int:
        return self.depth.shape[-2]

    @property
    def width(self) -> int:
        return self.depth.shape[-1]

    @property
    def fov_x(self) -> torch.Tensor:
        """Horizontal field of view in degrees (``[...]``)."""
        return torch.rad2deg(2 * torch.atan(0.5 * self.width / self.K[..., 0, 0]))

    def __len__(self) -> int:
        if self.depth.dim() != 3:
            raise TypeError("A single DepthEstimate has no length; only a batch does.")
        return self.depth.shape[0]

    def __getitem__(self, i: int) -> "DepthEstimate":
        if self.depth.dim() != 3:
            raise TypeError("Only a batched DepthEstimate can be indexed.")
        return DepthEstimate(self.depth[i], self.points[i], self.mask[i], self.K[i], self.source)

    def to(self, device=None, dtype=None) -> "DepthEstimate":
        return replace(
            self,
            depth=self.depth.to(device=device, dtype=dtype),
            points=self.points.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            K=self.K.to(device=device, dtype=dtype),
        )

    def cameras(self, w2c: Optional[torch.Tensor] = None) -> Cameras:
        """A ``Cameras`` batch with these intrinsics (identity pose unless ``w2c`` is given)."""
        k = self.K if self.K.dim() == 3 else self.K[None]
        if w2c is None:
            w2c = torch.eye(4, dtype=torch.float64).expand(k.shape[0], 4, 4)
        return Cameras(torch.as_tensor(w2c, dtype=torch.float64), k.double().cpu(), self.width, self.height)

    @staticmethod
    def stack(items: Sequence["DepthEstimate"]) -> "DepthEstimate":
        if not items:
            raise ValueError("Cannot stack an empty list of depth estimates.")
        return DepthEstimate(
            torch.stack([e.depth for e in items]),
            torch.stack([e.points for e in items]),
            torch.stack([e.mask for e in items]),
            torch.stack([e.K for e in items]),
            items[0].source,
        )


def _camera_rays(K: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[H,W,3]`` directions with z = 1 through pixel centres (the camera module's convention)."""
    cams = Cameras(torch.eye(4, dtype=torch.float64), K.detach().double().cpu().reshape(1, 3, 3), width, height)
    return cams.ray_directions_camera()[0]


def _from_depth(depth: torch.Tensor, mask: torch.Tensor, K: torch.Tensor, source: str) -> DepthEstimate:
    """Build a consistent estimate from z-depth, zeroing invalid pixels."""
    h, w = depth.shape[-2:]
    rays = _camera_rays(K, h, w).to(device=depth.device, dtype=depth.dtype)
    mask = mask & torch.isfinite(depth) & (depth > 0)
    depth = torch.where(mask, depth, torch.zeros_like(depth))
    return DepthEstimate(depth, rays * depth[..., None], mask, K.to(device=depth.device, dtype=depth.dtype), source)


def _check_image(image: torch.Tensor, batched: bool) -> None:
    want = 4 if batched else 3
    if image.dim() != want or image.shape[-3] != 3:
        shape = "[F,3,H,W]" if batched else "[3,H,W]"
        raise ValueError(f"Depth estimation needs images shaped {shape} in [0, 1]; got {tuple(image.shape)}.")


def _fov_list(fov_x, n: int) -> list[Optional[float]]:
    if fov_x is None or isinstance(fov_x, (int, float)):
        return [fov_x] * n
    vals = torch.as_tensor(fov_x, dtype=torch.float64).reshape(-1).tolist()
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise ValueError(f"fov_x must be one value or one per frame ({n}); got {len(vals)}.")
    return vals


class DepthEstimator:
    """The one interface of every depth estimator (MoGe, the plane and sphere fallbacks, a person's depth map):
    ``estimate(image [3,H,W], fov_x)`` gives a ``DepthEstimate``, ``estimate_batch`` the same for ``[F,3,H,W]``;
    ``source`` names the estimator, ``describe()`` says it in words, ``fallback`` marks the stand-ins (module notes).
    Subclasses implement ``estimate``."""

    source: str = ""
    fallback = False  # True for the stand-ins used when no depth model is available (module notes)
    # Whether a scene's depth door (``DepthSource``) gives the estimator the camera's field of view: the stand-ins
    # draw their surface through it; a depth model estimates its own.
    takes_camera_fov = True

    def estimate(self, image: torch.Tensor, fov_x: Optional[float] = None) -> DepthEstimate:  # pragma: no cover
        raise NotImplementedError

    def estimate_batch(self, images: torch.Tensor, fov_x=None) -> DepthEstimate:
        _check_image(images, batched=True)
        fovs = _fov_list(fov_x, images.shape[0])
        return DepthEstimate.stack([self.estimate(img, f) for img, f in zip(images, fovs)])

    def describe(self) -> str:
        return self.source


# ---- MoGe ----------------------------------------------------------------------------------------

def resolve_moge_checkpoint(repo_or_dir: PathLike, local_files_only: Optional[bool] = None) -> Path:
    """The local ``model.pt`` for a file, a folder holding one, or a hub repo id (cache first; a download
    only when the hub is not switched off, with a short timeout). Raises ``DepthUnavailable``."""
    p = Path(repo_or_dir).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / MOGE_CHECKPOINT_FILE).is_file():
            return p / MOGE_CHECKPOINT_FILE
        raise DepthUnavailable(f"MoGe folder {p} has no {MOGE_CHECKPOINT_FILE}.")
    spec = str(repo_or_dir)
    if not looks_like_repo_id(spec):
        raise DepthUnavailable(f"MoGe weights '{spec}' are neither a local file or folder nor a Hugging Face repo id.")
    try:
        return hub_file(spec, MOGE_CHECKPOINT_FILE, cache_only=local_files_only)
    except HubFileUnavailable as e:
        if e.why == "failed":
            raise DepthUnavailable(f"MoGe weights '{spec}' could not be downloaded "
                                   f"({e.__cause__.__class__.__name__}).") from None
        raise DepthUnavailable(f"MoGe weights '{spec}' are not in the Hugging Face cache and the hub cannot be "
                               "reached or is switched off.") from None


class MoGeEstimator(DepthEstimator):
    """MoGe (v2, or v1) wrapped to return ``DepthEstimate`` in pixel intrinsics.

    A scene lets MoGe estimate its own field of view, as the release calls it (``infer`` with defaults; release:
    src/data_utils.py ``load_single_view_data``), and places its z-depth along the rays of the scene's camera
    (``DepthSource``): ``estimate(image, fov_x)`` forces a field of view only when asked directly.
    """

    takes_camera_fov = False

    def __init__(self, model: torch.nn.Module, version: str = "v2", resolution_level: int = 9, batch_size: int = 4):
        self.model = model.eval()
        self.version = version
        self.source = "moge-2" if version == "v2" else "moge-1"
        self.resolution_level = resolution_level
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: PathLike = MOGE_REPO,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        local_files_only: Optional[bool] = None,
        **kwargs,
    ) -> "MoGeEstimator":
        """Load a MoGe checkpoint (``model.pt`` with ``model_config`` + ``model``) from a file, a folder or the hub.

        Unlike ``moge``'s own loader, a checkpoint that would leave weights random (missing keys) is refused
        instead of producing plausible-looking nonsense.
        """
        path = resolve_moge_checkpoint(repo_or_dir, local_files_only)
        try:
            from moge.model import import_model_class_by_version
        except ImportError as e:
            raise DepthUnavailable(f"The moge package cannot be imported ({e.__class__.__name__}: {e}).") from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            config = dict(ckpt["model_config"])
            state = ckpt["model"]
        except Exception as e:
            raise DepthUnavailable(f"MoGe checkpoint {path.name} cannot be read ({e.__class__.__name__}).") from None
        version = "v2" if "neck" in config else "v1"
        try:
            model = import_model_class_by_version(version)(**config)
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as e:
            raise DepthUnavailable(f"MoGe checkpoint {path.name} does not build a {version} model ({e.__class__.__name__}).") from None
        # Constant buffers (the encoder's normalisation mean/std) are rebuilt by the constructor; any other
        # missing weight would stay random, so that checkpoint is refused. Extra keys are ignored, as moge does.
        missing = [k for k in missing if not k.endswith(("image_mean", "image_std"))]
        if missing:
            raise DepthUnavailable(
                f"MoGe checkpoint {path.name} does not match its own config ({len(missing)} missing weights, e.g. {missing[0]})."
            )
        try:
            model = model.to(device=torch.device(device), dtype=dtype or torch.float32)
        except (RuntimeError, AssertionError) as e:
            raise DepthUnavailable(f"MoGe cannot be placed on {device} ({e.__class__.__name__}).") from None
        return cls(model, version=version, **kwargs)

    @torch.inference_mode()
    def estimate_batch(self, images: torch.Tensor, fov_x=None) -> DepthEstimate:
        _check_image(images, batched=True)
        n, _, h, w = images.shape
        fovs = _fov_list(fov_x, n)
        device = self.device
        # fp16 autocast only where it is fast and supported (CUDA with fp32 weights).
        use_fp16 = device.type == "cuda" and self.dtype == torch.float32
        out = []
        for start in range(0, n, self.batch_size):
            chunk = images[start : start + self.batch_size].to(device=device, dtype=self.dtype)
            chunk_fov = fovs[start : start + self.batch_size]
            if all(f is None for f in chunk_fov):
                fov_arg = None
            elif any(f is None for f in chunk_fov):
                raise ValueError("fov_x must be given for every frame of a batch or for none.")
            else:
                fov_arg = torch.tensor(chunk_fov, device=device, dtype=torch.float32)
            with warnings.catch_warnings():
                # moge opens an fp32 autocast region on every device; on CPU torch warns that it is a no-op.
                warnings.filterwarnings("ignore", message="In CPU autocast")
                res = self.model.infer(
                    chunk, resolution_level=self.resolution_level, apply_mask=False, force_projection=True,
                    fov_x=fov_arg, use_fp16=use_fp16,
                )
            depth = res["depth"].float()
            mask = res["mask"] if "mask" in res else torch.ones_like(depth, dtype=torch.bool)
            k = res["intrinsics"].float().clone()  # normalised: x by width, y by height
            k[:, 0, :] *= w
            k[:, 1, :] *= h
            k[:, 2, :] = torch.tensor([0.0, 0.0, 1.0], device=k.device)
            for i in range(depth.shape[0]):
                out.append(_from_depth(depth[i], mask[i].bool(), k[i], self.source))
        return DepthEstimate.stack(out)

    def estimate(self, image: torch.Tensor, fov_x: Optional[float] = None) -> DepthEstimate:
        _check_image(image, batched=False)
        return self.estimate_batch(image[None], None if fov_x is None else [fov_x])[0]

    def describe(self) -> str:
        return f"MoGe-{self.version[1]} ({self.device.type})"


# ---- fallbacks -----------------------------------------------------------------------------------

def _pixel_intrinsics(image: torch.Tensor, fov_x: float) -> tuple[int, int, torch.Tensor]:
    """``(h, w, K)`` of one ``[3,H,W]`` image seen with a ``fov_x``-degree horizontal field of view."""
    _check_image(image, batched=False)
    h, w = image.shape[-2:]
    return h, w, intrinsics_from_fov(w, h, fov_x)[0].float()


class _Constant(DepthEstimator):
    """A stand-in surface at a fixed ``distance`` in metres (subclasses say which surface: ``_depth``)."""

    fallback = True

    def __init__(self, distance: float, fov_x: float, what: str):
        if not (distance > 0 and math.isfinite(distance)):
            raise ValueError(f"{what} must be a positive number of metres; got {distance}.")
        self.fov_x = float(fov_x)

    def _depth(self, K: torch.Tensor, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def estimate(self, image: torch.Tensor, fov_x: Optional[float] = None) -> DepthEstimate:
        h, w, K = _pixel_intrinsics(image, fov_x or self.fov_x)
        return _from_depth(self._depth(K, h, w), torch.ones(h, w, dtype=torch.bool), K, self.source)


class PlaneDepth(_Constant):
    """A fronto-parallel plane at ``depth`` metres seen with a ``fov_x``-degree horizontal field of view."""

    source = "plane fallback"

    def __init__(self, depth: float = DEFAULT_PLANE_DEPTH, fov_x: float = DEFAULT_FOV_X):
        super().__init__(depth, fov_x, "Plane depth")
        self.depth = float(depth)

    def _depth(self, K: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return torch.full((h, w), self.depth, dtype=torch.float32)

    def describe(self) -> str:
        return f"constant-depth plane ({self.depth:g} m away, {self.fov_x:g}° field of view)"


class SphereDepth(_Constant):
    """Every pixel at distance ``radius`` from the camera centre (z-depth = radius / |K^-1 (u,v,1)|)."""

    source = "sphere fallback"

    def __init__(self, radius: float = DEFAULT_SPHERE_RADIUS, fov_x: float = DEFAULT_FOV_X):
        super().__init__(radius, fov_x, "Sphere radius")
        self.radius = float(radius)

    def _depth(self, K: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.radius / _camera_rays(K, h, w).float().norm(dim=-1)

    def describe(self) -> str:
        return f"constant-distance sphere ({self.radius:g} m radius)"


# ---- the user's depth map ------------------------------------------------------------------------

class UserDepth(DepthEstimator):
    """The person's depth map of the input photo (``engine.user_depth``); an image of the map's aspect gets it
    resized (nearest), any other is refused."""

    source = "user depth"

    def __init__(self, path: PathLike, fov_x: float = DEFAULT_FOV_X):
        self.path = Path(path)
        self.fov_x = float(fov_x)
        self.depth = read_user_depth(self.path)

    def estimate(self, image: torch.Tensor, fov_x: Optional[float] = None) -> DepthEstimate:
        h, w, K = _pixel_intrinsics(image, fov_x or self.fov_x)
        depth = self.depth
        if depth.shape != (h, w):
            dh, dw = depth.shape
            if abs(math.log((dw / dh) / (w / h))) > 0.01:
                raise DepthInputError(f"Depth map '{self.path.name}' is {dw}x{dh} but the image is {w}x{h}; give a "
                                      "depth map of the same shape.")
            # Nearest neighbour: interpolating across an object edge would invent depths between fore- and background.
            depth = F.interpolate(depth[None, None], size=(h, w), mode="nearest-exact")[0, 0]
        return _from_depth(depth.clone(), depth > 0, K, self.source)

    def describe(self) -> str:
        return f"user depth from {self.path.name}"


class DepthSource:
    """``(image [3,H,W], camera or None) -> (depth [H,W], valid [H,W], K [3,3])``: a scene's one depth door.

    Wraps an estimator (MoGe-2 or an announced fallback). MoGe estimates the image's field of view itself and its
    z-depth is unprojected with the camera's K by the caller, as the release does; the stand-ins (plane, sphere, a
    person's map) are given the camera's field of view (``DepthEstimator.takes_camera_fov``), so the sphere stays
    a sphere seen through that camera. ``K`` is the estimator's own intrinsics, used only for the input photo when
    no camera file gives them.
    """

    def __init__(self, estimator: DepthEstimator, note: str):
        self.estimator = estimator
        self.note = note

    def __call__(self, image: torch.Tensor, camera: Optional[Cameras] = None):
        fov_x = None
        if camera is not None and self.estimator.takes_camera_fov:
            fov_x = math.degrees(2 * math.atan(camera.width / (2 * float(camera.K[0, 0, 0]))))
        est = self.estimator.estimate(image, fov_x=fov_x)
        return est.depth.float(), est.mask.bool(), est.intrinsics.double()


_LOADED: dict = {}  # (checkpoint path, mtime, size, device, dtype) -> MoGeEstimator
_LOADED_LOCK = threading.Lock()


def _loaded_moge(spec, device, dtype, local_files_only) -> MoGeEstimator:
    """MoGe loaded once per process and reused: every scene, clip and plan of a server shares it. Keyed by the
    resolved checkpoint file (its size and modification time: a replaced file loads again), device and dtype."""
    path = resolve_moge_checkpoint(spec, local_files_only).resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, str(torch.device(device)), dtype or torch.float32)
    with _LOADED_LOCK:
        if key not in _LOADED:
            for stale in [k for k in _LOADED if k[0] == key[0] and k[3:] == key[3:]]:
                del _LOADED[stale]
            _LOADED[key] = MoGeEstimator.from_pretrained(path, device=device, dtype=dtype)
        return _LOADED[key]


def load_depth_estimator(
    spec=None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    announce: Optional[Callable[[str], None]] = print,
    panorama: bool = False,
    local_files_only: Optional[bool] = None,
) -> DepthEstimator:
    """The depth estimator a run gets.

    ``spec``: None (MoGe-2 from the hub cache), a hub repo id, a local MoGe file/folder, a user depth file
    (``.npy`` / 16-bit PNG), ``'plane'`` / ``'sphere'``, or an estimator object (returned as is).
    When MoGe cannot be had, the plane (photos) or sphere (``panorama=True``) fallback is returned and
    ``announce`` gets ONE line saying which fallback and why. MoGe is loaded once per process (per checkpoint
    file, device and dtype) and the same estimator is returned again.
    """
    if isinstance(spec, DepthEstimator):
        return spec
    if spec in ("plane", "sphere"):
        return PlaneDepth() if spec == "plane" else SphereDepth()
    if is_user_depth_file(spec):
        return UserDepth(spec)
    try:
        return _loaded_moge(spec or MOGE_REPO, device, dtype, local_files_only)
    except DepthUnavailable as e:
        fallback = SphereDepth() if panorama else PlaneDepth()
        reason = " ".join(str(e).split())  # one line, whatever the message held
        if announce is not None:
            announce(f"Depth: {reason.rstrip('.')}; using a {fallback.describe()} instead.")
        return fallback


# ---- generated frames when depth is a fallback ---------------------------------------------------

FILL_RADIUS = 6


def is_fallback(source) -> bool:
    """Whether a depth source (an estimator, or a wrapper holding one as ``estimator``) is a stand-in."""
    return bool(getattr(getattr(source, "estimator", source), "fallback", False))


def generated_frame_depth(source, image: torch.Tensor, camera: Cameras, rendered_depth: torch.Tensor,
                          covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(depth [H,W], valid [H,W])`` of a generated frame ``image`` seen by ``camera``, on the device the cache
    renders on, given the cache's render there (``rendered_depth``, ``covered``). With a depth model (``source``, a
    scene's depth door), its estimate scale-aligned to the rendered depth where both have one (64 pixels at least;
    otherwise the estimate's own scale); with a fallback (``is_fallback``), the cache's own depth with its holes
    continued (``depth_from_render``, module notes)."""
    from engine.geometry.align import align_depth

    if is_fallback(source):
        depth, valid = depth_from_render(rendered_depth, covered)
        return depth.to(rendered_depth.device), valid.to(rendered_depth.device)
    depth, valid, _ = source(image, camera)
    depth, valid = depth.to(rendered_depth.device), valid.to(rendered_depth.device)
    overlap = valid & covered & (rendered_depth > 0)
    if int(overlap.sum()) >= 64:
        try:
            depth = align_depth(depth, rendered_depth, overlap).apply(depth)
        except ValueError:
            pass  # too little usable overlap: keep the estimate's own scale
    return depth, valid & (depth > 0)


def depth_from_render(depth: torch.Tensor, covered: torch.Tensor, radius: int = FILL_RADIUS):
    """``(depth [H,W], valid [H,W])``: the rendered ``depth`` where ``covered``, holes filled by continuing
    the local plane of the nearest covered pixel (module notes)."""
    from scipy import ndimage

    z = depth.detach().cpu().double().numpy()
    known = covered.detach().cpu().numpy().astype(bool) & np.isfinite(z) & (z > 0)
    out = np.where(known, z, 0.0)
    if not known.any():
        return torch.from_numpy(out).to(depth.dtype), torch.from_numpy(known)
    holes = ~known
    if holes.any():
        h, w = z.shape
        q = np.where(known, 1.0 / np.where(known, z, 1.0), 0.0)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        # Window sums of the normal equations of q ~ alpha + beta x + gamma y over covered pixels.
        size = 2 * radius + 1
        m = known.astype(np.float64)

        def box(a):
            return ndimage.uniform_filter(a, size=size, mode="constant", cval=0.0) * size * size

        _, (ny, nx) = ndimage.distance_transform_edt(holes, return_indices=True)
        hy, hx = np.nonzero(holes)
        py, px = ny[hy, hx], nx[hy, hx]
        # Only the nearest covered pixels of holes need a fit; local coordinates keep the sums well scaled.
        sums = {}
        for name, a in {"n": m, "x": m * xs, "y": m * ys, "xx": m * xs * xs, "xy": m * xs * ys, "yy": m * ys * ys,
                        "q": m * q, "xq": m * xs * q, "yq": m * ys * q}.items():
            sums[name] = box(a)[py, px]
        cx, cy = px.astype(np.float64), py.astype(np.float64)
        n = sums["n"]
        sx, sy = sums["x"] - cx * n, sums["y"] - cy * n
        sxx = sums["xx"] - 2 * cx * sums["x"] + cx * cx * n
        syy = sums["yy"] - 2 * cy * sums["y"] + cy * cy * n
        sxy = sums["xy"] - cx * sums["y"] - cy * sums["x"] + cx * cy * n
        sq = sums["q"]
        sxq, syq = sums["xq"] - cx * sq, sums["yq"] - cy * sq
        a = np.stack([np.stack([n, sx, sy], -1), np.stack([sx, sxx, sxy], -1), np.stack([sy, sxy, syy], -1)], -2)
        b = np.stack([sq, sxq, syq], -1)
        det = np.linalg.det(a)
        # Determinant of the centred second moments relative to the count: zero when the points lie on a line.
        ok = (n >= 3) & (np.abs(det) > 1e-6 * np.maximum(n, 1) ** 3)
        q_fill = q[py, px].copy()
        if ok.any():
            coef = np.linalg.solve(a[ok], b[ok][..., None])[..., 0]
            q_fill[ok] = coef[:, 0] + coef[:, 1] * (hx[ok] - cx[ok]) + coef[:, 2] * (hy[ok] - cy[ok])
        q_known = q[known]
        lo, hi = 0.5 * q_known.min(), 2.0 * q_known.max()
        good = (q_fill >= lo) & (q_fill <= hi)
        out[hy[good], hx[good]] = 1.0 / q_fill[good]
        known = known.copy()
        known[hy[good], hx[good]] = True
    return torch.from_numpy(out).to(depth.dtype), torch.from_numpy(known)
