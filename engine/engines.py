"""Which engines exist, what each needs, and which one a run gets.

Availability is decided without loading or downloading anything (CUDA present? checkpoint files in the given
folder or the Hugging Face cache?), so the CLI and the UI can say at once why an engine is unavailable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.hub import HUB_REPO


@dataclass(frozen=True)
class EngineSpec:
    name: str
    variant: Optional[str]  # checkpoint subfolder of HUB_REPO; None for engines without official weights
    needs_gpu: bool
    description: str
    caveat: str = ""  # what a person must know before judging its frames (said wherever the engine is shown)


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("worldstereo-memory-dmd", "worldstereo-memory-dmd", True,
                   "full model with memory, 4-step DMD sampler (fast)"),
        EngineSpec("worldstereo-memory", "worldstereo-memory", True,
                   "full model with memory, 40-step UniPC + guidance (best quality, slow)"),
        EngineSpec("worldstereo-camera", "worldstereo-camera", True,
                   "camera control only (no memory), 40-step UniPC + guidance"),
        EngineSpec("tiny-random", None, False,
                   "the same architecture at a tiny random size: frames are noise; for tests and smoke runs",
                   "the WorldStereo architecture at a tiny size with random weights. Its frames are noise by design: "
                   "use it to see the pipeline run, not to judge results."),
        EngineSpec("preview", None, False,
                   "no generative network: renders the 3D cache and fills holes classically "
                   "(a preview, not generation)",
                   "no video model runs here. Each clip is the 3D point cloud rendered along the camera path, with its "
                   "holes filled by classical inpainting. It shows the whole geometric loop (depth → point cloud → "
                   "render → fuse → next trajectory) on a CPU; it is not WorldStereo's generation."),
    )
}
DEFAULT_GPU_ENGINE = "worldstereo-memory-dmd"
FALLBACK_ENGINE = "preview"


class EngineUnavailable(RuntimeError):
    """An engine that cannot run here; the message says why in one sentence."""


def unknown_engine(name: str) -> str:
    """The sentence that refuses an engine name that does not exist."""
    return f"Unknown engine '{name}'; choose one of: {', '.join(ENGINES)}."


def checkpoint_dir(variant: str, weights: Optional[Path]) -> Optional[Path]:
    """The local folder holding ``variant``'s config.json + model.safetensors, or None when not present.

    ``weights`` may be the variant folder itself or a folder with one subfolder per variant; without it the
    Hugging Face cache is searched (no network access).
    """
    if weights is not None:
        for cand in (Path(weights) / variant, Path(weights)):
            if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
                return cand
        return None
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in ("config.json", "model.safetensors"):
        hit = try_to_load_from_cache(HUB_REPO, f"{variant}/{name}")
        if not isinstance(hit, str):
            return None
        found.append(Path(hit).parent)
    return found[0]


def cpu_asked(device: Optional[str]) -> bool:
    """Whether a run asked for the CPU by name (``--device cpu``)."""
    return device is not None and str(device).strip().lower().split(":")[0] == "cpu"


def cpu_warning(name: str) -> str:
    """The one line a full engine run on a CPU prints."""
    return (f"{name} runs on the CPU as asked: a CPU is only for small (test) packages; the released 14B "
            "checkpoints need a CUDA GPU.")


def engine_status(name: str, weights: Optional[Path] = None, device: Optional[str] = None) -> tuple[bool, str]:
    """``(available, reason)``; ``reason`` is one sentence a person can act on. A full engine needs CUDA unless
    ``device`` asks for the CPU by name (a small package, such as the tiny ones the tests write)."""
    spec = ENGINES.get(name)
    if spec is None:
        return False, unknown_engine(name)
    if spec.needs_gpu and not torch.cuda.is_available() and not cpu_asked(device):
        return False, f"{name} needs a CUDA GPU and none was found."
    if spec.variant is not None and checkpoint_dir(spec.variant, weights) is None:
        where = f"in {weights}" if weights is not None else "in the Hugging Face cache"
        return False, (
            f"{name} weights were not found {where}; download them with "
            f"`hf download {HUB_REPO} --include '{spec.variant}/*'` or pass --weights DIR."
        )
    return True, f"{name}: {spec.description}."


def resolve_engine(requested: Optional[str] = None, weights: Optional[Path] = None,
                   announce: Callable[[str], None] = print, device: Optional[str] = None) -> str:
    """The engine a run uses: the requested one if it can run, else ``preview`` with a one-line reason.

    With nothing requested, the full DMD model where a GPU and its weights are present, else ``preview``. A full
    engine asked for on the CPU (``device="cpu"``) runs there, with a one-line warning (``cpu_warning``).
    """
    name = requested or DEFAULT_GPU_ENGINE
    if name not in ENGINES:
        raise EngineUnavailable(engine_status(name)[1])
    ok, reason = engine_status(name, weights, device)
    if ok:
        if ENGINES[name].needs_gpu and cpu_asked(device):
            announce(cpu_warning(name))
        return name
    announce(f"{reason} Falling back to the '{FALLBACK_ENGINE}' engine: {ENGINES[FALLBACK_ENGINE].description}.")
    return FALLBACK_ENGINE
