"""Z-buffered rendering of a coloured point cloud into a batch of cameras (pure torch, any device).

The 3D cache renders through this: colour video + hole mask for the GGM branch, pointmaps for the SSM.

How the z-buffer stays fast and deterministic: for every (frame, point) one int64 *key* packs the point's
depth bits above its point index, ``key = depth_bits << b | index`` with ``b = P.bit_length()``. The bit
pattern of a positive IEEE float orders the same way as the float, so one ``scatter_reduce(amin)`` per
frame gives, per pixel, the nearest point, ties broken by the smaller point index, and the winner's index
in the low bits — with no second pass and no dependence on scatter order (min of distinct keys).

Precision of the depth order (``b = P.bit_length()``):
- float32 points (compute in float32): all 31 bits of a positive float32 fit beside the index for
  ``P < 2**32``, so the order is the exact float32 order of the computed depths; only depths that are
  equal in float32 tie (and then the smaller index wins).
- float64 points (compute in float64): the depth is truncated to its top ``63 - b`` bits, i.e. depths
  closer than a relative ``2**-(52 - b)`` tie (about 2.3e-10 for 1M points) and the smaller index wins.
The returned depth is never the quantised key: it is the winner's camera z as computed in that dtype.

Pixel convention (``cameras.py``): a point at ``(u, v)`` lands in pixel ``(floor(v), floor(u))``; ``u = 0``
is inside, ``u = W`` outside. Projection uses ``K @ w2c`` folded into one 3x4 matrix, so ``u`` may differ
from ``fx*x/z + cx`` by an ulp of the compute dtype; a point within that of a pixel edge may land on
either side.

Splats (``radius = r > 0``): a point covers the ``(2r+1)^2`` pixel square centred on its pixel, every
covered pixel taking the point's depth; the square is clipped to the image, so a point projecting just
outside the image still covers the border pixels its square reaches (no dark band along the edges).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.geometry.cameras import Cameras


class RenderInputError(ValueError):
    """Inputs to ``render_points`` that cannot be rendered; the message is one readable sentence."""


@dataclass
class RenderResult:
    """What the cameras see of a point cloud. ``N`` frames of ``H x W`` pixels; holes are where no point lands.

    image [N,3,H,W] float in [0,1] (0 in holes); mask [N,H,W] bool (True = covered);
    depth [N,H,W] camera z of the winning point (0 in holes); pointmap [N,H,W,3] world XYZ of the winning
    point (0 in holes); index [N,H,W] int64 winning point index (-1 in holes).
    """

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    pointmap: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


# Elements of the [frames, points] projection processed per pass. On a CPU a single frame of a 1M cloud
# already keeps all cores busy and its temporaries fit in cache; a GPU wants all frames at once.
_CPU_PASS_ELEMENTS = 1 << 20
_GPU_PASS_ELEMENTS = 1 << 26


def _check_inputs(points, colors, radius, near, far) -> None:
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] != 3:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise RenderInputError(f"Points must be a tensor of shape [P,3]; got {shape}.")
    if not isinstance(colors, torch.Tensor) or colors.dim() != 2 or colors.shape[1] != 3:
        shape = tuple(colors.shape) if isinstance(colors, torch.Tensor) else type(colors).__name__
        raise RenderInputError(f"Colors must be a tensor of shape [P,3]; got {shape}.")
    if colors.shape[0] != points.shape[0]:
        raise RenderInputError(
            f"Colors must give one colour per point; got {colors.shape[0]} colours for {points.shape[0]} points."
        )
    if int(radius) != radius or radius < 0:
        raise RenderInputError(f"Point radius must be a whole number of pixels >= 0; got {radius}.")
    if not near >= 0:
        raise RenderInputError(f"The near plane must be at depth >= 0; got {near}.")
    if far is not None and not far > near:
        raise RenderInputError(f"The far plane must lie beyond the near plane ({near}); got {far}.")


def _compute_dtype(points: torch.Tensor) -> torch.dtype:
    return torch.float64 if points.dtype == torch.float64 else torch.float32


def _image_colors(colors: torch.Tensor) -> torch.Tensor:
    if colors.dtype == torch.uint8:
        return colors.float() / 255.0
    return colors if colors.is_floating_point() else colors.float()


def _default_chunk(n_frames: int, n_points: int, device: torch.device) -> int:
    budget = _GPU_PASS_ELEMENTS if device.type == "cuda" else _CPU_PASS_ELEMENTS
    return max(1, min(n_frames, budget // max(n_points, 1)))


def _projection_rows(cameras: Cameras, dtype: torch.dtype, device) -> torch.Tensor:
    """``K @ [R|t]`` per camera ``[N,3,4]``, folded in float64 with plain IEEE products and sums.

    The third row is exactly ``w2c``'s (K's last row is 0 0 1), so the projected z is the camera depth.
    """
    k = cameras.K.to(device=device, dtype=torch.float64)
    rt = cameras.w2c.to(device=device, dtype=torch.float64)[:, :3, :]
    folded = k[:, :, 0:1] * rt[:, 0:1, :] + k[:, :, 1:2] * rt[:, 1:2, :] + k[:, :, 2:3] * rt[:, 2:3, :]
    return folded.to(dtype)


def _project(proj: torch.Tensor, points_rows: torch.Tensor, out: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``out[c,3,P+1]`` = (u*z, v*z, z) of every point in every camera of the pass (sentinel column 0).

    Separate multiplies and adds (no BLAS, no fused multiply-add) so every element is the same IEEE result
    whatever the chunking, thread count or device: pixel assignment is reproducible bit for bit.
    """
    torch.mul(proj[:, :, 0:1], points_rows[0], out=out)
    for axis in (1, 2):
        out.add_(torch.mul(proj[:, :, axis : axis + 1], points_rows[axis], out=term))
    out.add_(proj[:, :, 3:4])
    out[:, :, -1] = 0
    return out


def render_points(
    points: torch.Tensor,
    colors: torch.Tensor,
    cameras: Cameras,
    radius: int = 0,
    near: float = 1e-3,
    far: Optional[float] = None,
    chunk: Optional[int] = None,
) -> RenderResult:
    """Render ``points [P,3]`` (world) with ``colors [P,3]`` into every camera of ``cameras``.

    Nearest point wins each pixel (ties: smaller point index); points with camera z < ``near`` (or
    z <= 0), z > ``far``, or outside the image are dropped. ``radius`` is the splat half-size in pixels.
    ``chunk`` is how many frames one pass projects at once (default: sized for the device). Runs on the
    points' device; computes in float64 for float64 points, else float32, and returns depth and pointmap
    in that dtype.
    """
    _check_inputs(points, colors, radius, near, far)
    radius = int(radius)
    device = points.device
    dtype = _compute_dtype(points)
    n, h, w = len(cameras), cameras.height, cameras.width
    p = points.shape[0]
    hw = h * w

    if p == 0 or n == 0:
        return RenderResult(
            torch.zeros(n, 3, h, w, dtype=_image_colors(colors[:0]).dtype, device=device),
            torch.zeros(n, h, w, dtype=torch.bool, device=device),
            torch.zeros(n, h, w, dtype=dtype, device=device),
            torch.zeros(n, h, w, 3, dtype=dtype, device=device),
            torch.full((n, h, w), -1, dtype=torch.int64, device=device),
        )
    # Every output pixel is written below (holes by the sentinel), so no zero fill: on a CPU zeroing
    # ~300 MB of fresh outputs costs as much as the whole z-buffer.
    image = torch.empty(n, 3, h, w, dtype=_image_colors(colors[:0]).dtype, device=device)
    depth = torch.empty(n, h, w, dtype=dtype, device=device)
    pointmap = torch.empty(n, h, w, 3, dtype=dtype, device=device)
    index = torch.empty(n, h, w, dtype=torch.int64, device=device)
    mask = torch.empty(n, h, w, dtype=torch.bool, device=device)
    if chunk is not None and (int(chunk) != chunk or chunk < 1):
        raise RenderInputError(f"Frame chunk must be a whole number >= 1; got {chunk}.")
    chunk = int(chunk) if chunk is not None else _default_chunk(n, p, device)

    # Index P is a sentinel "no point": a zero colour, a zero world point and depth 0, so holes come out of
    # the gathers already zeroed and the initial key of every pixel decodes to it.
    idx_bits = p.bit_length()
    depth_bits = 63 if dtype == torch.float64 else 31
    drop_bits = max(0, depth_bits + idx_bits - 63)
    low_mask = (1 << idx_bits) - 1
    empty_key = (((1 << (63 - idx_bits)) - 1) << idx_bits) | p
    bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32

    # Column P of every table is the sentinel "no point" (zero world point, zero colour, depth 0).
    points_rows = torch.zeros(3, p + 1, dtype=dtype, device=device)
    points_rows[:, :p] = points.T.to(dtype)
    colors_rows = torch.zeros(3, p + 1, dtype=image.dtype, device=device)
    colors_rows[:, :p] = _image_colors(colors).T.to(device)
    point_ids = torch.arange(p + 1, dtype=torch.int64, device=device)
    proj = _projection_rows(cameras, dtype, device)

    # Every per-pass temporary is allocated once and written with out=/in-place ops: on a CPU, fresh
    # multi-megabyte allocations cost more in page faults than the arithmetic they hold.
    uvz_ws = torch.empty(chunk, 3, p + 1, dtype=dtype, device=device)
    term_ws = torch.empty(chunk, 3, p + 1, dtype=dtype, device=device)
    valid_ws = torch.empty(chunk, p + 1, dtype=torch.bool, device=device)
    test_ws = torch.empty(chunk, p + 1, dtype=torch.bool, device=device)
    pix_ws = torch.empty(chunk, p + 1, dtype=torch.int64, device=device)
    keys_ws = torch.empty(chunk, p + 1, dtype=torch.int64, device=device)
    zbuf_ws = torch.empty(chunk, hw + 1, dtype=torch.int64, device=device)
    dump = torch.tensor(hw, dtype=torch.int64, device=device)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c = stop - start
        uvz = _project(proj[start:stop], points_rows, uvz_ws[:c], term_ws[:c])
        z, u, v = uvz[:, 2], uvz[:, 0], uvz[:, 1]
        u.div_(z)
        v.div_(z)
        valid, test = valid_ws[:c], test_ws[:c]
        # z > 0 as well as z >= near: the depth bits below are only ordered for positive floats.
        torch.ge(z, near, out=valid) if near > 0 else torch.gt(z, 0, out=valid)
        if far is not None:
            valid.logical_and_(torch.le(z, far, out=test))
        # Keys of culled entries are never read (they go to the dump slot), so their bits may be junk.
        keys = keys_ws[:c]
        keys.copy_(z.view(bits_dtype))
        if drop_bits:
            keys.bitwise_right_shift_(drop_bits)
        torch.add(point_ids, keys, alpha=1 << idx_bits, out=keys)
        u.floor_()
        v.floor_()
        pix = pix_ws[:c]
        zbuf = zbuf_ws[:c].fill_(empty_key)
        # One extra "dump" pixel per frame (column hw) takes every dropped entry, so no compaction is needed.
        if radius == 0:
            for bound, lo, hi in ((u, 0, w), (v, 0, h)):
                valid.logical_and_(torch.ge(bound, lo, out=test))
                valid.logical_and_(torch.lt(bound, hi, out=test))
            pix.copy_(torch.add(u, v, alpha=w, out=u))
            torch.where(valid, pix, dump, out=pix)
            zbuf.scatter_reduce_(1, pix, keys, "amin")
        else:
            # Entries whose whole square misses the image are dropped before the per-offset loop.
            for bound, lo, hi in ((u, -radius, w + radius), (v, -radius, h + radius)):
                valid.logical_and_(torch.ge(bound, lo, out=test))
                valid.logical_and_(torch.lt(bound, hi, out=test))
            base = torch.where(valid, torch.add(u, v, alpha=w).to(torch.int64), 0)
            for dy, dx in offsets:
                inside = valid & (u >= -dx) & (u < w - dx) & (v >= -dy) & (v < h - dy)
                torch.where(inside, base + (dy * w + dx), dump, out=pix)
                zbuf.scatter_reduce_(1, pix, keys, "amin")
        _write_winners(zbuf[:, :hw], low_mask, p, z, points_rows, colors_rows, slice(start, stop),
                       image, depth, pointmap, index, mask)
    return RenderResult(image, mask, depth, pointmap, index)


def _write_winners(zbuf, low_mask, p, z, points_rows, colors_rows, frames, image, depth, pointmap, index, mask):
    """Decode winner indices from the keys and gather colour, depth and world point per pixel.

    Gathers go row by row from 1-D tables (one per channel): torch's 1-D index_select is several times
    faster than gathering rows of a [P,3] table.
    """
    c, hw = zbuf.shape
    winner = torch.bitwise_and(zbuf, low_mask)
    hole = winner == p
    torch.logical_not(hole, out=mask[frames].view(c, hw))
    index[frames].view(c, hw).copy_(winner).masked_fill_(hole, -1)
    for i, f in enumerate(range(frames.start, frames.stop)):
        torch.index_select(z[i], 0, winner[i], out=depth[f].view(hw))
        for ch in range(3):
            torch.index_select(colors_rows[ch], 0, winner[i], out=image[f, ch].view(hw))
        world = pointmap[f].view(hw, 3)
        for ch in range(3):
            world[:, ch] = torch.index_select(points_rows[ch], 0, winner[i])
