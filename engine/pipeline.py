"""One clip: the official conditions in, generated keyframes out.

``ClipPipeline`` holds the WorldStereo transformer, the base model's VAE / text / image encoders and the
checkpoint config. ``generate`` takes one clip's ``ClipConditions`` (``engine.conditioning``: the pixel-level
tensors of the official inference) and encodes them as the release's pipelines do — the prompt with UMT5 (cached
across calls), the input view with CLIP, the input view's condition video per ``latent_cond_mode``, every render
and reference keyframe on its own with the VAE — then runs the variant's sampler (4-step DMD, or 40-step UniPC
with classifier-free guidance batched into one forward per step) and decodes the keyframes. Calling the pipeline
with the engine's own tensors (image, cameras, cache render, covered mask) builds those conditions first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from engine.conditioning import (SIZE_MULTIPLE, ClipConditions, ClipInputError, References, colour_coded_pointmaps,
                                 conditions_from_render)
from engine.geometry.cameras import Cameras
from engine.models.components import Components, load_components, resolve_base_model
from engine.models.config import WorldStereoConfig
from engine.progress import Progress, ensure, span
from engine.sampling import Sampler, make_sampler, sample

__all__ = ["ClipPipeline", "ClipInputError", "ClipOutput", "References", "default_dtype"]

LATENT_CHANNELS = 16
MASK_CHANNELS = 4
MAX_REFERENCES = 8
DEFAULT_SHIFT = 3.0  # flow shift of the DMD schedule when config.json names none (the release requires gen_shift)
DEFAULT_GUIDANCE = 5.0


@dataclass
class ClipOutput:
    frames: torch.Tensor  # [F,3,H,W] float32 in [0,1], on the CPU
    latents: torch.Tensor  # [1,16,F,H/8,W/8] normalised VAE latents, float32 on the CPU


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class ClipPipeline:
    """Transformer + encoders + config of one WorldStereo variant; ``pipe(...)`` generates one clip."""

    def __init__(self, transformer: torch.nn.Module, components: Components, config: WorldStereoConfig,
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
        self.transformer = transformer
        self.components = components
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self._offload_hooks: list = []
        self.backend = None  # engine.runtime backend running the transformer; None: the module itself (eager)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, package_or_repo, variant: Optional[str] = None,
                        device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None, *,
                        base_model: Optional[str] = None, text_encoder_device: Union[str, torch.device, None] = None,
                        offload_text_encoder: bool = False, cpu_offload: bool = False,
                        progress: Optional[Progress] = None) -> "ClipPipeline":
        """Load a checkpoint package (folder, or hub repo + ``variant`` subfolder) and its base model's parts.

        bf16 on CUDA by default. ``text_encoder_device='cpu'`` keeps UMT5 on the CPU; ``offload_text_encoder``
        moves it off the GPU after each use; ``cpu_offload`` keeps every network on the CPU and moves each to
        the GPU only while it runs (accelerate hooks).
        """
        from engine.models.loading import load_transformer, resolve_checkpoint

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or default_dtype(device)
        report = ensure(progress)
        config_path, _ = resolve_checkpoint(package_or_repo, variant)
        load_device = "cpu" if cpu_offload else device
        transformer = load_transformer(package_or_repo, variant=variant, base_model=base_model, device=load_device,
                                       dtype=dtype, progress=span(report, 0.0, 0.7))
        config = transformer.ws_config
        base = _resolve_base(base_model or config.base_model, config_path.parent)
        report(0.7, "loading VAE, text and image encoders")
        components = load_components(base, device=load_device, dtype=dtype,
                                     text_encoder_device=text_encoder_device,
                                     offload_text_encoder=offload_text_encoder)
        components.device = device
        pipe = cls(transformer, components, config, device=device, dtype=dtype)
        if cpu_offload:
            pipe.enable_model_cpu_offload(device)
        report(1.0, "model ready")
        return pipe

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

    def enable_model_cpu_offload(self, device: Union[str, torch.device, None] = None) -> None:
        """Keep the networks on the CPU and move each to ``device`` only while it runs."""
        from accelerate import cpu_offload_with_hook

        dev = torch.device(device or self.device)
        comps = self.components
        modules = [self.transformer, comps.vae, comps.image_encoder]
        # a text encoder pinned to the CPU (text_encoder_device='cpu') stays there
        pinned = comps.text_encoder is not None and not comps.offload_text_encoder \
            and next(comps.text_encoder.parameters()).device.type == "cpu" and dev.type != "cpu"
        if comps.text_encoder is not None and not pinned:
            modules.append(comps.text_encoder)
        self._offload_hooks = []
        for m in modules:
            m.to("cpu")
            _, hook = cpu_offload_with_hook(m, dev)
            self._offload_hooks.append(hook)
        comps.offload_text_encoder = not pinned
        self.device = dev
        comps.device = dev

    def _offload(self) -> None:
        for hook in self._offload_hooks:
            hook.offload()

    # ------------------------------------------------------------------ sampling set-up
    @property
    def is_distilled(self) -> bool:
        variant = self.config.variant or ""
        return self.config.dmd_steps is not None or variant.endswith("-dmd")

    @property
    def uses_pointmaps(self) -> bool:
        """Whether the model reads pointmaps (the paper's branch-form memory; no released checkpoint does)."""
        return getattr(self.transformer, "memory_branch", None) is not None

    def make_sampler(self, steps: Optional[int] = None) -> Sampler:
        """DMD with the checkpoint config's shift / start / end steps, or UniPC configured by the base model's
        scheduler config — as ``WorldStereo._build_pipeline`` (models/worldstereo_wrapper.py) builds them."""
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
                 cancel: Optional[Callable[[], bool]] = None) -> ClipOutput:
        """Generate the F keyframes along ``cameras`` (frame 0 is the input view) from the engine's own tensors.

        ``image [3,H,W]`` and ``render [F,3,H,W]`` in [0,1], ``render_mask [F,H,W]`` True where the 3D cache covers the
        pixel, ``pointmaps [F,3,H,W]`` their world XYZ (branch-form memory only); they become the official
        conditions through ``engine.conditioning.conditions_from_render``, then ``generate`` runs.
        """
        self._check_engine_inputs(image, cameras, render, render_mask, references, pointmaps)
        memory = self.config.has_memory
        cond = conditions_from_render(image, cameras, render, render_mask,
                                      references=references if memory and references is not None and len(references) else None,
                                      pointmaps=pointmaps if self.uses_pointmaps else None, memory=memory)
        return self.generate(cond, prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                             guidance=guidance, progress=progress, cancel=cancel)

    @torch.no_grad()
    def generate(self, conditions: ClipConditions, prompt: Optional[str] = None,
                 negative_prompt: Optional[str] = None, seed: int = 0, steps: Optional[int] = None,
                 guidance: float = DEFAULT_GUIDANCE, progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> ClipOutput:
        """Generate one clip from its official conditions. Variants without memory ignore references and camera
        codes; ``guidance`` applies to the 40-step variants only (the unconditional branch differs in text only);
        ``negative_prompt`` defaults to the checkpoint config's."""
        report = ensure(progress)
        f, h, w = self._check_conditions(conditions)
        sampler = self.make_sampler(steps)
        use_cfg = sampler.uses_guidance and guidance is not None and float(guidance) != 1.0

        report(0.0, "encoding conditions")
        cond = self._model_inputs(conditions, prompt, negative_prompt, use_cfg)
        batch = 2 if use_cfg else 1
        cond = {k: (v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 and k != "text" else v)
                for k, v in cond.items()}
        first_frame = cond.pop("first_frame")
        model_dtype = self.dtype

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            hidden = torch.cat([x.to(model_dtype), first_frame[:n]], dim=1)
            extra = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in cond.items() if k != "text"}
            net = self.backend or self.transformer
            return net(hidden_states=hidden, timestep=t.to(self.device), encoder_hidden_states=cond["text"],
                       return_dict=False, **extra).float()

        gen = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn((1, LATENT_CHANNELS, f, h // 8, w // 8), generator=gen, dtype=torch.float32)
        latents = sample(velocity, noise.to(self.device), sampler, guidance=guidance if use_cfg else None,
                         progress=span(report, 0.1, 0.9), cancel=cancel)
        del cond, first_frame
        self._offload()
        report(0.9, "decoding frames")
        frames = self.components.decode_latents(latents)
        self._offload()
        report(1.0, "clip done")
        return ClipOutput(frames=frames, latents=latents.float().cpu())

    # ------------------------------------------------------------------ helpers
    def _check_engine_inputs(self, image, cameras, render, render_mask, references, pointmaps) -> None:
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

    def _check_conditions(self, cond: ClipConditions) -> tuple[int, int, int]:
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

    def _model_inputs(self, cond: ClipConditions, prompt, negative_prompt, use_cfg: bool) -> dict:
        """The transformer's keyword inputs (plus ``first_frame``: the 20 mask + condition channels of
        ``hidden_states`` and ``text``), as the release's pipelines assemble them."""
        comps, dev, dt = self.components, self.device, self.dtype
        f = cond.num_frames
        h, w = cond.size
        texts = [prompt or ""]
        if use_cfg:
            texts.append(self.config.negative_prompt if negative_prompt is None else negative_prompt)
        text = comps.encode_prompt(texts)
        image_tokens = comps.encode_image(cond.image)

        cond_latent = comps.condition_latents(cond.image_tensor(), f, self.config.latent_cond_mode)
        mask = torch.zeros(1, MASK_CHANNELS, f, h // 8, w // 8, device=dev, dtype=dt)
        mask[:, :, 0] = 1  # only latent frame 0 (the input view) is given
        out = {
            "first_frame": torch.cat([mask, cond_latent.to(dev, dt)], dim=1),
            "text": text,
            "encoder_hidden_states_image": image_tokens.expand(len(texts), -1, -1),
            "render_latent": comps.encode_keyframes(cond.render_video).to(dev, dt),
            "render_mask": cond.render_mask.to(dev, dt),
            "camera_embedding": cond.camera_embedding.to(dev, dt),
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
        self._offload()
        return out


def _resolve_base(base_model: str, package_dir) -> str:
    """Like the transformer loader: relative to the package, then beside it (variants sharing one base), then as is."""
    for anchor in (package_dir, package_dir.parent):
        found = resolve_base_model(base_model, anchor)
        if found != base_model:
            return found
    return resolve_base_model(base_model)
