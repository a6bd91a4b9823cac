"""Depth alignment against known synthetic transforms (the truth is the transform we applied)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.geometry.align import Alignment, AlignmentError, align_depth


def _scene_depth(h=48, w=64, seed=0) -> torch.Tensor:
    """A smooth positive depth map (slanted plane plus bumps) with a wide range of depths."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64), torch.linspace(0, 1, w, dtype=torch.float64),
                          indexing="ij")
    bumps = 0.3 * torch.sin(6 * x + torch.rand(1, generator=g, dtype=torch.float64)) * torch.cos(4 * y)
    return 1.0 + 4.0 * y + 2.0 * x + bumps


def _corrupt(reference, outlier_fraction, noise, seed):
    g = torch.Generator().manual_seed(seed)
    ref = reference * (1 + noise * torch.randn(reference.shape, generator=g, dtype=torch.float64))
    out = torch.rand(reference.shape, generator=g, dtype=torch.float64) < outlier_fraction
    # Gross outliers in both directions, as disocclusions and wrong cache points give.
    wild = reference * (0.2 + 3.0 * torch.rand(reference.shape, generator=g, dtype=torch.float64))
    return torch.where(out, wild, ref), out


@pytest.mark.parametrize("scale,shift", [(2.5, 0.7), (0.4, -0.2), (1.0, 0.0)])
def test_recovers_scale_and_shift_with_noise_and_outliers(scale, shift):
    depth = _scene_depth()
    truth = scale * depth + shift
    ref, outliers = _corrupt(truth, 0.2, 0.01, seed=1)
    assert 0.17 < outliers.float().mean() < 0.23
    valid = torch.ones_like(depth, dtype=torch.bool)
    al = align_depth(depth.float(), ref.float(), valid)
    assert al.scale == pytest.approx(scale, rel=0.01)
    assert al.shift == pytest.approx(shift, abs=0.01 * max(abs(shift), scale))
    # Most clean pixels are kept, and most outliers rejected.
    assert al.inliers >= 0.95 * int((~outliers).sum())
    assert al.inliers <= int((~outliers).sum()) + 0.05 * int(outliers.sum())
    assert al.residual == pytest.approx(0.01, rel=0.3)  # relative RMS of the 1% noise


def test_plain_least_squares_is_hurt_by_outliers_and_matches_numpy_without_them():
    depth = _scene_depth()
    truth = 1.7 * depth + 0.3
    ref, _ = _corrupt(truth, 0.2, 0.0, seed=2)
    valid = torch.ones_like(depth, dtype=torch.bool)
    robust = align_depth(depth, ref, valid)
    plain = align_depth(depth, ref, valid, robust=False)
    assert robust.scale == pytest.approx(1.7, rel=1e-6)
    assert abs(plain.scale - 1.7) > 0.02  # the robust path is what rejects them
    # Without outliers the plain fit equals numpy's weighted lstsq of the relative residuals.
    ref_clean = truth * (1 + 0.02 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64))
    al = align_depth(depth, ref_clean, valid, robust=False)
    d, r = depth.numpy().ravel(), ref_clean.numpy().ravel()
    sol, *_ = np.linalg.lstsq(np.stack([d / r, 1 / r], axis=1), np.ones_like(d), rcond=None)
    assert al.scale == pytest.approx(sol[0], rel=1e-9)
    assert al.shift == pytest.approx(sol[1], rel=1e-7, abs=1e-9)
    assert al.inliers == d.size


def test_pure_scale_without_shift():
    depth = _scene_depth(seed=4)
    ref, _ = _corrupt(3.2 * depth, 0.2, 0.01, seed=5)
    valid = torch.ones_like(depth, dtype=torch.bool)
    al = align_depth(depth, ref, valid, with_shift=False)
    assert al.shift == 0.0
    assert al.scale == pytest.approx(3.2, rel=0.01)


def test_only_valid_and_positive_pixels_count():
    depth = _scene_depth(seed=6)
    ref = 2.0 * depth + 0.5
    valid = torch.zeros_like(depth, dtype=torch.bool)
    valid[10:30, 10:40] = True
    junk = ref.clone()
    junk[~valid] = 1e6  # garbage outside the mask must not matter even for the plain fit
    junk[12, 12] = 0.0  # a hole in the reference inside the mask
    depth_nan = depth.clone()
    depth_nan[13, 13] = float("nan")
    al = align_depth(depth_nan, junk, valid, robust=False)
    assert al.scale == pytest.approx(2.0, rel=1e-9)
    assert al.shift == pytest.approx(0.5, rel=1e-9)
    assert al.inliers == int(valid.sum()) - 2


def test_apply_is_the_affine_map():
    al = Alignment(scale=2.0, shift=-0.5, inliers=10, residual=0.0)
    d = torch.rand(5, 7, dtype=torch.float32) + 1
    out = al.apply(d)
    assert out.dtype == d.dtype and out.shape == d.shape
    torch.testing.assert_close(out, 2.0 * d - 0.5)


def test_too_few_pixels_raises_one_sentence():
    depth = _scene_depth()
    valid = torch.zeros_like(depth, dtype=torch.bool)
    valid[0, :5] = True
    with pytest.raises(AlignmentError) as err:
        align_depth(depth, depth * 2, valid)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "5 pixels" in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_mismatched_shapes_raise():
    with pytest.raises(AlignmentError):
        align_depth(torch.ones(4, 4), torch.ones(4, 5), torch.ones(4, 4, dtype=torch.bool))


def test_constant_depth_falls_back_to_scale():
    depth = torch.full((8, 8), 2.0, dtype=torch.float64)
    al = align_depth(depth, depth * 3.0, torch.ones(8, 8, dtype=torch.bool))
    assert al.shift == 0.0 and al.scale == pytest.approx(3.0, rel=1e-9)


def test_anticorrelated_depth_raises():
    depth = _scene_depth()
    ref = 20.0 - 2.0 * depth
    with pytest.raises(AlignmentError):
        align_depth(depth, ref, torch.ones_like(depth, dtype=torch.bool), robust=False)


def test_deterministic():
    depth = _scene_depth()
    ref, _ = _corrupt(1.3 * depth + 0.1, 0.3, 0.02, seed=7)
    valid = torch.ones_like(depth, dtype=torch.bool)
    assert align_depth(depth, ref, valid) == align_depth(depth, ref, valid)
