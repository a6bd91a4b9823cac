"""The memory bank of the spatial-stereo memory (SSM): the frames a scene has seen, with cameras, depth and labels,
kept in memory and in a folder.

Which frames serve a clip as references is ``engine.geometry.retrieval.retrieve``; each frame's label says where it
came from as the release's shortcut rules read it (``"<view>/<trajectory>"`` for an official scene's trajectory,
``"<scene>/pano_bank"`` for its panorama views; release: src/retrieval_wm.py ``fnames``). Saved form
(``MemoryBank.save``, one folder, replaced as a whole)::

    index.json        version, frames (image, depth, frame_id, source, label), width, height, cameras
    camera.json       the frames' cameras (official camera.json)
    images/NNNN.png   8-bit RGB
    depths/NNNN.npy   float32 depth
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.atomicio import atomic_folder, atomic_write_json
from engine.geometry.cameras import Cameras, CameraFormatError
from engine.images import encode_png

PathLike = Union[str, Path]

INDEX_FILE = "index.json"
CAMERA_FILE = "camera.json"
INDEX_VERSION = 1


class MemoryBankError(ValueError):
    """Memory bank input or a saved bank that cannot be used; the message is one readable sentence."""


def sample_align_nframe(n: int, k: int) -> list[int]:
    """The ``k`` frames of an ``n``-frame clip the release keeps in its memory bank (release: src/general_utils.py
    ``sample_align_nframe``, called by ``SimpleMemoryBank.update_memory``), in increasing order.

    Frame 0 (the start view, already known) is never kept and frame ``n - 1`` always is. The ``n - 1 - k`` frames
    left out are spread over the ``k`` steps (the first step from frame 0, then the ``k - 1`` gaps), one more to
    each of the first ``(n - 1 - k) % k`` steps, so the wider gaps come first: ``n = 21, k = 8`` gives
    3, 6, 9, 12, 14, 16, 18, 20. Needs ``1 <= k <= n - 1``.
    """
    n, k = operator.index(n), operator.index(k)
    if not 1 <= k <= n - 1:
        raise MemoryBankError(f"A clip of {n} frames can keep 1 to {max(n - 1, 0)} frames besides its first; "
                              f"got {k}.")
    base, extra = divmod(n - 1 - k, k)
    frames, current = [], 0
    for step in range(k):
        current += 1 + base + (1 if step < extra else 0)
        frames.append(current)
    return frames


class MemoryBank:
    """Frames the scene has seen (input, panorama views, kept frames of generated clips), with cameras, depth and
    labels (module doc).

    ``images [M,3,H,W]`` float32 in [0,1] and ``depths [M,H,W]`` float32 live on the CPU; ``cameras`` is a
    float64 ``Cameras`` of length M (``None`` while the bank is empty). All frames share one image size, set
    by the first ``add``; later frames of another size are resized to it (images by area/bilinear, depth
    by nearest neighbour, intrinsics scaled).
    """

    def __init__(self) -> None:
        self.images = torch.zeros(0, 3, 0, 0)
        self.depths = torch.zeros(0, 0, 0)
        self.cameras: Optional[Cameras] = None
        self.frame_ids: list[int] = []
        self.sources: list[str] = []  # the scene part that added each frame ("input", "panorama", a clip's name)
        self.labels: list[str] = []  # what the shortcut rules read (module doc)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __repr__(self) -> str:
        size = f"{self.cameras.width}x{self.cameras.height}" if self.cameras is not None else "empty"
        return f"MemoryBank({len(self)} frames, {size})"

    @property
    def size(self) -> Optional[tuple[int, int]]:
        """``(height, width)`` of the bank's frames, ``None`` while empty."""
        return None if self.cameras is None else (self.cameras.height, self.cameras.width)

    # ---- adding -----------------------------------------------------------------------------------
    def add(self, images: torch.Tensor, cameras: Cameras, depths: torch.Tensor,
            frame_ids: Optional[Sequence[int]] = None, source: str = "",
            labels: Optional[Sequence[str]] = None) -> list[int]:
        """Append frames; returns their bank indices. ``frame_ids`` default to the new bank indices, ``labels`` to
        ``source`` for every frame."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise MemoryBankError(f"Memory bank images must be a tensor [F,3,H,W]; got {tuple(getattr(images, 'shape', ()))}.")
        f, _, h, w = images.shape
        if not isinstance(depths, torch.Tensor) or depths.shape != (f, h, w):
            raise MemoryBankError(
                f"Memory bank depths must be [F,H,W] = {(f, h, w)} to match the images; got {tuple(getattr(depths, 'shape', ()))}.")
        if not isinstance(cameras, Cameras) or len(cameras) != f:
            raise MemoryBankError(f"Memory bank needs one camera per image ({f}); got {len(cameras) if isinstance(cameras, Cameras) else 'no camera batch'}.")
        ids = list(range(len(self), len(self) + f)) if frame_ids is None else [int(i) for i in frame_ids]
        if len(ids) != f:
            raise MemoryBankError(f"Memory bank got {len(ids)} frame ids for {f} frames; pass one id per frame.")
        names = [str(source)] * f if labels is None else [str(n) for n in labels]
        if len(names) != f:
            raise MemoryBankError(f"Memory bank got {len(names)} labels for {f} frames; pass one label per frame.")
        if f == 0:
            return []
        images = images.detach().to("cpu", torch.float32).clamp(0, 1)
        depths = depths.detach().to("cpu", torch.float32)
        cams = cameras.to("cpu", torch.float64)
        if (cams.width, cams.height) != (w, h):
            cams = cams.resized(w, h)
        cams = Cameras(cams.w2c.clone(), cams.K.clone(), w, h)  # drop file metadata: the bank writes its own
        if self.cameras is not None and (h, w) != self.size:
            bh, bw = self.size
            mode = "area" if bh * bw < h * w else "bilinear"
            images = F.interpolate(images, size=(bh, bw), mode=mode, **({} if mode == "area" else {"align_corners": False})).clamp(0, 1)
            depths = F.interpolate(depths[:, None], size=(bh, bw), mode="nearest-exact")[:, 0]
            cams = cams.resized(bw, bh)
        start = len(self)
        if self.cameras is None:
            self.images, self.depths, self.cameras = images.clone(), depths.clone(), cams
        else:
            self.images = torch.cat([self.images, images])
            self.depths = torch.cat([self.depths, depths])
            self.cameras = Cameras.cat([self.cameras, cams])
        self.frame_ids.extend(ids)
        self.sources.extend([str(source)] * f)
        self.labels.extend(names)
        return list(range(start, start + f))

    def extend(self, other: "MemoryBank") -> list[int]:
        """Append every frame of ``other`` with its frame id, source and label; returns their bank indices."""
        if len(other) == 0:
            return []
        added = self.add(other.images, other.cameras, other.depths, frame_ids=other.frame_ids, labels=other.labels)
        self.sources[added[0]:] = other.sources
        return added

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> Path:
        """Write the bank to ``folder`` (replaced as a whole, so a reader never sees half a bank):
        ``index.json``, ``camera.json`` (official format), ``images/NNNN.png``, ``depths/NNNN.npy`` (float32)."""
        with atomic_folder(folder) as tmp:
            (tmp / "images").mkdir()
            (tmp / "depths").mkdir()
            frames = []
            pixels = self.images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for i in range(len(self)):
                name = f"{i:04d}"
                (tmp / "images" / f"{name}.png").write_bytes(encode_png(pixels[i]))
                np.save(tmp / "depths" / f"{name}.npy", self.depths[i].numpy().astype(np.float32))
                frames.append({"image": f"images/{name}.png", "depth": f"depths/{name}.npy",
                               "frame_id": self.frame_ids[i], "source": self.sources[i], "label": self.labels[i]})
            index = {"version": INDEX_VERSION, "frames": frames}
            if self.cameras is not None:
                self.cameras.save_json(tmp / CAMERA_FILE)
                index.update(width=self.cameras.width, height=self.cameras.height, cameras=CAMERA_FILE)
            atomic_write_json(tmp / INDEX_FILE, index)  # written last and durably: the bank is complete
        return Path(folder)

    @classmethod
    def load(cls, folder: PathLike) -> "MemoryBank":
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MemoryBankError(f"{folder} holds no saved memory bank ({INDEX_FILE} is missing).") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MemoryBankError(f"{folder / INDEX_FILE} is damaged and cannot be read.") from None
        bank = cls()
        frames = index.get("frames") if isinstance(index, dict) else None
        if not isinstance(frames, list):
            raise MemoryBankError(f"{folder / INDEX_FILE} is not a memory bank index (no 'frames' list).")
        if not frames:
            return bank
        try:
            cams = Cameras.from_json(folder / index.get("cameras", CAMERA_FILE), index["width"], index["height"])
            if len(cams) != len(frames):
                raise MemoryBankError(f"{folder} lists {len(frames)} frames but {len(cams)} cameras; the bank is damaged.")
            images = []
            depths = []
            for fr in frames:
                with Image.open(folder / fr["image"]) as im:
                    images.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1))
                depths.append(torch.from_numpy(np.load(folder / fr["depth"]).astype(np.float32)))
            images_t = torch.stack(images)
            depths_t = torch.stack(depths)
        except (KeyError, TypeError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, MemoryBankError):
                raise
            if isinstance(e, CameraFormatError):
                raise MemoryBankError(f"The memory bank in {folder} has unusable cameras: {e}") from None
            raise MemoryBankError(f"The memory bank in {folder} is damaged or incomplete ({e.__class__.__name__}).") from None
        sources = [str(fr.get("source", "")) for fr in frames]
        bank.add(images_t, cams, depths_t, frame_ids=[int(fr["frame_id"]) for fr in frames],
                 labels=[str(fr.get("label", src)) for fr, src in zip(frames, sources)])  # banks saved before labels
        bank.sources = sources
        return bank
