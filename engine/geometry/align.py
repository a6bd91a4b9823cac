"""Scale (and shift) alignment of a new frame's depth to the depth the 3D cache already has there.

Model and space
    ``reference ~= scale * depth + shift``, fitted in *depth* space because the result is applied as an
    affine map of depth (``Alignment.apply``), the cache renders camera z-depth, and monocular estimators such
    as MoGe are affine-ambiguous in depth.
    Residuals are *relative*, ``e = (scale * d + shift - r) / r``: absolute depth errors grow with distance,
    so an absolute fit would be decided by the far background; relative errors weigh near and far alike.
    The fit stays linear in ``(scale, shift)``: with ``a = d / r`` and ``b = 1 / r``, ``e = scale*a + shift*b - 1``.

Robust fit (``robust=True``)
    1. Initial guess by least median of squares: 2-pixel hypotheses (1-pixel, i.e. the median ratio, without
       shift) drawn with a seeded generator and scored by the median |e| on a pixel subset. The median
       tolerates up to half the pixels being outliers, with no inlier threshold to tune.
    2. Refinement by iteratively reweighted least squares with Tukey's biweight (c = 4.685 sigma, sigma from
       the median absolute residual): redescending, so gross outliers (disocclusions, wrong cache points)
       get weight 0 instead of the bounded pull a Huber loss would leave them.
    ``inliers`` counts pixels with non-zero final weight; ``residual`` is the RMS relative error over them.
    Without ``robust`` it is one weighted least squares over all pixels (inliers = all of them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TUKEY_C = 4.685
MAD_TO_SIGMA = 1.4826


class AlignmentError(ValueError):
    """Depth that cannot be aligned (too little overlap, mismatched shapes); the message is one sentence."""


@dataclass(frozen=True)
class Alignment:
    """``aligned = scale * depth + shift``; ``inliers`` pixels support it with RMS relative error ``residual``."""

    scale: float
    shift: float
    inliers: int
    residual: float

    def apply(self, depth: torch.Tensor) -> torch.Tensor:
        """The aligned depth (same shape, dtype and device); a plain affine map, holes are not special-cased."""
        return depth * self.scale + self.shift


def _solve(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, with_shift: bool) -> tuple[float, float]:
    """Weighted least squares of ``scale*a + shift*b = 1``."""
    saa = (w * a * a).sum()
    sa = (w * a).sum()
    if with_shift:
        sab = (w * a * b).sum()
        sbb = (w * b * b).sum()
        sb = (w * b).sum()
        det = saa * sbb - sab * sab
        # A (near-)constant depth over the overlap makes a and b proportional: the shift is then not
        # identifiable, and a pure scale is the honest answer.
        if det > 1e-12 * saa * sbb:
            return float((sa * sbb - sb * sab) / det), float((saa * sb - sab * sa) / det)
    if saa <= 0:
        return float("nan"), 0.0
    return float(sa / saa), 0.0


def _residuals(a, b, scale, shift):
    return scale * a + shift * b - 1.0


def _initial_guess(a, b, d, r, with_shift, generator, hypotheses, score_pixels):
    n = a.numel()
    ratio_scale = float(torch.median(r / d))
    if not with_shift:
        return ratio_scale, 0.0
    dev = a.device
    pick = torch.randint(0, n, (min(n, score_pixels),), generator=generator).to(dev)
    sa, sb = a[pick], b[pick]
    i = torch.randint(0, n, (hypotheses,), generator=generator).to(dev)
    j = torch.randint(0, n, (hypotheses,), generator=generator).to(dev)
    dd = d[i] - d[j]
    ok = dd.abs() > 1e-9 * d.abs().max()
    scales = torch.where(ok, (r[i] - r[j]) / torch.where(ok, dd, torch.ones_like(dd)), torch.zeros_like(dd))
    shifts = r[i] - scales * d[i]
    ok &= scales > 0
    # The shift-free median-ratio fit competes too, so a scene that needs no shift is never made worse.
    scales = torch.cat([scales[ok], scales.new_tensor([ratio_scale])])
    shifts = torch.cat([shifts[ok], shifts.new_tensor([0.0])])
    scores = (scales[:, None] * sa[None] + shifts[:, None] * sb[None] - 1.0).abs().median(dim=1).values
    best = int(torch.argmin(scores))
    return float(scales[best]), float(shifts[best])


def align_depth(
    depth: torch.Tensor,
    reference: torch.Tensor,
    valid: torch.Tensor,
    robust: bool = True,
    with_shift: bool = True,
    min_pixels: int = 16,
    iterations: int = 30,
    seed: int = 0,
    max_pixels: int = 32768,
) -> Alignment:
    """Fit ``reference ~= scale * depth + shift`` over ``valid`` pixels where both depths are finite and > 0.

    ``depth``, ``reference`` and ``valid`` share one shape (``[H,W]``). ``with_shift=False`` fits a pure
    scale. ``seed`` fixes the robust initial guess's sampling. Above ``max_pixels`` usable pixels an even
    stride of them is fitted: two unknowns need no more, and a full frame would cost a second per call.
    Raises ``AlignmentError`` when fewer than
    ``min_pixels`` pixels overlap or the fit has no positive scale.
    """
    if not (isinstance(depth, torch.Tensor) and isinstance(reference, torch.Tensor) and isinstance(valid, torch.Tensor)):
        raise AlignmentError("Depth, reference and valid mask must all be tensors.")
    if depth.shape != reference.shape or valid.shape != depth.shape:
        raise AlignmentError(
            f"Depth {tuple(depth.shape)}, reference {tuple(reference.shape)} and valid mask {tuple(valid.shape)} "
            f"must have the same shape."
        )
    d = depth.detach().to(torch.float64)
    r = reference.detach().to(d.device, torch.float64)
    use = valid.to(d.device).bool() & torch.isfinite(d) & torch.isfinite(r) & (d > 0) & (r > 0)
    n = int(use.sum())
    if n < max(int(min_pixels), 2 if with_shift else 1):
        raise AlignmentError(
            f"Only {n} pixels overlap between the new depth and the reference (at least {min_pixels} are needed), "
            f"so the depth cannot be aligned; keep its own scale or choose views that overlap more."
        )
    d, r = d[use], r[use]
    if max_pixels and n > max_pixels:
        pick = torch.linspace(0, n - 1, int(max_pixels), device=d.device).round().long()
        d, r = d[pick], r[pick]
    a, b = d / r, 1.0 / r

    if not robust:
        scale, shift = _solve(a, b, torch.ones_like(a), with_shift)
        inliers = torch.ones_like(a, dtype=torch.bool)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        scale, shift = _initial_guess(a, b, d, r, with_shift, generator, hypotheses=256, score_pixels=2048)
        for _ in range(int(iterations)):
            e = _residuals(a, b, scale, shift)
            sigma = max(MAD_TO_SIGMA * float(e.abs().median()), 1e-12)
            u = e / (TUKEY_C * sigma)
            w = torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u))
            if int((w > 0).sum()) < (2 if with_shift else 1):
                break
            new_scale, new_shift = _solve(a, b, w, with_shift)
            done = abs(new_scale - scale) <= 1e-12 * abs(scale) and abs(new_shift - shift) <= 1e-12 * (abs(shift) + abs(scale))
            scale, shift = new_scale, new_shift
            if done:
                break
        e = _residuals(a, b, scale, shift)
        sigma = max(MAD_TO_SIGMA * float(e.abs().median()), 1e-12)
        inliers = e.abs() < TUKEY_C * sigma

    if not scale > 0:
        raise AlignmentError(
            "The new depth does not increase with the reference depth over their overlap (no positive scale fits), "
            "so it cannot be aligned; keep its own scale."
        )
    e = _residuals(a, b, scale, shift)[inliers]
    residual = float(torch.sqrt((e * e).mean())) if e.numel() else float("nan")
    return Alignment(scale=float(scale), shift=float(shift), inliers=int(inliers.sum()), residual=residual)
