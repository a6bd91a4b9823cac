"""A scene's job folder: where each file lives, the manifest that commits each state, and the file work of
creating, resuming, writing and committing a clip, and reverting one. Nothing else names a file of a scene:
``JobFolder.clip_files`` and ``JobFolder.scene_files`` give every path, ``ClipContent`` is what is written per clip.

Layout (every file written atomically, ``engine.atomicio``; ``manifest.json`` is the commit point of each clip)::

    manifest.json            inputs, engine, seed, versions, timings, the clips done, the current state files, and
                             the one resume record: the requests of the last run (``unfinished_requests``)
    input.png                the start image (or panorama) as used
    state/start.json         start camera (official camera.json)
    state/cache-NNNN.ply     the 3D cache after NNNN clips (the manifest names the current one; the earlier
                             ones are kept for ``revert``)
    state/manifest-NNNN.json the manifest as the scene stood with NNNN clips (what ``revert`` goes back to)
    state/bank-start/        the memory bank's seed frames
    clips/NN_name/           every file of a clip (``ClipFiles``): clip.mp4, render.mp4, render_mask.mp4, depth.mp4,
                             cameras.json, references.json, frames/NNNN.png (the generated frames, lossless), memory/
    scene.ply, scene.glb, scene_splats.ply                             (after every clip)
    cameras.json, transforms.json + images/, scene.zip                 (``export``)
    evaluation.json, evaluation.png   the last evaluation of the scene's clips (``engine.evaluate``); it names the
                                      clips it judged: a clip added later is not in it, and removing a clip it
                                      judged removes it (``remove_last_clip``)

A clip is written into a temporary folder and renamed into place (``write_clip``), then the new cache file, then
the manifest (``commit_clip``): a crash at any point leaves the last committed state intact, and reopening the folder
(``clean_debris``, ``load_state``) resumes from it. The state a commit moves the scene to is made in memory
(``with_clip``, ``as_committed``), never read back from the files just written: the scene moves on to the next clip
while this one's files are written (``engine.scene.ClipWriter``), and commits it once they are.

Revert writes back the manifest of the clip before (the commit point), then removes the clip's folder and
cache file. Every writer is deterministic (fixed zip timestamps, sorted entries, lossless frames, no wall-clock
values outside the manifest), so the scene-level files rewritten afterwards come back byte for byte as the run
that ended with that clip left them.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from engine import outputs
from engine.atomicio import atomic_folder, atomic_write_json, file_sha256, remove_debris
from engine.geometry.cache import PointCache
from engine.geometry.cameras import Cameras
from engine.geometry.memory import MemoryBank
from engine.images import load_image, save_image
from engine.settings import SceneError, SceneSettings

PathLike = Union[str, Path]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INPUT_IMAGE = "input.png"
START_CAMERA = "state/start.json"
BANK_START = "state/bank-start"
CLIPS = "clips"
FRAMES = "frames"  # a clip's generated frames, lossless
MEMORY = "memory"  # a clip's frames kept in the memory bank
DATASET_IMAGES = "images"
EVALUATION_JSON, EVALUATION_PNG = "evaluation.json", "evaluation.png"  # ``python -m engine evaluate``
# What the scene's zip leaves out: internal resume state (cache versions, memory frames) and the clips' lossless
# frames (the dataset images hold them).
ZIP_EXCLUDES = ("state/*", f"{CLIPS}/*/{MEMORY}/*", f"{CLIPS}/*/{FRAMES}/*")
SPLAT_SIGMA = 1.0  # splat standard deviation in units of the local point spacing (engine.geometry.cache notes)
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "open3d", "dlr-moge")


@dataclass(frozen=True)
class ClipFiles:
    """Every file of one clip, in its folder."""

    folder: Path
    video: Path  # clip.mp4: the generated frames as people watch them (H.264)
    frames: Path  # frames/NNNN.png: the generated frames, lossless (the 3DGS dataset is written from them)
    render: Path  # render.mp4: the cache render the model was given (holes mid-grey, frame 0 the input view)
    render_mask: Path  # render_mask.mp4: white where no point landed (the holes to generate)
    depth: Path  # depth.mp4: the grown cache's depth seen from every camera of the clip
    cameras: Path  # cameras.json: the clip's cameras as asked (official camera file)
    references: Path  # references.json: which memory frames served which target
    memory: Path  # memory/: the clip's frames kept in the memory bank (a saved ``MemoryBank``)

    @classmethod
    def under(cls, folder: Path) -> "ClipFiles":
        folder = Path(folder)
        return cls(folder, folder / "clip.mp4", folder / FRAMES, folder / "render.mp4", folder / "render_mask.mp4",
                   folder / "depth.mp4", folder / "cameras.json", folder / "references.json", folder / MEMORY)


@dataclass(frozen=True)
class SceneFiles:
    """The scene-level files: the fused cloud (after every clip) and the exports (``Scene.export``)."""

    cloud: Path  # scene.ply: the 3D cache as a plain coloured point cloud
    glb: Path  # scene.glb: the same points for glTF viewers
    splats: Path  # scene_splats.ply: the same points as 3D Gaussian splats
    cameras: Path  # cameras.json: the input view and every clip's cameras after it (official camera file)
    transforms: Path  # transforms.json + images/: the nerfstudio dataset
    images: Path
    zip: Path  # scene.zip: everything a person downloads (the evaluation too, when there is one)
    evaluation: Path  # evaluation.json: the last evaluation of the scene's clips (``engine.evaluate``)
    evaluation_plot: Path  # evaluation.png: its asked vs recovered camera paths

    @classmethod
    def under(cls, folder: Path) -> "SceneFiles":
        folder = Path(folder)
        return cls(folder / "scene.ply", folder / "scene.glb", folder / "scene_splats.ply", folder / "cameras.json",
                   folder / "transforms.json", folder / DATASET_IMAGES, folder / "scene.zip",
                   folder / EVALUATION_JSON, folder / EVALUATION_PNG)

    def outputs(self) -> tuple[Path, ...]:
        """The files (not the dataset's images folder)."""
        return self.cloud, self.glb, self.splats, self.cameras, self.transforms, self.zip


@dataclass
class ClipContent:
    """What is written per clip (``JobFolder.write_clip``), all of it in memory first."""

    frames: torch.Tensor  # [F,3,H,W] in [0,1]: the generated frames
    cameras: Cameras  # [F] the clip's cameras
    render: torch.Tensor  # [F,3,H,W] the render the model was given, in the official files' convention
    covered: torch.Tensor  # [F,H,W] bool: where a point of the cache landed
    depth: Optional[tuple]  # (depth [F,H,W], valid [F,H,W]) of the grown cache along the cameras
    references: dict  # the retrieval record, with the bank frames it names
    memory: MemoryBank  # the frames the clip adds to the memory bank


@dataclass
class ClipRecord:
    """A committed clip as the manifest lists it; ``seconds``: render, retrieve, generate, fuse, write (the clip's
    files), wait (for the clip before it to be written) and total (its time on the loop's critical path); ``timeline``:
    each step's [start, end] in seconds since its run began (``engine.scene.ClipWriter``)."""

    name: str
    folder: str  # relative to the job folder
    trajectory: str
    frames: int
    references: int
    seconds: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)


def clip_name(index: int, trajectory: str) -> str:
    """The folder name of the scene's clip ``index`` (0-based) along ``trajectory``: ``NN_`` and the trajectory's
    name, other characters than letters, digits, '-' and '_' replaced, at most 40 of them."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in trajectory)[:40]
    return f"{index:02d}_{safe}"


def clip_folder(name: str) -> str:
    """The folder of the clip ``name``, relative to the job folder (a clip record's ``folder``)."""
    return f"{CLIPS}/{name}"


def as_committed(cache: PointCache) -> PointCache:
    """``cache`` as its committed file holds it (``PointCache.save_ply``: colours in 8 bits), made in memory: what
    reopening the folder gives, without reading the file back."""
    return PointCache(cache.points, torch.round(cache.colors.clamp(0, 1) * 255) / 255, cache.confidence, cache.source)


def splat_scales(cache: PointCache):
    """The standard deviation ``[P]`` of each point's Gaussian splat: ``SPLAT_SIGMA`` times the local point spacing
    of the whole cloud (``PointCache.spacing``)."""
    return SPLAT_SIGMA * cache.spacing()


def unfinished_requests(manifest: dict) -> list[dict]:
    """The resume record: the requests of the scene's last run that have no committed clip yet (as
    ``TrajectoryRequest.to_dict`` wrote them; empty when that run finished)."""
    run = manifest.get("run") or {}
    requests = list(run.get("requests") or [])
    return requests[max(len(manifest.get("clips", [])) - int(run.get("first_clip", 0)), 0):]


def with_clip(manifest: dict, record: ClipRecord) -> dict:
    """A copy of ``manifest`` that lists the clip ``record`` and names its cache file as the current state."""
    new = copy.deepcopy(manifest)
    new["clips"].append(asdict(record))
    new["state"]["cache"] = cache_file(len(new["clips"]))
    return new


def with_run(manifest: dict, requests: list[dict]) -> dict:
    """``manifest`` with ``requests`` recorded as the run about to start: they are to become the next clips, in
    order. A run that asks for exactly what is still unfinished keeps the record it continues."""
    if unfinished_requests(manifest) == requests:
        return manifest
    return {**manifest, "run": {"first_clip": len(manifest["clips"]), "requests": list(requests)}}


def cache_file(clips: int) -> str:
    """The 3D cache file of the state with ``clips`` clips."""
    return f"state/cache-{clips:04d}.ply"


def snapshot_file(clips: int) -> str:
    """The manifest kept of the state with ``clips`` clips."""
    return f"state/manifest-{clips:04d}.json"


def package_versions(packages=VERSIONED_PACKAGES) -> dict:
    """The installed version of each of ``packages`` (those not installed are left out)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def new_manifest(*, kind: str, input_path: Path, settings: SceneSettings, engine_note: str, size, input_size,
                 median_depth: float, start_views: list, depth_note: str, input_sha256: Optional[str] = None) -> dict:
    """The manifest of a scene with no clip yet (its schema: every key a reopened scene reads). ``kind``: "photo",
    "panorama" or "official" (``input_path`` is then the official scene folder, ``input_sha256`` its digest, and the
    manifest keeps its path: its trajectories are the scene's default run)."""
    versions = package_versions()
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "input": {"name": input_path.name,
                  "sha256": file_sha256(input_path) if input_sha256 is None else input_sha256},
        "official_scene": str(Path(input_path).resolve()) if kind == "official" else None,
        "engine": settings.engine,
        "engine_note": engine_note,
        "settings": asdict(settings),
        "size": [int(s) for s in size],
        "input_size": [int(s) for s in input_size],
        "median_depth": median_depth,
        "start_views": start_views,
        "depth_note": depth_note,
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {"first_clip": 0, "requests": []},
        "clips": [],
        "state": {"cache": cache_file(0)},
    }


def check_same_input(job_dir: PathLike, image: PathLike, kind: str) -> None:
    """Refuse to continue the scene in ``job_dir`` from an input other than the one it was made from: an image
    (``kind`` "photo" or "panorama") or an official scene folder ("official", compared by its digest)."""
    folder, image = JobFolder(job_dir), Path(image)
    manifest = folder.read_manifest()
    if kind == "official":
        from engine.official_scene import read_official_scene

        digest = read_official_scene(image).digest()
    elif image.is_file():
        digest = file_sha256(image)
    else:
        raise SceneError(f"Input {image.name} does not exist or is not a file.")
    recorded = manifest.get("input", {})
    if recorded.get("sha256") != digest or manifest.get("kind") != kind:
        raise SceneError(f"{folder.path} holds a scene made from another input ({recorded.get('name', 'unknown')}, "
                         f"a {manifest.get('kind', 'photo')}); choose another --out, or give that input to continue it.")


class JobFolder:
    """The files of one scene (module doc): what is committed, and every change of what is committed."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

    # ---- paths ----------------------------------------------------------------------------------------
    def clip_files(self, name: str) -> ClipFiles:
        """Every file of the clip ``name`` (a clip record's ``name``)."""
        return ClipFiles.under(self.path / clip_folder(name))

    def scene_files(self) -> SceneFiles:
        return SceneFiles.under(self.path)

    # ---- the manifest ---------------------------------------------------------------------------------
    def holds_scene(self) -> bool:
        return (self.path / MANIFEST).exists()

    def read_manifest(self) -> dict:
        try:
            return json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SceneError(f"{self.path} holds no scene (no {MANIFEST}).") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SceneError(f"{self.path / MANIFEST} is damaged and cannot be read.") from None

    def unfinished(self) -> list[dict]:
        """The committed manifest's ``unfinished_requests``."""
        return unfinished_requests(self.read_manifest())

    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest: the commit point of every change of state."""
        atomic_write_json(self.path / MANIFEST, manifest)

    def snapshot(self, manifest: dict) -> None:
        """Keep ``manifest`` as the state with its number of clips (what ``revert`` goes back to)."""
        atomic_write_json(self.path / snapshot_file(len(manifest["clips"])), manifest)

    # ---- creating and resuming ------------------------------------------------------------------------
    def create(self, manifest: dict, image: torch.Tensor, start_camera: Cameras, bank: MemoryBank,
               cache: PointCache) -> None:
        """Write a new scene's start state, the manifest last."""
        save_image(self.path / INPUT_IMAGE, image)
        start_camera.save_json(self.path / START_CAMERA)
        bank.save(self.path / BANK_START)
        cache.save_ply(self.path / manifest["state"]["cache"])
        self.write_manifest(manifest)
        self.snapshot(manifest)

    def clean_debris(self, manifest: dict) -> None:
        """Remove what a process killed mid-write left: clip folders the manifest does not list (never committed)
        and the temporary files and folders of atomic writes."""
        done = {c["folder"] for c in manifest["clips"]}
        clips = self.path / CLIPS
        for leftover in clips.iterdir() if clips.is_dir() else ():
            if leftover.is_dir() and f"{CLIPS}/{leftover.name}" not in done:
                shutil.rmtree(leftover, ignore_errors=True)
        remove_debris(self.path)
        remove_debris(self.path / "state")

    def load_state(self, manifest: dict) -> tuple[torch.Tensor, Cameras, PointCache, MemoryBank]:
        """The committed state: ``(start image, start camera, 3D cache, memory bank)``."""
        image = load_image(self.path / INPUT_IMAGE)
        start = Cameras.from_json(self.path / START_CAMERA)
        cache = PointCache.load_ply(self.path / manifest["state"]["cache"])
        bank = MemoryBank.load(self.path / BANK_START)
        for clip in manifest["clips"]:
            bank.extend(MemoryBank.load(self.clip_files(clip["name"]).memory))
        return image, start, cache, bank

    # ---- writing and committing a clip ------------------------------------------------------------------
    def write_clip(self, name: str, content: ClipContent) -> ClipFiles:
        """Write a clip's files into a temporary folder that becomes ``clips/<name>`` once all are written (the clip
        is not committed until ``commit_clip``); returns its files."""
        with atomic_folder(self.path / clip_folder(name)) as tmp:
            files = ClipFiles.under(tmp)
            outputs.write_video(files.video, content.frames)
            for i, frame in enumerate(content.frames):
                save_image(files.frames / f"{i:04d}.png", frame)
            outputs.write_video(files.render, content.render)
            outputs.write_mask_video(files.render_mask, ~content.covered)
            if content.depth is not None:
                outputs.write_depth_video(files.depth, *content.depth)
            content.cameras.save_json(files.cameras)
            atomic_write_json(files.references, content.references)
            content.memory.save(files.memory)
        return self.clip_files(name)

    def commit_clip(self, manifest: dict, record: ClipRecord, cache: PointCache) -> dict:
        """Commit the clip whose folder is written: save ``cache`` (the grown cache, ``as_committed``) as the next
        cache file, then write the manifest that lists the clip (the commit point); returns that manifest.

        Not committed (disk full, a kill signal): the clip's folder and the new cache file are taken back, so the
        folder holds exactly the last committed state rather than orphans only a later clip would replace."""
        new = with_clip(manifest, record)
        try:
            cache.save_ply(self.path / new["state"]["cache"])
            self.write_manifest(new)
        except BaseException:
            shutil.rmtree(self.path / record.folder, ignore_errors=True)
            if new["state"]["cache"] != manifest["state"]["cache"]:
                (self.path / new["state"]["cache"]).unlink(missing_ok=True)
            raise
        return new

    # ---- the scene's cloud ----------------------------------------------------------------------------
    def write_scene_cloud(self, cache: PointCache, axes) -> SceneFiles:
        """The fused cloud as people download it: plain ``scene.ply`` for tools, ``scene.glb`` (world-to-glTF
        ``axes``) and ``scene_splats.ply`` (Gaussian splats, ``splat_scales``)."""
        files = self.scene_files()
        points, colors = cache.points.cpu(), cache.colors.cpu()  # the cache may live on the GPU
        outputs.write_point_cloud_ply(files.cloud, cache.points, cache.colors)
        outputs.write_point_cloud_glb(files.glb, points, colors, axes=axes)
        outputs.write_splat_ply(files.splats, points, colors, splat_scales(cache))
        return files

    def write_dataset(self, manifest: dict, start_camera: Cameras, start_frame: torch.Tensor) -> SceneFiles:
        """Every camera of the scene (``start_camera``, then each committed clip's after its first frame) as one
        official camera file, and the nerfstudio dataset of the same frames (``start_frame`` [3,H,W], then the clips'
        frames as generated)."""
        files = self.scene_files()
        cams, images = [start_camera], [start_frame]
        for clip in manifest["clips"]:
            cams.append(self.clip_cameras(clip)[1:])
            images.extend(self.clip_frame_files(clip)[1:])
        all_cams = Cameras.cat(cams)
        outputs.write_cameras_json(files.cameras, all_cams)
        # The clips' lossless PNGs are copied as they are, not decoded and encoded again.
        outputs.write_transforms_json(self.path, images, all_cams, image_dir=DATASET_IMAGES)
        # Frames of a removed clip (``revert``) must not linger in the dataset or the zip.
        listed = {f["file_path"] for f in json.loads(files.transforms.read_text())["frames"]}
        for stale in files.images.glob("*"):
            if f"{DATASET_IMAGES}/{stale.name}" not in listed and stale.is_file():
                stale.unlink()
        return files

    def write_zip(self) -> Path:
        """Everything a person downloads in one zip (without ``ZIP_EXCLUDES``)."""
        return outputs.zip_folder(self.path, self.scene_files().zip, exclude=ZIP_EXCLUDES)

    # ---- reading clips --------------------------------------------------------------------------------
    def clip_frames(self, clip: dict) -> torch.Tensor:
        """A committed clip's generated frames ``[F,3,H,W]``, exactly as generated (8-bit)."""
        return torch.stack([load_image(f) if isinstance(f, Path) else f for f in self.clip_frame_files(clip)])

    def clip_frame_files(self, clip: dict) -> list:
        """A committed clip's generated frames as its lossless PNG files (``frames/NNNN.png``, in order); a scene made
        before clips kept them: the frames decoded from the video (``[3,H,W]`` each)."""
        files = sorted(self.clip_files(clip["name"]).frames.glob("*.png"))
        return files or list(outputs.read_video(self.clip_files(clip["name"]).video))

    def clip_cameras(self, clip: dict) -> Cameras:
        """A committed clip's cameras, as its frames were asked to follow them."""
        return Cameras.from_json(self.clip_files(clip["name"]).cameras)

    # ---- reverting ------------------------------------------------------------------------------------
    def manifest_before_last(self, manifest: dict) -> dict:
        """The manifest kept when the scene had one clip less; rebuilt from ``manifest`` if that file is missing
        (a run killed between a commit and its snapshot)."""
        n = len(manifest["clips"])
        try:
            previous = json.loads((self.path / snapshot_file(n - 1)).read_text(encoding="utf-8"))
            if previous.get("clips") == manifest["clips"][:-1]:
                return previous
        except (OSError, ValueError):
            pass
        previous = copy.deepcopy(manifest)
        previous["clips"] = previous["clips"][:-1]
        previous["state"]["cache"] = cache_file(n - 1)
        previous.pop("cloud_written_for", None)
        return previous

    def remove_last_clip(self, manifest: dict, previous: dict) -> None:
        """Go back from ``manifest`` to ``previous`` (``manifest_before_last``): an evaluation that judged the last
        clip goes first (``remove_evaluation_of``; stopped after it, the scene just has no evaluation), then the
        manifest (the commit point), then the last clip's folder, cache file and kept manifest."""
        self.remove_evaluation_of(manifest["clips"][-1]["name"])
        self.write_manifest(previous)
        shutil.rmtree(self.clip_files(manifest["clips"][-1]["name"]).folder, ignore_errors=True)
        if previous["state"]["cache"] != manifest["state"]["cache"]:
            (self.path / manifest["state"]["cache"]).unlink(missing_ok=True)
        (self.path / snapshot_file(len(manifest["clips"]))).unlink(missing_ok=True)

    # ---- the evaluation -------------------------------------------------------------------------------
    def read_evaluation(self) -> Optional[dict]:
        """The scene's evaluation report (``evaluation.json``, as ``engine.evaluate`` writes it); None when there is
        none, or one that cannot be read (damaged: no better than none)."""
        try:
            report = json.loads(self.scene_files().evaluation.read_text(encoding="utf-8"))
            if all(isinstance(clip["name"], str) for clip in report["clips"]):
                return report
        except (OSError, ValueError, TypeError, KeyError):
            pass
        return None

    def remove_evaluation_of(self, name: str) -> None:
        """Remove the scene's evaluation (both files) if it judged the clip ``name`` or cannot be read: its figures,
        means and picture would show a clip the scene no longer has. An evaluation of other clips only stays. A clip's
        name is only used again after that clip was removed, so a name always means the clip the evaluation judged."""
        report = self.read_evaluation()
        if report is None or name in {clip["name"] for clip in report["clips"]}:
            files = self.scene_files()
            files.evaluation.unlink(missing_ok=True)
            files.evaluation_plot.unlink(missing_ok=True)

    def remove_scene_outputs(self) -> None:
        """Remove the scene-level files and the dataset images (a scene without clips has none, as after
        creating it)."""
        files = self.scene_files()
        for path in files.outputs():
            path.unlink(missing_ok=True)
        shutil.rmtree(files.images, ignore_errors=True)
