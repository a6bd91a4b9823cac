"""How a scene starts: depth of the input, the first 3D cache and memory bank, and the clip generator.

Kept apart from ``scene.py`` so the loop itself reads as the paper's algorithm; everything here runs once
per scene (or once per process for the networks).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.geometry.cameras import Cameras
from engine.geometry.cache import PointCache
from engine.geometry.memory import MemoryBank
from engine.preview import preview_clip
from engine.progress import Progress, ensure
from engine.settings import SceneError, bucket_size, engine_device
from engine.user_depth import is_user_depth_file

PANORAMA_MAX_WIDTH = 2048
PANORAMA_START_YAWS = (0.0, 90.0, 180.0, 270.0)  # exploration starts: the four horizontal directions
PANORAMA_CLOUD_HEIGHT = 512  # rows of the stitched distance map the views' depths are scaled to agree on


@dataclass
class Seed:
    image: torch.Tensor  # the start image as used ([3,H,W]; the equirectangular image for a panorama)
    start_camera: Cameras
    cache: PointCache
    bank: MemoryBank
    median_depth: float
    start_views: list  # w2c (4x4 lists) of the views trajectories may start from
    depth_note: str


class DepthSource:
    """``(image [3,H,W], camera or None) -> (depth [H,W], valid [H,W], K [3,3])``: the scene's one depth door.

    Wraps an ``engine.depth`` estimator (MoGe-2 or an announced fallback). ``K`` is the estimator's own
    intrinsics guess, used only for the input photo when no camera file gives them.
    """

    def __init__(self, estimator, note: str):
        self.estimator = estimator
        self.note = note

    def __call__(self, image: torch.Tensor, camera: Optional[Cameras] = None):
        fov_x = None
        if camera is not None:
            fov_x = math.degrees(2 * math.atan(camera.width / (2 * float(camera.K[0, 0, 0]))))
        est = self.estimator.estimate(image, fov_x=fov_x)
        return est.depth.float(), est.mask.bool(), est.intrinsics.double()


def depth_source_for(settings, panorama: bool, announce: Callable[[str], None]) -> DepthSource:
    """The depth door of a scene: its depth model, loaded once per process (``engine.depth``), on its device."""
    from engine.depth import load_depth_estimator

    # A user's depth map is of the input photo alone (``seed_photo``); generated frames get the depth model.
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


def seed_photo(image: torch.Tensor, depth_source, camera_json, size: tuple[int, int],
               user_depth=None, progress: Optional[Progress] = None) -> Seed:
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
    return Seed(image, start, cache, bank, median, [start.w2c[0].tolist()], note)


def seed_panorama(pano: torch.Tensor, settings, depth_source, progress: Optional[Progress] = None) -> Seed:
    """Start from an equirectangular panorama: cut the official 27-view bank at the checkpoint's bucket for an
    832x480 view (``photo_size``), give every view depth, scale each view's depth to agree with the views before it
    (on a stitched panoramic distance map), and lift every view at its full resolution into the first 3D cache
    (``engine.geometry.panorama.bank_points``); trajectories start from the horizontal views."""
    from engine.geometry.align import align_depth
    from engine.geometry.panorama import (BANK_HEIGHT, BANK_WIDTH, bank_cameras, bank_points, equirect_to_perspective,
                                          is_equirect, look_rotation, views_to_panorama_depth)

    report = ensure(progress)
    hp, wp = pano.shape[-2:]
    if not is_equirect(wp, hp):
        raise SceneError(f"A panorama must be equirectangular with a 2:1 aspect; this image is {wp}x{hp}.")
    if wp > PANORAMA_MAX_WIDTH:
        pano = F.interpolate(pano[None], size=(PANORAMA_MAX_WIDTH // 2, PANORAMA_MAX_WIDTH), mode="area")[0]
    # An official bank view (832x480) falls in the released configs' 480x832 bucket, in the default map's 480x768
    # (stretched to the same 120 x 90 degrees).
    height, width = photo_size(BANK_HEIGHT, BANK_WIDTH, settings)
    views = bank_cameras(width=width, height=height)
    images = equirect_to_perspective(pano, views)
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
    bank.add(images, views, depths, frame_ids=list(range(len(views))), source="panorama")
    start_views = []
    for yaw in PANORAMA_START_YAWS:
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = look_rotation([yaw], [0.0])[0]
        start_views.append(w2c.tolist())
    start = Cameras(torch.tensor(start_views[0], dtype=torch.float64), views.K[:1], width, height)
    median = float(distance[distance > 0].median()) if bool((distance > 0).any()) else 1.0
    return Seed(pano, start, cache, bank, median, start_views, getattr(depth_source, "note", "custom depth"))


# ---- clip generators ---------------------------------------------------------------------------------

class PreviewGenerator:
    """The `preview` engine: cache renders with classical hole filling (see engine/preview.py)."""

    has_memory = False
    uses_pointmaps = False

    def generate(self, *, conditions, progress=None, cancel=None, **_) -> torch.Tensor:
        from engine.conditioning import pil_to_tensor

        ensure(progress)(0.0, "preview: filling holes")
        render, covered = conditions.render_frames()
        frames = preview_clip(pil_to_tensor(conditions.image), render, covered)
        ensure(progress)(1.0, "preview: done")
        return frames


class NetworkGenerator:
    """A WorldStereo network (official weights or tiny random) behind the clip pipeline.

    Generators do not own a pipeline: the process keeps ONE resident per device (``resident_for``), and a generator makes it its
    own variant when it generates (switching DMD <-> 40-step swaps only the transformer). ``has_memory`` and
    ``uses_pointmaps`` are its variant's, read when it was made.
    """

    def __init__(self, spec: "PipelineSpec", steps: Optional[int], pipeline, announce: Callable[[str], None] = print):
        self.spec = spec
        self.steps = steps  # None: the variant's own (4 for DMD, 40 otherwise)
        self.announce = announce
        self.has_memory = pipeline.config.has_memory
        self.uses_pointmaps = pipeline.uses_pointmaps

    @property
    def pipeline(self):
        """The resident pipeline, made this generator's variant."""
        return resident_for(self.spec.device).acquire(self.spec, self.announce)

    def generate(self, *, conditions, prompt, seed, progress=None, cancel=None) -> torch.Tensor:
        with resident_for(self.spec.device).lock:  # one clip at a time: another generator must not swap the transformer mid-clip
            return self.pipeline.generate(conditions, prompt=prompt, seed=seed, steps=self.steps,
                                          progress=progress, cancel=cancel).frames


@dataclass(frozen=True)
class PipelineSpec:
    """What a resident pipeline is: the checkpoint package and how it runs."""

    engine: str
    source: str  # the checkpoint package folder
    device: str
    offload: str
    backend: str
    graphs: Optional[str]
    dtype: Optional[torch.dtype] = None  # None: the device's default (bf16 on CUDA)

    def shares_networks_with(self, other: "PipelineSpec") -> bool:
        """Whether a pipeline made for ``other`` can become this one by swapping its transformer (same device,
        offload and dtype; the base model is compared when switching)."""
        return (self.device, self.offload, self.dtype) == (other.device, other.offload, other.dtype)


class ResidentPipeline:
    """At most one generative pipeline per process: the demo's Fast/Quality switch (DMD <-> 40-step) swaps the
    transformer and its config and keeps the text encoder, image encoder and VAE of their shared base model."""

    def __init__(self):
        self.lock = threading.RLock()
        self.pipeline = None
        self.spec: Optional[PipelineSpec] = None

    def acquire(self, spec: PipelineSpec, announce: Callable[[str], None] = print):
        with self.lock:
            if self.spec == spec:
                return self.pipeline
            from engine.pipeline import ClipPipeline, base_model_of, release_memory

            pipe, old = self.pipeline, self.spec
            self.pipeline = self.spec = None  # a failure below leaves nothing half-made resident
            if spec.engine == "tiny-random":
                announce("tiny-random engine: a tiny randomly initialised WorldStereo; its frames are noise by design.")
            if old is not None and old.shares_networks_with(spec) and base_model_of(spec.source) == pipe.components.source:
                if old.source != spec.source:
                    pipe.switch_variant(spec.source, announce=announce)
            else:
                pipe = None
                release_memory(torch.device(spec.device))
                pipe = ClipPipeline.from_pretrained(spec.source, device=spec.device, dtype=spec.dtype,
                                                    offload=spec.offload, announce=announce)
            from engine import distributed

            if distributed.current() is not None:  # the other ranks of a sequence-parallel group load it too
                distributed.lead(pipe, spec.source, release=self.forget)
            elif spec.backend != "eager" or pipe.backend is not None:
                pipe.use_backend(spec.backend, graphs_dir=spec.graphs, announce=announce)
            self.pipeline, self.spec = pipe, spec
            return pipe

    def forget(self) -> None:
        """Drop the resident pipeline without waiting for a clip in progress: called when the sequence-parallel group
        it leads has ended, so no clip of it can finish (a clip in progress lets go of it when it fails)."""
        self.pipeline = self.spec = None

    def release(self) -> None:
        """Drop the resident pipeline (its memory goes back at once)."""
        from engine.pipeline import release_memory

        with self.lock:
            device = torch.device(self.spec.device) if self.spec is not None else torch.device("cpu")
            self.pipeline = self.spec = None
            release_memory(device)


_RESIDENTS: dict[str, ResidentPipeline] = {}
_RESIDENTS_LOCK = threading.Lock()


def resident_for(device: str) -> ResidentPipeline:
    """The resident pipeline slot of one device: one pipeline per process, or one per GPU when the app serves a
    pipeline per GPU (``engine.distributed.GpuPool``)."""
    key = str(torch.device(device))
    with _RESIDENTS_LOCK:
        return _RESIDENTS.setdefault(key, ResidentPipeline())


def pipeline_spec(settings) -> PipelineSpec:
    """The resident pipeline a scene's settings ask for."""
    from engine.engines import ENGINES, checkpoint_dir

    if settings.engine == "tiny-random":
        from engine.models.tiny import cached_tiny_package

        return PipelineSpec("tiny-random", str(cached_tiny_package("worldstereo-memory-dmd")), settings.device,
                            settings.offload, settings.backend, settings.graphs, torch.float32)
    variant = ENGINES[settings.engine].variant
    source = checkpoint_dir(variant, Path(settings.weights) if settings.weights else None)
    if source is None:
        from engine.engines import engine_status
        raise SceneError(engine_status(settings.engine, Path(settings.weights) if settings.weights else None)[1])
    return PipelineSpec(settings.engine, str(source), settings.device, settings.offload, settings.backend,
                        settings.graphs)


def clip_generator(settings, announce: Callable[[str], None] = print, pooled: bool = True):
    """The clip generator of the settings' engine. Networks load once per process (per GPU when the app serves a
    pipeline per GPU): the resident pipeline is made this engine's (a server's second scene does not load a 14B
    model again, nor does a switch of variant)."""
    from engine import distributed

    if settings.engine == "preview":
        return PreviewGenerator()
    if pooled:  # the app serving one pipeline per GPU: each clip on the least busy device
        pool = distributed.pooled_generator(settings, lambda s: clip_generator(s, announce, pooled=False))
        if pool is not None:
            return pool
    distributed.check_settings(settings)
    spec = pipeline_spec(settings)
    return NetworkGenerator(spec, settings.steps, resident_for(spec.device).acquire(spec, announce), announce)
