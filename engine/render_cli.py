"""``python -m engine render`` and ``python -m engine conditions``: a first clip's inputs without any network.

``render``: a scene's 3D cache rendered along a trajectory, written as the official ``render.mp4`` /
``render_mask.mp4`` (holes mid-grey and white in the mask, frame 0 the input view) and ``cameras.json``. A scene is
a job folder (its current cache is rendered) or an example-style folder holding one image (``image.png`` or
``start_frame.png``, any real format) and optionally its official ``camera.json``.

``conditions``: the conditioning of a photo's first clip exactly as the transformer would receive it, before any
VAE encoding (``engine.conditioning.ClipConditions``), at the engine's real size, written as safetensors; or, given a
job folder (``write_scene_conditions``), the conditioning of that scene's next clip along a trajectory, with the
memory-bank indices of its references (``ref_ids``) beside ``ref_index`` and ``camera_qt_ref``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from engine import conditioning, outputs
from engine.constants import KEYFRAMES
from engine.geometry import trajectories as traj
from engine.geometry.cameras import Cameras
from engine.geometry.memory import MemoryBank
from engine.geometry.retrieval import References, retrieve
from engine.jobfolder import JobFolder

IMAGE_NAMES = ("image.png", "image.jpg", "image.jpeg", "image.webp", "start_frame.png")


class RenderInputError(ValueError):
    """A render request that cannot be carried out; one sentence."""


def _requested(trajectory: Optional[str], folder: Path) -> tuple[Optional[Path], Optional[str]]:
    """(a camera file, or None) and (a preset name, or None)."""
    if trajectory and trajectory.lower().endswith(".json"):
        return Path(trajectory), None
    if trajectory:
        if trajectory not in traj.PRESETS:
            raise RenderInputError(f"Unknown trajectory '{trajectory}'; give a camera.json or one of: {', '.join(traj.PRESETS)}.")
        return None, trajectory
    if (folder / "camera.json").is_file():
        return folder / "camera.json", None
    return None, "orbit"


def photo_first_clip(image: torch.Tensor, camera_file: Optional[Path], preset: Optional[str],
                     size: tuple[int, int], frames: int, depth: Optional[str],
                     announce: Callable[[str], None] = print):
    """The photo's scene start (bucket image, start camera, first cache) and the first clip's keyframe cameras, as the
    release's single-view path has them: a camera file's trajectory subsampled to ``frames`` keyframes with its
    intrinsics rescaled from the photo to ``size``, or a preset from the start camera."""
    from engine.depth import DepthSource, PlaneDepth, UserDepth, load_depth_estimator
    from engine.scene_start import start_photo
    from engine.settings import check_frames

    h0, w0 = image.shape[-2:]
    file_cams = Cameras.from_json(camera_file, w0, h0) if camera_file is not None else None
    if file_cams is not None:
        check_frames(len(file_cams), f"Camera file {camera_file.name}")
    estimator = load_depth_estimator(depth, announce=announce)
    if file_cams is not None and isinstance(estimator, PlaneDepth):
        # Official files put the world origin at the look-at point: the plane goes through it.
        estimator = PlaneDepth(depth=float(file_cams.centers[0].norm()) or estimator.depth)
    start = start_photo(image, DepthSource(estimator, estimator.source), camera_file, size,
                        user_depth=estimator if isinstance(estimator, UserDepth) else None)
    if file_cams is not None:
        cams = conditioning.official_cameras(file_cams, (h0, w0), size, frames)
    else:
        cams = traj.make_trajectory(preset, start.start_camera, start.median_depth, frames=frames)
    return start, cams


def single_view_references(image: torch.Tensor, cameras: Cameras) -> References:
    """A photo's first clip: a bank holding the photo (``image [3,H,W]``) alone at the clip's start camera, so the
    retrieval rule gives it as the one reference at target 0 (``engine.geometry.retrieval`` module doc)."""
    bank = MemoryBank()
    bank.add(image[None], cameras[0:1], torch.zeros(1, *image.shape[-2:]), source="input")
    return retrieve(bank, cameras)[1]


def render_scene(scene: str, out: str, trajectory: Optional[str] = None, depth: Optional[str] = None,
                 frames: int = KEYFRAMES, max_side: int = 768, radius: Optional[int] = None,
                 announce: Callable[[str], None] = print) -> Cameras:
    """Render a scene's cache along a trajectory (see the module doc); returns the cameras used. ``radius``: the
    splat half-size in pixels (default: the official render radius at the render's size)."""
    from engine.images import load_image, to_pil

    folder, out_dir = Path(scene), Path(out)
    if not folder.is_dir():
        raise RenderInputError(f"Scene folder {folder} does not exist.")
    camera_file, preset = _requested(trajectory, folder)
    if JobFolder(folder).holds_scene():
        from engine.scene import TrajectoryRequest, open_for_files

        job = open_for_files(folder)  # its cache is rendered: no depth model is needed
        file_cams = job.read_camera_file(camera_file) if camera_file is not None else None
        cams = job.plan(TrajectoryRequest(name=preset or "camera.json", cameras=file_cams, frames=frames))
        image, cache = job.start_image_for(cams[0:1]), job.cache
        radius = job.splat_radius(cams) if radius is None else radius
    else:
        image_path = next((folder / n for n in IMAGE_NAMES if (folder / n).is_file()), None)
        if image_path is None:
            raise RenderInputError(f"{folder} holds no image ({', '.join(IMAGE_NAMES)}) and is not a job folder.")
        photo = load_image(image_path)
        bucket = conditioning.assign_bucket(*photo.shape[-2:])
        size = conditioning.scale_bucket(bucket, min(1.0, max_side / max(bucket)))
        start, cams = photo_first_clip(photo, camera_file, preset, size, frames, depth, announce)
        image, cache = start.image, start.cache
    result = cache.render(cams, radius=conditioning.splat_radius(cams.height, cams.width) if radius is None else radius)
    video, mask = conditioning.render_video_and_mask(to_pil(image), result.image, result.mask)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_video(out_dir / "render.mp4", (video[0].transpose(0, 1) + 1) / 2)
    outputs.write_mask_video(out_dir / "render_mask.mp4", mask[0, 0] > 0.5)  # official convention: white = hole
    cams.save_json(out_dir / "cameras.json")
    return cams


def write_conditions(image_path: str, out: str, camera_json: Optional[str] = None, trajectory: Optional[str] = None,
                     render_dir: Optional[str] = None, engine: str = "worldstereo-memory-dmd",
                     weights: Optional[str] = None, stride: int = 1, depth: Optional[str] = None,
                     announce: Callable[[str], None] = print) -> conditioning.ClipConditions:
    """Write the conditioning of a photo's first clip (see the module doc) to ``out``; returns it.

    The checkpoint's config.json gives the buckets, keyframe count and variant when its files are here, else the
    release's defaults; depth comes from MoGe when its weights are here, else the announced fallback. A single view
    has one reference, the input view at target 0.
    """
    from engine.engines import ENGINES, unknown_engine
    from engine.generators import registration
    from engine.images import load_image
    from engine.scene_start import checkpoint_config
    from engine.settings import bucket_size

    if engine not in ENGINES:
        raise RenderInputError(unknown_engine(engine))
    if not registration(engine).network:
        raise RenderInputError("The preview engine runs no network, so it has no model conditioning; choose "
                               "worldstereo-memory-dmd, worldstereo-memory, worldstereo-camera or tiny-random.")
    if sum(x is not None for x in (camera_json, trajectory, render_dir)) != 1:
        raise RenderInputError("Give exactly one trajectory: --camera-json FILE, --trajectory NAME or --render-dir DIR.")
    if trajectory is not None and trajectory not in traj.PRESETS:
        raise RenderInputError(f"Unknown trajectory '{trajectory}'; choose one of: {', '.join(traj.PRESETS)}.")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise RenderInputError(f"The stride must be a whole number of pixels from 1 up; got {stride!r:.40}.")
    config = checkpoint_config(engine, weights)
    nframe = config.nframe if config is not None else KEYFRAMES
    memory = config.has_memory if config is not None else registration(engine).memory
    image = load_image(image_path)
    h0, w0 = image.shape[-2:]
    size = bucket_size(engine, h0, w0, config.scale_map if config is not None else None)
    if render_dir is not None:
        folder = conditioning.check_render_dir(render_dir)
        bucket_image = conditioning.pil_to_tensor(conditioning.stretch_to_bucket(image, size))
        cams = conditioning.official_cameras(Cameras.from_json(folder / "camera.json", w0, h0), (h0, w0), size,
                                             nframe)
        refs = single_view_references(bucket_image, cams) if memory else None
        cond = conditioning.conditions_from_render_dir(folder, bucket_image, cams, nframe, refs, memory=memory,
                                                       stride=stride)
    else:
        start, cams = photo_first_clip(image, Path(camera_json) if camera_json else None, trajectory, size, nframe,
                                      depth, announce)
        render = start.cache.render(cams, radius=conditioning.splat_radius(*size))
        refs = retrieve(start.bank, cams)[1] if memory else None
        cond = conditioning.conditions_from_render(start.image, cams, render.image, render.mask, refs, memory=memory,
                                                   stride=stride)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cond.save(out)
    return cond


class _ConditionsOnly:
    """What ``Scene.build_conditions`` asks of a generator, for conditions written without one."""

    uses_pointmaps = False

    def __init__(self, has_memory: bool):
        self.has_memory = has_memory


def scene_request(scene, trajectory: Optional[str] = None, camera_json: Optional[str] = None):
    """The ``TrajectoryRequest`` a scene's next clip would run for ``trajectory`` (an unfinished request of the
    scene's last run, an official scene's trajectory, or a preset, ``view<k>:`` prefixed for panoramas) or for a
    camera file."""
    from engine.scene import TrajectoryRequest

    if camera_json is not None:
        return TrajectoryRequest(name=Path(camera_json).stem, cameras=scene.read_camera_file(camera_json))
    for request in scene.unfinished() + scene.official_requests():
        if request.name == trajectory:
            return request
    return TrajectoryRequest(name=trajectory)


def write_scene_conditions(scene_dir: str, out: str, trajectory: Optional[str] = None,
                           camera_json: Optional[str] = None, engine: str = "worldstereo-memory-dmd",
                           weights: Optional[str] = None, stride: int = 1):
    """Write the conditioning of the next clip of the scene in ``scene_dir`` along ``trajectory`` or ``camera_json``
    (``scene_request``) to ``out``, as ``Scene.generate`` would build it now: the scene's size and keyframes, its
    current cache rendered along the cameras (or the request's pre-rendered folder), the references the scene's
    memory bank gives (their bank indices as the int64 tensor ``ref_ids``). No network is loaded.

    Returns:
        The conditions and the retrieval record (``engine.geometry.retrieval.Retrieval``).
    """
    from engine.engines import ENGINES, unknown_engine
    from engine.generators import registration
    from engine.jobfolder import clip_name
    from engine.scene import Clip, open_for_files
    from engine.scene_start import checkpoint_config

    if engine not in ENGINES:
        raise RenderInputError(unknown_engine(engine))
    if not registration(engine).network:
        raise RenderInputError("The preview engine runs no network, so it has no model conditioning; choose "
                               "worldstereo-memory-dmd, worldstereo-memory, worldstereo-camera or tiny-random.")
    if (trajectory is None) == (camera_json is None):
        raise RenderInputError("Give exactly one trajectory of the scene's next clip: --trajectory NAME or "
                               "--camera-json FILE.")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise RenderInputError(f"The stride must be a whole number of pixels from 1 up; got {stride!r:.40}.")
    if not JobFolder(scene_dir).holds_scene():
        raise RenderInputError(f"{Path(scene_dir).name} holds no scene (no manifest.json); give a generate --out "
                               "folder.")
    config = checkpoint_config(engine, weights)
    memory = config.has_memory if config is not None else registration(engine).memory
    scene = open_for_files(scene_dir)
    request = scene_request(scene, trajectory, camera_json)
    cams = scene.plan(request)
    index = len(scene.clips)
    clip = Clip(request, index, clip_name(index, request.name), cams)
    clip.render = scene.render_cache(cams)
    clip.retrieval, clip.references = scene.retrieve(clip)
    cond = scene.build_conditions(clip, _ConditionsOnly(memory), stride=stride)
    extra = {"ref_ids": torch.tensor(clip.retrieval.references, dtype=torch.long)} if memory else {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cond.save(out, extra=extra)
    return cond, clip.retrieval
