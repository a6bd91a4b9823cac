"""One clip: input image + target cameras + cache render (+ memory references) in, generated frames out.

``ClipPipeline`` holds the WorldStereo transformer, the base model's VAE / text / image encoders and the
checkpoint config. A call encodes the prompt once (cached across calls), the input image once with CLIP, and
every keyframe on its own with the VAE (the released checkpoints' keyframe latent space), then runs the
variant's sampler (4-step DMD, or 40-step UniPC with classifier-free guidance batched into one forward per step)
and decodes the keyframes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from engine.geometry.cameras import Cameras
from engine.models.components import Components, load_components, resolve_base_model
from engine.models.config import WorldStereoConfig
from engine.progress import Progress, ensure, span
from engine.sampling import Sampler, make_sampler, sample

LATENT_CHANNELS = 16
MASK_CHANNELS = 4
SPATIAL_MULTIPLE = 16  # VAE x8 times the transformer's 2x2 patches
MAX_REFERENCES = 8
DEFAULT_SHIFT = 3.0  # Wan2.1 I2V's flow shift at 480p, used when config.json names none
DEFAULT_GUIDANCE = 5.0


class ClipInputError(ValueError):
    """Inputs to one clip that do not fit together; the message says what to change."""


@dataclass
class References:
    """Memory views for one clip.

    ``ref_index[r] = k`` means reference r serves target frame k + 1 (index 0 is the input frame, which needs
    no reference) — the transformer's convention. ``pointmaps`` are world XYZ ``[R,3,H,W]`` (only the paper's
    branch-form memory reads them).
    """

    images: torch.Tensor
    cameras: Cameras
    ref_index: torch.Tensor
    pointmaps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class ClipOutput:
    frames: torch.Tensor  # [F,3,H,W] float32 in [0,1], on the CPU
    latents: torch.Tensor  # [1,16,F,H/8,W/8] normalised VAE latents, float32 on the CPU


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def colour_code_pointmaps(*pointmaps: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """World XYZ maps ``[N,3,H,W]`` → images in [0,1], normalised per axis over all given maps together.

    A shared box keeps the colour of a 3D point the same in targets and references, which is what lets the
    memory match them. Non-finite points become 0.
    """
    present = [p for p in pointmaps if p is not None]
    if not present:
        return [None for _ in pointmaps]
    flat = torch.cat([p.float().permute(1, 0, 2, 3).reshape(3, -1) for p in present], dim=1)
    finite = torch.isfinite(flat).all(0)
    pts = flat[:, finite] if finite.any() else flat.new_zeros(3, 1)
    lo, hi = pts.min(dim=1).values.view(1, 3, 1, 1), pts.max(dim=1).values.view(1, 3, 1, 1)
    out = []
    for p in pointmaps:
        if p is None:
            out.append(None)
            continue
        q = ((p.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        out.append(torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0))
    return out


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

    def make_sampler(self, steps: Optional[int] = None) -> Sampler:
        cfg = self.config
        shift = float(cfg.gen_shift) if cfg.gen_shift is not None else DEFAULT_SHIFT
        if self.is_distilled:
            return make_sampler("dmd", steps=steps or cfg.dmd_steps or 4, shift=shift,
                                dmd_start=cfg.dmd_start_steps if cfg.dmd_start_steps is not None else 250,
                                dmd_end=cfg.dmd_end_steps if cfg.dmd_end_steps is not None else 1000)
        return make_sampler("unipc", steps=steps or 40, shift=shift)

    # ------------------------------------------------------------------ one clip
    @torch.no_grad()
    def __call__(self, image: torch.Tensor, cameras: Cameras, render: torch.Tensor, render_mask: torch.Tensor,
                 prompt: Optional[str] = None, negative_prompt: Optional[str] = None,
                 references: Optional[References] = None, pointmaps: Optional[torch.Tensor] = None, seed: int = 0,
                 steps: Optional[int] = None, guidance: float = DEFAULT_GUIDANCE, progress: Optional[Progress] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> ClipOutput:
        """Generate the F keyframes along ``cameras`` (frame 0 is the input view).

        ``render`` ``[F,3,H,W]`` and ``render_mask`` ``[F,H,W]`` (True where the cache covers the pixel) are the
        3D cache rendered along the cameras; ``pointmaps`` ``[F,3,H,W]`` their world XYZ (branch-form memory only).
        Variants without memory ignore ``references``. ``guidance`` applies to the 40-step variants only.
        """
        report = ensure(progress)
        f, h, w = self._check_inputs(image, cameras, render, render_mask, references, pointmaps)
        if references is not None and (len(references) == 0 or not self.config.has_memory):
            references = None
        sampler = self.make_sampler(steps)
        use_cfg = sampler.uses_guidance and guidance is not None and float(guidance) != 1.0

        report(0.0, "encoding conditions")
        cond = self._conditions(image, cameras, render, render_mask, prompt, negative_prompt, references, pointmaps,
                                use_cfg)
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
    def _check_inputs(self, image, cameras, render, render_mask, references, pointmaps) -> tuple[int, int, int]:
        if render.dim() != 4 or render.shape[1] != 3:
            raise ClipInputError(f"render must be [F,3,H,W]; got {tuple(render.shape)}.")
        f, _, h, w = render.shape
        if tuple(image.shape) != (3, h, w):
            raise ClipInputError(f"image must be [3,{h},{w}] like the render frames; got {tuple(image.shape)}.")
        if tuple(render_mask.shape) != (f, h, w):
            raise ClipInputError(f"render_mask must be [{f},{h},{w}]; got {tuple(render_mask.shape)}.")
        if len(cameras) != f:
            raise ClipInputError(f"{len(cameras)} cameras were given for {f} render frames; pass one per frame.")
        if f < 2:
            raise ClipInputError("A clip needs the input frame and at least one target frame.")
        if h % SPATIAL_MULTIPLE or w % SPATIAL_MULTIPLE:
            raise ClipInputError(f"Frame size {w}x{h} must be a multiple of {SPATIAL_MULTIPLE} in both directions; "
                                 "resize or crop the inputs.")
        if pointmaps is not None and tuple(pointmaps.shape) != (f, 3, h, w):
            raise ClipInputError(f"pointmaps must be [{f},3,{h},{w}]; got {tuple(pointmaps.shape)}.")
        if references is not None and len(references) > 0:
            r = len(references)
            if tuple(references.images.shape) != (r, 3, h, w):
                raise ClipInputError(f"reference images must be [R,3,{h},{w}]; got {tuple(references.images.shape)}.")
            if r > MAX_REFERENCES:
                raise ClipInputError(f"{r} references were given; the model takes at most {MAX_REFERENCES}.")
            if len(references.cameras) != r or tuple(torch.as_tensor(references.ref_index).shape) != (r,):
                raise ClipInputError("references need one camera and one ref_index per reference image.")
            idx = torch.as_tensor(references.ref_index)
            if int(idx.min()) < 0 or int(idx.max()) > f - 2:
                raise ClipInputError(f"ref_index values must lie in 0..{f - 2} (target frames after the input frame).")
            if references.pointmaps is not None and tuple(references.pointmaps.shape) != (r, 3, h, w):
                raise ClipInputError(f"reference pointmaps must be [{r},3,{h},{w}]; "
                                     f"got {tuple(references.pointmaps.shape)}.")
        return f, h, w

    def _conditions(self, image, cameras, render, render_mask, prompt, negative_prompt, references, pointmaps,
                    use_cfg: bool) -> dict:
        comps, dev, dt = self.components, self.device, self.dtype
        f, _, h, w = render.shape
        texts = [prompt or ""]
        if use_cfg:
            texts.append(self.config.negative_prompt if negative_prompt is None else negative_prompt)
        text = comps.encode_prompt(texts)
        image_tokens = comps.encode_image(image[None])

        use_pointmaps = getattr(self.transformer, "memory_branch", None) is not None and references is not None
        pm_targets, pm_refs = colour_code_pointmaps(pointmaps if use_pointmaps else None,
                                                    references.pointmaps if use_pointmaps else None)
        # Every keyframe is its own one-frame video, so all of them go through the VAE in one batched call.
        gray = torch.full_like(image, 0.5)  # Wan's "no frame" condition: zeros in [-1, 1]
        parts = [image[None], gray[None], render]
        if references is not None:
            parts.append(references.images)
        parts += [p for p in (pm_targets, pm_refs) if p is not None]
        latents = comps.encode_frames(torch.cat([p.float().cpu() for p in parts]))
        sizes = [p.shape[0] for p in parts]
        chunks = list(latents.split(sizes, dim=2))
        first, empty, render_latent = chunks[0], chunks[1], chunks[2]
        rest = chunks[3:]
        self._offload()

        cond_latent = torch.cat([first, empty.expand(-1, -1, f - 1, -1, -1)], dim=2)
        mask = torch.zeros(1, MASK_CHANNELS, f, h // 8, w // 8, device=dev, dtype=dt)
        mask[:, :, 0] = 1  # frame 0 is given
        first_frame = torch.cat([mask, cond_latent.to(dev, dt)], dim=1)

        # Codes in one normalised frame for targets and references (relative to the input camera, unit scale).
        def at_frame_size(c: Cameras) -> Cameras:
            return c if (c.width, c.height) == (w, h) else c.resized(w, h)

        all_cams = at_frame_size(cameras)
        if references is not None:
            all_cams = Cameras.cat([all_cams, at_frame_size(references.cameras).to(cameras.device, cameras.dtype)])
        norm = all_cams.normalized(0)
        tgt = norm[:f]
        out = {
            "first_frame": first_frame,
            "text": text,
            "encoder_hidden_states_image": image_tokens.expand(len(texts), -1, -1),
            "render_latent": render_latent.to(dev, dt),
            "render_mask": render_mask.to(dev, dt)[None, None],
            "camera_embedding": tgt.plucker().to(dev, dt).permute(1, 0, 2, 3)[None],
            "extrinsics": tgt.w2c.to(dev, dt)[None],
            "intrinsics": tgt.K.to(dev, dt)[None],
            "camera_qt": tgt.quaternion_translation().to(dev, dt)[None],
        }
        if references is not None:
            out["reference_latent"] = rest.pop(0).to(dev, dt)
            out["ref_index"] = torch.as_tensor(references.ref_index, dtype=torch.long, device=dev)[None]
            out["camera_qt_ref"] = norm[f:].quaternion_translation().to(dev, dt)[None]
        if use_pointmaps:
            if pm_targets is not None:
                out["pointmap_latent"] = rest.pop(0).to(dev, dt)
            if pm_refs is not None:
                out["ref_pointmap_latent"] = rest.pop(0).to(dev, dt)
        return out


def _resolve_base(base_model: str, package_dir) -> str:
    """Like the transformer loader: relative to the package, then beside it (variants sharing one base), then as is."""
    for anchor in (package_dir, package_dir.parent):
        found = resolve_base_model(base_model, anchor)
        if found != base_model:
            return found
    return resolve_base_model(base_model)
