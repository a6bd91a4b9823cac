"""The multi-trajectory loop: one photo or panorama in, clips + one consistent point cloud out.

Every clip is conditioned on the 3D cache rendered along its cameras (GGM) and on reference frames retrieved
from the memory bank (SSM); afterwards a few of its frames get depth, are scale-aligned to the cache and grow
both the cache and the bank, so the next trajectory sees everything generated so far. ``Scene.make_clip`` runs one
clip as named steps, in this order:

1. ``render_cache``: the 3D cache rendered along the trajectory's cameras (colour, holes, depth).
2. ``retrieve``: the memory frames that serve the clip as references (``engine.geometry.retrieval.retrieve``).
3. ``build_conditions``: the official model inputs (``engine.conditioning``).
4. ``generate_frames``: the engine's clip generator (``engine.generators``), clip k seeded with ``clip_seed``.
5. ``fuse``: kept frames get depth, scale-aligned to the cache, and grow a copy of it.
6. ``move_on``: the scene moved on in memory (manifest, cache, bank), made from the clip alone.
7. ``ClipWriter``: the clip's files written and the clip committed, in a background thread while the next clip runs
   steps 1-6 (``Scene.generate_clips``); the manifest lists a clip only once all its files are on disk.

The rooms around the loop: ``engine.settings`` checks what a scene is asked for, ``engine.scene_start`` starts a
scene (depth of the input, the first cache and bank), ``engine.generators`` makes each clip's frames,
``engine.jobfolder`` owns the files (every path, what is written per clip, commits, the resume record, revert),
``engine.outputs`` writes each file format.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from engine import conditioning, generators, scene_start
from engine.geometry import trajectories as traj
from engine.geometry.cache import PointCache
from engine.geometry.cameras import Cameras
from engine.geometry.memory import MemoryBank, sample_align_nframe
from engine.geometry.render import RenderResult
from engine.geometry.retrieval import References, Retrieval, retrieve, shortcut_bonus
from engine.images import load_image
from engine.jobfolder import (ClipContent, ClipRecord, JobFolder, as_committed, clip_folder, clip_name, new_manifest,
                              snapshot_file, unfinished_requests, with_clip, with_run)
from engine.progress import Progress, ensure, span
from engine.sampling import SamplingCancelled
from engine.scene_start import PANORAMA_KINDS, PANORAMA_START_YAWS
from engine.settings import SceneError, SceneSettings, check_frames, check_prompt, engine_device

__all__ = ["ClipWriter", "Committed", "GenerationCancelled", "Scene", "TrajectoryRequest", "check_trajectory_prompts",
           "default_trajectory_names", "open_for_files", "parse_trajectory_prompts", "revert", "with_trajectory_prompts"]

DEFAULT_PHOTO_TRAJECTORIES = ("up", "left", "right", "orbit")  # the paper's benchmark set
CANCELLED = "Generation was cancelled; the scene keeps every finished clip."


def clip_seed(scene_seed: int, index: int) -> int:
    """The seed of the scene's clip ``index`` (0-based): seed + k, so every clip draws noise of its own and a seed
    reproduces the whole scene."""
    return scene_seed + index


def frame_id(index: int, frame: int) -> int:
    """The id of frame ``frame`` of the scene's clip ``index`` (0-based) in the 3D cache and the memory bank:
    ``1000 (index + 1) + frame`` (the start's frames keep ids below 1000)."""
    return 1000 * (index + 1) + int(frame)


class GenerationCancelled(RuntimeError):
    """Raised when the caller's cancel flag is set; the scene keeps its last committed state."""

    def __init__(self, message: str = CANCELLED):
        super().__init__(message)


@dataclass
class TrajectoryRequest:
    """A trajectory to generate: a preset name (optionally ``view<k>:`` prefixed for panoramas) or cameras.

    ``cameras`` (an official camera file's, intrinsics in pixels of the input image) are subsampled to the clip's
    keyframe count as the release does. ``render_dir``: an official pre-rendered trajectory folder whose
    ``render.mp4`` / ``render_mask.mp4`` are this clip's GGM inputs (``cameras`` are then its ``camera.json``).
    ``prompt``: this trajectory's own prompt (None: the scene's). ``label``: ``"<view>/<traj>"`` of an official
    scene's trajectory (``official``): the memory bank names the frames it adds so, and its retrieval follows the
    release's shortcut rules; None: the frames are named by ``name`` and no shortcut applies. ``start_frame``: the
    image the trajectory starts from (an official group's ``start_frame.png``) instead of the scene's start view.
    """

    name: str
    cameras: Optional[Cameras] = None
    amount: Optional[float] = None
    frames: Optional[int] = None
    render_dir: Optional[str] = None
    prompt: Optional[str] = None
    label: Optional[str] = None
    start_frame: Optional[str] = None

    @classmethod
    def parse(cls, spec: Union[str, "TrajectoryRequest"]) -> "TrajectoryRequest":
        return spec if isinstance(spec, TrajectoryRequest) else cls(name=str(spec).strip())

    def to_dict(self) -> dict:
        """The request as JSON (the manifest's resume record): its cameras as an official camera file with their
        image size, so ``from_dict`` gives them back exactly."""
        cameras = None
        if self.cameras is not None:
            cameras = {**self.cameras.to_json_dict(), "width": self.cameras.width, "height": self.cameras.height}
        return {"name": self.name, "amount": self.amount, "frames": self.frames, "render_dir": self.render_dir,
                "cameras": cameras, "prompt": self.prompt, "label": self.label, "start_frame": self.start_frame}

    @classmethod
    def from_dict(cls, data: dict) -> "TrajectoryRequest":
        cams = data.get("cameras")
        cameras = None if cams is None else Cameras.from_json_dict(cams, cams.get("width"), cams.get("height"),
                                                                    source=f"The cameras of '{data['name']}'")
        return cls(name=str(data["name"]), cameras=cameras, amount=data.get("amount"), frames=data.get("frames"),
                   render_dir=data.get("render_dir"), prompt=data.get("prompt"), label=data.get("label"),
                   start_frame=data.get("start_frame"))

    @classmethod
    def official(cls, trajectory) -> "TrajectoryRequest":
        """An official scene's trajectory (``engine.official_scene.OfficialTrajectory``) as the release runs it: its
        camera file, its start frame, its own caption, its label for the shortcut rules, and its pre-rendered GGM
        inputs when the folder holds them (else the scene's cache is rendered along it, as for any trajectory)."""
        if trajectory.start_frame is None:
            raise SceneError(f"{trajectory.label} starts from the last frame of a generated clip, which this project "
                             "does not run yet; move that trajectory folder out of the scene to run the others.")
        return cls(name=trajectory.label, cameras=trajectory.cameras, prompt=trajectory.prompt,
                   render_dir=str(trajectory.folder) if trajectory.rendered else None, label=trajectory.label,
                   start_frame=str(trajectory.start_frame))


def parse_trajectory_prompts(specs: Sequence[str]) -> dict[str, str]:
    """Per-trajectory prompts given as ``NAME=TEXT`` (the CLI's ``--trajectory-prompt``, the page's lines) as
    ``{NAME: TEXT}``, each prompt checked (``check_prompt``); blank specs are skipped."""
    prompts = {}
    for spec in specs:
        if not spec.strip():
            continue
        name, sep, text = spec.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise SceneError(f"A trajectory prompt is NAME=TEXT (e.g. left=a corridor seen from the left); got "
                             f"'{spec.strip()[:40]}'.")
        if name in prompts:
            raise SceneError(f"Trajectory '{name[:40]}' is given two prompts; give each trajectory one.")
        check_prompt(text)
        prompts[name] = text
    return prompts


def check_trajectory_prompts(prompts: dict[str, str], names: Sequence[str]) -> None:
    """Refuse a prompt (``parse_trajectory_prompts``) for a trajectory not among ``names``, the run's: it would change
    nothing."""
    unknown = [n for n in prompts if n not in names]
    if unknown:
        raise SceneError(f"A prompt is given for trajectory '{unknown[0][:40]}', which this run does not generate; "
                         f"its trajectories are: {', '.join(names)[:300] or 'none'}.")


def with_trajectory_prompts(requests: Sequence[TrajectoryRequest], prompts: dict[str, str]) -> list[TrajectoryRequest]:
    """``requests`` with ``prompts`` (``parse_trajectory_prompts``) set on the trajectories they name, each of which
    must be one of them (``check_trajectory_prompts``)."""
    check_trajectory_prompts(prompts, [r.name for r in requests])
    return [dataclasses.replace(r, prompt=prompts[r.name]) if r.name in prompts else r for r in requests]


def default_trajectory_names(kind: str) -> list[str]:
    """The trajectories a photo or panorama scene runs when none are asked for: a photo's
    ``DEFAULT_PHOTO_TRAJECTORIES``, a panorama's forward move from each start view (an official scene runs its own,
    ``Scene.official_requests``)."""
    if kind == "panorama":
        return [f"view{k}:forward" for k in range(len(PANORAMA_START_YAWS))]
    return list(DEFAULT_PHOTO_TRAJECTORIES) if kind == "photo" else []


@dataclass
class Clip:
    """One clip on its way through the steps of ``Scene.make_clip``, ``move_on`` and its ``ClipWriter``; each step
    fills its part."""

    request: TrajectoryRequest
    index: int  # 0-based, in the scene
    name: str  # its folder's name (``engine.jobfolder.clip_name``)
    cameras: Cameras  # [F], frame 0 the start view
    origin: float = 0.0  # the run's start (``time.perf_counter``): the timeline's zero
    t0: float = field(default_factory=time.perf_counter)  # the clip's start
    seconds: dict = field(default_factory=dict)  # each step's wall time
    timeline: dict = field(default_factory=dict)  # each step's [start, end], seconds since ``origin``
    render: Optional[RenderResult] = None  # render_cache
    retrieval: Optional[Retrieval] = None  # retrieve
    references: Optional[References] = None
    conditions: Optional[conditioning.ClipConditions] = None  # build_conditions
    frames: Optional[torch.Tensor] = None  # generate_frames: [F,3,H,W]
    kept: list = field(default_factory=list)  # fuse: the frames that grow the cache and the bank
    kept_depths: Optional[torch.Tensor] = None  # [K,H,W]
    cache: Optional[PointCache] = None  # the grown cache
    references_json: Optional[dict] = None  # move_on: the references as references.json lists them
    memory: Optional[MemoryBank] = None  # the clip's frames for the memory bank
    committed_cache: Optional[PointCache] = None  # ``cache`` as its committed file holds it

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as the step ``name`` (a failed step records nothing: its clip is not committed)."""
        t = time.perf_counter()
        yield
        end = time.perf_counter()
        self.seconds[name] = end - t
        self.timeline[name] = [round(t - self.origin, 3), round(end - self.origin, 3)]

    def record(self) -> ClipRecord:
        """The clip as the manifest lists it."""
        return ClipRecord(name=self.name, folder=clip_folder(self.name), trajectory=self.request.name,
                          frames=len(self.cameras), references=len(self.retrieval.references),
                          seconds=dict(self.seconds), timeline=dict(self.timeline))


@dataclass(frozen=True)
class Committed:
    """A clip just committed and the scene's state with it, as ``Scene.generate_clips``' ``on_commit`` gets it (it
    reads like a scene to the page's views: ``manifest``, ``cache``, ``folder``, ``start_camera``, ``clips``)."""

    record: ClipRecord
    manifest: dict
    cache: PointCache
    folder: JobFolder
    start_camera: Cameras

    @property
    def clips(self) -> list[dict]:
        return list(self.manifest["clips"])


class ClipWriter:
    """Writes and commits a scene's clips in the order they are handed over (``Scene.generate_clips``): in one
    background thread (``background``), so clip k's files are written while clip k+1 is made, at most one clip
    waiting to be written; or at once. It holds the manifest as committed on disk. A failed write is raised at the
    next ``wait`` (the loop stops there, so no clip after it is written).

    A clip's ``seconds["total"]`` is its time on the loop's critical path: from its start to its hand-over (with the
    wait for the clip before it, ``seconds["wait"]``), plus its writing only when that is not done behind; its
    ``timeline`` shows when each step ran, the writing of clip k beside the steps of clip k+1."""

    def __init__(self, scene: "Scene", background: bool, on_commit: Optional[Callable[[Committed], None]] = None):
        self.scene = scene
        self.manifest = copy.deepcopy(scene.manifest)
        self.records: list[ClipRecord] = []
        self.origin = time.perf_counter()
        self.on_commit = on_commit
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clip-writer") if background else None
        self._pending: Optional[Future] = None
        self._waited = 0.0

    def wait(self) -> None:
        """Wait until the clip handed over last is committed; its failure is raised here."""
        t = time.perf_counter()
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                pending.result()
        finally:
            self._waited = time.perf_counter() - t

    def hand_over(self, clip: Clip) -> None:
        """Write and commit ``clip`` (moved on in memory: ``Scene.move_on``), behind the loop or at once."""
        if self._pool is None:
            self._commit(clip)
            return
        clip.seconds["wait"] = self._waited
        clip.seconds["total"] = time.perf_counter() - clip.t0
        self._pending = self._pool.submit(self._commit, clip)

    def close(self) -> None:
        """Wait for the last clip (its failure is raised), then end the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _commit(self, clip: Clip) -> None:
        scene, folder = self.scene, self.scene.folder
        with clip.step("write"):
            folder.write_clip(clip.name, scene.clip_content(clip))
        if self._pool is None:
            clip.seconds["total"] = time.perf_counter() - clip.t0
        record = clip.record()
        self.manifest = folder.commit_clip(self.manifest, record, clip.committed_cache)
        self.manifest = write_cloud(folder, self.manifest, clip.committed_cache)
        folder.snapshot(self.manifest)
        self.records.append(record)
        if self.on_commit is not None:
            self.on_commit(Committed(record, copy.deepcopy(self.manifest), clip.committed_cache, folder,
                                     scene.start_camera))


def write_cloud(folder: JobFolder, manifest: dict, cache: PointCache) -> dict:
    """Write the fused cloud of ``cache`` as people download it (``JobFolder.write_scene_cloud``) and return
    ``manifest`` marked as having it (``cloud_written_for``), that manifest written."""
    folder.write_scene_cloud(cache, scene_start.gltf_axes(manifest["kind"]))
    manifest = {**manifest, "cloud_written_for": manifest["state"]["cache"]}
    folder.write_manifest(manifest)
    return manifest


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
               depth_source=None, progress: Optional[Progress] = None,
               announce: Callable[[str], None] = print) -> "Scene":
        """Start a new scene from an image file. ``depth_source`` overrides depth estimation (tests pass
        ground truth): a callable ``(image [3,H,W], camera) -> (depth [H,W], valid [H,W], K [3,3])``."""
        settings = settings or SceneSettings()
        settings.validate()
        user_depth = scene_start.user_depth_for(settings, panorama)  # read and checked before a depth model loads
        folder = cls._new_folder(job_dir)
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
        manifest = new_manifest(
            kind="panorama" if panorama else "photo", input_path=image_path, settings=settings,
            engine_note=generators.engine_note(settings.engine), size=start.image.shape[-2:],
            input_size=img.shape[-2:], median_depth=start.median_depth, start_views=start.start_views,
            depth_note=start.depth_note)
        return cls._begin(folder, manifest, start, settings, depth_source, announce, report)

    @classmethod
    def create_official(cls, job_dir, root: Union[str, Path], *, settings: Optional[SceneSettings] = None,
                        depth_source=None, progress: Optional[Progress] = None,
                        announce: Callable[[str], None] = print) -> "Scene":
        """Start a new scene from an official scene folder (``engine.official_scene``) as the release runs one: the
        memory bank and the first cache are its ``pano_bank`` views (``scene_start.start_official``), and its
        trajectories, in the release's order with their own captions, are the scene's default run
        (``default_trajectories``)."""
        from engine.official_scene import read_official_scene

        settings = settings or SceneSettings()
        settings.validate()
        scene_start.user_depth_for(settings, panorama=True)  # a depth file is refused: the bank has 27 views
        folder = cls._new_folder(job_dir)
        official = read_official_scene(root)
        for trajectory in official.trajectories:
            TrajectoryRequest.official(trajectory)  # what cannot run is refused before any model loads
        report = ensure(progress)
        report(0.05, "loading depth model")
        depth_source = depth_source or scene_start.depth_source_for(settings, True, announce)
        report(0.2, "depth of the bank views")
        start = scene_start.start_official(official, settings, depth_source, span(report, 0.2, 0.9))
        bank = official.bank_cameras
        manifest = new_manifest(
            kind="official", input_path=official.root, input_sha256=official.digest(), settings=settings,
            engine_note=generators.engine_note(settings.engine), size=start.bank.size, input_size=(bank.height,
                                                                                                     bank.width),
            median_depth=start.median_depth, start_views=start.start_views, depth_note=start.depth_note)
        return cls._begin(folder, manifest, start, settings, depth_source, announce, report)

    @staticmethod
    def _new_folder(job_dir) -> JobFolder:
        folder = JobFolder(job_dir)
        if folder.holds_scene():
            raise SceneError(f"{folder.path} already holds a scene; open it to continue, or choose another folder.")
        return folder

    @classmethod
    def _begin(cls, folder: JobFolder, manifest: dict, start: scene_start.SceneStart, settings: SceneSettings,
               depth_source, announce: Callable[[str], None], report: Progress) -> "Scene":
        """Write a new scene's start (``JobFolder.create``) and open it. Nothing is written before the input has been
        fully understood: a refused input leaves no folder."""
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
        depth_source = depth_source or scene_start.depth_source_for(settings, manifest["kind"] in PANORAMA_KINDS,
                                                                    announce)
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

    def default_trajectories(self) -> list[Union[str, TrajectoryRequest]]:
        """What a run without trajectories generates: an official scene's trajectories as the release runs them, a
        panorama's forward move from each start view, a photo's ``DEFAULT_PHOTO_TRAJECTORIES``."""
        if self.manifest["kind"] == "official":
            return self.official_requests()
        return default_trajectory_names(self.manifest["kind"])

    def official_requests(self) -> list[TrajectoryRequest]:
        """An official scene's trajectories (``TrajectoryRequest.official``), in the release's order; none for any
        other scene."""
        from engine.official_scene import read_official_scene

        root = self.manifest.get("official_scene")
        return [TrajectoryRequest.official(t) for t in read_official_scene(root).trajectories] if root else []

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
        check_prompt(req.prompt)
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

    def plan_run(self, requests: Sequence[TrajectoryRequest]) -> None:
        """Record ``requests`` as the run about to start, the scene's one resume record (``engine.jobfolder``): a
        run cut short (a kill, a restart) is resumed from it (``unfinished``)."""
        manifest = with_run(self.manifest, [r.to_dict() for r in requests])
        if manifest is not self.manifest:
            self.manifest = manifest
            self.folder.write_manifest(self.manifest)

    def unfinished(self) -> list[TrajectoryRequest]:
        """The requests of the last run that have no committed clip yet."""
        return [TrajectoryRequest.from_dict(r) for r in unfinished_requests(self.manifest)]

    # ---- generation -----------------------------------------------------------------------------------
    def _clip_generator(self) -> generators.ClipGenerator:
        if self._generator is None:
            self._generator = generators.clip_generator(self.settings, self.announce)
        return self._generator

    def run(self, trajectories: Optional[Sequence[Union[str, TrajectoryRequest]]] = None,
            progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
            on_commit: Optional[Callable[["Committed"], None]] = None) -> list[ClipRecord]:
        """Generate every trajectory not yet done (resume-safe), each clip's files written behind the next clip
        (``generate_clips``), then export the scene."""
        requests = [TrajectoryRequest.parse(t) for t in (trajectories or self.default_trajectories())]
        done = {c["trajectory"] for c in self.manifest["clips"]}
        todo = [r for r in requests if r.name not in done]
        self.plan_run(todo)
        report = ensure(progress)
        records = self.generate_clips(todo, progress=span(report, 0.0, len(todo) / (len(todo) + 0.2)), cancel=cancel,
                                      on_commit=on_commit)
        self.export(progress=span(report, len(todo) / (len(todo) + 0.2), 1.0))
        return records

    def generate(self, request: Union[str, TrajectoryRequest], progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> ClipRecord:
        """Generate one clip along a trajectory, grow cache and memory, and commit it to the job folder before
        returning."""
        return self.generate_clips([request], progress=progress, cancel=cancel, behind=False)[0]

    def generate_clips(self, requests: Sequence[Union[str, TrajectoryRequest]], progress: Optional[Progress] = None,
                       cancel: Optional[Callable[[], bool]] = None,
                       on_commit: Optional[Callable[["Committed"], None]] = None,
                       behind: bool = True) -> list[ClipRecord]:
        """Generate a clip along each request in turn (``make_clip``: the steps of the module doc), move the scene
        on in memory after each (``move_on``) and hand it to a ``ClipWriter``: with ``behind``, clip k's files are
        written and committed in a background thread while clip k+1 is made. ``on_commit`` (called in the writer's
        thread) gets each clip as it is committed. Returns the committed clips' records.

        Whatever stops the run (a failed step, a cancel, a failed write), every clip handed over before it is
        committed or, if its writing failed, the scene goes back to the last committed state (``reload``): the
        object and the folder agree, and a resume starts there."""
        report = ensure(progress)
        requests = list(requests)
        writer = ClipWriter(self, background=behind and len(requests) > 1, on_commit=on_commit)
        n = len(requests)
        try:
            for i, req in enumerate(requests):
                clip = self.make_clip(req, span(report, i / n, (i + 1) / n, prefix=f"clip {i + 1}/{n} · "), cancel,
                                      origin=writer.origin)
                writer.wait()
                self.move_on(clip)
                writer.hand_over(clip)
        finally:
            try:
                writer.close()
            finally:
                if len(writer.manifest["clips"]) == len(self.manifest["clips"]):
                    self.manifest = writer.manifest  # as committed, with the clips' write seconds
                else:  # a clip was handed over but not committed
                    self.reload()
        return writer.records

    def make_clip(self, request: Union[str, TrajectoryRequest], progress: Progress,
                  cancel: Optional[Callable[[], bool]], origin: float) -> "Clip":
        """One clip through the steps from ``render_cache`` to ``fuse``, each timed; a set ``cancel`` flag stops it
        between steps. ``origin``: the run's start, for the clip's timeline."""
        report = ensure(progress)

        def stop_if_cancelled() -> None:
            if cancel is not None and cancel():
                raise GenerationCancelled()

        stop_if_cancelled()
        generator = self._clip_generator()
        req = TrajectoryRequest.parse(request)
        cameras = self.plan(req)
        index = len(self.manifest["clips"])
        clip = Clip(req, index, clip_name(index, req.name), cameras, origin=origin)
        with clip.step("render"):
            report(0.0, f"{clip.name}: rendering the 3D cache")
            # Only the paper's branch-form memory reads pointmaps; the released (stitched) form renders none.
            clip.render = self.render_cache(clip.cameras, pointmaps=generator.uses_pointmaps)
        stop_if_cancelled()
        with clip.step("retrieve"):
            report(0.05, f"{clip.name}: retrieving references")
            clip.retrieval, clip.references = self.retrieve(clip)
        stop_if_cancelled()
        with clip.step("generate"):
            clip.conditions = self.build_conditions(clip, generator)
            clip.frames = self.generate_frames(clip, generator, span(report, 0.1, 0.9), cancel)
        stop_if_cancelled()
        with clip.step("fuse"):
            report(0.9, f"{clip.name}: depth of kept frames")
            self.fuse(clip, span(report, 0.9, 1.0), stop_if_cancelled)
        return clip

    # ---- the steps ------------------------------------------------------------------------------------
    def render_cache(self, cameras: Cameras, pointmaps: bool = False) -> RenderResult:
        """The 3D cache seen along ``cameras``: colour, covered pixels, depth (and world points for ``pointmaps``)."""
        return self.cache.render(cameras, radius=self.splat_radius(cameras), pointmaps=pointmaps)

    def retrieve(self, clip: Clip) -> tuple[Retrieval, References]:
        """The memory frames that serve the clip (``engine.geometry.retrieval.retrieve``: the release's rule, with its
        shortcut rules for an official scene's trajectory). More than ``max_refs`` picked frames are narrowed by the
        release's selector on DINOv2 features from the Hugging Face cache, or on pose and quality alone with one line
        to ``announce`` (``engine.frame_features``)."""
        from engine.frame_features import load_frame_describer

        label = clip.request.label
        bonus = None
        if label is not None and "/" in label:
            view, name = label.split("/", 1)
            bonus = shortcut_bonus(view, name, self.bank.labels, len(clip.cameras))

        def frame_features(images: torch.Tensor):
            return load_frame_describer(device=engine_device(self.settings), announce=self.announce)(images)

        return retrieve(self.bank, clip.cameras, bonus=bonus, frame_features=frame_features,
                        max_refs=self.settings.max_refs)

    def build_conditions(self, clip: Clip, generator: generators.ClipGenerator,
                         stride: int = 1) -> conditioning.ClipConditions:
        """The clip's official conditions: the cache render (or the request's pre-rendered folder) along its cameras,
        and for memory models the retrieved references (``stride`` > 1: per-pixel maps at every ``stride``-th pixel,
        for inspection)."""
        cams = clip.cameras
        start_image = self.clip_start_image(clip)
        refs = clip.references if generator.has_memory else None
        if refs is not None and generator.uses_pointmaps:
            refs.pointmaps = self.cache.render(refs.cameras, pointmaps=True).pointmap.permute(0, 3, 1, 2)
        pointmaps = clip.render.pointmap.permute(0, 3, 1, 2) if generator.uses_pointmaps else None
        memory = generator.has_memory
        if clip.request.render_dir is not None:
            return conditioning.conditions_from_render_dir(clip.request.render_dir, start_image, cams, len(cams), refs,
                                                           pointmaps, memory, stride)
        return conditioning.conditions_from_render(start_image, cams, clip.render.image, clip.render.mask, refs,
                                                   pointmaps, memory, stride)

    def generate_frames(self, clip: Clip, generator: generators.ClipGenerator, progress: Progress,
                        cancel: Optional[Callable[[], bool]]) -> torch.Tensor:
        """The clip's frames ``[F,3,H,W]`` from its conditions, its noise drawn from ``clip_seed``."""
        try:
            return generator.generate(conditions=clip.conditions, prompt=self.clip_prompt(clip.request),
                                      seed=clip_seed(self.settings.seed, clip.index), progress=progress, cancel=cancel)
        except SamplingCancelled:  # one cancellation type for callers, whichever stage noticed the flag
            raise GenerationCancelled() from None

    def fuse(self, clip: Clip, progress: Progress, stop_if_cancelled: Callable[[], None]) -> None:
        """Give the clip's kept frames (``_kept_indices``) depth, scale-aligned to the cache's render
        (``engine.depth.generated_frame_depth``), and grow a copy of the cache with what it did not already hold
        (covered pixels are the cache seen again)."""
        from engine.depth import generated_frame_depth

        render = clip.render
        clip.kept = self._kept_indices(len(clip.cameras))
        clip.cache = copy.deepcopy(self.cache)
        depths = []
        for j, fi in enumerate(clip.kept):
            depth, valid = generated_frame_depth(self.depth_source, clip.frames[fi], clip.cameras[fi], render.depth[fi],
                                                 render.mask[fi])
            depths.append(depth)
            clip.cache.add_frame(clip.frames[fi], depth, clip.cameras[fi], frame_id=frame_id(clip.index, fi),
                                 valid=valid & ~render.mask[fi], confidence=self._new_point_confidence)
            progress((j + 1) / len(clip.kept), f"{clip.name}: fusing frame {j + 1}/{len(clip.kept)}")
            stop_if_cancelled()
        clip.cache.downsample(self.settings.point_budget)
        clip.kept_depths = torch.stack(depths)

    def move_on(self, clip: Clip) -> None:
        """The scene after ``clip``, in memory: the manifest lists it, the cache is the grown one as its committed
        file holds it (``as_committed``), the bank holds the clip's kept frames exactly as its files hold them. All
        made from the clip, never read back from its files, so the next clip can start before they are written."""
        references = clip.retrieval.to_json()
        references["bank_frames"] = [f"{self.bank.sources[i]}#{self.bank.frame_ids[i]}" for i in
                                     clip.retrieval.references]
        references["bank_labels"] = [self.bank.labels[i] for i in clip.retrieval.references]
        clip.references_json = references
        memory = MemoryBank()
        # The kept frames exactly as the clip's files hold them (8-bit, lossless), so a resumed scene's bank is this
        # one; each labelled as the shortcut rules read it.
        kept = torch.round(clip.frames[clip.kept].detach().cpu().float().clamp(0, 1) * 255) / 255
        memory.add(kept, clip.cameras[clip.kept], clip.kept_depths.cpu(),
                   frame_ids=[frame_id(clip.index, i) for i in clip.kept], source=clip.name,
                   labels=[clip.request.label or clip.request.name] * len(clip.kept))
        clip.memory = memory
        clip.committed_cache = as_committed(clip.cache)
        self.manifest = with_clip(self.manifest, clip.record())
        self.cache = clip.committed_cache  # the previous cache file stays: ``revert`` goes back to it
        self.bank.extend(memory)

    def clip_content(self, clip: Clip) -> ClipContent:
        """What is written of a clip (after ``move_on``): its frames and cameras, what the model was given (in the
        official files' convention: holes mid-grey, frame 0 the input view), the geometry it left (the grown cache's
        depth from every camera), the references it had and the frames it gives the memory bank."""
        seen = clip.cache.render(clip.cameras, radius=self.splat_radius(clip.cameras))
        render, covered = clip.conditions.render_frames()
        return ClipContent(frames=clip.frames, cameras=clip.cameras, render=render, covered=covered,
                           depth=(seen.depth, seen.mask), references=clip.references_json, memory=clip.memory)

    def reload(self) -> None:
        """Go back to the state the job folder has committed (after a clip that could not be written, a revert)."""
        reopened = Scene.open(self.job_dir, depth_source=self.depth_source, announce=self.announce)
        self.manifest, self.cache, self.bank = reopened.manifest, reopened.cache, reopened.bank

    # ---- what the steps ask of the scene -------------------------------------------------------------
    def splat_radius(self, cams: Cameras) -> int:
        """The splat half-size of this scene's cache renders (``conditioning.splat_radius`` unless set)."""
        if self.settings.splat_radius is not None:
            return int(self.settings.splat_radius)
        return conditioning.splat_radius(cams.height, cams.width)

    def start_image_for(self, camera: Cameras) -> torch.Tensor:
        """The start frame as ``camera`` sees it: the input photo, or the panorama cut to that view."""
        if self.manifest["kind"] in PANORAMA_KINDS:
            from engine.geometry.panorama import equirect_to_perspective

            return equirect_to_perspective(self.start_image, camera[0:1])[0]
        return self.start_image

    def clip_start_image(self, clip: Clip) -> torch.Tensor:
        """The clip's start frame ``[3,H,W]`` at the scene's size: the request's own (an official group's
        ``start_frame.png``, stretched to the bucket as the release does), else the scene's start view seen by the
        clip's first camera (``start_image_for``)."""
        if clip.request.start_frame is None:
            return self.start_image_for(clip.cameras[0:1])
        from engine.conditioning import pil_to_tensor, stretch_to_bucket

        h, w = self.manifest["size"]
        return pil_to_tensor(stretch_to_bucket(load_image(clip.request.start_frame), (h, w)))

    def clip_prompt(self, request: TrajectoryRequest) -> Optional[str]:
        """The prompt a trajectory is generated with: its own (``TrajectoryRequest.prompt``), else the scene's."""
        return self.settings.prompt if request.prompt is None else request.prompt

    def _kept_indices(self, n: int) -> list[int]:
        """The frames of an ``n``-frame clip that grow the cache and the memory bank: the release's
        ``sample_align_nframe``, at most the frames after the start view, none when ``keep_frames`` is 0."""
        k = min(self.settings.keep_frames, n - 1)
        return sample_align_nframe(n, k) if k > 0 else []

    @property
    def _new_point_confidence(self) -> float:
        # Preview fills holes by inpainting: its colours there are a guess, and the cache says so; so is depth
        # continued into the holes of the cache's render when there is no depth model.
        from engine.depth import is_fallback

        guessed = generators.registration(self.settings.engine).guessed_colours
        return 0.5 if guessed or is_fallback(self.depth_source) else 1.0

    # ---- outputs --------------------------------------------------------------------------------------
    def write_scene_cloud(self, only_if_stale: bool = False) -> dict:
        """The fused cloud as people download it (``write_cloud``): ``{"ply", "glb", "splats"}``."""
        files = self.folder.scene_files()
        paths = {"ply": files.cloud, "glb": files.glb, "splats": files.splats}
        if not (only_if_stale and self.manifest.get("cloud_written_for") == self.manifest["state"]["cache"]
                and all(p.exists() for p in paths.values())):
            self.manifest = write_cloud(self.folder, self.manifest, self.cache)
        return paths

    def export(self, progress: Optional[Progress] = None) -> dict:
        """Write the scene-level outputs: the clouds, every camera and the 3DGS dataset (``JobFolder.write_dataset``),
        the zip; returns their paths."""
        report = ensure(progress)
        report(0.0, "exporting the scene")
        paths = self.write_scene_cloud(only_if_stale=True)
        report(0.3, "writing the 3DGS dataset")
        files = self.folder.write_dataset(self.manifest, self.start_camera, self.start_image_for(self.start_camera))
        report(0.8, "packing the zip")
        self.folder.write_zip()
        paths.update(cameras=files.cameras, transforms=files.transforms, zip=files.zip)
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
        self.reload()
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
