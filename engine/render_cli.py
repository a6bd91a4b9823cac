"""``python -m engine render``: a scene's 3D cache rendered along a trajectory (the GGM inputs).

A scene is either a job folder (its current cache is rendered) or an example-style folder holding one image
(``image.png`` or ``start_frame.png``, any real format) and optionally its official ``camera.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine import outputs
from engine.geometry.cameras import Cameras
from engine.geometry.cache import PointCache
from engine.geometry import trajectories as traj

IMAGE_NAMES = ("image.png", "image.jpg", "image.jpeg", "image.webp", "start_frame.png")


class RenderInputError(ValueError):
    """A render request that cannot be carried out; one sentence."""


def _requested_cameras(trajectory: Optional[str], folder: Path) -> tuple[Optional[Cameras], Optional[str]]:
    """(cameras from a file, or None) and (a preset name, or None)."""
    if trajectory and trajectory.lower().endswith(".json"):
        return Cameras.from_json(trajectory), None
    if trajectory:
        if trajectory not in traj.PRESETS:
            raise RenderInputError(f"Unknown trajectory '{trajectory}'; give a camera.json or one of: {', '.join(traj.PRESETS)}.")
        return None, trajectory
    if (folder / "camera.json").is_file():
        return Cameras.from_json(folder / "camera.json"), None
    return None, "orbit"


def _fit(image: torch.Tensor, max_side: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image
    size = (max(2, int(round(h * scale / 2)) * 2), max(2, int(round(w * scale / 2)) * 2))
    return F.interpolate(image[None], size=size, mode="area")[0]


def render_scene(scene: str, out: str, trajectory: Optional[str] = None, depth: Optional[str] = None,
                 frames: int = 21, max_side: int = 768, radius: int = 1,
                 announce: Callable[[str], None] = print) -> Cameras:
    from engine.depth import PlaneDepth, load_depth_estimator
    from engine.images import load_image

    folder, out_dir = Path(scene), Path(out)
    if not folder.is_dir():
        raise RenderInputError(f"Scene folder {folder} does not exist.")
    file_cams, preset = _requested_cameras(trajectory, folder)
    if (folder / "manifest.json").is_file():
        from engine.scene import Scene, TrajectoryRequest

        job = Scene.open(folder, announce=announce)
        cams = job.plan(TrajectoryRequest(name=preset or "camera.json", cameras=file_cams, frames=frames))
        cache = job.cache
    else:
        image_path = next((folder / n for n in IMAGE_NAMES if (folder / n).is_file()), None)
        if image_path is None:
            raise RenderInputError(f"{folder} holds no image ({', '.join(IMAGE_NAMES)}) and is not a job folder.")
        image = load_image(image_path)
        h0, w0 = image.shape[-2:]
        estimator = load_depth_estimator(depth, announce=announce)
        if file_cams is not None:
            start = file_cams[0].resized(w0, h0) if (file_cams.width, file_cams.height) != (w0, h0) else file_cams[0]
            if isinstance(estimator, PlaneDepth):
                # Official files put the world origin at the look-at point: the plane goes through it.
                estimator = PlaneDepth(depth=float(start.centers[0].norm()) or estimator.depth)
        else:
            k = estimator.estimate(image).intrinsics.double().reshape(1, 3, 3)
            start = Cameras(torch.eye(4, dtype=torch.float64), k, w0, h0)
        image = _fit(image, max_side)
        start = start.resized(image.shape[-1], image.shape[-2])
        fov_x = float(torch.rad2deg(2 * torch.atan(start.width / (2 * start.K[0, 0, 0]))))
        est = estimator.estimate(image, fov_x=fov_x)
        d = est.depth.float()
        if d.shape != image.shape[-2:]:
            raise RenderInputError(f"Depth map is {tuple(d.shape)} but the image is {tuple(image.shape[-2:])}; give a depth of the image's size.")
        cache = PointCache.empty()
        cache.add_frame(image, d, start, frame_id=0, valid=est.mask.bool() & (d > 0))
        if file_cams is not None:
            cams = file_cams.resized(start.width, start.height)
        else:
            cams = traj.make_trajectory(preset, start, float(d[d > 0].median()), frames=frames)
    result = cache.render(cams, radius=radius)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_video(out_dir / "render.mp4", result.image)
    outputs.write_mask_video(out_dir / "render_mask.mp4", ~result.mask)  # official convention: white = hole
    cams.save_json(out_dir / "cameras.json")
    return cams
