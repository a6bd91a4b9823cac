"""WorldStereoTransformer: diffusers' Wan2.1 I2V transformer plus the camera/GGM branch and spatial-stereo memory.

A subclass of `WanTransformer3DModel`, so the backbone's state-dict names are the official ones at the top level
(`blocks.*`, `patch_embedding.*`, ...) and the branches sit beside them (`controlnet.*`, `ref_index_embedding`,
`camera_embedding.*`, and for the paper's memory form `memory_branch.*`). The backbone's modules are used as they
are; only the block loop is ours, because branch residuals enter between blocks and references join the attention.

The forward is a chain of named steps — `embed`, `encode_mask_and_rays`, `camera_branch`, `reference_tokens`,
`run_blocks`, `head` — which the exported graphs (`export/graphs.py`) call too, so eager and exported runs share one
implementation. The constructor is a diffusers config constructor: `save_pretrained` / `from_pretrained` round-trip;
official checkpoint packages load through `engine.models.loading.load_transformer`.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from engine.constants import LATENT_CHANNELS, MASK_CHANNELS, REF_INDEX_EMBEDDINGS

from .branches import CameraControlNet, MemoryBranch, RotaryEmb, TokenShards, WorldStereoRope, token_positions
from .config import ConfigError, WorldStereoConfig

BACKBONE_PARAMS = tuple(p for p in inspect.signature(WanTransformer3DModel.__init__).parameters if p != "self")


class InputError(ValueError):
    """Tensors handed to the model that do not fit together; the message says which and how."""


def backbone_init_kwargs(base_config: dict[str, Any]) -> dict[str, Any]:
    """The subset of a diffusers `transformer/config.json` that `WanTransformer3DModel.__init__` takes."""
    kw = {k: v for k, v in base_config.items() if k in BACKBONE_PARAMS}
    if "patch_size" in kw:
        kw["patch_size"] = tuple(kw["patch_size"])
    return kw


class Embedded(NamedTuple):
    """What `WorldStereoTransformer.embed` makes of the inputs every forward has."""

    tokens: torch.Tensor  # [B, N, D] target patch tokens (+ camera-code offsets)
    rotary: RotaryEmb  # (cos, sin) [1, N, 1, head_dim] of the target grid
    temb: torch.Tensor  # [B, D] timestep embedding (branches and output head)
    timestep_proj: torch.Tensor  # [B, 6, D] block modulation
    context: torch.Tensor  # [B, L_image + L_text, D] cross-attention context


def memory_block(block: WanTransformerBlock, x: torch.Tensor, ref: torch.Tensor, context: torch.Tensor,
                 timestep_proj: torch.Tensor, rotary: RotaryEmb) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone block of the released stitched memory, with the block's own diffusers submodules.

    Target tokens ``x`` [B, N, D] and reference tokens ``ref`` [B, M, D] share the block's modulation; ONE
    self-attention (``attn1``) runs over [reference ; target] with ``rotary`` given per token in that order; only
    the target tokens take the text/image cross-attention (``attn2``); the FFN runs on both. Returns (x, ref).
    With M = 0 this is exactly the plain block.
    """
    n = ref.shape[1]
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + timestep_proj.float()).chunk(6, dim=1)
    joint = torch.cat([ref, x], dim=1)
    normed = (block.norm1(joint.float()) * (1 + scale) + shift).type_as(joint)
    joint = (joint.float() + block.attn1(normed, None, None, rotary) * gate).type_as(joint)
    x = joint[:, n:]
    x = x + block.attn2(block.norm2(x.float()).type_as(x), context, None, None)
    joint = torch.cat([joint[:, :n], x], dim=1)
    normed = (block.norm3(joint.float()) * (1 + c_scale) + c_shift).type_as(joint)
    joint = (joint.float() + block.ffn(normed).float() * c_gate).type_as(joint)
    return joint[:, n:], joint[:, :n]


def _check_mask_frames(x: torch.Tensor, num_latent_frames: int, expected: int, downsample: int) -> None:
    """``render_mask``/``camera_embedding`` [B, C, F_pix, H, W] must bring the ``expected`` frame count, the one the
    mask embedding turns into ``num_latent_frames`` token frames: one frame per keyframe with the released configs'
    mask_downsample 1, (F - 1)·mask_downsample + 1 video frames otherwise (the release pads and strides them alike)."""
    if x.shape[2] != expected:
        raise InputError(f"render_mask/camera_embedding have {x.shape[2]} frames; with {num_latent_frames} latent "
                         f"frames and mask_downsample {downsample} they need {expected}.")


# Sequence parallelism (diffusers' context parallelism): at every `TokenShards` each rank keeps its contiguous share of
# the tokens and of their rotary rows; attention gathers the whole sequence through the Ulysses all-to-all inside
# diffusers' `dispatch_attention_fn`; the output projection gathers the target tokens again before the unpatchify.
# The camera branch is split at its own `shards`, so its residual i is the same share of the target tokens that
# backbone block i holds. Reference tokens are split on their own: the joint self-attention then gathers
# [reference share ; target share] of every rank — the whole set of tokens in another order, which attention (no
# mask, rotary applied per token beforehand) does not see — and each rank keeps its outputs for its own rows.
_SHARD_TOKENS = {
    "tokens": ContextParallelInput(split_dim=1, expected_dims=3),
    "rotary_cos": ContextParallelInput(split_dim=1, expected_dims=4),
    "rotary_sin": ContextParallelInput(split_dim=1, expected_dims=4),
}
CONTEXT_PARALLEL_PLAN = {
    "controlnet.shards": _SHARD_TOKENS,
    "target_shards": _SHARD_TOKENS,
    "reference_shards": _SHARD_TOKENS,
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


def _tracing() -> bool:
    """Under ONNX/TorchScript tracing or torch.compile, data-dependent checks would freeze or break the graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class WorldStereoTransformer(WanTransformer3DModel):
    """Wan2.1 I2V backbone + camera/GGM ControlNet + spatial-stereo memory (stitched or branch form).

    Constructor arguments: those of `WanTransformer3DModel` (the base model's `transformer/config.json`) plus
    ``worldstereo``, the checkpoint's `config.json` as a dict. `from_checkpoint_config` builds one from the two.
    ``_cp_plan`` is the sequence-parallel plan `enable_parallelism` applies (see `engine.models.parallel`).
    """

    _cp_plan = CONTEXT_PARALLEL_PLAN

    @register_to_config
    def __init__(self, patch_size: tuple[int, ...] = (1, 2, 2), num_attention_heads: int = 40,
                 attention_head_dim: int = 128, in_channels: int = 36, out_channels: int = 16, text_dim: int = 4096,
                 freq_dim: int = 256, ffn_dim: int = 13824, num_layers: int = 40, cross_attn_norm: bool = True,
                 qk_norm: Optional[str] = "rms_norm_across_heads", eps: float = 1e-6, image_dim: Optional[int] = None,
                 added_kv_proj_dim: Optional[int] = None, rope_max_seq_len: int = 1024,
                 pos_embed_seq_len: Optional[int] = None, worldstereo: Optional[dict[str, Any]] = None):
        args = dict(locals())
        super().__init__(**{k: args[k] for k in BACKBONE_PARAMS})
        if not isinstance(worldstereo, dict):
            raise ConfigError("WorldStereoTransformer needs its checkpoint config as a dict (worldstereo=...); build it "
                              "with WorldStereoTransformer.from_checkpoint_config or "
                              "engine.models.loading.load_transformer.")
        self.ws_config = ws = WorldStereoConfig.from_dict(dict(worldstereo))
        cfg = self.config
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        cn = ws.controlnet_cfg
        if cn.time_embed_dim != inner:
            raise ConfigError(f"controlnet_cfg.time_embed_dim ({cn.time_embed_dim}) must equal the backbone width ({inner}).")
        if cn.conv_out_dim != inner:
            raise ConfigError(f"controlnet_cfg.conv_out_dim ({cn.conv_out_dim}) must equal the backbone width ({inner}), "
                              "since the mask tokens are added to the branch's patch embedding.")
        self.inner_dim = inner
        self.rope = WorldStereoRope(cfg.attention_head_dim, tuple(cfg.patch_size), cfg.rope_max_seq_len)
        self.target_shards = TokenShards()
        self.reference_shards = TokenShards()
        self.controlnet = CameraControlNet(cn, cfg.in_channels, cfg.patch_size, inner, cfg.rope_max_seq_len)
        with torch.no_grad():  # official: the branch patch embedding starts as a copy of the backbone's
            self.controlnet.controlnet_patch_embedding.weight.copy_(self.patch_embedding.weight)
            self.controlnet.controlnet_patch_embedding.bias.copy_(self.patch_embedding.bias)
        # The camera variant (official WorldStereoModel) builds neither memory module, whatever its flags say.
        stitched = ws.has_memory and ws.memory_mode == "stitched"
        self.ref_index_embedding = None
        if stitched and cn.ref_embedding:
            # Built zero-initialised like the official one and never read by the forward; it exists so the
            # checkpoint's key loads.
            self.ref_index_embedding = nn.Embedding(REF_INDEX_EMBEDDINGS, inner)
            nn.init.zeros_(self.ref_index_embedding.weight)
        self.camera_embedding = None
        if ws.has_memory and cn.main_camera_embedding:
            self.camera_embedding = nn.Sequential(
                nn.Linear(cn.camera_embedding_dim, inner // 2), nn.SiLU(),
                nn.Linear(inner // 2, inner), nn.SiLU(),
                nn.Linear(inner, inner),
            )
            nn.init.zeros_(self.camera_embedding[4].weight)
            nn.init.zeros_(self.camera_embedding[4].bias)
        self.memory_branch = None
        if ws.has_memory and ws.memory_mode == "branch":
            self.memory_branch = MemoryBranch(ws.memory_cfg, cfg.in_channels, cfg.patch_size, inner, inner,
                                              cfg.rope_max_seq_len)

    @classmethod
    def from_checkpoint_config(cls, ws_config: WorldStereoConfig,
                               base_config: dict[str, Any]) -> "WorldStereoTransformer":
        """A fresh model from a checkpoint config and the base model's `transformer/config.json` dict."""
        return cls(**backbone_init_kwargs(base_config), worldstereo=ws_config.to_dict())

    # ------------------------------------------------------------------ small helpers
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_channels, F, h, w] → backbone patch tokens [B, F·h'·w', D]."""
        return self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()

    def camera_code_offsets(self, codes: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        """Per-frame camera codes [B, F, camera_embedding_dim] → token offsets [B, F·tokens_per_frame, D]."""
        emb = self.camera_embedding(codes.to(self.camera_embedding[0].weight.dtype))
        b, f, d = emb.shape
        return emb.unsqueeze(2).expand(b, f, tokens_per_frame, d).reshape(b, -1, d)

    def timestep_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """temb [B, D] as the condition embedder makes it, without the text and image parts."""
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep).to(next(iter(ce.time_embedder.parameters())).dtype)
        return ce.time_embedder(t).to(dtype)

    def _grid(self, shape) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        return shape[2] // pt, shape[3] // ph, shape[4] // pw

    def _reference_input(self, reference_latent: torch.Tensor) -> torch.Tensor:
        """16-channel clean reference latents → the official 36-channel layout [latent, ones(4), latent]; 36-channel
        inputs are used as given."""
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

    # ------------------------------------------------------------------ forward steps
    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              encoder_hidden_states_image: Optional[torch.Tensor] = None,
              camera_qt: Optional[torch.Tensor] = None) -> Embedded:
        """Patch tokens, rotary tables, timestep and text/image embeddings; camera codes add a per-frame offset to
        the target tokens (memory variants with `main_camera_embedding`; ignored otherwise)."""
        b = hidden_states.shape[0]
        x = self.patch_tokens(hidden_states)
        rotary = self.rope(hidden_states)
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0 or (timestep.numel() == 1 and b > 1):
            timestep = timestep.reshape(1).expand(b)
        temb, timestep_proj, context, context_img = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image)
        if context_img is not None:
            context = torch.cat([context_img, context], dim=1)
        if self.camera_embedding is not None and camera_qt is not None:
            _, hp, wp = self._grid(hidden_states.shape)
            x = x + self.camera_code_offsets(camera_qt, hp * wp).to(x.dtype)
        return Embedded(x, rotary, temb, timestep_proj.unflatten(1, (6, -1)), context)

    def encode_mask_and_rays(self, render_mask: torch.Tensor, camera_embedding: Optional[torch.Tensor],
                             num_frames: int) -> torch.Tensor:
        """The camera branch's mask tokens [B, F·h'·w', conv_out_dim], constant over a clip's denoising steps.

        ``render_mask`` [B, 1, F_pix, H, W] (1 = hole), ``camera_embedding`` [B, 6, F_pix, H, W] Plücker rays (d, o×d)
        at 8× the latent size; ``num_frames`` = F latent frames. Compute once per clip and pass the result to
        `forward` as ``mask_tokens`` (instead of render_mask/camera_embedding) at every step.
        """
        cn = self.ws_config.controlnet_cfg
        parts = [render_mask]
        if camera_embedding is not None and cn.add_channels > 1:  # a 1-channel checkpoint has no weights for rays
            parts.append(camera_embedding.to(render_mask.dtype))
        x = torch.cat(parts, dim=1)
        if x.shape[1] != cn.add_channels:
            raise InputError(f"render_mask + camera_embedding give {x.shape[1]} channels; this checkpoint expects "
                             f"{cn.add_channels} (1 mask channel + 6 Plücker channels when 7).")
        embedding = self.controlnet.controlnet_mask_embedding
        _check_mask_frames(x, num_frames, embedding.video_frames(num_frames), cn.mask_downsample)
        return embedding(x.to(embedding.mask_proj[0].weight.dtype))

    def camera_branch(self, hidden_states: torch.Tensor, render_latent: torch.Tensor, temb: torch.Tensor,
                      mask_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Residuals [B, F·h'·w', D] of the camera/GGM branch, one per branch block: its input is the first 20
        channels of the backbone input (noisy latent + mask) with the render latent, plus the mask tokens."""
        keep = LATENT_CHANNELS + MASK_CHANNELS
        control_input = torch.cat([hidden_states[:, :keep], render_latent.to(hidden_states.dtype)], dim=1)
        return self.controlnet(control_input, mask_tokens, temb)

    def reference_tokens(self, reference_latent: torch.Tensor, ref_index: torch.Tensor,
                         camera_qt_ref: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, RotaryEmb]:
        """Stitched memory: reference latents [B, 16|36, R, h, w] → (tokens [B, R·h'·w', D], rotary at their places).

        Tokens: the backbone patch embedding of [latent, ones(4), latent], plus the camera-code offset of
        ``camera_qt_ref`` [B, R, code] when the checkpoint has `camera_embedding`. Rotary: the right half of a
        2W-wide canvas at frame ``ref_index + 1`` ([R] or [B, R]: 0-based target frame after the input frame).
        """
        _, hp, wp = self._grid(reference_latent.shape)
        tokens = self.patch_tokens(self._reference_input(reference_latent))
        if self.camera_embedding is not None and camera_qt_ref is not None:
            tokens = tokens + self.camera_code_offsets(camera_qt_ref, hp * wp).to(tokens.dtype)
        return tokens, self.rope.at(*token_positions(ref_index + 1, hp, wp, w_offset=wp))

    def memory_branch_residuals(self, hidden_states: torch.Tensor, reference_latent: torch.Tensor,
                                ref_index: torch.Tensor, temb: torch.Tensor,
                                pointmap_latent: Optional[torch.Tensor] = None,
                                ref_pointmap_latent: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Paper SSM: residuals [B, F·h'·w', D] (zero on frames no reference serves), one per memory block.

        ``ref_index`` [B, R]: reference r serves target frame ref_index+1. ``pointmap_latent`` covers all F target
        frames; ``ref_pointmap_latent`` the R references.
        """
        b = hidden_states.shape[0]
        fp, hp, wp = self._grid(hidden_states.shape)
        frames = ref_index + 1

        def pick(x):
            idx = frames.view(b, 1, -1, 1, 1).expand(x.shape[0], x.shape[1], -1, x.shape[3], x.shape[4])
            return torch.gather(x, 2, idx)

        target_pm = pick(pointmap_latent) if pointmap_latent is not None else None
        res = self.memory_branch(pick(hidden_states), self._reference_input(reference_latent).to(hidden_states.dtype),
                                 temb, target_pm, ref_pointmap_latent)
        idx = frames.view(b, -1, 1, 1).expand(-1, -1, hp * wp, self.inner_dim)
        return [r.new_zeros(b, fp, hp * wp, self.inner_dim).scatter_add(1, idx, r).flatten(1, 2) for r in res]

    def run_blocks(self, embedded: Embedded, residuals: list[torch.Tensor],
                   refs: Optional[tuple[torch.Tensor, RotaryEmb]] = None) -> torch.Tensor:
        """The backbone blocks. Branch residual i is added to the target tokens after block i. With ``refs``
        (stitched memory: tokens and rotary from `reference_tokens`) every block is a `memory_block`, fed the
        original reference tokens again unless `controlnet_cfg.update_ref` carries them from block to block."""
        context, proj = embedded.context, embedded.timestep_proj
        x, cos, sin = self.target_shards(embedded.tokens, *embedded.rotary)
        target_rotary = (cos, sin)
        if refs is None:
            for i, block in enumerate(self.blocks):
                x = block(x, context, proj, target_rotary)
                if i < len(residuals):
                    x = x + residuals[i].to(x.dtype)
            return x
        ref_in, ref_cos, ref_sin = self.reference_shards(refs[0], *refs[1])
        ref_in = ref_in.to(x.dtype)
        if ref_in.shape[0] != x.shape[0]:
            ref_in = ref_in.expand(x.shape[0], -1, -1)
        rotary = tuple(torch.cat([r.to(t.dtype), t.expand(r.shape[0], -1, -1, -1)], dim=1)
                       for r, t in zip((ref_cos, ref_sin), target_rotary))
        carry = self.ws_config.controlnet_cfg.update_ref
        ref = ref_in
        for i, block in enumerate(self.blocks):
            x, ref_out = memory_block(block, x, ref, context, proj, rotary)
            ref = ref_out if carry else ref_in
            if i < len(residuals):
                x = x + residuals[i].to(x.dtype)
        return x

    def head(self, x: torch.Tensor, temb: torch.Tensor, latent_shape) -> torch.Tensor:
        """Output norm, projection and unpatchify: target tokens [B, N, D] → velocity [B, out, F, h, w]."""
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        fp, hp, wp = self._grid(latent_shape)
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, fp, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # ------------------------------------------------------------------ forward
    def forward(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: Optional[torch.Tensor] = None,
                render_latent: Optional[torch.Tensor] = None, render_mask: Optional[torch.Tensor] = None,
                camera_embedding: Optional[torch.Tensor] = None, extrinsics: Optional[torch.Tensor] = None,
                intrinsics: Optional[torch.Tensor] = None, reference_latent: Optional[torch.Tensor] = None,
                ref_index: Optional[torch.Tensor] = None, camera_qt: Optional[torch.Tensor] = None,
                camera_qt_ref: Optional[torch.Tensor] = None, pointmap_latent: Optional[torch.Tensor] = None,
                ref_pointmap_latent: Optional[torch.Tensor] = None, mask_tokens: Optional[torch.Tensor] = None,
                return_dict: bool = False):
        """Predict the flow-matching velocity of the target latents.

        Shapes (B batch, F latent frames, h×w latent size = H/8×W/8, R references, F_pix pixel-rate frames); the
        names are listed once in `engine.runtime.spec.FORWARD_INPUTS`:

        - hidden_states [B, 36, F, h, w]: Wan I2V input = noisy latent (16) + first-frame mask (4) + condition
          latent (16).
        - timestep [B] (or a scalar): diffusion time in [0, 1000].
        - encoder_hidden_states [B, L, text_dim]: UMT5 text embeddings (L = 512 for the real model).
        - encoder_hidden_states_image [B, 257, image_dim]: CLIP image tokens of the input image (optional).
        - render_latent [B, 16, F, h, w]: VAE latent of the 3D-cache render video along the target cameras.
          Without it (and render_mask) the camera branch is skipped and the backbone runs alone.
        - render_mask [B, 1, F_pix, H, W]: 1 where the cache render has a HOLE (nothing landed), 0 where it covers
          the pixel (the official polarity); pixel resolution, F_pix = F (one per keyframe, the released configs'
          mask_downsample 1), or (F-1)·mask_downsample+1 video frames for a config with mask_downsample > 1.
        - camera_embedding [B, 6, F_pix, H, W]: Plücker rays per pixel and frame, channels (d, o×d) — direction
          first, as the official `embed_rays`; same frames and size as render_mask; read when
          controlnet_cfg.add_channels is 7.
        - extrinsics / intrinsics: accepted for the official signature; the official branch blocks receive them and
          ignore them, and so does this model.
        - reference_latent [B, 16 or 36, R, h, w]: clean VAE latents of the retrieved memory views (None: no memory).
          The camera variant refuses them (it was never trained with references; the caller should not retrieve).
        - ref_index [R] or [B, R] long: 0-based index of the target frame each reference serves, not counting the
          input frame (reference r goes with latent frame ref_index+1). Default 0..R-1.
        - camera_qt [B, F, camera_embedding_dim] and camera_qt_ref [B, R, camera_embedding_dim]: per-frame camera codes
          (quaternion + translation) for `camera_embedding` (memory checkpoints with main_camera_embedding);
          omitted → no offset. The camera variant has no such module and ignores them.
        - pointmap_latent [B, 16, F, h, w], ref_pointmap_latent [B, 16, R, h, w]: VAE latents of colour-coded world
          pointmaps of targets and references; used by the paper's branch form only (the released stitched form has
          no weights that read them).
        - mask_tokens [B or 1, F·h'·w', conv_out_dim]: `encode_mask_and_rays(render_mask, camera_embedding, F)`,
          computed once per clip; given, render_mask and camera_embedding are not read.

        Returns the velocity tensor [B, 16, F, h, w] itself (not diffusers' 1-tuple; with return_dict=True a
        `Transformer2DModelOutput` whose `.sample` is that tensor).
        """
        if reference_latent is not None and not self.ws_config.has_memory:
            raise InputError(f"the {self.ws_config.variant or 'camera'} variant was not trained with references; "
                             "pass no reference_latent (use a memory variant for the spatial-stereo memory).")
        b, _, f = hidden_states.shape[:3]
        embedded = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, camera_qt)

        residuals: list[torch.Tensor] = []
        if render_latent is not None or render_mask is not None or mask_tokens is not None:
            if render_latent is None or (render_mask is None and mask_tokens is None):
                raise InputError("the camera branch needs render_latent and render_mask (or its mask_tokens); "
                                 "pass both or neither.")
            if mask_tokens is None:
                mask_tokens = self.encode_mask_and_rays(render_mask, camera_embedding, f)
            residuals = self.camera_branch(hidden_states, render_latent, embedded.temb, mask_tokens)

        refs = None
        if reference_latent is not None:
            fp, hp, wp = self._grid(hidden_states.shape)
            if self.config.patch_size[0] != 1:
                raise InputError("references need a temporal patch size of 1.")
            if tuple(reference_latent.shape[-2:]) != tuple(hidden_states.shape[-2:]):
                raise InputError(f"reference_latent is {tuple(reference_latent.shape[-2:])} but the target latents are "
                                 f"{tuple(hidden_states.shape[-2:])}; resize the references to the target size.")
            idx = self._ref_index(ref_index, b, reference_latent.shape[2], hidden_states.device)
            if not _tracing() and (int(idx.min()) < 0 or int(idx.max()) + 1 >= fp):
                raise InputError(f"ref_index must lie in 0..{fp - 2} (target frames after the input frame).")
            if self.memory_branch is not None:
                mem = self.memory_branch_residuals(hidden_states, reference_latent, idx, embedded.temb,
                                                   pointmap_latent, ref_pointmap_latent)
                n = max(len(residuals), len(mem))
                residuals = [(residuals[i] if i < len(residuals) else 0) + (mem[i] if i < len(mem) else 0)
                             for i in range(n)]
            else:
                refs = self.reference_tokens(reference_latent, idx, camera_qt_ref)

        out = self.head(self.run_blocks(embedded, residuals, refs), embedded.temb, hidden_states.shape)
        if return_dict:
            return Transformer2DModelOutput(sample=out)
        return out

    # ------------------------------------------------------------------ state-dict groups
    BRANCH_PREFIXES = ("controlnet.", "ref_index_embedding.", "camera_embedding.", "memory_branch.")

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The keys a plain `WanTransformer3DModel` has (for comparisons and for exporting the backbone alone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.BRANCH_PREFIXES)}
