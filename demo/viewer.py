"""What the page's 3D views show of a scene: the point viewer's and the splat viewer's files (``viewer_update``),
the points the 3D editor draws, and the confidence slider (``set_confidence``). The downloads stay the engine's full
files (``engine.jobfolder.SceneFiles``); these are views.

Viewer confidence (``viewer_confidence``)
    What the page's confidence slider compares against: a point's stored confidence (1 for points lifted from
    estimated or given depth; 0.5 where the colour or the depth was a guess: the ``preview`` engine's inpainted
    frames, depth filled into holes of the cache's render) times ``min(1, R / d)``, where ``d`` is the point's
    distance from the start camera's centre and ``R = FAR_FACTOR`` times the input's median depth. Far points count
    as low: depth errors grow with distance (relative depth error times depth), and a monocular estimate's far field
    (sky, distant walls) is its least reliable part; at ``2R`` a point keeps half its confidence.

The splat view (``write_views``)
    Splat viewers orbit the origin from a fixed distance, so the splats are put in the viewer's frame: y down,
    centred on the cloud's median point, scaled so 90% of the points lie within ``VIEW_RADIUS``. Browsers sort and
    draw every splat each frame: beyond ``max_splats`` a fixed random subset is drawn, its splats grown to cover the
    same area. Splat sizes come from the whole cloud's spacing (``engine.jobfolder.splat_scales``), so hiding points
    does not swell the rest.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np
import torch

from demo import jobs
from demo.context import AppContext, open_files, user_errors
from engine import outputs
from engine.jobfolder import splat_scales
from engine.scene_start import gltf_axes
from engine.settings import SceneError

MAX_VIEW_SPLATS = 100_000  # splats in the browser's splat view by default (a fixed subset beyond that)
VIEW_RADIUS = 1.0  # size of the cloud in the splat viewer's frame (gradio's viewer orbits the origin close by)
FAR_FACTOR = 4.0  # points beyond FAR_FACTOR x the median depth count less (module notes)


def viewer_confidence(points: torch.Tensor, confidence: torch.Tensor, origin, median_depth: float,
                      far_factor: float = FAR_FACTOR) -> torch.Tensor:
    """Confidence ``[P]`` the views filter on (module notes): stored confidence times ``min(1, R / d)``."""
    origin = torch.as_tensor(origin, dtype=torch.float64).reshape(1, 3)
    d = (points.detach().cpu().double() - origin).norm(dim=1)
    reach = far_factor * float(median_depth)
    far = torch.where(d > reach, reach / d.clamp(min=1e-12), torch.ones_like(d))
    return (confidence.detach().cpu().double() * far).float()


def scene_confidence(scene) -> torch.Tensor:
    """``viewer_confidence`` of every point of ``scene``'s cache (an ``engine.scene.Scene``)."""
    return viewer_confidence(scene.cache.points, scene.cache.confidence, scene.start_camera.centers[0],
                             float(scene.manifest.get("median_depth") or 1.0))


def write_views(scene, folder, min_confidence: float = 0.0, with_glb: bool = True,
                max_splats: Optional[int] = None) -> dict:
    """What the page's viewers show of ``scene``, into ``folder``: ``scene.glb`` and ``scene_splats.ply`` of the
    points whose viewer confidence is at least ``min_confidence``, the splats in the splat viewer's frame and at
    most ``max_splats`` of them (default ``MAX_VIEW_SPLATS``; module notes). ``with_glb=False`` writes the splats
    only. Refuses to hide everything. Returns ``{"glb": path or None, "splats": path}``."""
    max_splats = MAX_VIEW_SPLATS if max_splats is None else int(max_splats)
    if max_splats < 1:
        raise SceneError(f"The splat view needs at least one splat; got {max_splats}.")
    keep = scene_confidence(scene) >= float(min_confidence)
    if not bool(keep.any()):
        raise SceneError(f"No point has a confidence of {min_confidence:g} or more; lower the threshold.")
    folder = Path(folder)
    paths = {"glb": folder / "scene.glb" if with_glb else None, "splats": folder / "scene_splats.ply"}
    axes = gltf_axes(scene.manifest["kind"])
    points, colors = scene.cache.points.cpu()[keep], scene.cache.colors.cpu()[keep]  # the cache may live on the GPU
    scale = splat_scales(scene.cache)[keep.numpy()]
    if paths["glb"] is not None:
        outputs.write_point_cloud_glb(paths["glb"], points, colors, axes=axes)
    p = points.double().numpy() @ (outputs.OPENGL_TO_OPENCV @ axes).T
    centre = np.median(p, axis=0)
    radius = float(np.quantile(np.linalg.norm(p - centre, axis=1), 0.9)) or 1.0
    points, scale = torch.from_numpy((p - centre) * (VIEW_RADIUS / radius)), scale * (VIEW_RADIUS / radius)
    if len(points) > max_splats:
        pick = np.sort(np.random.default_rng(0).choice(len(points), max_splats, replace=False))
        grow = np.sqrt(len(points) / max_splats)
        points, colors, scale = points[pick], colors[torch.from_numpy(pick)], scale[pick] * grow
    outputs.write_splat_ply(paths["splats"], points, colors, scale)
    return paths


def viewer_update(ctx: AppContext, scene, job_root: Path, state: dict) -> dict:
    """``model3d`` and ``splats`` for the scene's current cloud, without the points under the session's
    confidence threshold; the splats in the viewer's frame (``write_views``). The full files stay the downloads;
    earlier views of the job are removed.

    Every call hands the splat viewer a file of its own name (a hard link): gradio's viewer restarts its
    loading only for a new file, and a repeated one arriving while it loads can leave it blank."""
    threshold = float((state or {}).get("min_confidence") or 0.0)
    name = f"{Path(scene.manifest['state']['cache']).stem}-{threshold:.2f}-{ctx.view_splats or 'default'}"
    folder = job_root / "view"
    for old in folder.glob("*") if folder.is_dir() else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    folder = folder / name
    if (folder / "scene_splats.ply").is_file() and (threshold <= 0 or (folder / "scene.glb").is_file()):
        paths = {"glb": folder / "scene.glb" if threshold > 0 else None, "splats": folder / "scene_splats.ply"}
    else:
        paths = write_views(scene, folder, threshold, with_glb=threshold > 0, max_splats=ctx.view_splats)
    alias = folder / f"scene_splats-{len(list(folder.glob('scene_splats-*.ply')))}.ply"
    jobs.link_or_copy(paths["splats"], alias)
    return {"model3d": str(paths["glb"] or scene.folder.scene_files().glb), "splats": str(alias)}


def set_confidence(ctx: AppContext, state: dict, threshold: float) -> tuple[dict, Optional[str], Optional[str]]:
    """Hide points under ``threshold`` in the point and splat viewers (and the 3D editor): ``(state, glb, splats)``."""
    state = dict(state or {})
    state["min_confidence"] = min(max(float(threshold or 0.0), 0.0), 1.0)
    if not state.get("job"):
        return state, None, None
    scene = open_files(ctx, state)
    if not scene.clips:
        return state, None, None
    try:
        shown = viewer_update(ctx, scene, jobs.job_dir(ctx.output_dir, state["job"]), state)
    except user_errors() as e:
        raise gr.Error(str(e)) from None
    return state, shown["model3d"], shown["splats"]
