"""Z-buffered rendering of a coloured point cloud into a batch of cameras (pure torch, any device).

The 3D cache renders through this: colour video + hole mask for the GGM branch, pointmaps for the SSM.

How the z-buffer stays fast and deterministic: for every (frame, point) one int64 *key* packs the point's
depth bits above its point index, ``key = depth_bits << b | index``. The bit pattern of a positive IEEE
float orders the same way as the float, so one ``scatter_reduce(amin)`` per frame gives, per pixel, the
nearest point, ties broken by the smaller point index, and the winner's index in the low bits — with no
second pass and no dependence on scatter order (the min of distinct keys is one value).

Precision of the depth order:
- float32 points (computed in float32, ``b = 32``): all 31 bits of a positive float32 sit above the
  index, so the order is the exact float32 order of the computed depths; only depths equal in float32
  tie (then the smaller index wins). Up to 2**31 - 1 points.
- float64 points (computed in float64, ``b = P.bit_length()``): the depth is truncated to its top
  ``63 - b`` bits, so depths closer than a relative ``2**-(52 - b)`` tie (about 2.3e-10 for 1M points)
  and the smaller index wins.
The returned depth is never the quantised key: it is the winner's camera z as computed in that dtype.

Pixel convention (``cameras.py``): a point at ``(u, v)`` lands in pixel ``(floor(v), floor(u))``; ``u = 0``
is inside, ``u = W`` outside. Projection uses ``K @ w2c`` folded into one 3x4 matrix, so ``u`` may differ
from ``fx*x/z + cx`` by an ulp of the compute dtype; a point within that of a pixel edge may land on
either side.

Points with a NaN or infinite coordinate are dropped.

Splats (``radius = r > 0``): a point covers the ``(2r+1)^2`` pixel square centred on its pixel, every
covered pixel taking the point's depth; the square is clipped to the image, so a point projecting just
outside the image still covers the border pixels its square reaches (no dark band along the edges).
"""
from __future__ import annotations

import sys
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
    point (0 in holes; None when the render was asked for none); index [N,H,W] int64 winning point index
    (-1 in holes).
    """

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    pointmap: Optional[torch.Tensor]
    index: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


# Elements of the [frames, points] projection processed per pass. On a CPU a single frame of a 1M cloud
# already keeps all cores busy and its temporaries fit in cache; a GPU wants all frames at once.
_CPU_PASS_ELEMENTS = 1 << 20
_GPU_PASS_ELEMENTS = 1 << 26
# Largest padded frame whose pixel indices float32 arithmetic represents exactly (2**24).
_EXACT_FLOAT32_INDEX = 1 << 24


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
    return colors if colors.dtype == torch.float64 else colors.float()


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
    pointmaps: bool = True,
) -> RenderResult:
    """Render ``points [P,3]`` (world) with ``colors [P,3]`` into every camera of ``cameras``.

    Nearest point wins each pixel (ties: smaller point index); points with camera z < ``near`` (or
    z <= 0), z > ``far``, or outside the image are dropped. ``radius`` is the splat half-size in pixels.
    ``chunk`` is how many frames one pass projects at once (default: sized for the device; the result
    does not depend on it). Runs on the points' device; computes in float64 for float64 points, else
    float32, and returns depth and pointmap in that dtype; the image is float32 (float64 for float64
    colours; uint8 colours are scaled by 1/255). ``pointmaps=False`` skips the pointmap (``pointmap`` is None):
    only the paper's branch-form memory reads it.
    """
    _check_inputs(points, colors, radius, near, far)
    if chunk is not None and (int(chunk) != chunk or chunk < 1):
        raise RenderInputError(f"Frame chunk must be a whole number >= 1; got {chunk}.")
    radius = int(radius)
    device = points.device
    dtype = _compute_dtype(points)
    image_dtype = _image_colors(colors[:0]).dtype
    n, h, w = len(cameras), cameras.height, cameras.width
    p = points.shape[0]
    hw = h * w
    if p == 0 or n == 0:
        return RenderResult(
            torch.zeros(n, 3, h, w, dtype=image_dtype, device=device),
            torch.zeros(n, h, w, dtype=torch.bool, device=device),
            torch.zeros(n, h, w, dtype=dtype, device=device),
            torch.zeros(n, h, w, 3, dtype=dtype, device=device) if pointmaps else None,
            torch.full((n, h, w), -1, dtype=torch.int64, device=device),
        )
    if dtype == torch.float32 and p >= 1 << 31:
        raise RenderInputError(f"At most 2**31 - 1 float32 points can be rendered at once; got {p}.")
    chunk = int(chunk) if chunk is not None else _default_chunk(n, p, device)

    # Column P of every table is the sentinel "no point" (zero world point, zero colour, depth 0): holes
    # decode to it and come out of the gathers already zeroed.
    points_rows = torch.zeros(3, p + 1, dtype=dtype, device=device)
    points_rows[:, :p] = points.T.to(dtype)
    finite = torch.isfinite(points_rows[:, :p]).all(0)
    if not bool(finite.all()):
        points_rows[:, :p][:, ~finite] = float("nan")  # NaN depth fails every test below: dropped
    colors_rows = torch.zeros(3, p + 1, dtype=image_dtype, device=device)
    colors_rows[:, :p] = _image_colors(colors).T.to(device)
    proj = _projection_rows(cameras, dtype, device)
    keys_for = _KeyPacker(p, dtype, chunk, device)

    # Outputs are written in full below (no zero fill: on a CPU that costs as much as the z-buffer).
    # ``index`` holds raw winners (P for holes) until the end: the gathers read it frame by frame.
    image = torch.empty(n, 3, h, w, dtype=image_dtype, device=device)
    depth = torch.empty(n, h, w, dtype=dtype, device=device)
    pointmap = torch.empty(n, h, w, 3, dtype=dtype, device=device) if pointmaps else None
    index = torch.empty(n, h, w, dtype=torch.int64, device=device)

    # Pixels are addressed in a frame padded by a ring of ``pad`` pixels: coordinates are clamped into the
    # ring, so off-image points (and every square of a splat) land somewhere without any range test, and
    # the ring is discarded. The ring's corner square doubles as the dump for points failing the depth
    # test: its centre (radius, radius) with every splat offset stays inside the ring.
    pad = 2 * radius + 1
    hp, wp = h + 2 * pad, w + 2 * pad
    origin = pad * wp + pad
    # Pixel arithmetic in the compute dtype is exact while indices stay below 2**24 (float32).
    coord_dtype = dtype if hp * wp < _EXACT_FLOAT32_INDEX else torch.float64

    # Per-pass temporaries are allocated once and written with out=/in-place ops: on a CPU, fresh
    # multi-megabyte allocations cost more in page faults than the arithmetic they hold.
    uvz_ws = torch.empty(chunk, 3, p + 1, dtype=dtype, device=device)
    term_ws = torch.empty(chunk, 3, p + 1, dtype=dtype, device=device)
    valid_ws = torch.empty(chunk, p + 1, dtype=torch.bool, device=device)
    test_ws = torch.empty(chunk, p + 1, dtype=torch.bool, device=device)
    pix_ws = torch.empty(chunk, p + 1, dtype=torch.int64, device=device)
    shifted_ws = torch.empty(chunk, p + 1, dtype=torch.int64, device=device) if radius else None
    zbuf_ws = torch.empty(chunk, hp * wp, dtype=torch.int64, device=device)
    dump = torch.tensor(radius * wp + radius - origin, dtype=coord_dtype, device=device)
    offsets = [dy * wp + dx for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c = stop - start
        uvz = _project(proj[start:stop], points_rows, uvz_ws[:c], term_ws[:c])
        z, u, v = uvz[:, 2], uvz[:, 0], uvz[:, 1]
        u.div_(z)
        v.div_(z)
        valid, test = valid_ws[:c], test_ws[:c]
        # z > 0 as well as z >= near: the depth bits are only ordered for positive floats.
        torch.ge(z, near, out=valid) if near > 0 else torch.gt(z, 0, out=valid)
        if far is not None:
            valid.logical_and_(torch.le(z, far, out=test))
        # Keys of culled entries are never read (they go to the dump pixel), so their bits may be junk.
        keys = keys_for(z)
        if coord_dtype != dtype:
            u, v = u.to(coord_dtype), v.to(coord_dtype)
        # Clamped to the ring: a clamped point's whole square stays in the ring, off the image.
        u.floor_().clamp_(-radius - 1, w + radius)
        v.floor_().clamp_(-radius - 1, h + radius)
        pixf = torch.where(valid, torch.add(u, v, alpha=wp, out=u), dump, out=u)
        pix = pix_ws[:c]
        pix.copy_(pixf).add_(origin)
        zbuf = zbuf_ws[:c].fill_(keys_for.empty_key)
        if radius == 0:
            zbuf.scatter_reduce_(1, pix, keys, "amin")
        else:
            shifted = shifted_ws[:c]
            for offset in offsets:
                zbuf.scatter_reduce_(1, torch.add(pix, offset, out=shifted), keys, "amin")
        inner = zbuf.view(c, hp, wp)[:, pad : pad + h, pad : pad + w]
        winners = torch.bitwise_and(inner, keys_for.index_mask, out=index[start:stop])
        for i in range(c):
            # Depth now, while this pass's z row is still in cache.
            torch.index_select(z[i], 0, winners[i].view(hw), out=depth[start + i].view(hw))

    # Channel-major gathers: each table row stays in cache across all frames (random reads into a cloud
    # of a million points are cache-bound; this order is ~1.7x faster than frame-major on a CPU).
    flat = index.view(n, hw)
    for ch in range(3):
        for f in range(n):
            torch.index_select(colors_rows[ch], 0, flat[f], out=image[f, ch].view(hw))
    if pointmap is not None:
        gathered = torch.empty(hw, dtype=dtype, device=device)
        for ch in range(3):
            for f in range(n):
                pointmap[f].view(hw, 3)[:, ch].copy_(torch.index_select(points_rows[ch], 0, flat[f], out=gathered))
    mask = index != p
    index.masked_fill_(~mask, -1)
    return RenderResult(image, mask, depth, pointmap, index)


class _KeyPacker:
    """Writes the per-pass int64 keys ``depth_bits << b | point_index`` (see the module docstring)."""

    def __init__(self, p: int, dtype: torch.dtype, chunk: int, device) -> None:
        self.float32 = dtype == torch.float32
        self.idx_bits = 32 if self.float32 else p.bit_length()
        depth_bits = 31 if self.float32 else 63
        self.drop_bits = max(0, depth_bits + self.idx_bits - 63)
        self.index_mask = (1 << self.idx_bits) - 1
        # Larger than every real key (all depth bits set, above any finite float) and decodes to P.
        self.empty_key = (((1 << (63 - self.idx_bits)) - 1) << self.idx_bits) | p
        ids = torch.arange(p + 1, dtype=torch.int64, device=device)
        self.keys = torch.empty(chunk, p + 1, dtype=torch.int64, device=device)
        # float32 on a little-endian machine: the low int32 word of every key is the point index for
        # good, and each pass only copies the depth bits into the high word (one 4-byte strided copy
        # instead of converting and combining 8-byte integers).
        self.high_word = self.float32 and sys.byteorder == "little"
        if self.high_word:
            self.keys.copy_(ids)
            self.words = self.keys.view(torch.int32).view(chunk, p + 1, 2)
        else:
            self.ids = ids

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[0]
        if self.high_word:
            self.words[:c, :, 1].copy_(z.view(torch.int32))
            return self.keys[:c]
        keys = self.keys[:c]
        keys.copy_(z.view(torch.int32 if self.float32 else torch.int64))
        if self.drop_bits:
            keys.bitwise_right_shift_(self.drop_bits)
        return torch.add(self.ids, keys, alpha=1 << self.idx_bits, out=keys)
