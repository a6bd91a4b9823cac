"""The planned camera paths drawn into the point cloud, before anything is generated.

One ``.glb`` for ``gr.Model3D``: the scene's 3D cache as coloured points, and for every planned trajectory
its camera centres joined into a path plus a few camera frusta, all drawn as densely sampled points (the
viewer shows POINTS primitives reliably, and it sends every ``.ply`` to its splat renderer). The file is written
by the engine's own GLB writer, so the path lands in the same frame as the ``scene.glb`` shown later.

The drawing is sized by point count, not by the scene's scale: a path gets points every 1/150 of the scene's median
depth, but never more than ``MAX_PATH_POINTS`` (polyline and frusta together), however long it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from engine import outputs
from engine.geometry.cameras import Cameras

# Distinct, saturated colours so neighbouring paths can be told apart against a photo-coloured cloud.
PATH_COLORS = np.array([
    [255, 40, 40], [40, 200, 255], [255, 200, 0], [180, 80, 255], [0, 220, 120],
    [255, 120, 200], [255, 140, 0], [120, 255, 40],
], dtype=np.uint8)
MAX_CLOUD_POINTS = 400_000
MAX_PATH_POINTS = 6_000  # per planned path: 2/3 for the polyline through the centres, 1/3 for the frusta


def _segment_points(a: np.ndarray, b: np.ndarray, step: float, budget: int) -> np.ndarray:
    """Points every ``step`` along the segments ``a[i] -> b[i]`` (both ``[M,3]``), the step widened so that all
    segments together take at most ``budget`` points plus their ends."""
    lengths = np.linalg.norm(b - a, axis=1) if len(a) else np.zeros(0)
    step = max(step if np.isfinite(step) else 0.0, float(lengths.sum()) / max(budget, 1))
    out = []
    for p, q, length in zip(a, b, lengths):
        n = max(2, int(np.ceil(length / step)) + 1) if step > 0 else 2
        t = np.linspace(0.0, 1.0, n)[:, None]
        out.append(p + t * (q - p))
    return np.concatenate(out) if out else np.zeros((0, 3))


def frustum_segments(cams: Cameras, size: float) -> tuple[np.ndarray, np.ndarray]:
    """The 8 edges (4 from the centre, 4 around the image plane at distance ``size``) of each camera."""
    K = cams.K.detach().cpu().double().numpy()
    c2w = cams.c2w.detach().cpu().double().numpy()
    w, h = cams.width, cams.height
    corners_px = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], dtype=np.float64)
    starts, ends = [], []
    for k, m in zip(K, c2w):
        rays = corners_px @ np.linalg.inv(k).T  # camera-frame directions with z = 1
        corners = (rays * size) @ m[:3, :3].T + m[:3, 3]
        centre = m[:3, 3]
        for i in range(4):
            starts += [centre, corners[i]]
            ends += [corners[i], corners[(i + 1) % 4]]
    return np.array(starts), np.array(ends)


def path_points(cams: Cameras, scale: float, frusta: int = 4) -> np.ndarray:
    """Sampled points of one trajectory: the polyline through its centres and ``frusta`` camera frusta."""
    centres = cams.centers.detach().cpu().double().numpy().reshape(-1, 3)
    step = scale / 150.0
    line_budget = 2 * MAX_PATH_POINTS // 3 - 2 * len(centres)
    parts = [_segment_points(centres[:-1], centres[1:], step, line_budget)] if len(centres) > 1 else [centres]
    picks = np.unique(np.linspace(0, len(cams) - 1, num=min(frusta, len(cams))).round().astype(int))
    a, b = frustum_segments(cams[picks.tolist()], size=scale * 0.08)
    parts.append(_segment_points(a, b, step, MAX_PATH_POINTS // 3 - 2 * len(a)))
    return np.concatenate(parts)


def write_plan_glb(path: Path, cloud_points, cloud_colors, plans: Sequence[tuple[str, Cameras]], scale: float,
                   seed: int = 0, axes=outputs.OPENCV_TO_OPENGL) -> dict[str, list[int]]:
    """Write the cloud plus every planned path; returns each path's RGB colour (for the legend).

    ``axes``: the scene's world-to-glTF axes (``engine.scene_start.gltf_axes``), so the plan and ``scene.glb`` agree.
    """
    pts = np.asarray(cloud_points.detach().cpu().numpy() if hasattr(cloud_points, "detach") else cloud_points, dtype=np.float64)
    cols = np.asarray(cloud_colors.detach().cpu().numpy() if hasattr(cloud_colors, "detach") else cloud_colors)
    if cols.dtype != np.uint8:
        cols = (np.clip(cols, 0.0, 1.0) * 255).round().astype(np.uint8)
    if len(pts) > MAX_CLOUD_POINTS:
        keep = np.random.default_rng(seed).choice(len(pts), MAX_CLOUD_POINTS, replace=False)
        pts, cols = pts[keep], cols[keep]
    legend = {}
    all_pts, all_cols = [pts], [cols]
    for i, (name, cams) in enumerate(plans):
        colour = PATH_COLORS[i % len(PATH_COLORS)]
        p = path_points(cams, scale)
        all_pts.append(p)
        all_cols.append(np.repeat(colour[None], len(p), axis=0))
        legend[name] = colour.tolist()
    outputs.write_point_cloud_glb(path, np.concatenate(all_pts), np.concatenate(all_cols), axes=axes)
    return legend
