"""Export mode: the same WorldStereo function written in operators every ONNX consumer accepts.

Exporting the model as it is fails three ways (diffusers 0.42, torch 2.13, ONNX Runtime 1.31): no `aten::rms_norm`
in the TorchScript exporter, an unloadable Reshape from the dynamo exporter at opset 18 and a failing CPU `Attention`
kernel at opset 23.
Inside ``export_mode(model)``:

- every `WanAttention` (backbone and both branches) runs `PlainAttnProcessor`: softmax(q·kᵀ/√d)·v as two matmuls,
  rotary embedding as real multiply-adds on the even/odd channel pairs (no complex numbers, no strided writes);
- every `torch.nn.RMSNorm` becomes `DecomposedRMSNorm` (x·rsqrt(mean(x²)+eps)·w in float32), every LayerNorm a
  `DecomposedLayerNorm`, both sharing the original parameters;
- every `WorldStereoRope` reads its tables in float32 (diffusers keeps them in float64, which TensorRT cannot take;
  the model's rope already gathers them at positions built from the input's shape, so sizes stay dynamic).

The model keeps its dtype: a bfloat16 model gives bfloat16 graphs. On exit everything is put back. The functions
agree with the originals to float32 rounding (tested at 1e-5).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_wan import WanAttention

from engine.constants import TEXT_TOKENS  # diffusers' Wan processor splits image/text context at it; so do we
from engine.models.branches import WorldStereoRope


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, N, heads, d] by the angles whose cos/sin are given per channel.

    The tables repeat each angle for both channels of a pair (diffusers' `repeat_interleave_real`), so
    out = x·cos + swap(x)·sin with swap(x1, x2) = (−x2, x1) is the same rotation as diffusers' strided version.
    """
    xf = x.float()  # in float32 whatever the graph's dtype, as diffusers rotates against its float64 tables
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos.float() + swapped * sin.float()).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, Nq, H, d], k/v [B, Nk, H, d] → [B, Nq, H·d]; softmax in float32 like SDPA's math path."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    probs = torch.softmax(scores.float(), dim=-1).to(vh.dtype)
    return torch.matmul(probs, vh).transpose(1, 2).flatten(2)


class PlainAttnProcessor:
    """`WanAttnProcessor`'s computation (self-, text cross- and image cross-attention) in exportable operators."""

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("export mode has no attention masks (WorldStereo uses none).")
        image_context = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - TEXT_TOKENS
            image_context = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (heads, -1))
        v = attn.to_v(context).unflatten(2, (heads, -1))
        if rotary_emb is not None:
            cos, sin = rotary_emb
            q = _rotate(q, cos, sin)
            k = _rotate(k, cos, sin)
        out = _attend(q, k, v)
        if image_context is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (heads, -1))
            v_img = attn.add_v_proj(image_context).unflatten(2, (heads, -1))
            out = out + _attend(q, k_img, v_img)
        return attn.to_out[1](attn.to_out[0](out))


class DecomposedRMSNorm(nn.Module):
    """`torch.nn.RMSNorm` over the last dimension, as ReduceMean/Sqrt/Div (no `aten::rms_norm`)."""

    def __init__(self, original: nn.RMSNorm):
        super().__init__()
        self.weight = original.weight
        self.eps = original.eps if original.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last dimension in float32 (diffusers' FP32LayerNorm semantics), elementwise ops only."""

    def __init__(self, original: nn.LayerNorm):
        super().__init__()
        if len(original.normalized_shape) != 1:
            raise NotImplementedError("export mode decomposes LayerNorm over the last dimension only.")
        self.weight = original.weight
        self.bias = original.bias
        self.eps = original.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        centred = xf - mean
        y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def _replace(root: nn.Module, predicate, make) -> list[tuple[nn.Module, str, nn.Module]]:
    swapped = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if predicate(child):
                setattr(parent, name, make(child))
                swapped.append((parent, name, child))
    return swapped


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Swap attention processors and norms of ``model`` for exportable ones and read rotary tables in float32;
    restore everything on exit."""
    attn_modules = [m for m in model.modules() if isinstance(m, WanAttention)]
    saved_processors = [m.processor for m in attn_modules]
    ropes = [m for m in model.modules() if isinstance(m, WorldStereoRope)]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for m in attn_modules:
            m.set_processor(PlainAttnProcessor())
        for rope in ropes:
            rope.table_dtype = torch.float32
        swapped += _replace(model, lambda c: isinstance(c, nn.RMSNorm), DecomposedRMSNorm)
        swapped += _replace(model, lambda c: isinstance(c, nn.LayerNorm), DecomposedLayerNorm)
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
        for rope in ropes:
            rope.table_dtype = None  # the tables' own dtype again
        for m, p in zip(attn_modules, saved_processors):
            m.set_processor(p)
