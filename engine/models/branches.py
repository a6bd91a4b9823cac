"""The two ControlNet branches of WorldStereo and the pieces they share, the rotary helper among them.

Attention inside the branches is diffusers' `WanAttention` (same to_q/to_k/to_v/to_out/norm_q/norm_k names as the
official checkpoints), so `model.set_attn_processor(...)` swaps the processor of the branches together with the
backbone's, and the q/k `RMSNorm` modules can be replaced by name (an ONNX export mode does both). Every rotary
table — backbone, branches, reference positions — is read through `WorldStereoRope` at `token_positions`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from .config import ControlNetConfig, MemoryBranchConfig

RotaryEmb = tuple[torch.Tensor, torch.Tensor]


def token_positions(frames: torch.Tensor, height: int, width: int,
                    w_offset=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, h, w) positions of patch tokens, frame-major then row-major as ``flatten(2)`` orders Conv3d patches.

    ``frames``: [F] or [B, F] long tensor of time indices, one per frame. Columns start at ``w_offset`` (the right
    half of a 2W canvas uses w_offset=W). Returns three [N] or [B, N] long tensors, N = F·height·width. Built from
    tensor ops only, so sizes taken from traced shapes stay dynamic in an exported graph.
    """
    lead = frames.shape[:-1]
    grid = (*frames.shape, height, width)
    t = frames.unsqueeze(-1).unsqueeze(-1).expand(grid)
    h = torch.arange(height, device=frames.device).view(height, 1).expand(grid)
    w = (torch.arange(width, device=frames.device) + w_offset).view(1, width).expand(grid)
    return t.reshape(*lead, -1), h.reshape(*lead, -1), w.reshape(*lead, -1)


class TokenShards(nn.Module):
    """A point where sequence-parallel inference splits a token sequence and its rotary tables along the tokens.

    In one process it hands its inputs back unchanged. `WorldStereoTransformer._cp_plan` names every instance, and
    under diffusers' context parallelism a hook there keeps each rank's contiguous share of the tokens (and of the
    matching rotary rows), so whatever follows — blocks, branch residuals — works on that share.
    """

    def forward(self, tokens: torch.Tensor, rotary_cos: torch.Tensor,
                rotary_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tokens, rotary_cos, rotary_sin


class WorldStereoRope(WanRotaryPosEmbed):
    """diffusers' Wan 3D rotary tables, readable at arbitrary integer token positions.

    `at` gathers (cos, sin) for given positions; `forward` gathers them for the patch grid of its input, which is
    exactly what the parent's slicing returns (tested), but stays shape-generic under tracing. ``table_dtype``:
    None reads the float64 tables as diffusers does; the export mode sets float32 (TensorRT has no float64).
    """

    table_dtype: Optional[torch.dtype] = None

    def at(self, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> RotaryEmb:
        """``t``, ``h``, ``w``: [N] or [B, N] → (cos, sin) [1 or B, N, 1, head_dim], the layout the Wan attention
        processor broadcasts against [B, N, heads, head_dim]."""
        sizes = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            if self.table_dtype is not None:
                table = table.to(self.table_dtype)
            ft, fh, fw = table.split(sizes, dim=1)
            emb = torch.cat([ft[t], fh[h], fw[w]], dim=-1)
            out.append((emb if emb.ndim == 3 else emb.unsqueeze(0)).unsqueeze(2))
        return out[0], out[1]

    def forward(self, hidden_states: torch.Tensor) -> RotaryEmb:
        pt, ph, pw = self.patch_size
        frames = torch.arange(hidden_states.shape[2] // pt, device=hidden_states.device)
        return self.at(*token_positions(frames, hidden_states.shape[3] // ph, hidden_states.shape[4] // pw))


# The official branch blocks (SingleAttentionBlock): LayerNorm eps 1e-5 in the modulation, RMSNorm eps 1e-6 on q/k,
# whatever the backbone's eps.
BRANCH_LAYER_NORM_EPS = 1e-5
BRANCH_QK_NORM_EPS = 1e-6


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the timestep embedding: returns (norm(x)·(1+scale)+shift, gate).

    Official keys `linear` (cond→3·dim, applied to SiLU(temb)) and an affine `norm` (eps 1e-5). The official branch
    runs under autocast in the model dtype, where LayerNorm computes in float32; here the norm and the modulation
    are float32 whatever the weights' dtype, and the result is cast back to the input's dtype.
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 3 * dim)
        self.norm = FP32LayerNorm(dim, eps=BRANCH_LAYER_NORM_EPS, elementwise_affine=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mod = self.linear(F.silu(temb.to(self.linear.weight.dtype))).float()
        shift, scale, gate = mod.unsqueeze(1).chunk(3, dim=-1)
        return (self.norm(x.float()) * (1 + scale) + shift).to(x.dtype), gate


class ControlNetBlock(nn.Module):
    """The official branch block (SingleAttentionBlock): adaLN self-attention + GELU(tanh) FFN of width ``dim``, no
    cross-attention. Residual sums are formed in float32 and rounded once to the stream's dtype (the official,
    under autocast, rounds the gated term first: the same value up to one rounding)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cond_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, cond_dim)
        self.self_attn = WanAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=BRANCH_QK_NORM_EPS,
                                      processor=WanAttnProcessor())
        self.norm2 = AdaLayerNormZero(dim, cond_dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rotary_emb: Optional[RotaryEmb]) -> torch.Tensor:
        # The official blocks also receive normalised extrinsics/intrinsics and patch counts, which their attention
        # processor accepts and ignores (no parameter could read them); so they are not passed here.
        h, gate = self.norm1(x, temb)
        x = (x.float() + gate * self.self_attn(h, None, None, rotary_emb).float()).to(x.dtype)
        h, gate = self.norm2(x, temb)
        return (x.float() + gate * self.ffn(h).float()).to(x.dtype)


def _zero_linears(n: int, in_dim: int, out_dim: int) -> nn.ModuleList:
    layers = nn.ModuleList([nn.Linear(in_dim, out_dim) for _ in range(n)])
    for lin in layers:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return layers


# The official mask embedding pads a fixed 3 frames in front (and 3 behind with `interp`, whose clips have known
# first and last frames) before its temporal stride, whatever mask_downsample is (> 1).
MASK_TIME_PADDING = 3


class MaskEmbedding(nn.Module):
    """cat[render mask, Plücker rays] at pixel resolution → tokens of width ``out_dim`` on the patch grid."""

    def __init__(self, in_channels: int, mid_channels: int, out_dim: int, downsample: int, patch_size: Sequence[int],
                 interp: bool = False):
        super().__init__()
        self.downsample = downsample
        self.time_padding = (MASK_TIME_PADDING, MASK_TIME_PADDING if interp else 0) if downsample > 1 else (0, 0)
        k = (downsample, 8, 8)
        self.mask_proj = nn.Sequential(
            nn.Conv3d(in_channels, mid_channels, kernel_size=k, stride=k),
            nn.GroupNorm(mid_channels // 8, mid_channels),
            nn.SiLU(),
        )
        self.mask_zero_proj = nn.Conv3d(mid_channels, out_dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))
        nn.init.zeros_(self.mask_zero_proj.weight)
        nn.init.zeros_(self.mask_zero_proj.bias)

    def video_frames(self, latent_frames: int) -> int:
        """How many pixel frames give ``latent_frames`` latent frames after padding and the temporal stride."""
        return latent_frames * self.downsample - sum(self.time_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, F_pix, H, W] with F_pix = `video_frames(F)` → [B, F·h'·w', out_dim]."""
        if any(self.time_padding):
            x = F.pad(x, (0, 0, 0, 0, *self.time_padding))
        x = self.mask_zero_proj(self.mask_proj(x))
        return x.flatten(2).transpose(1, 2)


class CameraControlNet(nn.Module):
    """The camera / GGM branch (`controlnet.*`): render latent + mask tokens → per-block residuals."""

    def __init__(self, cfg: ControlNetConfig, in_channels: int, patch_size: Sequence[int], out_dim: int,
                 rope_max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.controlnet_blocks = nn.ModuleList(
            [ControlNetBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.time_embed_dim) for _ in range(cfg.num_layers)]
        )
        # Output width is the backbone's inner dim (5120 for the 14B checkpoints), not a constant.
        self.proj_out = _zero_linears(cfg.num_layers, cfg.dim, out_dim)
        self.controlnet_patch_embedding = nn.Conv3d(in_channels, cfg.conv_out_dim, kernel_size=tuple(patch_size),
                                                    stride=tuple(patch_size))
        self.controlnet_mask_embedding = MaskEmbedding(cfg.add_channels, cfg.mid_channels, cfg.conv_out_dim,
                                                       cfg.mask_downsample, patch_size, cfg.interp)
        self.proj_in = nn.Identity() if cfg.conv_out_dim == cfg.dim else nn.Linear(cfg.conv_out_dim, cfg.dim)
        self.rope = WorldStereoRope(cfg.dim // cfg.num_heads, tuple(patch_size), rope_max_seq_len)
        self.shards = TokenShards()  # sequence parallelism: the branch runs on each rank's share of the tokens

    def forward(self, control_input: torch.Tensor, mask_tokens: torch.Tensor, temb: torch.Tensor) -> list[torch.Tensor]:
        """control_input [B, in_channels, F, h, w]; mask_tokens [B or 1, F·h'·w', conv_out_dim] (the output of
        ``controlnet_mask_embedding``); temb [B, cond]. Returns one residual [B, F·h'·w', out_dim] per branch block,
        to be added after backbone block i."""
        x = self.controlnet_patch_embedding(control_input).flatten(2).transpose(1, 2)
        if mask_tokens.shape[1] != x.shape[1]:
            raise ValueError(f"the render mask gives {mask_tokens.shape[1]} tokens but the latents give {x.shape[1]}; "
                             "pass render_mask/camera_embedding at 8x the latent size, frames as the model expects.")
        x = self.proj_in(x + mask_tokens.to(x.dtype))
        x, cos, sin = self.shards(x, *self.rope(control_input))
        rotary = (cos, sin)
        out = []
        for block, proj in zip(self.controlnet_blocks, self.proj_out):
            x = block(x, temb, rotary)
            out.append(proj(x))
        return out


class MemoryBranch(nn.Module):
    """The paper's SSM ControlNet (`memory_branch.*`, our names: no released checkpoint has this form).

    Each target frame is stitched with its reference along width ([target | reference]); pointmap latents of both
    halves are added through a zero-initialised patch embedding; attention runs inside each pair only; the target
    half of every block's output goes through a zero-initialised projection back to the backbone width.
    """

    def __init__(self, cfg: MemoryBranchConfig, in_channels: int, patch_size: Sequence[int], cond_dim: int,
                 out_dim: int, rope_max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        ps = tuple(patch_size)
        self.patch_embedding = nn.Conv3d(in_channels, cfg.dim, kernel_size=ps, stride=ps)
        self.pointmap_embedding = nn.Conv3d(cfg.pointmap_channels, cfg.dim, kernel_size=ps, stride=ps)
        nn.init.zeros_(self.pointmap_embedding.weight)
        nn.init.zeros_(self.pointmap_embedding.bias)
        self.blocks = nn.ModuleList(
            [ControlNetBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cond_dim) for _ in range(cfg.num_layers)]
        )
        self.proj_out = _zero_linears(cfg.num_layers, cfg.dim, out_dim)
        self.rope = WorldStereoRope(cfg.dim // cfg.num_heads, ps, rope_max_seq_len)
        self.patch_size = ps

    def forward(self, target: torch.Tensor, reference: torch.Tensor, temb: torch.Tensor,
                target_pointmap: Optional[torch.Tensor] = None,
                reference_pointmap: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """target, reference: [B, C, R, h, w] (pair r = target frame r beside reference r); pointmaps [B, 16, R, h, w].

        Returns per block a residual [B, R, h'·w', out_dim] for the target half of each pair.
        """
        if self.patch_size[0] != 1:
            raise ValueError("the memory branch pairs single latent frames; it needs a temporal patch size of 1.")
        canvas = torch.cat([target, reference], dim=-1)
        x = self.patch_embedding(canvas)  # [B, D, R, h', 2w']
        if target_pointmap is not None or reference_pointmap is not None:
            tp = target_pointmap if target_pointmap is not None else torch.zeros_like(reference_pointmap)
            rp = reference_pointmap if reference_pointmap is not None else torch.zeros_like(target_pointmap)
            x = x + self.pointmap_embedding(torch.cat([tp, rp], dim=-1).to(x.dtype))
        b, d, r, hp, wp2 = x.shape
        # One attention sequence per pair: fold the pairs into the batch.
        x = x.permute(0, 2, 3, 4, 1).reshape(b * r, hp * wp2, d)
        # A shared time index is exact here: inside one pair only position differences matter to RoPE.
        rotary = self.rope.at(*token_positions(torch.zeros(1, dtype=torch.long, device=x.device), hp, wp2))
        temb_pairs = temb.repeat_interleave(r, dim=0)
        wp = wp2 // 2
        out = []
        for block, proj in zip(self.blocks, self.proj_out):
            x = block(x, temb_pairs, rotary)
            target_half = x.view(b * r, hp, wp2, d)[:, :, :wp].reshape(b, r, hp * wp, d)
            out.append(proj(target_half))
        return out
