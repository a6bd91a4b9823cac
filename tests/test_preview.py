"""The preview engine's hole filling (engine.preview.fill_holes) against OpenCV's Telea inpainting run here on each
frame alone."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from engine.preview import fill_holes


def test_fill_holes_is_telea_frame_by_frame_and_keeps_covered_pixels():
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(6, 3, 40, 56, generator=g)
    covered = torch.rand(6, 40, 56, generator=g) > 0.4
    covered[2] = True  # no hole: unchanged
    covered[3] = False  # nothing covered: nothing to propagate from, unchanged
    out = fill_holes(frames, covered, radius=3)
    assert out.shape == frames.shape and out.dtype == torch.float32
    for i in range(6):
        expected = frames[i].permute(1, 2, 0).numpy().copy()
        holes = ~covered[i].numpy()
        if holes.any() and not holes.all():
            img = np.clip(np.round(expected.astype(np.float64) * 255), 0, 255).astype(np.uint8)
            filled = cv2.inpaint(img, holes.astype(np.uint8), 3, cv2.INPAINT_TELEA).astype(np.float32) / 255
            expected[holes] = filled[holes]
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), expected)
    assert torch.equal(out[covered[:, None].expand_as(out)], frames[covered[:, None].expand_as(frames)])
