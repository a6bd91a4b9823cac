"""The 3D cache (global-geometric memory): one world-space point cloud grown from every frame with depth.

Each point has a colour in [0,1], a confidence and the id of the frame it came from. Frames are lifted
with ``unproject_frame`` (depth discontinuities dropped, see ``depth_edges``), the cloud is kept under a
point budget by voxel merging (``PointCache.downsample``), rendered along cameras with
``engine.geometry.render.render_points``, and saved as a binary PLY that standard readers open (``engine.plyio``).

Depth edges (``depth_edges``)
    A pixel is an edge when the depths in its 3x3 neighbourhood (itself included, only valid pixels) span
    more than ``threshold`` in log depth: ``log(max) - log(min) > threshold``. Log depth is the log of
    disparity up to sign, so the rule is the same on depth and disparity and independent of the scene's
    scale (relative and metric depth use one threshold). Both sides of a step are marked, and so is every
    "flying pixel" an estimator interpolates across it, because each such pixel has neighbours on a steeper
    side than any real surface gives: a plane tilted by angle ``a`` changes log depth by about
    ``tan(a) / f`` per pixel, so the default 0.05 over two pixels drops only surfaces seen within a few
    degrees of grazing at ``f`` ~ 500 px (and those are unreliable anyway).

Voxel merging (``voxel_downsample``)
    Open3D's grid: origin ``min_bound - voxel/2``, cell ``floor((p - origin) / voxel)``; a merged point is
    the mean position and mean colour of its cell (so the result matches ``o3d.geometry.PointCloud.
    voxel_down_sample``), its confidence the cell's largest and its source the frame of that most confident
    point (smallest index on ties): merging a weaker duplicate into a point must not demote it. The grid
    is computed in torch rather than by Open3D because Open3D is measurably slower here (2M random points,
    2 shared CPU cores, same run: ``voxel_down_sample`` 6.9 s, this code 3.4 s; ``voxel_down_sample_and_trace``,
    which confidence and source would need, plus reading its trace back took 24 s), a budget search needs
    several counting passes (about 0.6 s each at 3M points), and this also runs on the GPU.

Splat scale (``point_spacing``)
    The Gaussian splats written for the viewers are isotropic with a standard deviation of the mean distance
    to a point's ``k`` nearest neighbours (``scipy.spatial.cKDTree``), so neighbouring splats overlap into a
    closed surface.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from engine.geometry.cameras import Cameras
from engine.geometry.render import RenderResult, render_points
from engine.plyio import PlyError, read_vertices, write_vertices

PathLike = Union[str, Path]

DEFAULT_EDGE_THRESHOLD = 0.05
SPACING_NEIGHBOURS = 4


class CacheError(ValueError):
    """Input the 3D cache cannot use (wrong shapes, unreadable file); the message is one readable sentence."""


# ---- frames to points ------------------------------------------------------------------------------

def _usable_depth(depth: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(depth) & (depth > 0)


def depth_edges(depth: torch.Tensor, threshold: float = DEFAULT_EDGE_THRESHOLD,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[H,W]`` bool, True where the 3x3 neighbourhood's log-depth range exceeds ``threshold``.

    Only pixels with finite positive depth (and ``valid``, if given) take part; invalid pixels are never
    edges and do not make their neighbours edges.
    """
    if depth.dim() != 2:
        raise CacheError(f"Depth for edge detection must be one [H,W] map; got shape {tuple(depth.shape)}.")
    ok = _usable_depth(depth)
    if valid is not None:
        ok &= valid.to(depth.device).bool()
    logd = torch.log(torch.where(ok, depth, torch.ones_like(depth)).to(torch.float64))
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=depth.device)
    # max_pool2d pads with -inf, so image borders behave like invalid neighbours.
    hi = F.max_pool2d(torch.where(ok, logd, -inf)[None, None], 3, stride=1, padding=1)[0, 0]
    lo = -F.max_pool2d(torch.where(ok, -logd, -inf)[None, None], 3, stride=1, padding=1)[0, 0]
    return ok & ((hi - lo) > threshold)


def _one_camera(camera: Cameras) -> Cameras:
    if not isinstance(camera, Cameras) or len(camera) != 1:
        got = len(camera) if isinstance(camera, Cameras) else type(camera).__name__
        raise CacheError(f"A frame needs exactly one camera (a Cameras batch of length 1); got {got}.")
    return camera


def _frame_image(image: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1:] != depth.shape:
        raise CacheError(
            f"The frame image must be [3,H,W] with the depth's size {tuple(depth.shape)}; got {tuple(image.shape)}."
        )
    return image


def unproject_frame(
    image: torch.Tensor,
    depth: torch.Tensor,
    camera: Cameras,
    valid: Optional[torch.Tensor] = None,
    drop_edges: bool = True,
    edge_threshold: float = DEFAULT_EDGE_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lift one frame to world points.

    Keeps pixels with finite positive depth, ``valid`` (if given) and, with ``drop_edges``, not on a depth
    edge. Returns ``points [M,3]`` (depth's dtype and device), ``colors [M,3]`` (the image's, clamped to
    [0,1]) and ``pixel_index [M]`` (row-major ``i * W + j``).
    """
    camera = _one_camera(camera)
    if depth.dim() == 3 and depth.shape[0] == 1:
        depth = depth[0]
    if depth.dim() != 2:
        raise CacheError(f"A frame's depth must be one [H,W] map; got shape {tuple(depth.shape)}.")
    image = _frame_image(image, depth)
    if valid is not None and valid.shape[-2:] != depth.shape:
        raise CacheError(f"The valid mask {tuple(valid.shape)} must match the depth's size {tuple(depth.shape)}.")
    keep = _usable_depth(depth)
    if valid is not None:
        keep &= valid.reshape(depth.shape).to(depth.device).bool()
    if drop_edges:
        keep &= ~depth_edges(depth, edge_threshold, valid=keep)
    pixel_index = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1)
    safe = torch.where(keep, depth, torch.ones_like(depth))
    world = camera.to(device=depth.device).unproject(safe[None])[0].reshape(-1, 3)
    points = world[pixel_index]
    colors = image.to(depth.device).reshape(3, -1)[:, pixel_index].T.clamp(0, 1)
    return points, colors, pixel_index


# ---- voxel merging ---------------------------------------------------------------------------------

def _voxel_keys(points: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """One integer per occupied cell of Open3D's grid (see module notes); equal keys = same cell."""
    # float64 as Open3D computes, so cells match its grid; in-place ops because these are [P,3] passes
    # over millions of points and fresh temporaries cost more than the arithmetic.
    p = points.to(torch.float64, copy=True)
    p.sub_(p.min(dim=0).values - voxel_size / 2).div_(voxel_size).floor_()
    cells = p.to(torch.int64)
    del p
    dims = cells.max(dim=0).values + 1
    if float(dims[0]) * float(dims[1]) * float(dims[2]) < 2.0**62:
        key = cells[:, 0].mul_(dims[1]).add_(cells[:, 1]).mul_(dims[2]).add_(cells[:, 2])
        return key
    # A grid too fine to pack into one int64: rank the cells instead (slower, rare).
    return torch.unique(cells, dim=0, return_inverse=True)[1]


def count_voxels(points: torch.Tensor, voxel_size: float) -> int:
    """How many points ``voxel_downsample`` leaves at ``voxel_size``."""
    if points.shape[0] == 0:
        return 0
    return int(torch.unique(_voxel_keys(points, voxel_size)).numel())


def voxel_downsample(points, colors, confidence, source, voxel_size: float):
    """Merge points per voxel (rules in the module notes); returns the four merged tensors."""
    if points.shape[0] == 0:
        return points, colors, confidence, source
    _, inverse, counts = torch.unique(_voxel_keys(points, voxel_size), return_inverse=True, return_counts=True)
    m, dev = counts.numel(), points.device
    denom = counts.to(torch.float64)[:, None]
    pts = torch.zeros(m, 3, dtype=torch.float64, device=dev).index_add_(0, inverse, points.to(torch.float64))
    cols = torch.zeros(m, 3, dtype=torch.float64, device=dev).index_add_(0, inverse, colors.to(torch.float64))
    best = torch.full((m,), -float("inf"), dtype=confidence.dtype, device=dev)
    best.scatter_reduce_(0, inverse, confidence, "amax")
    n = points.shape[0]
    ids = torch.arange(n, device=dev)
    first = torch.full((m,), n, dtype=torch.int64, device=dev)
    first.scatter_reduce_(0, inverse, torch.where(confidence == best[inverse], ids, n), "amin")
    return (
        (pts / denom).to(points.dtype),
        (cols / denom).to(colors.dtype),
        best,
        source[first],
    )


def _initial_voxel_size(points: torch.Tensor, budget: int) -> float:
    """A first guess assuming the points cover surfaces spanning the two largest bounding-box extents."""
    ext = (points.max(dim=0).values - points.min(dim=0).values).to(torch.float64).sort(descending=True).values
    area = float(ext[0] * ext[1])
    if area > 0:
        return math.sqrt(area / budget)
    if float(ext[0]) > 0:
        return float(ext[0]) / budget
    return 1.0  # every point coincides: any size merges them


def find_voxel_size(points: torch.Tensor, budget: int, start: Optional[float] = None,
                    fill: float = 0.9, max_passes: int = 12) -> float:
    """A voxel size leaving at most ``budget`` points (aiming at >= ``fill * budget``), by a search on counts.

    Each pass counts the cells at one size and steps along a secant of ``log(count)`` over ``log(size)``
    (a slope of -2, as for a surface, before two passes exist). The slope is far from constant: a cloud
    lifted from depth maps is dense near the cameras and sparse far away, so its count falls much more
    slowly than ``size**-2`` until the far voxels start to merge. Once the budget is bracketed the steps stay
    inside the bracket. The smallest size found within budget is returned.
    """
    size = float(start) if start else _initial_voxel_size(points, budget)
    extent = float((points.max(dim=0).values - points.min(dim=0).values).max())
    # Below this the grid stops merging anything and cell indices would outgrow int64.
    smallest = max(extent, 1e-30) * 2.0**-40
    target = budget * (1 + fill) / 2
    lo = 0.0  # largest size known to exceed the budget
    hi = math.inf  # smallest size known to fit
    previous = None
    for _ in range(max_passes):
        count = count_voxels(points, size)
        if count <= budget:
            hi = min(hi, size)
            if count >= fill * budget:
                break
        else:
            lo = max(lo, size)
        if math.isfinite(hi) and lo > 0 and hi / lo < 1.02:  # counts jump in steps this fine
            break
        slope = -2.0
        if previous is not None and previous[0] != size:
            slope = math.log(max(count, 1) / max(previous[1], 1)) / math.log(size / previous[0])
            slope = min(max(slope, -3.0), -0.1)  # counts fall with size; bound what noise can do
        previous = (size, count)
        step = min(max((target / max(count, 1)) ** (1 / slope), 1 / 8), 8.0)
        size *= step
        if math.isfinite(hi) and lo > 0:
            size = min(max(size, lo * (hi / lo) ** 0.1), lo * (hi / lo) ** 0.9)
        if size < smallest:
            break  # duplicates: no finer grid gets closer to the budget
    if not math.isfinite(hi):
        # Not within budget after max_passes (pathological spreads): grow until it is.
        size = max(lo, smallest)
        while count_voxels(points, size) > budget:
            size *= 2
        hi = size
    return hi


# ---- viewers ---------------------------------------------------------------------------------------

def point_spacing(points: torch.Tensor, k: int = SPACING_NEIGHBOURS) -> np.ndarray:
    """Mean distance ``[P]`` (float64) from each point to its ``k`` nearest other points (``cKDTree``).

    Points that share a position with all their neighbours get the smallest positive spacing of the cloud,
    so every splat keeps a finite positive size.
    """
    from scipy.spatial import cKDTree

    p = points.detach().cpu().double().numpy()
    if len(p) < 2:
        return np.ones(len(p))
    k = min(int(k), len(p) - 1)
    dist, _ = cKDTree(p).query(p, k=k + 1, workers=-1)  # the first neighbour is the point itself
    spacing = dist[:, 1:].mean(axis=1)
    positive = spacing[spacing > 0]
    floor = positive.min() if positive.size else 1.0
    return np.where(spacing > 0, spacing, floor)


# ---- the cache -------------------------------------------------------------------------------------

def _as_per_point(value, m: int, default: float, dtype, device, name: str) -> torch.Tensor:
    if value is None:
        return torch.full((m,), default, dtype=dtype, device=device)
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        return t.to(dtype).expand(m).clone()
    if t.shape != (m,):
        raise CacheError(f"{name} must be one number or one value per point ({m}); got shape {tuple(t.shape)}.")
    return t.to(dtype)


@dataclass(eq=False)
class PointCache:
    """A world-space point cloud: ``points [P,3]`` float32, ``colors [P,3]`` float32 in [0,1],
    ``confidence [P]`` float32 and ``source [P]`` int64 (the frame id each point came from; -1 unknown)."""

    points: torch.Tensor
    colors: torch.Tensor
    confidence: torch.Tensor
    source: torch.Tensor
    _spacing: Optional[tuple] = field(default=None, init=False, repr=False)  # (points it was computed for, spacing)

    def __post_init__(self) -> None:
        p = self.points.shape[0] if self.points.dim() == 2 else -1
        if (self.points.shape[-1:] != (3,) or self.colors.shape != (p, 3) or self.confidence.shape != (p,)
                or self.source.shape != (p,)):
            raise CacheError(
                f"A point cache needs points [P,3], colors [P,3], confidence [P] and source [P]; got "
                f"{tuple(self.points.shape)}, {tuple(self.colors.shape)}, {tuple(self.confidence.shape)} and "
                f"{tuple(self.source.shape)}."
            )
        dev = self.points.device
        self.points = self.points.to(torch.float32)
        self.colors = self.colors.to(dev, torch.float32)
        self.confidence = self.confidence.to(dev, torch.float32)
        self.source = self.source.to(dev, torch.int64)

    @classmethod
    def empty(cls, device=None) -> "PointCache":
        return cls(
            torch.zeros(0, 3, device=device),
            torch.zeros(0, 3, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
        )

    def __len__(self) -> int:
        return self.points.shape[0]

    @property
    def device(self) -> torch.device:
        return self.points.device

    def spacing(self) -> np.ndarray:
        """``point_spacing`` of the current points, computed once per state of the cloud: the viewers' files are
        written more than once after each clip, and the neighbour search is the costliest part of writing them.
        Growing the cloud replaces ``points`` by a new tensor (never in place), which ends the memo."""
        if self._spacing is None or self._spacing[0] is not self.points:
            self._spacing = (self.points, point_spacing(self.points))
        return self._spacing[1]

    def to(self, device) -> "PointCache":
        return PointCache(self.points.to(device), self.colors.to(device), self.confidence.to(device),
                          self.source.to(device))

    # ---- growing ------------------------------------------------------------------------------------
    def add_points(self, points: torch.Tensor, colors: torch.Tensor, confidence=None, frame_id=-1) -> int:
        """Append points (``confidence`` and ``frame_id``: one value or one per point); returns how many."""
        points = torch.as_tensor(points)
        colors = torch.as_tensor(colors)
        if points.dim() != 2 or points.shape[1] != 3 or colors.shape != points.shape:
            raise CacheError(
                f"Points and colors must both be [M,3]; got {tuple(points.shape)} and {tuple(colors.shape)}."
            )
        if colors.dtype == torch.uint8:
            colors = colors.float() / 255
        m, dev = points.shape[0], self.device
        conf = _as_per_point(confidence, m, 1.0, torch.float32, dev, "Confidence")
        src = _as_per_point(frame_id, m, -1, torch.int64, dev, "Frame id")
        self.points = torch.cat([self.points, points.to(dev, torch.float32)])
        self.colors = torch.cat([self.colors, colors.to(dev, torch.float32).clamp(0, 1)])
        self.confidence = torch.cat([self.confidence, conf])
        self.source = torch.cat([self.source, src])
        return m

    def add_frame(self, image: torch.Tensor, depth: torch.Tensor, camera: Cameras, frame_id: int,
                  valid: Optional[torch.Tensor] = None, confidence=None, drop_edges: bool = True) -> int:
        """Lift one frame (``image [3,H,W]``, ``depth [H,W]``) with ``unproject_frame`` and append it.

        ``confidence`` is one number or a ``[H,W]`` map (default 1). Returns the number of points added.
        """
        points, colors, pix = unproject_frame(image, depth, camera, valid=valid, drop_edges=drop_edges)
        conf = confidence
        if isinstance(confidence, torch.Tensor) and confidence.dim() >= 2:
            if confidence.shape[-2:] != depth.shape[-2:]:
                raise CacheError(
                    f"A confidence map must match the depth's size {tuple(depth.shape[-2:])}; "
                    f"got {tuple(confidence.shape)}."
                )
            conf = confidence.reshape(-1).to(pix.device)[pix]
        return self.add_points(points, colors, confidence=conf, frame_id=int(frame_id))

    # ---- bounding --------------------------------------------------------------------------------
    def downsample(self, budget: int = 1_000_000, voxel_size: Optional[float] = None) -> None:
        """Merge points per voxel so at most ``budget`` remain.

        With ``voxel_size`` the cloud is merged at that size first (even when already within budget);
        if the result still exceeds ``budget`` (or no size is given and the cloud does), the smallest
        voxel size found that fits the budget is used (``find_voxel_size``).
        """
        budget = int(budget)
        if budget < 1:
            raise CacheError(f"The point budget must be at least 1; got {budget}.")
        if voxel_size is not None and not voxel_size > 0:
            raise CacheError(f"The voxel size must be positive; got {voxel_size}.")
        if voxel_size is not None:
            self._merge(voxel_size)
        if len(self) > budget:
            self._merge(find_voxel_size(self.points, budget, start=voxel_size))

    def _merge(self, voxel_size: float) -> None:
        self.points, self.colors, self.confidence, self.source = voxel_downsample(
            self.points, self.colors, self.confidence, self.source, float(voxel_size))

    # ---- looking ------------------------------------------------------------------------------------
    def render(self, cameras: Cameras, radius: int = 0, near: float = 1e-3, far: Optional[float] = None,
               pointmaps: bool = False) -> RenderResult:
        """What ``cameras`` see of the cache (``render_points``: nearest point per pixel), on the cache's device
        (a cache moved to the GPU renders there). World-XYZ pointmaps only with ``pointmaps=True``: the paper's
        branch-form memory is their one reader."""
        return render_points(self.points, self.colors, cameras, radius=radius, near=near, far=far, pointmaps=pointmaps)

    def median_depth(self, camera: Cameras, near: float = 1e-3) -> float:
        """Median camera z of the points at depth >= ``near`` projecting into the image (NaN if none).

        With an even count it is the mean of the two middle values, as ``numpy.median``.
        """
        camera = _one_camera(camera).to(device=self.device)
        if len(self) == 0:
            return float("nan")
        uv, z = camera.project(self.points)
        uv, z = uv[0], z[0]
        inside = (z >= near) & (uv[:, 0] >= 0) & (uv[:, 0] < camera.width) & (uv[:, 1] >= 0) & (uv[:, 1] < camera.height)
        zs = torch.sort(z[inside]).values
        n = zs.numel()
        if n == 0:
            return float("nan")
        return float((zs[(n - 1) // 2] + zs[n // 2]) / 2)

    # ---- files --------------------------------------------------------------------------------------
    def save_ply(self, path: PathLike) -> Path:
        """Binary little-endian PLY (``engine.plyio``): ``x y z`` float, ``red green blue`` uchar, ``confidence``
        float and ``source`` int (int32, so frame ids round-trip exactly); written atomically."""
        src = self.source.cpu().numpy()
        if src.size and (src.min() < -(2**31) or src.max() >= 2**31):
            raise CacheError("Frame ids in the cache do not fit the PLY file's 32-bit source field.")
        pts = self.points.detach().cpu().numpy().astype(np.float32)
        cols = np.round(self.colors.detach().cpu().clamp(0, 1).numpy() * 255).astype(np.uint8)
        columns = {"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2],
                   "red": cols[:, 0], "green": cols[:, 1], "blue": cols[:, 2],
                   "confidence": self.confidence.detach().cpu().numpy().astype(np.float32),
                   "source": src.astype(np.int32)}
        return write_vertices(path, columns, comments=["WorldStereo Studio 3D cache"])

    @classmethod
    def load_ply(cls, path: PathLike, device=None) -> "PointCache":
        """Read a PLY point cloud (this class's files, or any vertex PLY with x/y/z and optional colours).

        Missing confidence reads as 1 and missing source as -1; colours default to mid-grey.
        """
        path = Path(path)
        try:
            columns = read_vertices(path)
        except PlyError as e:
            raise CacheError(str(e)) from None
        if not all(axis in columns for axis in "xyz"):
            raise CacheError(f"Point cloud file {path.name} has no x, y, z vertex properties.")
        n = len(columns["x"])
        points = np.stack([columns[a] for a in "xyz"], axis=1).astype(np.float32)
        if all(ch in columns for ch in ("red", "green", "blue")):
            colors = np.stack([_unit_color(columns[ch]) for ch in ("red", "green", "blue")], axis=1)
        else:
            colors = np.full((n, 3), 0.5, dtype=np.float32)
        conf = columns.get("confidence", np.ones(n, dtype=np.float32)).astype(np.float32)
        src = columns.get("source", np.full(n, -1, dtype=np.int64)).astype(np.int64)
        return cls(torch.from_numpy(points).to(device), torch.from_numpy(colors).to(device),
                   torch.from_numpy(conf).to(device), torch.from_numpy(src).to(device))


def _unit_color(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return values.astype(np.float32).clip(0, 1)
    return (values.astype(np.float32) / np.iinfo(values.dtype).max).clip(0, 1)

