"""The `preview` engine: no generative network, the geometric loop only.

A clip is the 3D cache rendered along the trajectory with its holes filled by classical inpainting
(OpenCV Telea), frame 0 being the input view itself. It shows on a CPU what the real engines are
conditioned on, and lets the memory, cache growth and outputs run end to end.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

PREVIEW_NOTE = (
    "preview engine: frames are the 3D cache rendered along the camera path with holes filled by classical "
    "inpainting; no video model ran"
)


def fill_holes(frames: torch.Tensor, covered: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """Inpaint the uncovered pixels of ``frames [F,3,H,W]`` (covered: bool ``[F,H,W]``); covered pixels are kept."""
    out = frames.detach().cpu().float().clone()
    covered = covered.detach().cpu()
    for i in range(out.shape[0]):
        holes = ~covered[i]
        if not bool(holes.any()):
            continue
        if not bool(covered[i].any()):
            continue  # nothing to propagate from: an all-black frame is the honest answer
        img = (out[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        filled = cv2.inpaint(img, holes.numpy().astype(np.uint8), radius, cv2.INPAINT_TELEA)
        filled_t = torch.from_numpy(filled).permute(2, 0, 1).float() / 255.0
        out[i] = torch.where(holes[None], filled_t, out[i])
    return out


def preview_clip(start_image: torch.Tensor, render_image: torch.Tensor, render_mask: torch.Tensor) -> torch.Tensor:
    """Frames ``[F,3,H,W]``: the start image, then the hole-filled renders of frames 1..F-1."""
    frames = fill_holes(render_image, render_mask)
    frames[0] = start_image.detach().cpu().float()
    return frames
