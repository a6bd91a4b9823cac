"""Helpers for tests of the tiny transformer, also imported by tests/parallel_model_check.py (which torchrun runs
outside pytest): random values for the layers the official initialisation zeroes, and random forward inputs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def wake_zero_layers(model, seed: int = 0, scale: float = 0.05, prefixes: Optional[tuple[str, ...]] = None):
    """`engine.models.tiny.wake_zero_init` on ``model`` (or on its submodules named by ``prefixes``, e.g.
    ``"controlnet."``) with a generator seeded ``seed``: what the official initialisation zeroes gets random values,
    so a comparison through those paths is not vacuous. Returns the model."""
    from engine.models.tiny import wake_zero_init

    g = torch.Generator().manual_seed(seed)
    parts = [model] if prefixes is None else [model.get_submodule(p.rstrip(".")) for p in prefixes]
    woken = sum(wake_zero_init(part, g, scale) for part in parts)
    assert woken, "no zero-initialised parameter found: the test would compare nothing new"
    return model


def forward_inputs(batch: int, frames: int, h: int, w: int, ref_index: Optional[Sequence[int]] = None,
                   seed: int = 0, pointmaps: bool = False) -> dict:
    """Keyword inputs of one forward of the tiny transformer (text 8 x 32, image 4 x 24) at latent size
    ``frames x h x w`` (pixels 8x; a mask frame per keyframe, the tiny config's mask_downsample 1); ``ref_index``: the target frame each reference
    serves (none: no references), ``pointmaps``: with the paper branch's pointmap latents."""
    g = torch.Generator().manual_seed(seed)
    f_pix = frames
    kw = dict(
        hidden_states=torch.randn(batch, 36, frames, h, w, generator=g),
        timestep=torch.tensor([700.0] * batch),
        encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
        encoder_hidden_states_image=torch.randn(batch, 4, 24, generator=g),
        render_latent=torch.randn(batch, 16, frames, h, w, generator=g),
        render_mask=(torch.rand(batch, 1, f_pix, h * 8, w * 8, generator=g) > 0.3).float(),
        camera_embedding=torch.randn(batch, 6, f_pix, h * 8, w * 8, generator=g),
        camera_qt=torch.randn(batch, frames, 7, generator=g),
    )
    if ref_index is not None:
        r = len(ref_index)
        kw.update(reference_latent=torch.randn(batch, 16, r, h, w, generator=g), ref_index=torch.tensor(ref_index),
                  camera_qt_ref=torch.randn(batch, r, 7, generator=g))
        if pointmaps:
            kw.update(pointmap_latent=torch.randn(batch, 16, frames, h, w, generator=g),
                      ref_pointmap_latent=torch.randn(batch, 16, r, h, w, generator=g))
    return kw
