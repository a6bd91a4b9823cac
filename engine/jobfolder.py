"""A scene's job folder: where each file lives, the manifest that commits each state, and the file work of
creating, resuming, committing a clip and reverting one.

Layout (every file written atomically, ``engine.atomicio``; ``manifest.json`` is the commit point of each clip)::

    manifest.json            inputs, engine, seed, versions, timings, the clips done, the current state files
    input.png                the start image (or panorama) as used
    state/start.json         start camera (official camera.json)
    state/cache-NNNN.ply     the 3D cache after NNNN clips (the manifest names the current one; the earlier
                             ones are kept for ``revert``)
    state/manifest-NNNN.json the manifest as the scene stood with NNNN clips (what ``revert`` goes back to)
    state/bank-start/        the memory bank's seed frames
    clips/NN_name/           clip.mp4, render.mp4, render_mask.mp4, depth.mp4, cameras.json, references.json,
                             frames/NNNN.png (the generated frames, lossless), memory/
    scene.ply, scene.glb, scene_splats.ply                             (after every clip)
    cameras.json, transforms.json + images/, scene.zip                 (``export``)

A clip is written into a temporary folder and renamed into place, then the new cache file, then the manifest:
a crash at any point leaves the last committed state intact, and reopening the folder (``clean_debris``,
``load_state``) resumes from it.

Revert writes back the manifest of the clip before (the commit point), then removes the clip's folder and
cache file. Every writer is deterministic (fixed zip timestamps, sorted entries, lossless frames, no wall-clock
values outside the manifest), so the scene-level files rewritten afterwards come back byte for byte as the run
that ended with that clip left them.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Union

import torch

from engine.atomicio import atomic_folder, atomic_write_json, file_sha256, remove_debris
from engine.geometry.cache import PointCache
from engine.geometry.cameras import Cameras
from engine.geometry.memory import MemoryBank
from engine.images import load_image, save_image
from engine.outputs import read_video
from engine.settings import SceneError, SceneSettings

PathLike = Union[str, Path]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INPUT_IMAGE = "input.png"
START_CAMERA = "state/start.json"
BANK_START = "state/bank-start"
CLIPS = "clips"
FRAMES = "frames"  # a clip's generated frames, lossless
CLIP_CAMERAS = "cameras.json"  # a clip's cameras as asked (official camera file)
MEMORY = "memory"  # a clip's frames kept in the memory bank
DATASET_IMAGES = "images"
# Scene-level files derived from the clips and the cache (rewritten after every clip, export or revert).
SCENE_CLOUD = "scene.ply"
EVALUATION_JSON, EVALUATION_PNG = "evaluation.json", "evaluation.png"  # ``python -m engine evaluate``
SCENE_OUTPUTS = (SCENE_CLOUD, "scene.glb", "scene_splats.ply", "cameras.json", "transforms.json", "scene.zip")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "open3d", "dlr-moge")


@dataclass
class ClipRecord:
    """A committed clip as the manifest lists it; ``seconds``: render, retrieve, generate, fuse, write (the clip's
    files) and total."""

    name: str
    folder: str  # relative to the job folder
    trajectory: str
    frames: int
    references: int
    seconds: dict = field(default_factory=dict)


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
                 median_depth: float, start_views: list, depth_note: str) -> dict:
    """The manifest of a scene with no clip yet (its schema: every key a reopened scene reads)."""
    versions = package_versions()
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "input": {"name": input_path.name, "sha256": file_sha256(input_path)},
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
        "planned": [],
        "clips": [],
        "state": {"cache": cache_file(0)},
    }


def check_same_input(job_dir: PathLike, image: PathLike, panorama: bool) -> None:
    """Refuse to continue the scene in ``job_dir`` from an input other than the one it was made from."""
    folder, image = JobFolder(job_dir), Path(image)
    manifest = folder.read_manifest()
    if not image.is_file():
        raise SceneError(f"Input {image.name} does not exist or is not a file.")
    recorded = manifest.get("input", {})
    kind = "panorama" if panorama else "photo"
    if recorded.get("sha256") != file_sha256(image) or manifest.get("kind") != kind:
        raise SceneError(f"{folder.path} holds a scene made from another input ({recorded.get('name', 'unknown')}, "
                         f"a {manifest.get('kind', 'photo')}); choose another --out, or give that input to continue it.")


class JobFolder:
    """The files of one scene (module doc): what is committed, and every change of what is committed."""

    def __init__(self, path: PathLike):
        self.path = Path(path)

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
            part = MemoryBank.load(self.path / clip["folder"] / MEMORY)
            bank.add(part.images, part.cameras, part.depths, frame_ids=part.frame_ids, source=clip["name"])
        return image, start, cache, bank

    # ---- committing a clip ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def clip_folder(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder for a clip's files; it becomes ``clips/<name>`` when the block ends (the clip
        is not committed until ``commit_clip``)."""
        with atomic_folder(self.path / CLIPS / name) as tmp:
            yield tmp

    def commit_clip(self, manifest: dict, record: ClipRecord, cache: PointCache) -> dict:
        """Commit the clip whose folder is written: save the grown cache as the next cache file, then write the
        manifest that lists the clip (the commit point); returns that manifest.

        Not committed (disk full, a kill signal): the clip's folder and the new cache file are taken back, so the
        folder holds exactly the last committed state rather than orphans only a later clip would replace."""
        new = copy.deepcopy(manifest)
        new["clips"].append(asdict(record))
        new["state"]["cache"] = cache_file(len(new["clips"]))
        try:
            cache.save_ply(self.path / new["state"]["cache"])
            self.write_manifest(new)
        except BaseException:
            shutil.rmtree(self.path / record.folder, ignore_errors=True)
            if new["state"]["cache"] != manifest["state"]["cache"]:
                (self.path / new["state"]["cache"]).unlink(missing_ok=True)
            raise
        return new

    # ---- reading clips --------------------------------------------------------------------------------
    def clip_frames(self, clip: dict) -> torch.Tensor:
        """A committed clip's generated frames ``[F,3,H,W]``, exactly as generated (8-bit)."""
        frames = sorted((self.path / clip["folder"] / FRAMES).glob("*.png"))
        if not frames:  # a scene made before clips kept their frames: the video is all there is
            return read_video(self.path / clip["folder"] / "clip.mp4")
        return torch.stack([load_image(f) for f in frames])

    def clip_cameras(self, clip: dict) -> Cameras:
        """A committed clip's cameras, as its frames were asked to follow them."""
        return Cameras.from_json(self.path / clip["folder"] / CLIP_CAMERAS)

    def scene_cloud(self) -> Path:
        """The scene's fused point cloud (``scene.ply``, written after every clip)."""
        return self.path / SCENE_CLOUD

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
        """Go back from ``manifest`` to ``previous`` (``manifest_before_last``): the manifest first (the commit
        point), then the last clip's folder, cache file and kept manifest."""
        self.write_manifest(previous)
        shutil.rmtree(self.path / manifest["clips"][-1]["folder"], ignore_errors=True)
        if previous["state"]["cache"] != manifest["state"]["cache"]:
            (self.path / manifest["state"]["cache"]).unlink(missing_ok=True)
        (self.path / snapshot_file(len(manifest["clips"]))).unlink(missing_ok=True)

    def remove_scene_outputs(self) -> None:
        """Remove the scene-level files and the dataset images (a scene without clips has none, as after
        creating it)."""
        for name in SCENE_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / DATASET_IMAGES, ignore_errors=True)
