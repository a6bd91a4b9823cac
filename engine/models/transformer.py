"""WorldStereoTransformer: diffusers' Wan2.1 I2V transformer plus the camera/GGM branch and spatial-stereo memory.

A subclass of `WanTransformer3DModel`, so the backbone's state-dict names are the official ones at the top level
(`blocks.*`, `patch_embedding.*`, ...) and the branches sit beside them (`controlnet.*`, `ref_index_embedding`,
`camera_embedding.*`, and for the paper's memory form `memory_branch.*`). The backbone's modules are used as they
are; only the block loop is ours, because branch residuals enter between blocks and references join the sequence.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn as nn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from .branches import CameraControlNet, MemoryBranch, grid_positions, rotary_at
from .config import ConfigError, WorldStereoConfig

# Released checkpoints embed reference time indices 0..20 (21 keyframes); the table size is fixed by the weights.
NUM_REF_INDEX_EMBEDDINGS = 21
LATENT_CHANNELS = 16
MASK_CHANNELS = 4  # Wan I2V: 16 noisy latent + 4 first-frame mask + 16 condition latent = 36
VAE_SCALE = 8


class InputError(ValueError):
    """Tensors handed to the model that do not fit together; the message says which and how."""


def backbone_init_kwargs(base_config: dict[str, Any]) -> dict[str, Any]:
    """The subset of a diffusers `transformer/config.json` that `WanTransformer3DModel.__init__` takes."""
    params = inspect.signature(WanTransformer3DModel.__init__).parameters
    kw = {k: v for k, v in base_config.items() if k in params and k != "self"}
    if "patch_size" in kw:
        kw["patch_size"] = tuple(kw["patch_size"])
    return kw


def _align_mask_frames(x: torch.Tensor, num_latent_frames: int, downsample: int) -> torch.Tensor:
    """Bring a pixel-rate tensor [B, C, F_pix, H, W] to (F-1)·downsample+1 frames.

    The released 2.0 checkpoints encode every keyframe on its own (one video frame per latent frame). When such a
    per-keyframe mask arrives while the config still says mask_downsample>1, each keyframe after the first is
    repeated `downsample` times so every latent frame's temporal kernel sees exactly its own keyframe (our reading;
    the official handling of this case is not published).
    """
    expected = (num_latent_frames - 1) * downsample + 1
    f_pix = x.shape[2]
    if f_pix == expected:
        return x
    if f_pix == num_latent_frames and downsample > 1:
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(downsample, dim=2)], dim=2)
    raise InputError(f"render_mask/camera_embedding have {f_pix} frames; with {num_latent_frames} latent frames "
                     f"they need {expected} (or {num_latent_frames}, one per keyframe).")


class WorldStereoTransformer(WanTransformer3DModel):
    """Wan2.1 I2V backbone + camera/GGM ControlNet + spatial-stereo memory (stitched or branch form)."""

    def __init__(self, ws_config: WorldStereoConfig, base_config: dict[str, Any]):
        super().__init__(**backbone_init_kwargs(base_config))
        self.ws_config = ws_config
        cfg = self.config
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        cn = ws_config.controlnet_cfg
        if cn.time_embed_dim != inner:
            raise ConfigError(f"controlnet_cfg.time_embed_dim ({cn.time_embed_dim}) must equal the backbone width ({inner}).")
        if cn.conv_out_dim != inner:
            raise ConfigError(f"controlnet_cfg.conv_out_dim ({cn.conv_out_dim}) must equal the backbone width ({inner}), "
                              "since the mask tokens are added to the branch's patch embedding.")
        self.inner_dim = inner
        self.controlnet = CameraControlNet(cn, cfg.in_channels, cfg.patch_size, inner, cfg.rope_max_seq_len, cfg.eps)
        with torch.no_grad():  # official: the branch patch embedding starts as a copy of the backbone's
            self.controlnet.controlnet_patch_embedding.weight.copy_(self.patch_embedding.weight)
            self.controlnet.controlnet_patch_embedding.bias.copy_(self.patch_embedding.bias)
        if cn.ref_embedding:
            self.ref_index_embedding = nn.Embedding(NUM_REF_INDEX_EMBEDDINGS, inner)
        else:
            self.ref_index_embedding = None
        if cn.main_camera_embedding:
            self.camera_embedding = nn.Sequential(
                nn.Linear(cn.camera_embedding_dim, inner // 2), nn.SiLU(),
                nn.Linear(inner // 2, inner), nn.SiLU(),
                nn.Linear(inner, inner),
            )
            nn.init.zeros_(self.camera_embedding[4].weight)
            nn.init.zeros_(self.camera_embedding[4].bias)
        else:
            self.camera_embedding = None
        if ws_config.memory_mode == "branch":
            self.memory_branch = MemoryBranch(ws_config.memory_cfg, cfg.in_channels, cfg.patch_size, inner, inner,
                                              cfg.rope_max_seq_len, cfg.eps)
        else:
            self.memory_branch = None

    # ------------------------------------------------------------------ helpers
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()

    def _frame_offsets(self, codes: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Per-frame camera code [B, F, camera_embedding_dim] → token offset [B, F·tokens_per_frame, D]."""
        emb = self.camera_embedding(codes.to(self.camera_embedding[0].weight.dtype))
        return emb.repeat_interleave(tokens_per_frame, dim=1)

    def _reference_input(self, reference_latent: torch.Tensor) -> torch.Tensor:
        """16-channel clean reference latents → the 36-channel layout of the backbone input.

        A reference is a fully known frame, so (our reading) it enters like Wan's conditioning frame: its clean latent
        in the noisy slot, an all-ones mask and itself as the condition latent. 36-channel inputs are used as given.
        """
        c = reference_latent.shape[1]
        if c == self.config.in_channels:
            return reference_latent
        if c != LATENT_CHANNELS:
            raise InputError(f"reference_latent has {c} channels; pass {LATENT_CHANNELS} (VAE latent) "
                             f"or {self.config.in_channels}.")
        ones = reference_latent.new_ones(reference_latent.shape[0], MASK_CHANNELS, *reference_latent.shape[2:])
        return torch.cat([reference_latent, ones, reference_latent], dim=1)

    @staticmethod
    def _ref_index(ref_index: Optional[torch.Tensor], batch: int, num_refs: int, device) -> torch.Tensor:
        if ref_index is None:
            ref_index = torch.arange(num_refs, device=device)
        ref_index = torch.as_tensor(ref_index, dtype=torch.long, device=device)
        if ref_index.ndim == 1:
            ref_index = ref_index.unsqueeze(0)
        if ref_index.ndim == 2 and ref_index.shape[0] == 1:
            ref_index = ref_index.expand(batch, -1)
        if ref_index.shape != (batch, num_refs):
            raise InputError(f"ref_index has shape {tuple(ref_index.shape)}; it needs [{num_refs}] or [{batch}, {num_refs}] "
                             "(one target frame index per reference).")
        return ref_index

    def _mask_and_rays(self, render_mask: Optional[torch.Tensor], camera_embedding: Optional[torch.Tensor],
                       num_frames: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        cn = self.ws_config.controlnet_cfg
        parts = []
        if render_mask is not None:
            parts.append(render_mask.to(like.dtype))
        if camera_embedding is not None and cn.add_channels > (1 if render_mask is not None else 0):
            parts.append(camera_embedding.to(like.dtype))
        if not parts:
            raise InputError("the camera branch needs render_mask (and camera_embedding Plücker rays); none was given.")
        x = torch.cat(parts, dim=1)
        if x.shape[1] != cn.add_channels:
            raise InputError(f"render_mask + camera_embedding give {x.shape[1]} channels; this checkpoint expects "
                             f"{cn.add_channels} (1 mask channel + 6 Plücker channels when 7).")
        size = (height * VAE_SCALE, width * VAE_SCALE)
        if tuple(x.shape[-2:]) != size:
            if not cn.interp:
                raise InputError(f"render_mask/camera_embedding are {tuple(x.shape[-2:])} pixels; the latents need {size}.")
            # interp=True: resample to the latent's pixel grid (our reading of the flag).
            b, c, f = x.shape[:3]
            x = torch.nn.functional.interpolate(x.transpose(1, 2).flatten(0, 1), size=size, mode="bilinear",
                                                align_corners=False).unflatten(0, (b, f)).transpose(1, 2)
        return _align_mask_frames(x, num_frames, cn.mask_downsample)

    # ------------------------------------------------------------------ branches
    def camera_branch(self, *, hidden_states: torch.Tensor, render_latent: torch.Tensor, render_mask: torch.Tensor,
                      camera_embedding: Optional[torch.Tensor], temb: torch.Tensor,
                      extrinsics: Optional[torch.Tensor] = None,
                      intrinsics: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Residuals [B, F·h'·w', D] of the camera/GGM branch, one per branch block."""
        b, _, f, h, w = hidden_states.shape
        keep = LATENT_CHANNELS + MASK_CHANNELS
        control_input = torch.cat([hidden_states[:, :keep], render_latent.to(hidden_states.dtype)], dim=1)
        mask_and_rays = self._mask_and_rays(render_mask, camera_embedding, f, h, w, hidden_states)
        return self.controlnet(control_input, mask_and_rays, temb, extrinsics, intrinsics)

    def memory_branch_residuals(self, *, hidden_states: torch.Tensor, reference_latent: torch.Tensor,
                                ref_index: torch.Tensor, temb: torch.Tensor,
                                pointmap_latent: Optional[torch.Tensor] = None,
                                ref_pointmap_latent: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Paper SSM: residuals [B, F·h'·w', D] (zero on frames no reference serves), one per memory block.

        ``ref_index`` [B, R]: reference r serves target frame ref_index+1. ``pointmap_latent`` covers all F target
        frames; ``ref_pointmap_latent`` the R references.
        """
        b, _, f, h, w = hidden_states.shape
        frames = ref_index + 1
        gather = frames.view(b, 1, -1, 1, 1)

        def pick(x):
            return torch.gather(x, 2, gather.expand(x.shape[0], x.shape[1], -1, x.shape[3], x.shape[4]))

        target = pick(hidden_states)
        target_pm = pick(pointmap_latent) if pointmap_latent is not None else None
        res = self.memory_branch(target, self._reference_input(reference_latent).to(hidden_states.dtype), temb,
                                 target_pm, ref_pointmap_latent)
        pt, ph, pw = self.config.patch_size
        per = (h // ph) * (w // pw)
        out = []
        idx = frames.view(b, -1, 1, 1).expand(-1, -1, per, self.inner_dim)
        for r in res:
            full = r.new_zeros(b, f // pt, per, self.inner_dim).scatter_add(1, idx, r)
            out.append(full.flatten(1, 2))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: Optional[torch.Tensor] = None,
                render_latent: Optional[torch.Tensor] = None, render_mask: Optional[torch.Tensor] = None,
                camera_embedding: Optional[torch.Tensor] = None, extrinsics: Optional[torch.Tensor] = None,
                intrinsics: Optional[torch.Tensor] = None, reference_latent: Optional[torch.Tensor] = None,
                ref_index: Optional[torch.Tensor] = None, camera_qt: Optional[torch.Tensor] = None,
                camera_qt_ref: Optional[torch.Tensor] = None, pointmap_latent: Optional[torch.Tensor] = None,
                ref_pointmap_latent: Optional[torch.Tensor] = None, return_dict: bool = False):
        """Predict the flow-matching velocity of the target latents.

        Shapes (B batch, F latent frames, h×w latent size = H/8×W/8, R references, F_pix pixel-rate frames):

        - hidden_states [B, 36, F, h, w]: Wan I2V input = noisy latent (16) + first-frame mask (4) + condition
          latent (16).
        - timestep [B]: diffusion time in [0, 1000].
        - encoder_hidden_states [B, L, text_dim]: UMT5 text embeddings (L = 512 for the real model).
        - encoder_hidden_states_image [B, 257, image_dim]: CLIP image tokens of the input image (optional).
        - render_latent [B, 16, F, h, w]: VAE latent of the 3D-cache render video along the target cameras.
          Without it (and render_mask) the camera branch is skipped and the backbone runs alone.
        - render_mask [B, 1, F_pix, H, W]: 1 where the cache render covers the pixel, 0 in holes; pixel resolution,
          F_pix = (F-1)·mask_downsample+1 video frames (or F, one per keyframe).
        - camera_embedding [B, 6, F_pix, H, W]: Plücker rays (moment o×d, direction d; `Cameras.plucker`) per pixel and frame, same frames and
          size as render_mask; used when controlnet_cfg.add_channels is 7.
        - extrinsics [B, F_pix, 4, 4] world-to-camera (normalised about the trajectory's camera centres) and
          intrinsics [B, F_pix, 3, 3] in pixels: handed to the branch blocks, which do not use them (see
          `ControlNetBlock.forward`).
        - reference_latent [B, 16 or 36, R, h, w]: clean VAE latents of the retrieved memory views (None: no memory).
        - ref_index [R] or [B, R] long: 0-based index of the target frame each reference serves, not counting the
          input frame (reference r goes with latent frame ref_index+1). Default 0..R-1.
        - camera_qt [B, F, camera_embedding_dim] and camera_qt_ref [B, R, camera_embedding_dim]: per-frame camera codes
          (quaternion + translation) for `camera_embedding` (main_camera_embedding checkpoints); omitted → no offset.
        - pointmap_latent [B, 16, F, h, w], ref_pointmap_latent [B, 16, R, h, w]: VAE latents of colour-coded world
          pointmaps of targets and references; used by the paper's branch form only (the released stitched form has
          no weights that read them).

        Returns the velocity tensor [B, 16, F, h, w] itself (not diffusers' 1-tuple; with return_dict=True a
        `Transformer2DModelOutput` whose `.sample` is that tensor).
        """
        b, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        fp, hp, wp = f // pt, h // ph, w // pw
        per_frame = hp * wp

        x = self._tokens(hidden_states)
        rotary = self.rope(hidden_states)

        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.numel() == 1 and b > 1 or timestep.ndim == 0:
            timestep = timestep.reshape(1).expand(b)
        temb, timestep_proj, context, context_img = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if context_img is not None:
            context = torch.cat([context_img, context], dim=1)

        if self.camera_embedding is not None and camera_qt is not None:
            x = x + self._frame_offsets(camera_qt, per_frame).to(x.dtype)

        residuals: list[torch.Tensor] = []
        if render_latent is not None or render_mask is not None:
            if render_latent is None or render_mask is None:
                raise InputError("the camera branch needs both render_latent and render_mask; pass both or neither.")
            residuals = self.camera_branch(hidden_states=hidden_states, render_latent=render_latent,
                                           render_mask=render_mask, camera_embedding=camera_embedding, temb=temb,
                                           extrinsics=extrinsics, intrinsics=intrinsics)

        num_ref_tokens = 0
        if reference_latent is not None:
            if pt != 1:
                raise InputError("references need a temporal patch size of 1.")
            r = reference_latent.shape[2]
            if tuple(reference_latent.shape[-2:]) != (h, w):
                raise InputError(f"reference_latent is {tuple(reference_latent.shape[-2:])} but the target latents are "
                                 f"{(h, w)}; resize the references to the target size.")
            idx = self._ref_index(ref_index, b, r, hidden_states.device)
            if not _tracing() and (int(idx.min()) < 0 or int(idx.max()) + 1 >= fp):
                raise InputError(f"ref_index must lie in 0..{fp - 2} (target frames after the input frame).")
            if self.memory_branch is not None:
                mem = self.memory_branch_residuals(hidden_states=hidden_states, reference_latent=reference_latent,
                                                   ref_index=idx, temb=temb, pointmap_latent=pointmap_latent,
                                                   ref_pointmap_latent=ref_pointmap_latent)
                residuals = _sum_residual_lists(residuals, mem)
            else:
                ref_tokens = self._tokens(self._reference_input(reference_latent).to(hidden_states.dtype))
                if self.ref_index_embedding is not None:
                    ref_tokens = ref_tokens + self.ref_index_embedding(idx + 1).repeat_interleave(per_frame, 1).to(x.dtype)
                if self.camera_embedding is not None and camera_qt_ref is not None:
                    ref_tokens = ref_tokens + self._frame_offsets(camera_qt_ref, per_frame).to(x.dtype)
                # References sit in the right half of a 2W-wide canvas at the time of the frame they serve.
                t_pos, h_pos, w_pos = grid_positions(idx + 1, hp, wp, w_offset=wp, device=x.device)
                ref_rot = rotary_at(self.rope, t_pos, h_pos, w_pos)
                rotary = tuple(torch.cat([rr.to(tr.dtype), tr.expand(b, -1, -1, -1)], dim=1)
                               for rr, tr in zip(ref_rot, rotary))
                x = torch.cat([ref_tokens, x], dim=1)
                num_ref_tokens = ref_tokens.shape[1]

        for i, block in enumerate(self.blocks):
            x = block(x, context, timestep_proj, rotary)
            if i < len(residuals):
                res = residuals[i].to(x.dtype)
                x = x + res if num_ref_tokens == 0 else torch.cat([x[:, :num_ref_tokens], x[:, num_ref_tokens:] + res], 1)

        x = x[:, num_ref_tokens:]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, fp, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if return_dict:
            return Transformer2DModelOutput(sample=out)
        return out

    # ------------------------------------------------------------------ state-dict groups
    BRANCH_PREFIXES = ("controlnet.", "ref_index_embedding.", "camera_embedding.", "memory_branch.")

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The keys a plain `WanTransformer3DModel` has (for comparisons and for exporting the backbone alone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.BRANCH_PREFIXES)}


def _tracing() -> bool:
    """Under ONNX/TorchScript tracing or torch.compile, data-dependent checks would freeze or break the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _sum_residual_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
