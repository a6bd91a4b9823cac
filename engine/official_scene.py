"""An official WorldStereo panorama scene folder, read as the release reads it (release: run_multi_traj.py;
release: src/retrieval_wm.py ``SimpleMemoryBank.__init__``; release: src/data_utils.py ``sort_trajs``,
``load_mutli_traj_dataset``).
Reading only: nothing here renders or generates.

Layout::

    pano_bank/cameras.json          {"0000": {"intrinsic": 3x3, "extrinsic": 4x4 w2c}, ...}
    pano_bank/images/<name>.png     the bank's views (832 x 480 in the release's examples)
    <group>/start_frame.png         the view a group's trajectories start from
    <group>/valid_analysis.json     optional, view groups only: a view whose "valid" is not "yes" is skipped
    <group>/traj<k>/camera.json     the trajectory's cameras (official camera.json)
    <group>/traj<k>/traj_caption.json   {"prompt": ...}: the trajectory's own prompt

Bank: the images in name order (bank index = position), each with the camera of its name. Trajectories in the
release's order (``sort_trajs``): the ``view*`` groups in name order, each traj2, traj0, traj1; then
``target*/traj*``, ``reconstruct*/traj0``, ``wonder*/traj*`` (each by group, then trajectory name); last
``reconstruct*/traj1``, which the release starts from the last frame of the group's traj0 clip. The release lists a
trajectory when its folder holds ``render.mp4`` (it reads its renders from the folder); here when it holds
``camera.json``, since this project renders the cache itself. The release renames a group folder holding '-' to
'_' on disk; here the folder is left as it is and only the group's name (``view``) has '_'.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from engine.atomicio import file_sha256
from engine.conditioning import RENDER_FILES
from engine.geometry.cameras import CameraFormatError, Cameras, load_camera_bank
from engine.geometry.retrieval import shortcut_bonus
from engine.images import load_image

PathLike = Union[str, Path]

BANK_DIR = "pano_bank"
START_FRAME = "start_frame.png"
CAMERA_FILE = "camera.json"
CAPTION_FILE = "traj_caption.json"
VALIDITY_FILE = "valid_analysis.json"


class OfficialSceneError(ValueError):
    """A folder that is not a usable official scene; the message is one readable sentence."""


@dataclass
class OfficialTrajectory:
    """One trajectory of an official scene: ``view`` and ``traj`` are the release's ``view_id`` / ``traj_id``
    (the inputs of its shortcut rules), ``cameras`` its camera file, ``prompt`` its caption (None without one),
    ``start_frame`` the image it starts from (None for ``reconstruct*/traj1``: the last frame of its traj0 clip)."""

    view: str
    traj: str
    folder: Path
    cameras: Cameras
    prompt: Optional[str]
    start_frame: Optional[Path]

    @property
    def label(self) -> str:
        """``"<view>/<traj>"``: how the bank names the frames this trajectory adds (``shortcut_bonus``)."""
        return f"{self.view}/{self.traj}"

    @property
    def rendered(self) -> bool:
        """Whether the folder holds the release's pre-rendered GGM inputs (``engine.conditioning.RENDER_FILES``)."""
        return all((self.folder / name).is_file() for name in RENDER_FILES)

    def bonus(self, bank_labels: Sequence[str], n_targets: int) -> dict[int, set[int]]:
        """The release's shortcut bonus of this trajectory (``engine.geometry.retrieval.shortcut_bonus``)."""
        return shortcut_bonus(self.view, self.traj, bank_labels, n_targets)


@dataclass
class OfficialScene:
    """``bank_cameras`` (one per bank image, at the images' size), ``bank_files`` in bank order, and the
    ``trajectories`` in the release's order."""

    root: Path
    bank_cameras: Cameras
    bank_files: list[Path]
    trajectories: list[OfficialTrajectory]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def bank_labels(self) -> list[str]:
        """Where each bank frame came from, as the release names the panorama's views: ``"<scene>/pano_bank"``."""
        return [f"{self.name}/{BANK_DIR}"] * len(self.bank_files)

    def bank_images(self) -> torch.Tensor:
        """The bank's views ``[N,3,H,W]`` float in [0,1]."""
        return torch.stack([load_image(p) for p in self.bank_files])

    def digest(self) -> str:
        """A sha256 of what the scene starts from and runs (the bank's cameras and views, every trajectory's camera
        file): a job folder made from this scene is continued only with the same."""
        files = [self.root / BANK_DIR / "cameras.json", *self.bank_files, *(t.folder / CAMERA_FILE for t in
                                                                         self.trajectories)]
        h = hashlib.sha256()
        for path in files:
            h.update(f"{path.relative_to(self.root).as_posix()}:{file_sha256(path)}\n".encode())
        return h.hexdigest()


def is_official_scene(root: PathLike) -> bool:
    return (Path(root) / BANK_DIR / "cameras.json").is_file()


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise OfficialSceneError(f"{what} {path.name} cannot be read.") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OfficialSceneError(f"{what} {path.name} is not valid JSON.") from None


def _read_bank(root: Path) -> tuple[Cameras, list[Path]]:
    folder = root / BANK_DIR
    files = sorted((folder / "images").glob("*.png"))
    if not files:
        raise OfficialSceneError(f"The scene's {BANK_DIR}/images folder holds no PNG views.")
    try:
        names, cams = load_camera_bank(folder / "cameras.json")
    except CameraFormatError as e:
        raise OfficialSceneError(str(e)) from None
    missing = [p.stem for p in files if p.stem not in names]
    if missing:
        raise OfficialSceneError(f"{BANK_DIR}/cameras.json has no camera for view {missing[0]}; "
                                 "every bank image needs one.")
    sizes = set()
    for p in files:
        with Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) != 1:
        raise OfficialSceneError(f"The {BANK_DIR} views differ in size; they must all be one size.")
    (width, height), = sizes
    order = [names.index(p.stem) for p in files]
    return Cameras(cams.w2c[order], cams.K[order], width, height), files


def _view_is_valid(group: Path) -> bool:
    marker = group / VALIDITY_FILE
    if not marker.is_file():
        return True
    data = _read_json(marker, "View check")
    return isinstance(data, dict) and data.get("valid") == "yes"


def _trajectory_folders(root: Path) -> list[Path]:
    """The trajectory folders in the release's order (module doc)."""
    def trajs(group: Path, pattern: str = "traj*") -> list[Path]:
        return sorted(p for p in group.glob(pattern) if (p / CAMERA_FILE).is_file())

    def groups(prefix: str) -> list[Path]:
        return sorted(p for p in root.glob(f"{prefix}*") if p.is_dir())

    order = []
    for view in groups("view"):
        if _view_is_valid(view):
            order += [view / t for t in ("traj2", "traj0", "traj1") if (view / t / CAMERA_FILE).is_file()]
    for prefix, pattern in (("target", "traj*"), ("reconstruct", "traj0"), ("wonder", "traj*"),
                            ("reconstruct", "traj1")):
        order += sorted((t for g in groups(prefix) for t in trajs(g, pattern)), key=lambda p: (p.parent.name, p.name))
    return order


def _read_trajectory(folder: Path) -> OfficialTrajectory:
    group = folder.parent
    start = group / START_FRAME
    iterative = group.name.startswith("reconstruct") and folder.name == "traj1"
    size = {}
    if start.is_file() and not iterative:
        with Image.open(start) as im:
            size = {"width": im.size[0], "height": im.size[1]}  # the release reads K as pixels of the start frame
    try:
        cameras = Cameras.from_json(folder / CAMERA_FILE, **size)
    except CameraFormatError as e:
        raise OfficialSceneError(f"{group.name}/{folder.name}: {e}") from None
    prompt = None
    caption = folder / CAPTION_FILE
    if caption.is_file():
        data = _read_json(caption, f"{group.name}/{folder.name} caption")
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise OfficialSceneError(f"{group.name}/{folder.name}/{CAPTION_FILE} needs a text 'prompt'.")
        prompt = data["prompt"]
    return OfficialTrajectory(view=group.name.replace("-", "_"), traj=folder.name, folder=folder, cameras=cameras,
                              prompt=prompt, start_frame=None if iterative or not start.is_file() else start)


def read_official_scene(root: PathLike) -> OfficialScene:
    """Read an official scene folder (module doc); refuses one without a bank or without trajectories."""
    root = Path(root)
    if not is_official_scene(root):
        raise OfficialSceneError(f"{root.name} is not an official scene folder: it has no {BANK_DIR}/cameras.json.")
    bank, files = _read_bank(root)
    trajectories = [_read_trajectory(f) for f in _trajectory_folders(root)]
    if not trajectories:
        raise OfficialSceneError(f"{root.name} holds no trajectory folder with a {CAMERA_FILE}.")
    return OfficialScene(root, bank, files, trajectories)
