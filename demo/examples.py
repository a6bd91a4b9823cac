"""Example inputs for the demo, read in place from the shared examples folder (never copied).

Photos are used as they are. The panorama example is an equirectangular image the app makes itself by
stitching the official 27-view bank (``engine.geometry.panorama.perspective_to_equirect``); it is made on
first use and kept in the app's output folder. A panorama example folder that holds official trajectories
(``view*/traj*/camera.json``) can also run as the release runs it (``Example.scene``:
``engine.scene.Scene.create_official``).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PANORAMA_SIZE = (1024, 2048)  # (height, width) of the stitched example panorama
_stitch_lock = threading.Lock()


@dataclass(frozen=True)
class Example:
    name: str
    label: str
    thumbnail: Path  # an existing image shown in the example gallery
    panorama: bool
    prompt: str
    image: Optional[Path] = None  # the input photo; None for a panorama made on demand
    bank: Optional[Path] = None  # the pano_bank folder a panorama is stitched from
    camera_json: Optional[Path] = None
    scene: Optional[Path] = None  # an official scene folder (pano_bank + trajectories) the example can run as is


def default_examples_dir() -> Path:
    shared = Path(os.environ.get("WORLDSTEREO_SHARED", REPO.parent / "shared"))
    return (shared / "examples").resolve()


def _prompt(folder: Path) -> str:
    try:
        data = json.loads((folder / "prompt.json").read_text(encoding="utf-8"))
        return str(data.get("short caption", "")).strip()
    except (OSError, ValueError, AttributeError):
        return ""


def find_examples(examples_dir: Optional[Path]) -> list[Example]:
    """The examples present in ``examples_dir`` (an empty list when the folder is absent)."""
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    root = Path(examples_dir)
    found = []
    for folder in sorted((root / "perspective").glob("*")):
        image = folder / "image.png"
        if image.is_file():
            cam = folder / "camera.json"
            found.append(Example(folder.name, folder.name.replace("_", " ").replace("-", " "), image, False,
                                 _prompt(folder), image=image, camera_json=cam if cam.is_file() else None))
    for folder in sorted((root / "panorama").glob("*")):
        bank = folder / "pano_bank"
        first = bank / "images" / "0000.png"
        if (bank / "cameras.json").is_file() and first.is_file():
            official = folder if any(folder.glob("*/traj*/camera.json")) else None
            found.append(Example(folder.name, f"360° panorama: {folder.name.replace('-', ' ')}", first, True,
                                 "", bank=bank, scene=official))
    return found


def example_input(example: Example, output_dir: Path) -> Path:
    """The image file to feed the app for ``example`` (stitching a panorama the first time it is used)."""
    if example.image is not None:
        return example.image
    import torch

    from engine.geometry.cameras import load_camera_bank
    from engine.geometry.panorama import perspective_to_equirect
    from engine.images import load_image, save_image

    target = Path(output_dir) / "examples" / f"{example.name}-panorama.png"
    with _stitch_lock:
        if not target.is_file():
            names, cams = load_camera_bank(example.bank / "cameras.json")
            views = torch.stack([load_image(example.bank / "images" / f"{n}.png") for n in names])
            pano, _ = perspective_to_equirect(views, cams, *PANORAMA_SIZE)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(target, pano)  # atomic: a half-written example is never picked up
    return target
