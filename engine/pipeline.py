"""One clip: the official conditions in, generated keyframes out.

``ClipPipeline`` holds the WorldStereo transformer, the base model's VAE / text / image encoders and the
checkpoint config. ``generate(ClipConditions, ...)`` runs named steps, the way diffusers pipelines read:

1. ``encode_prompt``: UMT5 embeddings of the prompt (and of the negative prompt under guidance), cached.
2. ``encode_image``: CLIP tokens of the input view.
3. ``prepare_conditions``: everything else the transformer reads, as the release's pipelines assemble it — the
   input view's condition latents per ``latent_cond_mode``, every render and reference keyframe VAE-encoded on its
   own, camera codes, and the camera branch's mask tokens (render mask + Plücker rays), computed ONCE per clip and
   passed to every step as ``mask_tokens``.
4. ``prepare_latents``: the starting noise, drawn from ``generator`` (by default a CPU generator seeded with ``seed``:
   a seed gives the same clip on every device), or ``latents`` as given, as diffusers pipelines take them, so a clip
   can be compared with another implementation's from the same noise.
5. ``denoise``: the variant's sampler (4-step DMD, or 40-step UniPC with classifier-free guidance batched into one
   forward per step).
6. ``decode``: the VAE, keyframe by keyframe.

Calling the pipeline with the engine's own tensors (image, cameras, cache render, covered mask) builds the
conditions first. ``switch_variant`` swaps the transformer for another variant of the same base model, keeping
the encoders, the VAE and their caches, and reading again only the transformer's tensors that differ. Where the
networks live is the ``offload`` option (``engine.offload``).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from engine.conditioning import ClipConditions, ClipInputError, colour_coded_pointmaps, conditions_from_render
from engine.constants import LATENT_CHANNELS, MASK_CHANNELS, MAX_REFERENCES, SIZE_MULTIPLE, VAE_SCALE
from engine.geometry.cameras import Cameras
from engine.geometry.retrieval import References
from engine.models.components import Components, load_components
from engine.models.config import WorldStereoConfig, variant_is_distilled
from engine.offload import IMAGE_ENCODER, TRANSFORMER, VAE, Placement
from engine.progress import Progress, ensure, span
from engine.sampling import Sampler, make_sampler, sample

__all__ = ["ClipPipeline", "ClipInputError", "ClipOutput", "References", "default_dtype"]

DEFAULT_SHIFT = 3.0  # flow shift of the DMD schedule when config.json names none (the release requires gen_shift)
DEFAULT_GUIDANCE = 5.0


@dataclass
class ClipOutput:
    frames: torch.Tensor  # [F,3,H,W] float32 in [0,1], on the CPU
    latents: torch.Tensor  # [1,16,F,H/8,W/8] normalised VAE latents, float32 on the CPU


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class ClipPipeline:
    """Transformer + encoders + config of one WorldStereo variant; ``pipe(...)`` / ``generate`` make one clip."""

    def __init__(self, transformer: torch.nn.Module, components: Components, config: WorldStereoConfig,
                 dtype: Optional[torch.dtype] = None):
        self.components = components
        self.placement: Placement = components.placement
        self.dtype = dtype or default_dtype(self.device)
        self.transformer = self.placement.place(transformer, TRANSFORMER)
        self.config = config
        self.backend = None  # engine.runtime backend running the transformer; None: the module itself (eager)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def offload(self) -> str:
        return self.placement.mode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, package_or_repo, variant: Optional[str] = None,
                        device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None, *,
                        base_model: Optional[str] = None, offload: str = "none",
                        progress: Optional[Progress] = None,
                        announce: Optional[Callable[[str], None]] = None) -> "ClipPipeline":
        """Load a checkpoint package (folder, or hub repo + ``variant`` subfolder) and its base model's parts.

        bf16 on CUDA by default. ``offload``: one of ``engine.offload.OFFLOAD_CHOICES``. ``announce`` gets the
        transformer's split between checkpoint and base model (``engine.models.loading.load_transformer``).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(device)
        placement = Placement(offload, device)
        report = ensure(progress)
        transformer = _load_transformer(package_or_repo, variant, base_model, placement, dtype, span(report, 0.0, 0.7),
                                        announce)
        report(0.7, "loading VAE, text and image encoders")
        base = base_model_of(package_or_repo, variant, base_model)
        components = load_components(base, placement, dtype)
        pipe = cls(transformer, components, transformer.ws_config, dtype=dtype)
        report(1.0, "model ready")
        return pipe

    def switch_variant(self, package_or_repo, variant: Optional[str] = None, *, base_model: Optional[str] = None,
                       progress: Optional[Progress] = None, announce: Optional[Callable[[str], None]] = None) -> None:
        """Swap in another variant's transformer and config (DMD <-> 40-step, camera): the text and image encoders,
        the VAE and their caches stay. The variant must share this pipeline's base model (``base_model_of``).

        The two transformers are never in memory together. With the transformer resident (offload ``none`` or
        ``text-encoder``) the new one takes over the old one's tensors that it would read from the same file (a
        camera and a memory checkpoint share their base model's tensors; the DMD file is a whole model of its own),
        the rest of the old one is released, then only what differs is read. Under ``model`` or ``group`` offload
        the old one is released first and the new one read whole. The transformer then runs eagerly until
        ``use_backend`` is called again."""
        base = base_model_of(package_or_repo, variant, base_model)
        if base != self.components.source:
            raise ValueError(f"{package_or_repo} builds on {base}, not on this pipeline's {self.components.source}; "
                             "load a new pipeline for it.")
        old, self.transformer, self.backend = self.transformer, None, None
        reuse = old if self.placement.resident(TRANSFORMER) else None
        del old
        if reuse is None:
            release_memory(self.device)
        transformer = _load_transformer(package_or_repo, variant, base_model, self.placement, self.dtype, progress,
                                        announce, reuse=reuse)
        del reuse
        self.transformer = self.placement.place(transformer, TRANSFORMER)
        self.config = transformer.ws_config

    def use_backend(self, name: str, graphs_dir=None, announce: Callable[[str], None] = print, **options) -> str:
        """Run the transformer with an ``engine.runtime`` backend (eager, compile, onnxruntime, tensorrt).

        ``self.transformer`` stays the real module (offload hooks attach to it). A backend that cannot run here
        falls back to eager and ``announce`` gets the one-line reason. Returns the backend in use.
        """
        from engine.runtime import make_backend

        backend = make_backend(name, self.transformer, graphs_dir=graphs_dir, **options)
        reason = getattr(backend, "fallback_reason", None)
        if reason:
            announce(reason)
        self.backend = None if backend.name == "eager" else backend
        return backend.name

    # ------------------------------------------------------------------ sampling set-up
    @property
    def is_distilled(self) -> bool:
        return self.config.dmd_steps is not None or variant_is_distilled(self.config.variant or "")

    @property
    def uses_pointmaps(self) -> bool:
        """Whether the model reads pointmaps (the paper's branch-form memory; no released checkpoint does)."""
        return getattr(self.transformer, "memory_branch", None) is not None

    def make_sampler(self, steps: Optional[int] = None) -> Sampler:
        """DMD with the checkpoint config's shift / start / end steps, or UniPC configured by the base model's
        scheduler config — as ``WorldStereo._build_pipeline`` (release: models/worldstereo_wrapper.py) builds them."""
        cfg = self.config
        if self.is_distilled:
            shift = float(cfg.gen_shift) if cfg.gen_shift is not None else DEFAULT_SHIFT
            return make_sampler("dmd", steps=steps or cfg.dmd_steps or 4, shift=shift,
                                dmd_start=cfg.dmd_start_steps if cfg.dmd_start_steps is not None else 250,
                                dmd_end=cfg.dmd_end_steps if cfg.dmd_end_steps is not None else 1000)
        return make_sampler("unipc", steps=steps or 40, scheduler_config=self.components.scheduler_config)

    # ------------------------------------------------------------------ one clip
    @torch.no_grad()
    def __call__(self, image: torch.Tensor, cameras: Cameras, render: torch.Tensor, render_mask: torch.Tensor,
                 prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                 references: Optional[References] = None, pointmaps: Optional[torch.Tensor] = None, seed: int = 0,
                 steps: Optional[int] = None, guidance: float = DEFAULT_GUIDANCE, progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None) -> ClipOutput:
        """Generate the F keyframes along ``cameras`` (frame 0 is the input view) from the engine's own tensors.

        ``image [3,H,W]`` and ``render [F,3,H,W]`` in [0,1], ``render_mask [F,H,W]`` True where the 3D cache covers the
        pixel, ``pointmaps [F,3,H,W]`` their world XYZ (branch-form memory only); they become the official
        conditions through ``engine.conditioning.conditions_from_render``, then ``generate`` runs.
        """
        check_engine_inputs(image, cameras, render, render_mask, references, pointmaps)
        memory = self.config.has_memory
        cond = conditions_from_render(image, cameras, render, render_mask,
                                      references=references if memory and references is not None and len(references) else None,
                                      pointmaps=pointmaps if self.uses_pointmaps else None, memory=memory)
        return self.generate(cond, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                             guidance=guidance, progress=progress, cancel=cancel, generator=generator, latents=latents)

    @torch.no_grad()
    def generate(self, conditions: ClipConditions, prompt: Optional[str] = None,
                 negative_prompt: Optional[str] = None, seed: int = 0, steps: Optional[int] = None,
                 guidance: float = DEFAULT_GUIDANCE, progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None) -> ClipOutput:
        """Generate one clip from its official conditions. Variants without memory ignore references and camera
        codes; ``guidance`` applies to the 40-step variants only (the unconditional branch differs in text only);
        ``negative_prompt`` defaults to the checkpoint config's. The starting noise is ``latents`` when given, else
        drawn from ``generator`` (default: a CPU generator seeded with ``seed``; ``prepare_latents``)."""
        report = ensure(progress)
        f, h, w = check_conditions(conditions)
        sampler = self.make_sampler(steps)
        use_cfg = sampler.uses_guidance and guidance is not None and float(guidance) != 1.0
        report(0.0, "encoding conditions")
        text = self.encode_prompt(prompt, negative_prompt if use_cfg else None, use_cfg)
        inputs = {"encoder_hidden_states": text, "encoder_hidden_states_image": self.encode_image(conditions),
                  **self.prepare_conditions(conditions)}
        if generator is None and latents is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = self.prepare_latents(f, h, w, generator=generator, latents=latents)
        latents = self.denoise(latents, inputs, sampler, guidance=guidance if use_cfg else None,
                               progress=span(report, 0.1, 0.9), cancel=cancel)
        del inputs
        report(0.9, "decoding frames")
        frames = self.decode(latents)
        report(1.0, "clip done")
        return ClipOutput(frames=frames, latents=latents.float().cpu())

    # ------------------------------------------------------------------ the steps
    def encode_prompt(self, prompt: Optional[str], negative_prompt: Optional[str] = None,
                      guidance: bool = False) -> torch.Tensor:
        """UMT5 embeddings ``[1 or 2, 512, D]``: the prompt, then under guidance the negative prompt (default: the
        checkpoint config's)."""
        texts = [prompt or ""]
        if guidance:
            texts.append(self.config.negative_prompt if negative_prompt is None else negative_prompt)
        return self.components.encode_prompt(texts)

    def encode_image(self, conditions: ClipConditions) -> torch.Tensor:
        """CLIP tokens ``[1, 257, 1280]`` of the input view (uint8, not rescaled, as released)."""
        tokens = self.components.encode_image(conditions.image)
        self.placement.after_use(self.components.image_encoder, IMAGE_ENCODER)
        return tokens

    def prepare_conditions(self, cond: ClipConditions) -> dict:
        """The transformer's keyword inputs besides noise, time and text, as the release's pipelines assemble them:
        ``first_frame`` (the 20 mask + condition channels of ``hidden_states``), render / reference / pointmap
        latents, camera codes and the per-clip ``mask_tokens``."""
        comps, dev, dt = self.components, self.device, self.dtype
        f = cond.num_frames
        h, w = cond.size
        cond_latent = comps.condition_latents(cond.image_tensor(), f, self.config.latent_cond_mode)
        mask = torch.zeros(1, MASK_CHANNELS, f, h // VAE_SCALE, w // VAE_SCALE, device=dev, dtype=dt)
        mask[:, :, 0] = 1  # only latent frame 0 (the input view) is given
        out = {
            "first_frame": torch.cat([mask, cond_latent.to(dev, dt)], dim=1),
            "render_latent": comps.encode_keyframes(cond.render_video).to(dev, dt),
            "extrinsics": cond.extrinsics.to(dev, dt)[None],
            "intrinsics": cond.intrinsics.to(dev, dt)[None],
        }
        memory = self.config.has_memory
        if memory and cond.camera_qt is not None:
            out["camera_qt"] = cond.camera_qt.to(dev, dt)
        if memory and cond.num_references:
            # 16 channels: the transformer stacks them as the release does ([latent, ones 4, latent]), and the
            # exported graphs take this layout
            out["reference_latent"] = comps.encode_keyframes(cond.reference_video).to(dev, dt)
            out["ref_index"] = cond.ref_index.to(dev, torch.long)[None]
            out["camera_qt_ref"] = cond.camera_qt_ref.to(dev, dt)
            if self.uses_pointmaps:
                targets, refs = colour_coded_pointmaps(cond.pointmaps, cond.reference_pointmaps)
                if targets is not None:
                    out["pointmap_latent"] = comps.encode_keyframes(targets.transpose(0, 1)[None]).to(dev, dt)
                if refs is not None:
                    out["ref_pointmap_latent"] = comps.encode_keyframes(refs.transpose(0, 1)[None]).to(dev, dt)
        self.placement.after_use(comps.vae, VAE)
        out["mask_tokens"] = self.mask_tokens(cond)
        return out

    def mask_tokens(self, cond: ClipConditions) -> torch.Tensor:
        """The camera branch's mask tokens of the render mask and Plücker rays: constant over a clip's steps, so
        computed once here and passed to every forward (``WorldStereoTransformer.encode_mask_and_rays``)."""
        self.placement.before_use(self.transformer, TRANSFORMER)
        return self.transformer.encode_mask_and_rays(cond.render_mask.to(self.device, self.dtype),
                                                     cond.camera_embedding.to(self.device, self.dtype),
                                                     num_frames=cond.num_frames)

    def prepare_latents(self, frames: int, height: int, width: int, generator: Optional[torch.Generator] = None,
                        latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The starting noise ``[1,16,F,H/8,W/8]`` (float32, on the pipeline's device), as diffusers pipelines make it:
        ``latents`` when given (checked for shape), else drawn from ``generator`` on that generator's device
        (diffusers' ``randn_tensor``; a CPU generator gives the same noise whatever the pipeline's device)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, LATENT_CHANNELS, frames, height // VAE_SCALE, width // VAE_SCALE)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ClipInputError(f"latents must be {list(shape)} for this clip; got {list(latents.shape)}.")
            return latents.to(self.device, torch.float32)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def denoise(self, latents: torch.Tensor, inputs: dict, sampler: Sampler, guidance: Optional[float] = None,
                progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """Integrate from noise to clean latents. ``inputs``: ``encoder_hidden_states`` (2 rows under guidance: cond,
        uncond), ``first_frame`` and the transformer's other keyword inputs, batch 1 (shared by both halves)."""
        batch = inputs["encoder_hidden_states"].shape[0]
        shared = {k: (v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else v)
                  for k, v in inputs.items()}
        first_frame = shared.pop("first_frame")
        model_dtype = self.dtype
        net = self.backend or self.transformer

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            hidden = torch.cat([x.to(model_dtype), first_frame[:n]], dim=1)
            extra = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in shared.items()}
            return net(hidden_states=hidden, timestep=t.to(self.device), return_dict=False, **extra).float()

        try:
            return sample(velocity, latents, sampler, guidance=guidance, progress=progress, cancel=cancel)
        finally:
            self.placement.after_use(self.transformer, TRANSFORMER)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → frames ``[F,3,H,W]`` in [0,1] (float32, CPU)."""
        frames = self.components.decode_latents(latents)
        self.placement.after_use(self.components.vae, VAE)
        return frames


# ---------------------------------------------------------------------- loading
def base_model_of(package_or_repo, variant: Optional[str] = None, base_model: Optional[str] = None) -> str:
    """The base model (folder or hub id) a checkpoint package builds on: ``base_model`` if given, else its
    config.json's, resolved like the transformer loader (relative to the package, then beside it)."""
    from engine.models.loading import resolve_checkpoint
    from engine.models.weightfiles import locate_base_model

    config_path, _ = resolve_checkpoint(package_or_repo, variant)
    if base_model is None:
        base_model = WorldStereoConfig.from_json(config_path).base_model
    return locate_base_model(base_model, config_path.parent)


def _load_transformer(package_or_repo, variant, base_model, placement: Placement, dtype, progress, announce=None,
                      reuse=None):
    from engine.models.loading import load_transformer

    return load_transformer(package_or_repo, variant=variant, base_model=base_model,
                            device=placement.load_device(TRANSFORMER), dtype=dtype, progress=progress,
                            announce=announce, reuse=reuse)


def release_memory(device: torch.device) -> None:
    """Give freed networks' memory back (before a large load): Python's cycles first, then CUDA's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- input checks
def check_engine_inputs(image, cameras, render, render_mask, references, pointmaps) -> None:
    if render.dim() != 4 or render.shape[1] != 3:
        raise ClipInputError(f"render must be [F,3,H,W]; got {tuple(render.shape)}.")
    f, _, h, w = render.shape
    if tuple(image.shape) != (3, h, w):
        raise ClipInputError(f"image must be [3,{h},{w}] like the render frames; got {tuple(image.shape)}.")
    if tuple(render_mask.shape) != (f, h, w):
        raise ClipInputError(f"render_mask must be [{f},{h},{w}]; got {tuple(render_mask.shape)}.")
    if len(cameras) != f:
        raise ClipInputError(f"{len(cameras)} cameras were given for {f} render frames; pass one per frame.")
    if pointmaps is not None and tuple(pointmaps.shape) != (f, 3, h, w):
        raise ClipInputError(f"pointmaps must be [{f},3,{h},{w}]; got {tuple(pointmaps.shape)}.")
    if references is not None and len(references) > 0:
        r = len(references)
        if tuple(references.images.shape) != (r, 3, h, w):
            raise ClipInputError(f"reference images must be [R,3,{h},{w}]; got {tuple(references.images.shape)}.")
        if len(references.cameras) != r or tuple(torch.as_tensor(references.ref_index).shape) != (r,):
            raise ClipInputError("references need one camera and one ref_index per reference image.")
        if references.pointmaps is not None and tuple(references.pointmaps.shape) != (r, 3, h, w):
            raise ClipInputError(f"reference pointmaps must be [{r},3,{h},{w}]; "
                                 f"got {tuple(references.pointmaps.shape)}.")


def check_conditions(cond: ClipConditions) -> tuple[int, int, int]:
    f = cond.num_frames
    h, w = cond.size
    if cond.stride != 1 or tuple(cond.render_video.shape[-2:]) != (h, w):
        raise ClipInputError("These conditions hold every few pixels only (a stride); build them at full size.")
    if f < 2:
        raise ClipInputError("A clip needs the input frame and at least one target frame.")
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ClipInputError(f"Frame size {w}x{h} must be a multiple of {SIZE_MULTIPLE} in both directions; "
                             "resize or crop the inputs.")
    r = cond.num_references
    if r > MAX_REFERENCES:
        raise ClipInputError(f"{r} references were given; the model takes at most {MAX_REFERENCES}.")
    if r and (int(cond.ref_index.min()) < 0 or int(cond.ref_index.max()) > f - 2):
        raise ClipInputError(f"ref_index values must lie in 0..{f - 2} (target frames after the input frame).")
    return f, h, w
