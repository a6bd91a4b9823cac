"""How a scene starts: depth of the input, the frame size, the first 3D cache and memory bank (a photo:
``start_photo``; a panorama: ``start_panorama``; an official scene folder: ``start_official``), and the world frame
each start gives.

Kept apart from ``scene.py`` so the loop itself reads as the paper's algorithm; everything here runs once per scene.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.geometry.cameras import Cameras
from engine.geometry.cache import PointCache
from engine.geometry.memory import MemoryBank
from engine.progress import Progress, ensure, span
from engine.settings import SceneError, bucket_size, engine_device
from engine.user_depth import is_user_depth_file

PANORAMA_MAX_WIDTH = 2048
PANORAMA_START_YAWS = (0.0, 90.0, 180.0, 270.0)  # exploration starts: the four horizontal directions
PANORAMA_CLOUD_HEIGHT = 512  # rows of the stitched distance map the views' depths are scaled to agree on
OFFICIAL_PANORAMA_SIZE = (1024, 2048)  # (rows, columns) of the panorama an official scene's bank views are stitched to
# Scene kinds whose world is a panorama's (z up, trajectories from start views at its centre): an equirectangular
# input, or an official scene folder (its pano_bank).
PANORAMA_KINDS = ("panorama", "official")


@dataclass
class SceneStart:
    """What a new scene starts from."""

    image: torch.Tensor  # the start image as used ([3,H,W]; the equirectangular image for a panorama)
    start_camera: Cameras
    cache: PointCache
    bank: MemoryBank
    median_depth: float
    start_views: list  # w2c (4x4 lists) of the views trajectories may start from
    depth_note: str


def depth_source_for(settings, panorama: bool, announce: Callable[[str], None]):
    """The depth door of a scene (``engine.depth.DepthSource``): its depth model, loaded once per process, on its
    device."""
    from engine.depth import DepthSource, load_depth_estimator

    # A user's depth map is of the input photo alone (``start_photo``); generated frames get the depth model.
    model = None if is_user_depth_file(settings.depth) else settings.depth
    estimator = load_depth_estimator(model, device=engine_device(settings), panorama=panorama, announce=announce)
    return DepthSource(estimator, getattr(estimator, "source", type(estimator).__name__))


def user_depth_for(settings, panorama: bool):
    """The person's depth map of the input photo when ``settings.depth`` names a depth file (``engine.user_depth``),
    read and checked; None when depth comes from a depth model. A panorama takes none."""
    if not is_user_depth_file(settings.depth):
        return None
    if panorama:
        raise SceneError("A depth file is the depth of one photo; a panorama's views get theirs from the depth model, "
                         "so leave the depth file out.")
    from engine.depth import UserDepth

    return UserDepth(settings.depth)


def checkpoint_config(engine: str, weights: Optional[str] = None):
    """The ``WorldStereoConfig`` of a full engine's checkpoint when its files are here (``weights`` or the hub
    cache; nothing is downloaded), else None (the small engines, or weights not present)."""
    from engine.engines import ENGINES, checkpoint_dir
    from engine.models.config import WorldStereoConfig

    spec = ENGINES.get(engine)
    if spec is None or spec.variant is None:
        return None
    folder = checkpoint_dir(spec.variant, Path(weights) if weights else None)
    return None if folder is None else WorldStereoConfig.from_json(folder / "config.json", variant=spec.variant)


def photo_size(height: int, width: int, settings) -> tuple[int, int]:
    """``(h, w)`` of a scene's frames for an input of ``height x width`` (a photo, or a panorama's bank view): the
    engine's bucket for it (the checkpoint's own ``scale_map`` when its config.json is here)."""
    config = checkpoint_config(settings.engine, settings.weights)
    return bucket_size(settings.engine, height, width, config.scale_map if config is not None else None)


def start_photo(image: torch.Tensor, depth_source, camera_json, size: tuple[int, int],
               user_depth=None, progress: Optional[Progress] = None) -> SceneStart:
    """Start from one photo: its camera, the photo stretched to the bucket ``size = (h, w)`` (``photo_size``) as the
    release does, its depth (``depth_source``, or ``user_depth``: the person's map, an ``engine.depth.UserDepth``)
    unprojected into the first cache and the bank's first frame."""
    from engine.conditioning import pil_to_tensor, stretch_to_bucket

    report = ensure(progress)
    h0, w0 = image.shape[-2:]
    if camera_json is not None:
        # The release reads a camera file's intrinsics as pixels of the input image as given.
        start = Cameras.from_json(camera_json, w0, h0)[0]
    else:
        _, _, k = depth_source(image, None)
        start = Cameras(torch.eye(4, dtype=torch.float64), k.reshape(1, 3, 3), w0, h0)
    h, w = size
    photo, image = image, pil_to_tensor(stretch_to_bucket(image, (h, w)))
    start = start.resized(w, h)
    report(0.3, "depth of the input")
    if user_depth is not None:
        # The user's map is of the photo as given; it is stretched with the photo below (nearest).
        depth = user_depth.estimate(photo).depth.float()
        valid = torch.isfinite(depth) & (depth > 0)
        note = user_depth.describe()
    else:
        depth, valid, _ = depth_source(image, start)
        note = depth_source.note if hasattr(depth_source, "note") else "custom depth"
    if depth.shape != image.shape[-2:]:
        depth = F.interpolate(depth[None, None], size=image.shape[-2:], mode="nearest")[0, 0]
        valid = F.interpolate(valid[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0] > 0.5
    report(0.7, "building the 3D cache")
    cache = PointCache.empty(device=depth.device)
    cache.add_frame(image, depth, start, frame_id=0, valid=valid)
    bank = MemoryBank()
    bank.add(image[None], start, depth[None], frame_ids=[0], source="input")
    median = float(depth[valid & (depth > 0)].median()) if bool((valid & (depth > 0)).any()) else 1.0
    return SceneStart(image, start, cache, bank, median, [start.w2c[0].tolist()], note)


def start_panorama(pano: torch.Tensor, settings, depth_source, progress: Optional[Progress] = None) -> SceneStart:
    """Start from an equirectangular panorama: cut the official 27-view bank at the checkpoint's bucket for an
    832x480 view (``photo_size``) and start from those views (``start_from_views``)."""
    from engine.geometry.panorama import BANK_HEIGHT, BANK_WIDTH, bank_cameras, equirect_to_perspective, is_equirect

    hp, wp = pano.shape[-2:]
    if not is_equirect(wp, hp):
        raise SceneError(f"A panorama must be equirectangular with a 2:1 aspect; this image is {wp}x{hp}.")
    if wp > PANORAMA_MAX_WIDTH:
        pano = F.interpolate(pano[None], size=(PANORAMA_MAX_WIDTH // 2, PANORAMA_MAX_WIDTH), mode="area")[0]
    # An official bank view (832x480) falls in the released configs' 480x832 bucket, in the default map's 480x768
    # (stretched to the same 120 x 90 degrees).
    height, width = photo_size(BANK_HEIGHT, BANK_WIDTH, settings)
    views = bank_cameras(width=width, height=height)
    return start_from_views(pano, equirect_to_perspective(pano, views), views, settings, depth_source, progress)


def start_official(scene, settings, depth_source, progress: Optional[Progress] = None) -> SceneStart:
    """Start from an official scene folder (``engine.official_scene.OfficialScene``) as the release does: its
    ``pano_bank`` views with their own cameras are the memory bank (each view stretched to the checkpoint's bucket
    with PIL bicubic, as the release stretches every frame it conditions on; labelled ``"<scene>/pano_bank"`` for
    the shortcut rules), lifted into the first 3D cache as a panorama's views are (``start_from_views``). The start
    image is the views stitched back into an equirectangular panorama (``OFFICIAL_PANORAMA_SIZE``): presets started
    from the scene's views and the 3DGS dataset's first frame are cut from it."""
    from engine.conditioning import pil_to_tensor, stretch_to_bucket
    from engine.geometry.panorama import perspective_to_equirect
    report = ensure(progress)
    cams = scene.bank_cameras
    views_as_given = scene.bank_images()
    report(0.05, "stitching the bank views")
    pano, _ = perspective_to_equirect(views_as_given, cams, *OFFICIAL_PANORAMA_SIZE)
    height, width = photo_size(cams.height, cams.width, settings)
    images = torch.stack([pil_to_tensor(stretch_to_bucket(view, (height, width))) for view in views_as_given])
    return start_from_views(pano, images, cams.resized(width, height), settings, depth_source,
                            span(report, 0.1, 1.0), labels=scene.bank_labels)


def start_from_views(pano: torch.Tensor, images: torch.Tensor, views: Cameras, settings, depth_source,
                     progress: Optional[Progress] = None, labels: Optional[list] = None) -> SceneStart:
    """A panorama's start from its bank views (``images [N,3,H,W]`` seen by ``views``, all from the panorama's
    centre): give every view depth, scale each view's depth to agree with the views before it (on a stitched
    panoramic distance map), lift every view at its full resolution into the first 3D cache
    (``engine.geometry.panorama.bank_points``), and keep the views as the memory bank's first frames (``labels``:
    theirs for the shortcut rules, default "panorama"); trajectories start from the horizontal views."""
    from engine.geometry.align import align_depth
    from engine.geometry.panorama import bank_points, look_rotation, views_to_panorama_depth

    report = ensure(progress)
    height, width = images.shape[-2:]
    hd = min(pano.shape[-2], PANORAMA_CLOUD_HEIGHT)
    distance = torch.zeros(hd, 2 * hd)
    depths = []
    for i in range(len(views)):
        depth, valid, _ = depth_source(images[i], views[i])
        depth = torch.where(valid, depth, torch.zeros_like(depth)).float().cpu()  # stitched on the CPU
        seen = views_to_panorama_depth(depth[None], views[i : i + 1], hd, 2 * hd)
        overlap = (seen > 0) & (distance > 0)
        if int(overlap.sum()) >= 64:
            try:
                # A pure scale: it applies alike to ray distances and to the view's z-depths.
                scale = align_depth(seen, distance, overlap, with_shift=False).scale
                depth, seen = depth * scale, seen * scale
            except ValueError:
                pass  # too little agreement to trust: keep the view's own scale
        distance = torch.where(distance > 0, distance, seen)
        depths.append(depth)
        report((i + 1) / len(views), f"panorama view {i + 1}/{len(views)}")
    depths = torch.stack(depths)
    points, colours = bank_points(images, depths, views)
    cache = PointCache.empty()
    cache.add_points(points.float(), colours.float(), frame_id=0)
    cache.downsample(settings.point_budget)
    bank = MemoryBank()
    bank.add(images, views, depths, frame_ids=list(range(len(views))), source="panorama", labels=labels)
    start_views = []
    for yaw in PANORAMA_START_YAWS:
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = look_rotation([yaw], [0.0])[0]
        start_views.append(w2c.tolist())
    start = Cameras(torch.tensor(start_views[0], dtype=torch.float64), views.K[:1], width, height)
    median = float(distance[distance > 0].median()) if bool((distance > 0).any()) else 1.0
    return SceneStart(pano, start, cache, bank, median, start_views, getattr(depth_source, "note", "custom depth"))


def gltf_axes(kind: str):
    """The world-to-glTF axes of a scene's files (``scene.glb``, drawings over the cloud): a photo's world is the
    input camera's OpenCV frame (y down), a panorama's the bank's z-up world."""
    from engine import outputs

    return outputs.ZUP_TO_OPENGL if kind in PANORAMA_KINDS else outputs.OPENCV_TO_OPENGL
