"""Equirectangular panoramas: perspective views in and out, panoramic depth to a 360° point cloud.

The one equirectangular convention of the project (everything here and every caller uses it):

- World frame: the frame of the official panorama bank ``cameras.json``. **World +z is up.** The bank's
  first camera (the start view, ``view0``) has w2c rotation rows ``(0,1,0), (0,0,-1), (-1,0,0)``: it looks
  along world -x, its image-right is world +y and its image-down is world -z.
- Longitude ``lon`` (yaw) is 0 along world -x, i.e. the start view's optical axis, and grows to the
  right as seen from inside the sphere: ``lon = +90°`` is world +y. Latitude ``lat`` (pitch) is +90° at
  world +z (up). Direction:
  ``d = (-cos(lat)·cos(lon), cos(lat)·sin(lon), sin(lat))``.
- Pixels follow the camera module's pixel-centre convention: pixel ``(row i, column j)`` has its centre
  at ``u = j + 0.5``, ``v = i + 0.5`` in an image ``W`` wide and ``H`` high, and
  ``lon = 2π·(u/W − 1/2)``, ``lat = π·(1/2 − v/H)``. So the panorama's centre column boundary
  ``u = W/2`` looks along the start view's axis, the left/right edges ``u = 0 ≡ W`` look straight behind
  it (world +x, where the panorama wraps), the top edge is the zenith, the bottom edge the nadir.
- A bank camera with yaw ``ψ`` and pitch ``θ`` looks along ``d(lon=ψ, lat=θ)`` with no roll: its image
  right is ``d(ψ+90°, 0)`` (horizontal), its image down is forward × right.
- Panoramic depth is the **distance along the ray** from the panorama centre (not a z-depth), so a point
  is ``center + depth · d``.

The official bank (27 views, 832x480, 120° horizontal x 90° vertical field of view, all at the centre):
view 0 at yaw 0 pitch 0, views 1 and 2 at yaw 0 pitched up / down by ``atan(1/2)`` (≈ 26.57°), views
3-10 on the horizon at yaws 40°, 80°, ..., 320°, views 11-18 at the same yaws pitched up, views 19-26
pitched down. The bank does not see the caps above / below about ±71.6° latitude.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from engine.geometry.cache import unproject_frame
from engine.geometry.cameras import Cameras, intrinsics_matrix

BANK_WIDTH = 832
BANK_HEIGHT = 480
BANK_FOV_X_DEG = 120.0
BANK_FOV_Y_DEG = 90.0
BANK_PITCH_DEG = math.degrees(math.atan2(1.0, 2.0))
BANK_RING_YAWS_DEG = tuple(40.0 * k for k in range(1, 9))

# Blend weights reach zero at each view's border so stitched seams fade out instead of stepping; the
# power favours the view that sees a direction most centrally (tuned on the official bank).
_WEIGHT_POWER = 1.0


class PanoramaError(ValueError):
    """Unusable panorama input; the message is one readable sentence."""


# ---- the convention ------------------------------------------------------------------------------
def lonlat_to_direction(lon: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """Unit world directions ``[...,3]`` for longitude / latitude in radians (see module docstring)."""
    c = torch.cos(lat)
    return torch.stack([-c * torch.cos(lon), c * torch.sin(lon), torch.sin(lat)], dim=-1)


def direction_to_lonlat(dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longitude in ``(-π, π]`` and latitude in ``[-π/2, π/2]`` of world directions ``[...,3]`` (any length)."""
    x, y, z = dirs.unbind(-1)
    lon = torch.atan2(y, -x)
    lat = torch.atan2(z, torch.hypot(x, y))
    return lon, lat


def equirect_directions(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[H,W,3]`` unit world directions through the pixel centres of an equirectangular image."""
    u = torch.arange(width, device=device, dtype=torch.float64) + 0.5
    v = torch.arange(height, device=device, dtype=torch.float64) + 0.5
    lon = 2 * math.pi * (u / width - 0.5)
    lat = math.pi * (0.5 - v / height)
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    return lonlat_to_direction(lon, lat).to(dtype)


def direction_to_equirect(dirs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates ``(u, v)`` ``[...,2]`` of world directions ``[...,3]``; ``u`` wraps into ``[0, W)``."""
    lon, lat = direction_to_lonlat(dirs)
    u = torch.remainder((lon / (2 * math.pi) + 0.5) * width, width)
    v = (0.5 - lat / math.pi) * height
    return torch.stack([u, v], dim=-1)


def is_equirect(width: int, height: int, tolerance: float = 0.02) -> bool:
    """Whether ``width`` x ``height`` is a 2:1 equirectangular size, within a relative ``tolerance`` of the ratio."""
    if width <= 0 or height <= 0:
        return False
    return abs(width / height - 2.0) <= 2.0 * tolerance


# ---- the official bank ---------------------------------------------------------------------------
def bank_layout() -> list[tuple[float, float]]:
    """``(yaw, pitch)`` in degrees of the 27 official bank views, in file order."""
    p = BANK_PITCH_DEG
    front = [(0.0, 0.0), (0.0, p), (0.0, -p)]
    return front + [(y, 0.0) for y in BANK_RING_YAWS_DEG] + [(y, p) for y in BANK_RING_YAWS_DEG] + [
        (y, -p) for y in BANK_RING_YAWS_DEG
    ]


def look_rotation(yaw_deg: Sequence[float], pitch_deg: Sequence[float], dtype=torch.float64) -> torch.Tensor:
    """World-to-camera rotations ``[N,3,3]`` of roll-free cameras looking at (yaw, pitch) in degrees."""
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float64))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float64))
    forward = lonlat_to_direction(yaw, pitch)
    right = lonlat_to_direction(yaw + math.pi / 2, torch.zeros_like(pitch))
    down = torch.cross(forward, right, dim=-1)
    return torch.stack([right, down, forward], dim=-2).to(dtype)


def bank_cameras(
    width: int = BANK_WIDTH, height: int = BANK_HEIGHT, fx: Optional[float] = None, dtype=torch.float64
) -> Cameras:
    """The official 27-view panorama bank, every camera centred at the origin.

    Without ``fx`` the views have the official 120° x 90° field of view (so ``fx != fy`` at 832x480, as in
    the official file); with ``fx`` the pixels are square (``fy = fx``).
    """
    layout = bank_layout()
    n = len(layout)
    w2c = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    w2c[:, :3, :3] = look_rotation([y for y, _ in layout], [p for _, p in layout])
    if fx is None:
        fx_ = 0.5 * width / math.tan(math.radians(BANK_FOV_X_DEG) / 2)
        fy_ = 0.5 * height / math.tan(math.radians(BANK_FOV_Y_DEG) / 2)
    else:
        fx_ = fy_ = float(fx)
    k = intrinsics_matrix(fx_, fy_, width / 2, height / 2, n=n)
    return Cameras(w2c.to(dtype), k.to(dtype), width, height)


# ---- sampling helpers ----------------------------------------------------------------------------
def _sample(image: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear samples ``[C,P]`` of ``image [C,H,W]`` at normalised coordinates ``grid [P,2]`` in ``[-1,1]``."""
    out = F.grid_sample(image[None], grid.view(1, 1, -1, 2), mode="bilinear", padding_mode=padding, align_corners=False)
    return out[0, :, 0]


def _sample_equirect(pano: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``[C,P]`` of an equirectangular ``pano [C,H,W]`` at pixel coordinates, wrapping around."""
    # One wrapped column on each side makes the seam interpolate across u = 0 ≡ W; rows clamp at the poles.
    padded = torch.cat([pano[..., -1:], pano, pano[..., :1]], dim=-1)
    _, h, w = padded.shape
    x = (torch.remainder(u, pano.shape[-1]) + 1).mul_(2 / w).sub_(1)
    y = (2 / h) * v - 1
    return _sample(padded, torch.stack([x, y], dim=-1).to(pano.dtype), "border")


def _view_hits(cameras: Cameras, i: int, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World directions ``[P,3]`` that may land in view ``i``: their indices and normalised image coordinates
    ``[M,2]`` (grid_sample's ``align_corners=False`` frame: the image spans ``[-1,1]``; some fall outside)."""
    r = cameras.R[i].to(dirs.dtype)
    fx, fy = cameras.K[i, 0, 0].item(), cameras.K[i, 1, 1].item()
    cx, cy = cameras.K[i, 0, 2].item(), cameras.K[i, 1, 2].item()
    w, h = cameras.width, cameras.height
    # Cheap cone test first: no ray of the view is further from its axis than its widest corner, so the
    # projection below runs only on the directions that can land in the image (a quarter of the sphere).
    tx, ty = max(cx, w - cx) / fx, max(cy, h - cy) / fy
    cos_max = 1.0 / math.sqrt(1.0 + tx * tx + ty * ty)
    z = dirs @ r[2]
    idx = (z >= cos_max - 1e-4).nonzero().squeeze(1)
    sub = dirs[idx]
    z = z[idx]
    a = (sub @ r[0]).div_(z).mul_(2 * fx / w).add_(2 * cx / w - 1)
    b = (sub @ r[1]).div_(z).mul_(2 * fy / h).add_(2 * cy / h - 1)
    return idx, torch.stack([a, b], dim=-1)


def _border_weight(grid: torch.Tensor) -> torch.Tensor:
    """Blend weight at normalised image coordinates ``[M,2]``: 1 at the centre, smoothly 0 at the border
    and beyond it, plus a tiny floor inside the image so pixels that only a view's edge sees stay covered."""
    one_minus_sq = 1 - grid.square()
    inside = (one_minus_sq >= 0).all(dim=-1)
    one_minus_sq.clamp_(min=0)
    wgt = one_minus_sq[:, 0] * one_minus_sq[:, 1]
    if _WEIGHT_POWER != 1:
        wgt.pow_(_WEIGHT_POWER)
    return wgt.add_(inside, alpha=1e-6)


def _stitch(
    values: torch.Tensor, masks: Optional[torch.Tensor], cameras: Cameras, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend per-view maps ``[N,C,h,w]`` into an equirectangular ``[C,H,W]`` and its coverage ``[H,W]``."""
    n, c, h, w = values.shape
    if len(cameras) != n:
        raise PanoramaError(f"Got {n} views but {len(cameras)} cameras; pass one camera per view.")
    if masks is not None and masks.shape != (n, h, w):
        raise PanoramaError(f"Masks {tuple(masks.shape)} must be [N,H,W] = {(n, h, w)}, one per view.")
    if (h, w) != (cameras.height, cameras.width):
        cameras = cameras.resized(w, h)
    dtype = values.dtype if values.is_floating_point() else torch.float32
    dirs = equirect_directions(height, width, device=values.device, dtype=dtype).view(-1, 3)
    acc = torch.zeros(c, dirs.shape[0], device=values.device, dtype=dtype)
    wsum = torch.zeros(dirs.shape[0], device=values.device, dtype=dtype)
    for i in range(n):
        idx, grid = _view_hits(cameras, i, dirs)
        if idx.numel() == 0:
            continue
        wgt = _border_weight(grid)
        if masks is None:
            contrib = _sample(values[i].to(dtype), grid, "border")
        else:
            # Normalised convolution: sample (value·valid, valid) so masked-out pixels never leak in.
            valid = masks[i : i + 1].to(device=values.device, dtype=torch.bool)
            kept = torch.where(valid, values[i].to(dtype), torch.zeros((), dtype=dtype, device=values.device))
            s = _sample(torch.cat([kept, valid.to(dtype)]), grid, "zeros")
            cover = s[-1] * (s[-1] > 1e-3)
            contrib = s[:-1] / s[-1].clamp_min(1e-3)
            wgt = wgt * cover
        acc.index_add_(1, idx, contrib * wgt)
        wsum.index_add_(0, idx, wgt)
    covered = wsum > 0
    out = torch.where(covered, acc / wsum.clamp_min(1e-12), torch.zeros_like(acc))
    return out.view(c, height, width), covered.view(height, width)


def _check_pano(pano: torch.Tensor, name: str = "panorama") -> None:
    if pano.dim() != 3:
        raise PanoramaError(f"The {name} must be a [C,H,W] tensor; got shape {tuple(pano.shape)}.")


# ---- public conversions --------------------------------------------------------------------------
def equirect_to_perspective(pano: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """Cut perspective views ``[N,C,H,W]`` out of an equirectangular ``pano [C,Hp,Wp]``.

    Only the cameras' rotations are used: the views are taken from the panorama's centre.
    """
    _check_pano(pano)
    c, hp, wp = pano.shape
    dtype = pano.dtype if pano.is_floating_point() else torch.float32
    _, d = cameras.to(device=pano.device, dtype=dtype).rays()
    n, h, w, _ = d.shape
    uv = direction_to_equirect(d.reshape(-1, 3), hp, wp)
    out = _sample_equirect(pano.to(dtype), uv[:, 0], uv[:, 1])
    return out.view(c, n, h, w).permute(1, 0, 2, 3).contiguous()


def perspective_to_equirect(
    images: torch.Tensor,
    cameras: Cameras,
    height: int,
    width: int,
    masks: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stitch perspective views ``[N,C,H,W]`` into an equirectangular ``[C,height,width]`` panorama.

    Each view's weight falls smoothly to zero at its border, so overlapping views blend without seams.
    ``masks [N,H,W]`` (bool) marks the usable pixels of each view. Returns the panorama and its coverage
    ``[height,width]`` (bool); uncovered pixels are 0. Only rotations are used (views share the centre).
    """
    if images.dim() != 4:
        raise PanoramaError(f"Views must be an [N,C,H,W] tensor; got shape {tuple(images.shape)}.")
    return _stitch(images, masks, cameras.to(device=images.device), height, width)


def views_to_panorama_depth(depths: torch.Tensor, cameras: Cameras, height: int, width: int) -> torch.Tensor:
    """Stitch per-view z-depth maps ``[N,H,W]`` into an equirectangular distance map ``[height,width]``.

    Each z-depth becomes the distance along its pixel's ray before blending, so the result is panoramic
    depth in the module's convention (distance from the shared camera centre). Non-positive or non-finite
    depths count as missing; uncovered panorama pixels are 0.
    """
    if depths.dim() != 3:
        raise PanoramaError(f"Depth maps must be an [N,H,W] tensor; got shape {tuple(depths.shape)}.")
    n, h, w = depths.shape
    cams = cameras.to(device=depths.device)
    if len(cams) != n:
        raise PanoramaError(f"Got {n} depth maps but {len(cams)} cameras; pass one camera per view.")
    centres = cams.centers
    if (centres - centres[:1]).norm(dim=-1).max() > 1e-6 * max(1.0, float(centres.norm(dim=-1).max())):
        raise PanoramaError("Panorama depth needs views that share one camera centre; these cameras are at different places.")
    rays = cams.ray_directions_camera(h, w).to(depths.dtype)
    dist = depths * rays.norm(dim=-1)
    valid = torch.isfinite(depths) & (depths > 0)
    dist = torch.where(valid, dist, torch.zeros_like(dist))
    pano, covered = _stitch(dist[:, None], valid, cams, height, width)
    return pano[0] * covered


def panorama_points(
    pano: torch.Tensor,
    depth: torch.Tensor,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    valid: Optional[torch.Tensor] = None,
    depth_is_distance: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 360° point cloud ``points [M,3]``, ``colors [M,C]`` from a panorama and its depth ``[Hp,Wp]``.

    With ``depth_is_distance`` (the default and the module's convention) depth is the distance along each
    pixel's ray from ``center``. Otherwise it is the horizontal distance from the vertical axis through
    ``center`` (cylindrical depth), and pixels within 0.1° of the poles, where that is undefined, are dropped.
    Pixels with non-finite or non-positive depth, or ``valid == False``, are dropped.
    """
    _check_pano(pano)
    c, hp, wp = pano.shape
    if depth.shape != (hp, wp):
        raise PanoramaError(f"Depth {tuple(depth.shape)} must match the panorama's size {(hp, wp)}.")
    dtype = depth.dtype if depth.is_floating_point() else torch.float32
    d = equirect_directions(hp, wp, device=depth.device, dtype=torch.float64)
    keep = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        keep &= valid.to(device=depth.device, dtype=torch.bool)
    dist = depth.to(torch.float64)
    if not depth_is_distance:
        horiz = d[..., :2].norm(dim=-1)
        keep &= horiz > math.sin(math.radians(0.1))
        dist = dist / horiz.clamp_min(1e-12)
    points = torch.as_tensor(center, dtype=torch.float64, device=depth.device) + d * dist[..., None]
    return points[keep].to(dtype), pano.permute(1, 2, 0)[keep]


def bank_points(images: torch.Tensor, depths: torch.Tensor, cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """A panorama's first cloud: every bank view lifted at its full resolution, as a photo is lifted
    (``engine.geometry.cache.unproject_frame``: pixels with finite positive depth, depth edges dropped).

    Why every view and not one panoramic depth map: the views overlap (most directions are seen by two or three of
    the 27), so the cloud is denser than any one view's pixels. A forward move brings surfaces nearer than the bank
    saw them; from a cloud of one panoramic map its renders show combs of one-pixel gaps between splats, from this
    one solid holes where the scene was hidden (tests/test_panorama.py measures both). Merging per voxel to the
    scene's point budget (``PointCache.downsample``) then evens the density out in space.

    Args:
        images: The bank views, in [0, 1]. [N, 3, H, W]
        depths: Their z-depths, 0 where unknown. [N, H, W]
        cameras: Their cameras. [N]

    Returns:
        World points and their colours. [P, 3] each
    """
    if images.dim() != 4 or depths.shape != (images.shape[0], *images.shape[-2:]) or len(cameras) != images.shape[0]:
        raise PanoramaError(f"Views {tuple(images.shape)}, depths {tuple(depths.shape)} and {len(cameras)} cameras "
                            "must match: one depth map and one camera per view.")
    points, colours = [], []
    for i in range(images.shape[0]):
        lifted, lifted_colours, _ = unproject_frame(images[i], depths[i], cameras[i])
        points.append(lifted)
        colours.append(lifted_colours)
    return torch.cat(points), torch.cat(colours)
