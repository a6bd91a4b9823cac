"""The parts of the Wan2.1 I2V base model around the transformer: VAE, UMT5 text encoder, CLIP image encoder.

They load from the base model's diffusers layout (``vae/``, ``text_encoder/`` + ``tokenizer/``,
``image_encoder/`` + ``image_processor/``, ``scheduler/``), a local folder or a hub repository id. Encodings
follow the released WorldStereo pipelines: UMT5 last hidden states of cleaned prompts zeroed past each prompt's
tokens, CLIP penultimate hidden states of the uint8 input view, VAE latents (``mode``) normalised by the VAE's
``latents_mean``/``latents_std``. The released 2.0 checkpoints work in a "keyframe latent space": every render
and reference keyframe is VAE-encoded on its own; only the input view's condition video goes through the VAE
as one video.
"""
from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from engine.constants import TEXT_TOKENS
from engine.hub import BASE_COMPONENT_FOLDERS, hub_offline
from engine.offload import IMAGE_ENCODER, TEXT_ENCODER, VAE, Placement

PathLike = Union[str, Path]

PROMPT_CACHE_SIZE = 8  # a real encoding is 512 x 4096 floats (8 MB); keep the few prompts a session reuses
CONDITION_CACHE_SIZE = 2  # input-view condition latents (21 x 60 x 96 x 16 floats at full size)


class ComponentLoadError(ValueError):
    """A base model folder or repository that lacks a part this engine needs."""


def prompt_clean(text: str) -> str:
    """The release's ``prompt_clean`` (release: models/pipelines/pipeline_dmd_keyframe.py): ftfy's fix, HTML entities
    unescaped twice, runs of whitespace collapsed to one space, ends stripped."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class Components:
    """VAE, text and image encoders of one base model, and the encodings WorldStereo needs from them."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    image_encoder: torch.nn.Module
    image_processor: object
    placement: Placement  # the GPU memory option: where the networks live (engine.offload)
    dtype: torch.dtype
    scheduler_config: Optional[dict] = None  # the base model's scheduler/scheduler_config.json (UniPC, flow shift)
    source: str = ""  # the base model folder or repo they were loaded from
    _prompt_cache: dict = field(default_factory=dict, repr=False)
    _condition_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the networks compute (under every offload option)."""
        return self.placement.device

    # ---------------------------------------------------------------- text
    def encode_prompt(self, texts: Union[str, Sequence[str]], max_length: int = TEXT_TOKENS) -> torch.Tensor:
        """UMT5 embeddings ``[B, max_length, D]`` on ``device``/``dtype``; rows past each prompt's tokens are 0.

        Prompts are cleaned as the release's ``_get_t5_prompt_embeds`` does (``prompt_clean``). Prompts seen before
        come from a cache, so a multi-clip run encodes its prompts once.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        missing = [t for t in dict.fromkeys(texts) if (t, max_length) not in self._prompt_cache]
        if missing:
            enc = self.tokenizer([prompt_clean(t) for t in missing], padding="max_length", max_length=max_length,
                                 truncation=True, add_special_tokens=True, return_attention_mask=True,
                                 return_tensors="pt")
            dev = self.device
            self.placement.before_use(self.text_encoder, TEXT_ENCODER)
            with torch.no_grad():
                hidden = self.text_encoder(enc.input_ids.to(dev), enc.attention_mask.to(dev)).last_hidden_state
            self.placement.after_use(self.text_encoder, TEXT_ENCODER)
            keep = enc.attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            hidden = (hidden * keep).to("cpu", torch.float32)  # Wan zeroes everything past the prompt
            for t, h in zip(missing, hidden):
                self._prompt_cache[(t, max_length)] = h
            wanted = {(t, max_length) for t in texts}
            for key in [k for k in self._prompt_cache if k not in wanted][: max(0, len(self._prompt_cache) - PROMPT_CACHE_SIZE)]:
                del self._prompt_cache[key]
        return torch.stack([self._prompt_cache[(t, max_length)] for t in texts]).to(self.device, self.dtype)

    # ---------------------------------------------------------------- image
    def clip_pixels(self, images: Union[Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """CLIP ``pixel_values`` of uint8 PIL images as the release makes them: its ``CLIPImageProcessor`` is
        loaded with ``do_rescale=False`` (release: models/worldstereo_wrapper.py), so 0-255 values reach the
        normalisation."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        return self.image_processor(images=images, do_rescale=False, return_tensors="pt").pixel_values

    def encode_image(self, images: Union[Image.Image, Sequence[Image.Image]]) -> torch.Tensor:
        """CLIP penultimate hidden states ``[B, tokens, D]`` (257 tokens for ViT-H/14) of PIL images (``encode_image``
        of the release's pipelines, on ``clip_pixels``)."""
        pixels = self.clip_pixels(images)
        dev = self.device
        enc_dtype = next(self.image_encoder.parameters()).dtype
        with torch.no_grad():
            out = self.image_encoder(pixel_values=pixels.to(dev, enc_dtype), output_hidden_states=True)
        return out.hidden_states[-2].to(self.device, self.dtype)

    # ---------------------------------------------------------------- VAE
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
        return mean, std

    def _normalised(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).to(self.device, self.dtype)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """One video ``[1,3,T,H,W]`` in [-1,1] through the causal VAE as a whole (``mode``, normalised):
        ``[1,16,1+(T-1)/4,H/8,W/8]``."""
        dev = self.device
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            z = self.vae.encode(video.to(dev, vae_dtype)).latent_dist.mode()
        return self._normalised(z)

    def encode_keyframes(self, video: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Keyframes ``[1,3,F,H,W]`` in [-1,1] -> normalised latents ``[1,16,F,H/8,W/8]``, every frame encoded as its
        own one-frame video with the latent distribution's ``mode`` (``keyframe_vae_encode``,
        release: src/vae_utils.py)."""
        dev = self.device
        vae_dtype = next(self.vae.parameters()).dtype
        frames = video[0].transpose(0, 1)  # [F,3,H,W]
        out = []
        with torch.no_grad():
            for part in frames.split(chunk):
                x = part.to(dev, vae_dtype).unsqueeze(2)  # [n,3,1,H,W]: n one-frame videos
                out.append(self.vae.encode(x).latent_dist.mode())
        return self._normalised(torch.cat(out).squeeze(2).transpose(0, 1).unsqueeze(0))

    def condition_latents(self, image: torch.Tensor, num_frames: int, mode: str = "full_vae") -> torch.Tensor:
        """The 16 condition channels ``[1,16,F,H/8,W/8]`` of the input view ``[3,H,W]`` in [-1,1], as the release's
        ``prepare_latents`` makes them: ``full_vae`` encodes [image, 4(F-1) zero frames] as one video (the causal
        x4 VAE gives F latent frames); ``first_frame_only`` is the image's latent followed by the latent of one zero
        frame repeated. The last few results are kept: every clip of a photo starts from the same view, and the
        whole-video encoding is the costliest of the conditions."""
        x = image.float().cpu()[None, :, None].contiguous()  # [1,3,1,H,W]
        key = (hashlib.sha256(x.numpy().tobytes()).hexdigest(), tuple(x.shape), int(num_frames), mode)
        if key not in self._condition_cache:
            if mode == "full_vae":
                zeros = x.new_zeros(1, 3, 4 * (num_frames - 1), *x.shape[-2:])
                z = self.encode_video(torch.cat([x, zeros], dim=2))
            elif mode == "first_frame_only":
                first = self.encode_video(x)
                empty = self.encode_video(torch.zeros_like(x))
                z = torch.cat([first, empty.expand(-1, -1, num_frames - 1, -1, -1)], dim=2)
            else:
                raise ComponentLoadError(f"latent_cond_mode '{mode}' is not one the release knows; use full_vae or "
                                         "first_frame_only.")
            while len(self._condition_cache) >= CONDITION_CACHE_SIZE:
                del self._condition_cache[next(iter(self._condition_cache))]
            self._condition_cache[key] = z.cpu()
        return self._condition_cache[key].to(self.device, self.dtype)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Normalised latents ``[1,16,F,h,w]`` → frames ``[F,3,8h,8w]`` in [0,1] (float32), frame by frame."""
        dev = self.device
        vae_dtype = next(self.vae.parameters()).dtype
        z = latents.float()
        mean, std = self._latent_stats(z)
        z = (z * std + mean)[0].transpose(0, 1).unsqueeze(2)  # [F,16,1,h,w]
        out = []
        with torch.no_grad():
            for part in z.split(chunk):
                x = self.vae.decode(part.to(dev, vae_dtype)).sample  # [n,3,1,H,W]
                out.append(((x.float().squeeze(2) + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)


def load_components(base_model: PathLike, placement: Optional[Placement] = None, dtype: torch.dtype = torch.float32, *,
                    vae_dtype: torch.dtype = torch.float32, image_encoder_dtype: torch.dtype = torch.float32,
                    revision: Optional[str] = None) -> Components:
    """Load VAE, UMT5 + tokenizer, CLIP vision + processor and the scheduler config from a Wan2.1 I2V diffusers
    folder or repo, and place them as ``placement`` says (default: everything on the CPU).

    ``dtype`` is the text encoder's and the returned embeddings' dtype; the VAE and CLIP run in float32 by
    default, as the Wan I2V examples do.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

    placement = placement or Placement()
    src = str(base_model)
    local = Path(src).is_dir()
    if local:
        absent = [n for n in BASE_COMPONENT_FOLDERS if not (Path(src) / n).is_dir()]
        if absent:
            raise ComponentLoadError(f"The base model folder {src} lacks {', '.join(absent)}; point base_model at a "
                                     "complete Wan2.1 image-to-video diffusers folder.")
    kw = {} if revision is None else {"revision": revision}
    try:
        vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        text_encoder = UMT5EncoderModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **kw)
        image_encoder = CLIPVisionModel.from_pretrained(src, subfolder="image_encoder", dtype=image_encoder_dtype, **kw)
        image_processor = CLIPImageProcessor.from_pretrained(src, subfolder="image_processor", **kw)
        scheduler_config = dict(UniPCMultistepScheduler.load_config(src, subfolder="scheduler", **kw))
    except (OSError, ValueError) as e:
        hint = " (offline: download it first or pass a local folder)" if hub_offline() and not local else ""
        raise ComponentLoadError(f"Could not load the base model parts from {src}{hint}: {str(e).splitlines()[0]}") from e
    return assemble_components(vae, text_encoder, tokenizer, image_encoder, image_processor, placement, dtype,
                               scheduler_config, source=src)


def assemble_components(vae, text_encoder, tokenizer, image_encoder, image_processor, placement: Placement,
                        dtype: torch.dtype, scheduler_config: Optional[dict] = None, source: str = "") -> Components:
    """``Components`` of networks already built (loaded, or random at full size for benchmarks), placed as
    ``placement`` says."""
    for role, m in ((VAE, vae), (TEXT_ENCODER, text_encoder), (IMAGE_ENCODER, image_encoder)):
        placement.place(m.eval().requires_grad_(False), role)
    return Components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder,
                      image_processor=image_processor, placement=placement, dtype=dtype,
                      scheduler_config=scheduler_config, source=source)
