"""Analytic FLOP count of one WorldStereo transformer forward (multiply-add = 2 FLOPs).

Backbone block (width d, FFN width f, L query tokens of which the self-attention sees all L, text tokens T,
CLIP image tokens I):
    self-attention projections q,k,v,o      8·L·d²
    self-attention scores + weighted sum    4·L²·d
    cross-attention q,o                     4·L·d²
    cross-attention k,v (text + image)      4·(T+I)·d²
    cross-attention scores + sum            4·L·(T+I)·d
    FFN                                     4·L·d·f
Camera branch block (width b, FFN g, target tokens Lt, no cross-attention): 8·Lt·b² + 4·Lt²·b + 4·Lt·b·g,
plus proj_in (2·Lt·D·b) and one proj_out per block (2·Lt·b·D) into the backbone width D.
Patch embeddings, norms, modulation and the head are below 0.1% and left out.
With R stitched references every backbone block attends over L = Lt + R·(tokens per frame).
Check (the backbone alone, from the formulas above): Wan2.1-14B (40 blocks, d = 5120, f = 13824, T + I = 512 + 257)
at 21 keyframes of 480 x 768 has 21 x (480/16) x (768/16) = 30240 target tokens -> 1.49 PFLOP per forward, of which
0.75 PFLOP is the 4·L²·d attention term; 8 references add 8 x 1440 tokens (L = 41760) -> 2.46 PFLOP. At 800 TFLOP/s
that is about 1.9 s and 3.1 s per forward.
"""
from __future__ import annotations

from engine.constants import IMAGE_TOKENS, PATCH_SIZE, TEXT_TOKENS, VAE_SCALE


def tokens_per_frame(height: int, width: int, vae_scale: int = VAE_SCALE,
                     patch: tuple[int, int] = (PATCH_SIZE, PATCH_SIZE)) -> int:
    return (height // vae_scale // patch[0]) * (width // vae_scale // patch[1])


def backbone_flops(layers: int, dim: int, ffn: int, tokens: int, text_tokens: int = TEXT_TOKENS,
                   image_tokens: int = IMAGE_TOKENS) -> float:
    ctx = text_tokens + image_tokens
    per_block = (8 * tokens * dim**2 + 4 * tokens**2 * dim + 4 * tokens * dim**2 + 4 * ctx * dim**2
                 + 4 * tokens * ctx * dim + 4 * tokens * dim * ffn)
    return float(layers * per_block)


def branch_flops(layers: int, dim: int, ffn: int, tokens: int, out_dim: int) -> float:
    if layers == 0:
        return 0.0
    per_block = 8 * tokens * dim**2 + 4 * tokens**2 * dim + 4 * tokens * dim * ffn + 2 * tokens * dim * out_dim
    return float(layers * per_block + 2 * tokens * out_dim * dim)


def worldstereo_flops(base: dict, controlnet: dict, frames: int, height: int, width: int, refs: int = 0,
                      text_tokens: int = TEXT_TOKENS, image_tokens: int = IMAGE_TOKENS) -> dict:
    """FLOPs of one forward (batch 1) split into backbone and camera branch."""
    d = base["num_attention_heads"] * base["attention_head_dim"]
    per_frame = tokens_per_frame(height, width, patch=tuple(base["patch_size"][1:]))
    target = frames * per_frame
    total_tokens = target + refs * per_frame
    bb = backbone_flops(base["num_layers"], d, base["ffn_dim"], total_tokens, text_tokens, image_tokens)
    br = branch_flops(controlnet.get("num_layers", 0), controlnet.get("dim", d), controlnet.get("ffn_dim", 0), target, d)
    return {"tokens": total_tokens, "backbone": bb, "branch": br, "total": bb + br}
