"""What a scene may be asked for, checked before anything is loaded or written.

``SceneSettings`` are a scene's choices (engine, seed, prompt, frames, memory sizes, how the network runs); the
manifest keeps them, so a reopened scene runs as it began. ``SceneError`` is the one refusal of the scene code: a
``ValueError`` whose message is one sentence a person can act on. ``bucket_size`` gives each engine's frame size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine import conditioning
from engine.constants import KEYFRAMES, MAX_REFERENCES, TINY_FRAME_SCALE
from engine.engines import ENGINES, unknown_engine
from engine.offload import OffloadError, check_offload

# Engines without the real network use the official aspect buckets at a fraction of the size, so a CPU run
# stays quick while showing the same framing (the bucket is chosen at full size, then scaled).
ENGINE_SCALE = {"preview": 0.5, "tiny-random": TINY_FRAME_SCALE}
# A clip holds every frame, render, mask and pointmap in memory at once (about 10 MB a frame at full size), so a
# public server must bound it: 121 covers the official 81-frame camera files with room to spare.
MIN_CLIP_FRAMES, MAX_CLIP_FRAMES = 2, 121
# The text encoder reads at most ``engine.constants.TEXT_TOKENS`` (512) tokens, about 2000 characters of English;
# longer prompts are refused rather than cut silently, so what a person typed is what conditioned the clip.
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit; the manifest keeps them as JSON integers


class SceneError(ValueError):
    """A scene request that cannot be carried out; the message is one sentence."""


def bucket_size(engine: str, height: int, width: int, scale_map=None) -> tuple[int, int]:
    """``(height, width)`` of a scene's frames for an input of ``height x width``: the official bucket (nearest
    aspect in the checkpoint's ``scale_map``), scaled by ``ENGINE_SCALE`` for the small engines."""
    bucket = conditioning.assign_bucket(height, width, scale_map)
    return conditioning.scale_bucket(bucket, ENGINE_SCALE.get(engine, 1.0))


@dataclass
class SceneSettings:
    engine: str = "preview"
    seed: int = 0
    prompt: Optional[str] = None
    frames: int = KEYFRAMES  # keyframes per clip, frame 0 = the start view
    keep_frames: int = 8  # frames of each clip added to memory and cache (the paper's align_nframe)
    max_refs: int = MAX_REFERENCES
    point_budget: int = 1_000_000
    splat_radius: Optional[int] = None  # cache splat half-size in pixels; None: the official radius at the clip's size
    device: str = "cpu"
    weights: Optional[str] = None
    depth: Optional[str] = None  # MoGe repo/folder, or a user depth file (.npy / 16-bit PNG) for the start image
    steps: Optional[int] = None
    backend: str = "eager"  # how the transformer runs: eager, compile, onnxruntime, tensorrt (engine.runtime)
    graphs: Optional[str] = None  # exported graphs / engines for onnxruntime and tensorrt (python -m export)
    offload: str = "none"  # GPU memory: one of engine.offload.OFFLOAD_CHOICES

    @classmethod
    def from_dict(cls, data: dict) -> "SceneSettings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        """Refuse settings a person can get wrong, with one sentence, before anything is loaded or written."""
        if self.engine not in ENGINES:
            raise SceneError(unknown_engine(self.engine))
        check_frames(self.frames, "Frames per clip")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise SceneError(f"The seed must be a whole number from 0 to {MAX_SEED}; got {self.seed!r:.40}.")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or not 1 <= self.steps <= 1000):
            raise SceneError(f"Denoising steps must be a whole number from 1 to 1000; got {self.steps!r:.40}.")
        check_prompt(self.prompt)
        try:
            check_offload(self.offload)
        except OffloadError as e:
            raise SceneError(str(e)) from None
        engine_device(self)  # a device this machine has


def engine_device(settings: SceneSettings) -> torch.device:
    """The scene's device: where the networks run and the 3D cache and its renders live."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SceneError(f"The device '{settings.device}' is not available here (no CUDA GPU); use --device cpu.")
    return device


def check_frames(frames, what: str = "A trajectory") -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or not MIN_CLIP_FRAMES <= frames <= MAX_CLIP_FRAMES:
        raise SceneError(f"{what} must be a whole number from {MIN_CLIP_FRAMES} to {MAX_CLIP_FRAMES} frames; "
                         f"got {frames!r:.40}.")


def check_prompt(prompt: Optional[str]) -> None:
    """Prompts are plain text of at most ``MAX_PROMPT_CHARS`` characters (refused, never truncated)."""
    if prompt is None:
        return
    if not isinstance(prompt, str):
        raise SceneError("The prompt must be text.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise SceneError(f"The prompt is {len(prompt)} characters long; keep it to at most {MAX_PROMPT_CHARS}.")
    # Bytes that were not UTF-8 reach Python as lone surrogates (argv, form posts): they cannot be encoded
    # for the text encoder or written to the manifest as text.
    if any("\ud800" <= ch <= "\udfff" for ch in prompt):
        raise SceneError("The prompt is not valid UTF-8 text; retype it or save it as UTF-8.")
    if any((ord(ch) < 32 and ch not in "\t\n\r") or ord(ch) == 127 for ch in prompt):
        raise SceneError("The prompt contains control characters; use plain text.")
