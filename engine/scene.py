"""The multi-trajectory loop: one photo or panorama in, clips + one consistent point cloud out.

Every clip is conditioned on the 3D cache rendered along its cameras (GGM) and on reference frames retrieved
from the memory bank (SSM); afterwards a few of its frames get depth, are scale-aligned to the cache and grow
both the cache and the bank, so the next trajectory sees everything generated so far.

The rooms around the loop: ``engine.settings`` checks what a scene is asked for, ``engine.scene_start`` starts a
scene (depth of the input, the first cache and bank), ``engine.generators`` makes each clip's frames,
``engine.jobfolder`` owns the files
(layout, commits, resume, revert), ``engine.outputs`` writes each file format.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from engine import conditioning, generators, outputs, scene_start
from engine.atomicio import atomic_write_json
from engine.geometry import trajectories as traj
from engine.geometry.cache import PointCache, viewer_confidence
from engine.geometry.cameras import Cameras
from engine.geometry.memory import MemoryBank, sample_align_nframe
from engine.geometry.retrieval import retrieve
from engine.images import load_image, save_image
from engine.jobfolder import (CLIPS, DATASET_IMAGES, FRAMES, MEMORY, ClipRecord, JobFolder, new_manifest,
                              snapshot_file)
from engine.progress import Progress, ensure, span
from engine.sampling import SamplingCancelled
from engine.settings import SceneError, SceneSettings, check_frames, engine_device

__all__ = ["GenerationCancelled", "Scene", "TrajectoryRequest", "open_for_files", "revert"]

SPLAT_SIGMA = 1.0  # splat standard deviation in units of the local point spacing (engine.geometry.cache notes)
MAX_VIEW_SPLATS = 100_000  # splats in the browser's splat view by default (a fixed subset beyond that)
VIEW_RADIUS = 1.0  # size of the cloud in the splat viewer's frame (gradio's viewer orbits the origin close by)

DEFAULT_PHOTO_TRAJECTORIES = ("up", "left", "right", "orbit")  # the paper's benchmark set


def clip_seed(scene_seed: int, index: int) -> int:
    """The seed of the scene's clip ``index`` (0-based): seed + k, so every clip draws noise of its own and a seed
    reproduces the whole scene."""
    return scene_seed + index


class GenerationCancelled(RuntimeError):
    """Raised when the caller's cancel flag is set; the scene keeps its last committed state."""


@dataclass
class TrajectoryRequest:
    """A trajectory to generate: a preset name (optionally ``view<k>:`` prefixed for panoramas) or cameras.

    ``cameras`` (an official camera file's, intrinsics in pixels of the input image) are subsampled to the clip's
    keyframe count as the release does. ``render_dir``: an official pre-rendered trajectory folder whose
    ``render.mp4`` / ``render_mask.mp4`` are this clip's GGM inputs (``cameras`` are then its ``camera.json``).
    """

    name: str
    cameras: Optional[Cameras] = None
    amount: Optional[float] = None
    frames: Optional[int] = None
    render_dir: Optional[str] = None

    @classmethod
    def parse(cls, spec: Union[str, "TrajectoryRequest"]) -> "TrajectoryRequest":
        return spec if isinstance(spec, TrajectoryRequest) else cls(name=str(spec).strip())


class Scene:
    """A scene in a job folder: the 3D cache, the memory bank, every generated camera, and the clip loop."""

    def __init__(self, job_dir: Path, settings: SceneSettings, manifest: dict, start_image: torch.Tensor,
                 start_camera: Cameras, cache: PointCache, bank: MemoryBank, depth_source, announce=print):
        self.folder = JobFolder(job_dir)
        self.job_dir = self.folder.path
        self.settings = settings
        self.manifest = manifest
        self.start_image = start_image
        self.start_camera = start_camera
        self.cache = cache.to(engine_device(settings))  # the cache and its renders live where the networks run
        self.bank = bank
        self.depth_source = depth_source
        self.announce = announce
        self._generator = None

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, job_dir, image: Union[str, Path], *, panorama: bool = False,
               settings: Optional[SceneSettings] = None, camera_json: Optional[Union[str, Path]] = None,
               depth_source=None, progress: Optional[Progress] = None, announce: Callable[[str], None] = print) -> "Scene":
        """Start a new scene from an image file. ``depth_source`` overrides depth estimation (tests pass
        ground truth): a callable ``(image [3,H,W], camera) -> (depth [H,W], valid [H,W])``."""
        settings = settings or SceneSettings()
        settings.validate()
        user_depth = scene_start.user_depth_for(settings, panorama)  # read and checked before a depth model loads
        folder = JobFolder(job_dir)
        if folder.holds_scene():
            raise SceneError(f"{folder.path} already holds a scene; open it to continue, or choose another folder.")
        report = ensure(progress)
        image_path = Path(image)
        img = load_image(image_path)
        report(0.05, "loading depth model")
        depth_source = depth_source or scene_start.depth_source_for(settings, panorama, announce)
        report(0.2, "depth of the input")
        if panorama:
            start = scene_start.start_panorama(img, settings, depth_source, span(report, 0.2, 0.9))
        else:
            size = scene_start.photo_size(img.shape[-2], img.shape[-1], settings)
            start = scene_start.start_photo(img, depth_source, camera_json, size, user_depth, span(report, 0.2, 0.9))
        # Nothing is written before the input has been fully understood: a refused input leaves no folder.
        manifest = new_manifest(
            kind="panorama" if panorama else "photo", input_path=image_path, settings=settings,
            engine_note=generators.engine_note(settings.engine), size=start.image.shape[-2:],
            input_size=img.shape[-2:], median_depth=start.median_depth, start_views=start.start_views,
            depth_note=start.depth_note)
        folder.create(manifest, start.image, start.start_camera, start.bank, start.cache)
        report(1.0, "scene ready")
        return cls(folder.path, settings, manifest, start.image, start.start_camera, start.cache, start.bank,
                   depth_source, announce)

    @classmethod
    def open(cls, job_dir, *, depth_source=None, settings_override: Optional[dict] = None,
             announce: Callable[[str], None] = print) -> "Scene":
        """Reopen a job folder at its last committed state (after a crash, a kill or to add trajectories)."""
        folder = JobFolder(job_dir)
        manifest = folder.read_manifest()
        settings = SceneSettings.from_dict({**manifest["settings"], **(settings_override or {})})
        folder.clean_debris(manifest)
        image, start, cache, bank = folder.load_state(manifest)
        depth_source = depth_source or scene_start.depth_source_for(settings, manifest["kind"] == "panorama", announce)
        scene = cls(folder.path, settings, manifest, image, start, cache, bank, depth_source, announce)
        scene._finish_last_commit()
        return scene

    def _finish_last_commit(self) -> None:
        """A run stopped after a clip's commit but before its last writes (killed, disk full) left the scene clouds
        or the manifest kept for ``revert`` unwritten: write them as that run would have."""
        clips = len(self.manifest["clips"])
        if clips and not (self.job_dir / snapshot_file(clips)).is_file():
            self.write_scene_cloud(only_if_stale=True)
            self.folder.snapshot(self.manifest)

    # ---- trajectories ---------------------------------------------------------------------------------
    @property
    def clips(self) -> list[dict]:
        return list(self.manifest["clips"])

    def default_trajectories(self) -> list[str]:
        if self.manifest["kind"] == "panorama":
            return [f"view{k}:forward" for k in range(len(self.manifest["start_views"]))]
        return list(DEFAULT_PHOTO_TRAJECTORIES)

    def _start_for(self, name: str) -> tuple[Cameras, str]:
        """The start camera of a trajectory: the input view, or ``view<k>:`` of a panorama."""
        if ":" in name:
            view, preset = name.split(":", 1)
            views = self.manifest["start_views"]
            try:
                k = int(view.removeprefix("view"))
                w2c = torch.tensor(views[k], dtype=self.start_camera.dtype)
            except (ValueError, IndexError):
                raise SceneError(f"Unknown start view '{view}'; this scene has view0..view{len(views) - 1}.") from None
            return Cameras(w2c, self.start_camera.K, self.start_camera.width, self.start_camera.height), preset
        return self.start_camera, name

    def read_camera_file(self, path: Union[str, Path]) -> Cameras:
        """An official camera file for this scene: its intrinsics are pixels of the input image as given (the
        release's reading), so they are declared at the input's size when the manifest records it."""
        size = self.manifest.get("input_size")
        if size:
            return Cameras.from_json(path, width=int(size[1]), height=int(size[0]))
        return Cameras.from_json(path)

    def plan(self, request: Union[str, TrajectoryRequest]) -> Cameras:
        """The cameras a trajectory will use (for drawing the path before generating)."""
        req = TrajectoryRequest.parse(request)
        frames = self.settings.frames if req.frames is None else req.frames
        if req.cameras is not None:
            check_frames(len(req.cameras), f"Trajectory '{req.name[:40]}'")  # the file's own size bound
            cams = conditioning.select_keyframes(req.cameras, frames)
            if (cams.width, cams.height) != (self.start_camera.width, self.start_camera.height):
                cams = cams.resized(self.start_camera.width, self.start_camera.height)
            return cams
        check_frames(frames, f"Trajectory '{req.name[:40]}'")
        start, preset = self._start_for(req.name)
        if preset not in traj.PRESETS:
            raise SceneError(f"Unknown trajectory '{preset[:40]}'; choose from: {', '.join(traj.PRESETS)}.")
        try:
            # The input's median depth, fixed at creation: a preset means the same path whenever it is asked for.
            return traj.make_trajectory(preset, start, self.manifest["median_depth"], frames=frames, amount=req.amount)
        except ValueError as e:  # the trajectory module words its refusals for people (amount out of range, ...)
            raise SceneError(str(e)) from None

    # ---- generation -----------------------------------------------------------------------------------
    def _clip_generator(self):
        if self._generator is None:
            self._generator = generators.clip_generator(self.settings, self.announce)
        return self._generator

    def run(self, trajectories: Optional[Sequence[Union[str, TrajectoryRequest]]] = None,
            progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None) -> list[ClipRecord]:
        """Generate every trajectory not yet done (resume-safe), then export the scene."""
        requests = [TrajectoryRequest.parse(t) for t in (trajectories or self.default_trajectories())]
        planned = [r.name for r in requests]
        if planned != self.manifest.get("planned"):
            self.manifest["planned"] = planned
            self.folder.write_manifest(self.manifest)
        done = {c["trajectory"] for c in self.manifest["clips"]}
        todo = [r for r in requests if r.name not in done]
        report = ensure(progress)
        records = []
        for i, req in enumerate(todo):
            records.append(self.generate(req, progress=span(report, i / (len(todo) + 0.2), (i + 1) / (len(todo) + 0.2)),
                                         cancel=cancel))
        self.export(progress=span(report, len(todo) / (len(todo) + 0.2), 1.0))
        return records

    def generate(self, request: Union[str, TrajectoryRequest], progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> ClipRecord:
        """Generate one clip along a trajectory, grow cache and memory, and commit it to the job folder."""
        req = TrajectoryRequest.parse(request)
        report = ensure(progress)

        def check_cancel():
            if cancel is not None and cancel():
                raise GenerationCancelled("Generation was cancelled; the scene keeps every finished clip.")

        generator = self._clip_generator()
        timings = {}
        t0 = time.perf_counter()
        cams = self.plan(req)
        index = len(self.manifest["clips"])
        safe_name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in req.name)[:40]
        name = f"{index:02d}_{safe_name}"
        report(0.0, f"{name}: rendering the 3D cache")
        # Only the paper's branch-form memory reads pointmaps; the released (stitched) form renders none.
        render = self.cache.render(cams, radius=self.splat_radius(cams),
                                   pointmaps=getattr(generator, "uses_pointmaps", False))
        timings["render"] = time.perf_counter() - t0
        check_cancel()

        t = time.perf_counter()
        report(0.05, f"{name}: retrieving references")
        retrieval, references = retrieve(self.bank, cams, max_refs=self.settings.max_refs,
                                         input_view=self.start_image if self._first_photo_clip else None)
        timings["retrieve"] = time.perf_counter() - t
        check_cancel()

        t = time.perf_counter()
        start_image = self.start_image_for(cams[0:1])
        conditions = self._conditions(req, cams, render, references, start_image, generator)
        try:
            frames = generator.generate(conditions=conditions, prompt=self.settings.prompt,
                                        seed=clip_seed(self.settings.seed, index), progress=span(report, 0.1, 0.8),
                                        cancel=cancel)
        except SamplingCancelled:
            # One cancellation type for callers, whichever stage noticed the flag.
            raise GenerationCancelled("Generation was cancelled; the scene keeps every finished clip.") from None
        timings["generate"] = time.perf_counter() - t
        check_cancel()

        t = time.perf_counter()
        report(0.8, f"{name}: depth of kept frames")
        keep = self._kept_indices(len(cams))
        new_cache = copy.deepcopy(self.cache)
        kept_depths = []
        for j, fi in enumerate(keep):
            depth, valid = self._aligned_depth(frames[fi], cams[fi], render.depth[fi], render.mask[fi])
            kept_depths.append(depth)
            # Only what the cache did not already hold grows it: covered pixels are the cache seen again.
            new_cache.add_frame(frames[fi], depth, cams[fi], frame_id=1000 * (index + 1) + int(fi),
                                valid=valid & ~render.mask[fi], confidence=self._new_point_confidence)
            report(0.8 + 0.1 * (j + 1) / len(keep), f"{name}: fusing frame {j + 1}/{len(keep)}")
            check_cancel()
        new_cache.downsample(self.settings.point_budget)
        timings["fuse"] = time.perf_counter() - t

        t = time.perf_counter()
        report(0.92, f"{name}: writing outputs")
        # The depth video: the grown cache seen from every camera of the clip (the geometry the clip left).
        seen = new_cache.render(cams, radius=self.splat_radius(cams))
        with self.folder.clip_folder(name) as tmp:
            self._write_clip(tmp, name, frames, cams, conditions, retrieval, keep, torch.stack(kept_depths), index,
                             depth_video=(seen.depth, seen.mask))
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        record = ClipRecord(name=name, folder=f"{CLIPS}/{name}", trajectory=req.name, frames=len(cams),
                            references=len(retrieval.refs), seconds=timings)
        manifest = self.folder.commit_clip(self.manifest, record, new_cache)
        # Only now does the in-memory scene move on. The cache is taken back from its file (colours quantised
        # as stored), so a run reopened from the folder (resume, revert) continues from exactly this state.
        self.manifest = manifest
        self.cache = PointCache.load_ply(self.job_dir / manifest["state"]["cache"], device=new_cache.device)
        self.bank.add(frames[keep], cams[keep], torch.stack(kept_depths),
                      frame_ids=[1000 * (index + 1) + int(i) for i in keep], source=name)
        # The previous cache file stays: ``revert`` goes back to it.
        self.write_scene_cloud()
        self.folder.snapshot(self.manifest)
        report(1.0, f"{name}: done")
        return record

    def splat_radius(self, cams: Cameras) -> int:
        """The splat half-size of this scene's cache renders (``conditioning.splat_radius`` unless set)."""
        if self.settings.splat_radius is not None:
            return int(self.settings.splat_radius)
        return conditioning.splat_radius(cams.height, cams.width)

    @property
    def _first_photo_clip(self) -> bool:
        """The first clip of a photo, which the release conditions on the input view alone."""
        return self.manifest["kind"] == "photo" and not self.manifest["clips"]

    def _conditions(self, req: TrajectoryRequest, cams: Cameras, render, references, start_image: torch.Tensor,
                    generator) -> conditioning.ClipConditions:
        """The clip's official conditions: the cache render (or the request's pre-rendered folder) along ``cams``,
        and for memory models the retrieved references."""
        memory = getattr(generator, "has_memory", False)
        use_pointmaps = getattr(generator, "uses_pointmaps", False)
        refs = references if memory else None
        if refs is not None:
            if use_pointmaps:
                refs.pointmaps = self.cache.render(refs.cameras, pointmaps=True).pointmap.permute(0, 3, 1, 2)
        pointmaps = render.pointmap.permute(0, 3, 1, 2) if use_pointmaps else None
        if req.render_dir is not None:
            return conditioning.conditions_from_render_dir(req.render_dir, start_image, cams, len(cams), refs,
                                                           pointmaps, memory)
        return conditioning.conditions_from_render(start_image, cams, render.image, render.mask, refs, pointmaps,
                                                   memory)

    def start_image_for(self, camera: Cameras) -> torch.Tensor:
        """The start frame as ``camera`` sees it: the input photo, or the panorama cut to that view."""
        if self.manifest["kind"] == "panorama":
            from engine.geometry.panorama import equirect_to_perspective

            return equirect_to_perspective(self.start_image, camera[0:1])[0]
        return self.start_image

    @property
    def _new_point_confidence(self) -> float:
        # Preview fills holes by inpainting: its colours there are a guess, and the cache says so; so is depth
        # continued into the holes of the cache's render when there is no depth model.
        return 0.5 if generators.registration(self.settings.engine).guessed_colours or self._depth_is_fallback else 1.0

    def _kept_indices(self, n: int) -> list[int]:
        """The frames of an ``n``-frame clip that grow the cache and the memory bank: the release's
        ``sample_align_nframe``, at most the frames after the start view, none when ``keep_frames`` is 0."""
        k = min(self.settings.keep_frames, n - 1)
        return sample_align_nframe(n, k) if k > 0 else []

    @property
    def _depth_is_fallback(self) -> bool:
        from engine.depth import is_fallback

        return is_fallback(self.depth_source)

    def _aligned_depth(self, image, camera, ref_depth, ref_valid):
        from engine.geometry.align import align_depth

        if self._depth_is_fallback:
            # No depth model: the cache's own depth, holes continued from it (engine.depth notes).
            from engine.depth import depth_from_render

            depth, valid = depth_from_render(ref_depth, ref_valid)
            return depth.to(ref_depth.device), valid.to(ref_depth.device)  # where the cache renders
        depth, valid, _ = self.depth_source(image, camera)
        depth, valid = depth.to(ref_depth.device), valid.to(ref_depth.device)  # where the cache renders
        overlap = valid & ref_valid & (ref_depth > 0)
        if int(overlap.sum()) >= 64:
            try:
                depth = align_depth(depth, ref_depth, overlap).apply(depth)
            except ValueError:
                pass  # too little usable overlap: keep the estimate's own scale
        return depth, valid & (depth > 0)

    def _write_clip(self, folder: Path, name, frames, cams, conditions, retrieval, keep, kept_depths, index,
                    depth_video=None) -> None:
        """A clip's files into ``folder`` (``JobFolder.clip_folder``)."""
        outputs.write_video(folder / "clip.mp4", frames)
        # The frames as generated, lossless: the 3DGS dataset is written from them, not from the H.264 video.
        for i, frame in enumerate(frames):
            save_image(folder / FRAMES / f"{i:04d}.png", frame)
        # What the model was given, in the official files' convention: holes mid-grey, frame 0 the input view,
        # render_mask.mp4 white where no point landed (the hole to generate).
        render, covered = conditions.render_frames()
        outputs.write_video(folder / "render.mp4", render)
        outputs.write_mask_video(folder / "render_mask.mp4", ~covered)
        if depth_video is not None:
            outputs.write_depth_video(folder / "depth.mp4", *depth_video)
        cams.save_json(folder / "cameras.json")
        refs = retrieval.to_json()
        refs["bank_frames"] = [self.bank.sources[i] + f"#{self.bank.frame_ids[i]}" for i in retrieval.refs]
        atomic_write_json(folder / "references.json", refs)
        part = MemoryBank()
        part.add(frames[keep], cams[keep], kept_depths, frame_ids=[1000 * (index + 1) + int(i) for i in keep], source=name)
        part.save(folder / MEMORY)

    # ---- outputs --------------------------------------------------------------------------------------
    def write_scene_cloud(self, only_if_stale: bool = False) -> dict:
        """The fused cloud: plain ``scene.ply`` for tools, ``scene.glb`` for the browser's point viewer and
        ``scene_splats.ply`` (3D Gaussian splats) for splat viewers."""
        paths = {"ply": self.job_dir / "scene.ply", "glb": self.job_dir / "scene.glb",
                 "splats": self.job_dir / "scene_splats.ply"}
        state = self.manifest["state"]["cache"]
        if not (only_if_stale and self.manifest.get("cloud_written_for") == state and all(p.exists() for p in paths.values())):
            outputs.write_point_cloud_ply(paths["ply"], self.cache.points, self.cache.colors)
            self._write_viewer_clouds(paths["glb"], paths["splats"], keep=None)
            self.manifest["cloud_written_for"] = state
            self.folder.write_manifest(self.manifest)
        return paths

    def viewer_confidence(self) -> torch.Tensor:
        """Per-point confidence the viewers filter on (``engine.geometry.cache.viewer_confidence``)."""
        return viewer_confidence(self.cache.points, self.cache.confidence, self.start_camera.centers[0],
                                 float(self.manifest.get("median_depth") or 1.0))

    def write_viewer_files(self, folder, min_confidence: float = 0.0, with_glb: bool = True,
                           max_splats: Optional[int] = None) -> dict:
        """What the browser's viewers show, into ``folder``: ``scene.glb`` and ``scene_splats.ply`` of the points
        whose viewer confidence is at least ``min_confidence``. The splats are put in the splat viewer's frame
        (y down, centred on the cloud's median point, scaled so 90% of the points lie within
        ``VIEW_RADIUS``: splat viewers orbit the origin from a fixed distance), at most ``max_splats`` of them
        (default ``MAX_VIEW_SPLATS``). ``with_glb=False`` writes the splats only. Refuses to hide everything."""
        max_splats = MAX_VIEW_SPLATS if max_splats is None else int(max_splats)
        if max_splats < 1:
            raise SceneError(f"The splat view needs at least one splat; got {max_splats}.")
        keep = self.viewer_confidence() >= float(min_confidence)
        if not bool(keep.any()):
            raise SceneError(f"No point has a confidence of {min_confidence:g} or more; lower the threshold.")
        folder = Path(folder)
        paths = {"glb": folder / "scene.glb" if with_glb else None, "splats": folder / "scene_splats.ply"}
        self._write_viewer_clouds(paths["glb"], paths["splats"], keep=keep, view_frame=True, max_splats=max_splats)
        return paths

    def _write_viewer_clouds(self, glb: Optional[Path], splats: Path, keep: Optional[torch.Tensor],
                             view_frame: bool = False, max_splats: int = MAX_VIEW_SPLATS) -> None:
        points, colors = self.cache.points.cpu(), self.cache.colors.cpu()  # the cache may live on the GPU
        # Splat sizes come from the whole cloud's spacing, so hiding points does not swell the rest.
        scale = SPLAT_SIGMA * self.cache.spacing()
        if keep is not None:
            keep = keep.cpu()
            points, colors, scale = points[keep], colors[keep], scale[keep.numpy()]
        if glb is not None:
            outputs.write_point_cloud_glb(glb, points, colors, axes=self.viewer_axes())
        if view_frame:
            p = points.double().numpy() @ (outputs.OPENGL_TO_OPENCV @ self.viewer_axes()).T
            centre = np.median(p, axis=0)
            radius = float(np.quantile(np.linalg.norm(p - centre, axis=1), 0.9)) or 1.0
            points, scale = torch.from_numpy((p - centre) * (VIEW_RADIUS / radius)), scale * (VIEW_RADIUS / radius)
            if len(points) > max_splats:
                # Browsers sort and draw every splat each frame; a fixed random subset with splats grown to cover
                # the same area keeps the view fluid (the download keeps every point).
                pick = np.sort(np.random.default_rng(0).choice(len(points), max_splats, replace=False))
                grow = np.sqrt(len(points) / max_splats)
                points, colors, scale = points[pick], colors[torch.from_numpy(pick)], scale[pick] * grow
        outputs.write_splat_ply(splats, points, colors, scale)

    def viewer_axes(self):
        """World-to-glTF axes for the viewer: photos live in the input camera's OpenCV frame (y down),
        panoramas in the bank's z-up world."""
        return scene_start.gltf_axes(self.manifest["kind"])

    def export(self, progress: Optional[Progress] = None) -> dict:
        """Write the scene-level outputs and the zip; returns their paths."""
        report = ensure(progress)
        report(0.0, "exporting the scene")
        paths = self.write_scene_cloud(only_if_stale=True)
        cams = [self.start_camera]
        images = [self.start_image_for(self.start_camera)[None]]
        for clip in self.manifest["clips"]:
            cams.append(Cameras.from_json(self.job_dir / clip["folder"] / "cameras.json")[1:])
            images.append(self.folder.clip_frames(clip)[1:])
        all_cams = Cameras.cat(cams)
        outputs.write_cameras_json(self.job_dir / "cameras.json", all_cams)
        report(0.3, "writing the 3DGS dataset")
        outputs.write_transforms_json(self.job_dir, torch.cat(images), all_cams, image_dir=DATASET_IMAGES)
        # Frames of a removed clip (``revert``) must not linger in the dataset or the zip.
        listed = {f["file_path"] for f in json.loads((self.job_dir / "transforms.json").read_text())["frames"]}
        for stale in (self.job_dir / DATASET_IMAGES).glob("*"):
            if f"{DATASET_IMAGES}/{stale.name}" not in listed and stale.is_file():
                stale.unlink()
        report(0.8, "packing the zip")
        # The zip is for people: internal resume state (cache versions, memory frames) stays out, and so do the
        # clips' lossless frames (the dataset images hold them).
        zip_path = outputs.zip_folder(self.job_dir, self.job_dir / "scene.zip",
                                      exclude=("state/*", f"{CLIPS}/*/{MEMORY}/*", f"{CLIPS}/*/{FRAMES}/*"))
        paths.update(cameras=self.job_dir / "cameras.json", transforms=self.job_dir / "transforms.json", zip=zip_path)
        report(1.0, "export done")
        return paths

    # ---- undo -----------------------------------------------------------------------------------------
    def revert(self, progress: Optional[Progress] = None) -> dict:
        """Remove the last clip: the scene goes back to its state before that clip (``engine.jobfolder`` notes).

        Returns the removed clip's record. The 3D cache, the memory bank, the manifest and every scene-level
        file are those of the clip before; with no clip left, the scene-level files are removed, as after
        ``create``.
        """
        report = ensure(progress)
        clips = self.manifest["clips"]
        if not clips:
            raise SceneError("This scene has no clip to remove.")
        n, removed = len(clips), clips[-1]
        previous = self.folder.manifest_before_last(self.manifest)
        if not (self.job_dir / previous["state"]["cache"]).is_file():
            raise SceneError(f"The 3D cache from before clip {removed['name']} was not kept, so it cannot be removed.")
        report(0.1, f"removing {removed['name']}")
        self.folder.remove_last_clip(self.manifest, previous)
        reopened = Scene.open(self.job_dir, depth_source=self.depth_source, announce=self.announce)
        self.manifest, self.cache, self.bank = reopened.manifest, reopened.cache, reopened.bank
        if n == 1:
            self.folder.remove_scene_outputs()
        else:
            report(0.3, "rewriting the scene files")
            self.write_scene_cloud()
            self.export(progress=span(report, 0.5, 1.0))
        report(1.0, f"removed {removed['name']}")
        return removed


class _NoDepth:
    """The depth door of a scene opened only to be changed by file (``revert``): no model is loaded."""

    def __call__(self, image, camera=None):
        raise SceneError("This scene was opened without a depth model.")


def open_for_files(job_dir) -> "Scene":
    """The scene in ``job_dir`` opened to read or change its files (plan, render, revert): no model is loaded."""
    return Scene.open(job_dir, depth_source=_NoDepth(), announce=lambda m: None)


def revert(job_dir) -> tuple["Scene", dict]:
    """Remove the last clip of the scene in ``job_dir`` without loading any model: ``(scene, removed record)``."""
    scene = open_for_files(job_dir)
    return scene, scene.revert()
