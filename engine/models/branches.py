"""The two ControlNet branches of WorldStereo and the pieces they share.

Attention inside the branches is diffusers' `WanAttention` (same to_q/to_k/to_v/to_out/norm_q/norm_k names as the
official checkpoints), so `model.set_attn_processor(...)` swaps the processor of the branches together with the
backbone's, and the q/k `RMSNorm` modules can be replaced by name (an ONNX export mode does both).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from .config import ControlNetConfig, MemoryBranchConfig

RotaryEmb = tuple[torch.Tensor, torch.Tensor]


def rotary_at(rope: WanRotaryPosEmbed, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> RotaryEmb:
    """Wan 3D rotary (cos, sin) for arbitrary integer token positions.

    ``t``, ``h``, ``w``: [N] or [B, N] positions. Returns tensors [1 or B, N, 1, head_dim], the layout
    `WanAttnProcessor` broadcasts against [B, N, heads, head_dim]. Indexes the module's own frequency tables, so
    a grid of positions gives exactly what ``rope(hidden_states)`` gives.
    """
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        ft, fh, fw = table.split(sizes, dim=1)
        emb = torch.cat([ft[t], fh[h], fw[w]], dim=-1)
        if emb.ndim == 2:
            emb = emb.unsqueeze(0)
        out.append(emb.unsqueeze(2))
    return out[0], out[1]


def grid_positions(frames: Sequence[int] | torch.Tensor, height: int, width: int, w_offset: int = 0,
                   device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token positions (t, h, w), frame-major then row-major as `flatten(2)` orders Conv3d patches.

    ``frames``: [F] or [B, F] time indices, one per frame. Columns start at ``w_offset`` (the right half of a
    2W canvas uses w_offset=W). Returns three [N] or [B, N] long tensors, N = F*height*width.
    """
    frames = torch.as_tensor(frames, dtype=torch.long, device=device)
    hh = torch.arange(height, device=frames.device)
    ww = torch.arange(width, device=frames.device) + w_offset
    per = height * width
    t = frames.unsqueeze(-1).expand(*frames.shape, per).flatten(-2)
    h = hh.view(height, 1).expand(height, width).flatten().repeat(frames.shape[-1])
    w = ww.view(1, width).expand(height, width).flatten().repeat(frames.shape[-1])
    if frames.ndim == 2:
        h = h.unsqueeze(0).expand_as(t)
        w = w.unsqueeze(0).expand_as(t)
    return t, h, w


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by the timestep embedding: returns (norm(x)·(1+scale)+shift, gate).

    The official keys are `linear` (cond→3·dim) and an affine `norm`. The linear starts at zero (adaLN-zero), so a
    fresh block is the identity. SiLU before the linear follows Wan's own time projection (an assumption: the
    activation has no weights to confirm it).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mod = self.linear(F.silu(temb.to(self.linear.weight.dtype))).float()
        shift, scale, gate = mod.unsqueeze(1).chunk(3, dim=-1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), self.norm.weight.float(), self.norm.bias.float(),
                              self.norm.eps)
        return (normed * (1 + scale) + shift).type_as(x), gate


class ControlNetBlock(nn.Module):
    """adaLN-zero self-attention + GELU(tanh) FFN block of width ``dim``, no cross-attention (none in the checkpoint)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, cond_dim, eps)
        self.self_attn = WanAttention(dim=dim, heads=num_heads, dim_head=dim // num_heads, eps=eps,
                                      processor=WanAttnProcessor())
        self.norm2 = AdaLayerNormZero(dim, cond_dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rotary_emb: Optional[RotaryEmb],
                extrinsics: Optional[torch.Tensor] = None, intrinsics: Optional[torch.Tensor] = None) -> torch.Tensor:
        # The official blocks receive the (normalised) extrinsics and intrinsics, but no parameter of the checkpoint
        # could consume them and the Plücker rays already carry the cameras into the branch; the most plausible
        # reading is that they are passed through unused, so they are accepted here and not used.
        h, gate = self.norm1(x, temb)
        x = (x.float() + gate * self.self_attn(h, None, None, rotary_emb).float()).type_as(x)
        h, gate = self.norm2(x, temb)
        x = (x.float() + gate * self.ffn(h).float()).type_as(x)
        return x


class MaskEmbedding(nn.Module):
    """cat[render mask, Plücker rays] at pixel resolution → tokens of width ``out_dim`` on the patch grid."""

    def __init__(self, in_channels: int, mid_channels: int, out_dim: int, downsample: int, patch_size: Sequence[int]):
        super().__init__()
        self.downsample = downsample
        k = (downsample, 8, 8)
        self.mask_proj = nn.Sequential(
            nn.Conv3d(in_channels, mid_channels, kernel_size=k, stride=k),
            nn.GroupNorm(mid_channels // 8, mid_channels),
            nn.SiLU(),
        )
        self.mask_zero_proj = nn.Conv3d(mid_channels, out_dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))
        nn.init.zeros_(self.mask_zero_proj.weight)
        nn.init.zeros_(self.mask_zero_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, F_pix, H, W] with F_pix = (F-1)·downsample + 1 → [B, F·h'·w', out_dim]."""
        if self.downsample > 1:
            # Front zero-padding makes the first (input) frame its own latent frame, as Wan's VAE treats it.
            x = F.pad(x, (0, 0, 0, 0, self.downsample - 1, 0))
        x = self.mask_zero_proj(self.mask_proj(x))
        return x.flatten(2).transpose(1, 2)


class CameraControlNet(nn.Module):
    """The camera / GGM branch (`controlnet.*`): render latent + mask + rays → per-block residuals."""

    def __init__(self, cfg: ControlNetConfig, in_channels: int, patch_size: Sequence[int], out_dim: int,
                 rope_max_seq_len: int, eps: float = 1e-6):
        super().__init__()
        self.cfg = cfg
        self.controlnet_blocks = nn.ModuleList(
            [ControlNetBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.time_embed_dim, eps) for _ in range(cfg.num_layers)]
        )
        # Output width is the backbone's inner dim (5120 for the 14B checkpoints), not a constant.
        self.proj_out = nn.ModuleList([nn.Linear(cfg.dim, out_dim) for _ in range(cfg.num_layers)])
        for lin in self.proj_out:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.controlnet_patch_embedding = nn.Conv3d(in_channels, cfg.conv_out_dim, kernel_size=tuple(patch_size),
                                                    stride=tuple(patch_size))
        self.controlnet_mask_embedding = MaskEmbedding(cfg.add_channels, cfg.mid_channels, cfg.conv_out_dim,
                                                       cfg.mask_downsample, patch_size)
        self.proj_in = nn.Identity() if cfg.conv_out_dim == cfg.dim else nn.Linear(cfg.conv_out_dim, cfg.dim)
        self.rope = WanRotaryPosEmbed(cfg.dim // cfg.num_heads, tuple(patch_size), rope_max_seq_len)

    def forward(self, control_input: torch.Tensor, mask_and_rays: torch.Tensor, temb: torch.Tensor,
                extrinsics: Optional[torch.Tensor] = None, intrinsics: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """control_input [B, in_channels, F, h, w]; mask_and_rays [B, add_channels, F_pix, H, W]; temb [B, cond].

        Returns one residual [B, F·h'·w', out_dim] per branch block, to be added after backbone block i.
        """
        x = self.controlnet_patch_embedding(control_input).flatten(2).transpose(1, 2)
        m = self.controlnet_mask_embedding(mask_and_rays.to(x.dtype))
        if m.shape[1] != x.shape[1]:
            raise ValueError(f"the render mask gives {m.shape[1]} tokens but the latents give {x.shape[1]}; "
                             "pass render_mask/camera_embedding at 8x the latent size with (F-1)*mask_downsample+1 frames.")
        x = self.proj_in(x + m)
        rotary = self.rope(control_input)
        out = []
        for block, proj in zip(self.controlnet_blocks, self.proj_out):
            x = block(x, temb, rotary, extrinsics, intrinsics)
            out.append(proj(x))
        return out


class MemoryBranch(nn.Module):
    """The paper's SSM ControlNet (`memory_branch.*`, our names: no released checkpoint has this form).

    Each target frame is stitched with its reference along width ([target | reference]); pointmap latents of both
    halves are added through a zero-initialised patch embedding; attention runs inside each pair only; the target
    half of every block's output goes through a zero-initialised projection back to the backbone width.
    """

    def __init__(self, cfg: MemoryBranchConfig, in_channels: int, patch_size: Sequence[int], cond_dim: int,
                 out_dim: int, rope_max_seq_len: int, eps: float = 1e-6):
        super().__init__()
        self.cfg = cfg
        ps = tuple(patch_size)
        self.patch_embedding = nn.Conv3d(in_channels, cfg.dim, kernel_size=ps, stride=ps)
        self.pointmap_embedding = nn.Conv3d(cfg.pointmap_channels, cfg.dim, kernel_size=ps, stride=ps)
        nn.init.zeros_(self.pointmap_embedding.weight)
        nn.init.zeros_(self.pointmap_embedding.bias)
        self.blocks = nn.ModuleList(
            [ControlNetBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cond_dim, eps) for _ in range(cfg.num_layers)]
        )
        self.proj_out = nn.ModuleList([nn.Linear(cfg.dim, out_dim) for _ in range(cfg.num_layers)])
        for lin in self.proj_out:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.rope = WanRotaryPosEmbed(cfg.dim // cfg.num_heads, ps, rope_max_seq_len)
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
        t, hh, ww = grid_positions([0], hp, wp2, device=x.device)
        # A shared time index is exact here: inside one pair only position differences matter to RoPE.
        rotary = rotary_at(self.rope, t, hh, ww)
        temb_pairs = temb.repeat_interleave(r, dim=0)
        wp = wp2 // 2
        out = []
        for block, proj in zip(self.blocks, self.proj_out):
            x = block(x, temb_pairs, rotary)
            target_half = x.view(b * r, hp, wp2, d)[:, :, :wp].reshape(b, r, hp * wp, d)
            out.append(proj(target_half))
        return out
