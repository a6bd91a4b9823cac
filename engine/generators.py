"""Clip generators: what makes a clip's frames from its conditions, registered by engine name.

The scene loop asks one thing of an engine (``ClipGenerator``): the frames of a clip, given the clip's official
conditions, prompt and seed. ``GENERATORS`` holds each engine's registration (how its generator is made and the
few facts the loop needs about it); nothing else in the engine compares engine names.

- ``preview``: no network; the cache's renders with holes filled classically (``engine.preview``).
- ``tiny-random`` and the released variants: a WorldStereo network behind the clip pipeline. A process keeps ONE
  resident pipeline per device (``ResidentPipeline``): the demo's Fast/Quality switch (DMD <-> 40-step) swaps only
  the transformer, and a server's second scene does not load a 14B model again.
- The app serving one pipeline per GPU (``python app.py --gpus ... --workers-per-gpu N``): ``GpuPool`` lists the
  devices, and each clip runs on the device with the fewest clips in progress (``PooledGenerator``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch

from engine.engines import ENGINES
from engine.models.config import variant_has_memory
from engine.preview import PREVIEW_NOTE, preview_clip
from engine.progress import Progress, ensure
from engine.settings import SceneError

TINY_NOTE = "tiny-random engine: a tiny randomly initialised WorldStereo; its frames are noise by design."
TINY_VARIANT = "worldstereo-memory-dmd"  # the tiny package the tiny-random engine runs


class ClipGenerator(Protocol):
    """What the scene loop asks of an engine."""

    has_memory: bool  # reads the references retrieved from the memory bank
    uses_pointmaps: bool  # reads pointmaps (the paper's branch-form memory; no released checkpoint does)

    def generate(self, *, conditions, prompt: Optional[str], seed: int, progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """The clip's frames ``[F,3,H,W]`` in [0,1] from its ``engine.conditioning.ClipConditions``."""


@dataclass(frozen=True)
class Registration:
    """How an engine makes clips."""

    make: Callable  # (settings, announce) -> ClipGenerator on settings.device
    network: bool = True  # a generative network makes the clips (the GPU pool and the sequence-parallel group serve it)
    memory: bool = False  # the network reads references (decides the conditions written without a checkpoint here)
    guessed_colours: bool = False  # the colours it gives the cache's holes are a guess (classical inpainting)
    note: Optional[str] = None  # what the manifest says of its clips; None: the engine's description


# ---- the engines' generators ---------------------------------------------------------------------

class PreviewGenerator:
    """The `preview` engine: cache renders with classical hole filling (see engine/preview.py)."""

    has_memory = False
    uses_pointmaps = False

    def generate(self, *, conditions, progress=None, cancel=None, **_) -> torch.Tensor:
        from engine.conditioning import pil_to_tensor

        ensure(progress)(0.0, "preview: filling holes")
        render, covered = conditions.render_frames()
        frames = preview_clip(pil_to_tensor(conditions.image), render, covered)
        ensure(progress)(1.0, "preview: done")
        return frames


class NetworkGenerator:
    """A WorldStereo network (official weights or tiny random) behind the clip pipeline.

    Generators do not own a pipeline: the process keeps ONE resident per device (``resident_for``), and a generator
    makes it its own variant when it generates (switching DMD <-> 40-step swaps only the transformer).
    ``has_memory`` and ``uses_pointmaps`` are its variant's, read when it was made.
    """

    def __init__(self, spec: "PipelineSpec", steps: Optional[int], pipeline, announce: Callable[[str], None] = print):
        self.spec = spec
        self.steps = steps  # None: the variant's own (4 for DMD, 40 otherwise)
        self.announce = announce
        self.has_memory = pipeline.config.has_memory
        self.uses_pointmaps = pipeline.uses_pointmaps

    @property
    def pipeline(self):
        """The resident pipeline, made this generator's variant."""
        return resident_for(self.spec.device).acquire(self.spec, self.announce)

    def generate(self, *, conditions, prompt, seed, progress=None, cancel=None) -> torch.Tensor:
        # One clip at a time: another generator must not swap the transformer mid-clip.
        with resident_for(self.spec.device).lock:
            return self.pipeline.generate(conditions, prompt=prompt, seed=seed, steps=self.steps,
                                          progress=progress, cancel=cancel).frames


def check_group_settings(settings) -> None:
    """Refuse, in one sentence, scene settings a sequence-parallel group cannot run (``engine.distributed``; no-op
    outside a group, and for an engine without a network)."""
    from engine import distributed

    group = distributed.current()
    if group is None or not registration(settings.engine).network:
        return
    if settings.backend != "eager":
        raise distributed.GroupError(f"The '{settings.backend}' backend runs the transformer on one GPU; a "
                                     "sequence-parallel group runs it eagerly, so drop --backend.")
    if settings.offload == "model":
        raise distributed.GroupError("--offload model moves the transformer between CPU and GPU, which a "
                                     "sequence-parallel group cannot do; give each rank a GPU that holds it, or use "
                                     "--offload text-encoder.")
    if torch.device(settings.device).type != group.device.type:
        raise distributed.GroupError(f"Every rank of this group computes on {group.device.type}; drop --device "
                                     f"{settings.device}.")


def _network_generator(spec: "PipelineSpec", settings, announce: Callable[[str], None]) -> NetworkGenerator:
    check_group_settings(settings)
    return NetworkGenerator(spec, settings.steps, resident_for(spec.device).acquire(spec, announce), announce)


def _tiny_random(settings, announce: Callable[[str], None]) -> NetworkGenerator:
    from engine.models.tiny import cached_tiny_package

    spec = PipelineSpec(settings.engine, str(cached_tiny_package(TINY_VARIANT)), settings.device, settings.offload,
                        settings.backend, settings.graphs, torch.float32, note=TINY_NOTE)
    return _network_generator(spec, settings, announce)


def _released(settings, announce: Callable[[str], None]) -> NetworkGenerator:
    from engine.engines import checkpoint_dir, engine_status

    weights = Path(settings.weights) if settings.weights else None
    source = checkpoint_dir(ENGINES[settings.engine].variant, weights)
    if source is None:
        raise SceneError(engine_status(settings.engine, weights)[1])
    spec = PipelineSpec(settings.engine, str(source), settings.device, settings.offload, settings.backend,
                        settings.graphs)
    return _network_generator(spec, settings, announce)


GENERATORS: dict[str, Registration] = {
    "preview": Registration(lambda settings, announce: PreviewGenerator(), network=False, guessed_colours=True,
                            note=PREVIEW_NOTE),
    "tiny-random": Registration(_tiny_random, memory=variant_has_memory(TINY_VARIANT)),
    **{spec.name: Registration(_released, memory=variant_has_memory(spec.variant))
       for spec in ENGINES.values() if spec.variant is not None},
}


def registration(engine: str) -> Registration:
    """The registration of ``engine`` (an unknown name is refused in one sentence)."""
    if engine not in GENERATORS:
        from engine.engines import unknown_engine

        raise SceneError(unknown_engine(engine))
    return GENERATORS[engine]


def engine_note(engine: str) -> str:
    """What a scene's manifest says of the clips ``engine`` makes."""
    return registration(engine).note or ENGINES[engine].description


def clip_generator(settings, announce: Callable[[str], None] = print) -> ClipGenerator:
    """The clip generator of the settings' engine. Networks load once per process (per GPU when the app serves a
    pipeline per GPU): the resident pipeline is made this engine's."""
    entry = registration(settings.engine)
    if entry.network and _POOL is not None:  # the app serving one pipeline per GPU: each clip on the least busy one
        return PooledGenerator(_POOL, settings, lambda s: entry.make(s, announce))
    return entry.make(settings, announce)


# ---- the resident pipeline -----------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineSpec:
    """What a resident pipeline is: the checkpoint package and how it runs."""

    engine: str
    source: str  # the checkpoint package folder
    device: str
    offload: str
    backend: str
    graphs: Optional[str]
    dtype: Optional[torch.dtype] = None  # None: the device's default (bf16 on CUDA)
    note: Optional[str] = None  # announced when the pipeline is loaded (what its frames are)

    def shares_networks_with(self, other: "PipelineSpec") -> bool:
        """Whether a pipeline made for ``other`` can become this one by swapping its transformer (same device,
        offload and dtype; the base model is compared when switching)."""
        return (self.device, self.offload, self.dtype) == (other.device, other.offload, other.dtype)


class ResidentPipeline:
    """At most one generative pipeline per process: the demo's Fast/Quality switch (DMD <-> 40-step) swaps the
    transformer and its config and keeps the text encoder, image encoder and VAE of their shared base model."""

    def __init__(self):
        self.lock = threading.RLock()
        self.pipeline = None
        self.spec: Optional[PipelineSpec] = None

    def acquire(self, spec: PipelineSpec, announce: Callable[[str], None] = print):
        with self.lock:
            if self.spec == spec:
                return self.pipeline
            from engine.pipeline import ClipPipeline, base_model_of, release_memory

            pipe, old = self.pipeline, self.spec
            self.pipeline = self.spec = None  # a failure below leaves nothing half-made resident
            if spec.note:
                announce(spec.note)
            shared = old is not None and old.shares_networks_with(spec)
            if shared and base_model_of(spec.source) == pipe.components.source:
                if old.source != spec.source:
                    pipe.switch_variant(spec.source, announce=announce)
            else:
                pipe = None
                release_memory(torch.device(spec.device))
                pipe = ClipPipeline.from_pretrained(spec.source, device=spec.device, dtype=spec.dtype,
                                                    offload=spec.offload, announce=announce)
            from engine import distributed

            if distributed.current() is not None:  # the other ranks of a sequence-parallel group load it too
                distributed.lead(pipe, spec.source, release=self.forget)
            elif spec.backend != "eager" or pipe.backend is not None:
                pipe.use_backend(spec.backend, graphs_dir=spec.graphs, announce=announce)
            self.pipeline, self.spec = pipe, spec
            return pipe

    def forget(self) -> None:
        """Drop the resident pipeline without waiting for a clip in progress: called when the sequence-parallel group
        it leads has ended, so no clip of it can finish (a clip in progress lets go of it when it fails)."""
        self.pipeline = self.spec = None

    def release(self) -> None:
        """Drop the resident pipeline (its memory goes back at once)."""
        from engine.pipeline import release_memory

        with self.lock:
            device = torch.device(self.spec.device) if self.spec is not None else torch.device("cpu")
            self.pipeline = self.spec = None
            release_memory(device)


_RESIDENTS: dict[str, ResidentPipeline] = {}
_RESIDENTS_LOCK = threading.Lock()


def resident_for(device: str) -> ResidentPipeline:
    """The resident pipeline slot of one device: one pipeline per process, or one per GPU when the app serves a
    pipeline per GPU (``GpuPool``)."""
    key = str(torch.device(device))
    with _RESIDENTS_LOCK:
        return _RESIDENTS.setdefault(key, ResidentPipeline())


# ---- one pipeline per GPU ------------------------------------------------------------------------

class GpuPool:
    """Devices that each hold one pipeline per engine (how many scenes run at once is the app queue's limit)."""

    def __init__(self, devices: Sequence[str]):
        self.devices = [str(d) for d in devices]
        self._busy = {d: 0 for d in self.devices}
        self._lock = threading.Lock()

    def pick(self) -> str:
        """The device with the fewest clips in progress or waiting (first listed on a tie); counted as busier."""
        with self._lock:
            device = min(self.devices, key=lambda d: self._busy[d])
            self._busy[device] += 1
            return device

    def done(self, device: str) -> None:
        with self._lock:
            self._busy[device] -= 1


class PooledGenerator:
    """A clip generator with one pipeline per pool device, loaded on a device's first clip; one clip at a time
    runs on each device's pipeline."""

    def __init__(self, pool: GpuPool, settings, load: Callable):
        self.pool = pool
        self._settings = settings
        self._load = load  # settings → clip generator on settings.device
        self._generators: dict = {}
        self._locks = {d: threading.Lock() for d in pool.devices}
        first = pool.devices[0]
        with self._locks[first]:
            self._generators[first] = load(replace(settings, device=first))

    @property
    def has_memory(self) -> bool:
        return self._generators[self.pool.devices[0]].has_memory

    @property
    def uses_pointmaps(self) -> bool:
        return self._generators[self.pool.devices[0]].uses_pointmaps

    def generator_for(self, device: str):
        if device not in self._generators:
            self._generators[device] = self._load(replace(self._settings, device=device))
        return self._generators[device]

    def generate(self, **kwargs):
        device = self.pool.pick()
        try:
            with self._locks[device]:
                return self.generator_for(device).generate(**kwargs)
        finally:
            self.pool.done(device)


_POOL: Optional[GpuPool] = None


def set_gpu_pool(devices: Sequence[str]) -> GpuPool:
    """Serve one pipeline per device of ``devices`` from now on (``python app.py --workers-per-gpu``)."""
    global _POOL
    _POOL = GpuPool(devices)
    return _POOL
