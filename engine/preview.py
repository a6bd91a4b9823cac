"""The `preview` engine: no generative network, the geometric loop only.

A clip is the 3D cache rendered along the trajectory with its holes filled by classical inpainting
(OpenCV Telea), frame 0 being the input view itself. It shows on a CPU what the real engines are
conditioned on, and lets the memory, cache growth and outputs run end to end.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

PREVIEW_NOTE = (
    "preview engine: frames are the 3D cache rendered along the camera path with holes filled by classical "
    "inpainting; no video model ran"
)


def fill_holes(frames: torch.Tensor, covered: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """Inpaint the uncovered pixels of ``frames [F,3,H,W]`` (covered: bool ``[F,H,W]``); covered pixels are kept.

    Frames are filled by a small thread pool (OpenCV lets other threads run while it inpaints); each frame's result
    depends on that frame alone."""
    from concurrent.futures import ThreadPoolExecutor

    out = frames.detach().cpu().float().clone()
    covered = covered.detach().cpu()
    holes_all = (~covered).numpy()
    todo = [i for i in range(out.shape[0]) if holes_all[i].any() and not holes_all[i].all()]
    # (no holes: nothing to fill; nothing covered: nothing to propagate from, an all-black frame is the honest answer)
    pixels = out.permute(0, 2, 3, 1).numpy()  # a view of ``out``: each frame is filled in place

    def fill(i: int) -> None:
        img = np.clip(np.rint(pixels[i] * 255.0), 0, 255).astype(np.uint8)
        filled = cv2.inpaint(img, holes_all[i].astype(np.uint8), radius, cv2.INPAINT_TELEA)
        holes = holes_all[i]
        pixels[i][holes] = filled[holes].astype(np.float32) / np.float32(255.0)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, todo))
    return out


def preview_clip(start_image: torch.Tensor, render_image: torch.Tensor, render_mask: torch.Tensor) -> torch.Tensor:
    """Frames ``[F,3,H,W]``: the start image, then the hole-filled renders of frames 1..F-1."""
    frames = fill_holes(render_image, render_mask)
    frames[0] = start_image.detach().cpu().float()
    return frames
