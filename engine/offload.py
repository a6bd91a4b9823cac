"""GPU memory options of a clip pipeline: where each network lives, and how it reaches the GPU when it runs.

``OFFLOAD_CHOICES`` is the one list of options (the CLI's ``--offload``, ``SceneSettings.offload``, the demo's
"GPU memory" control); ``OFFLOAD_HELP`` says each in one line, ``offload_help_text`` all of them in one paragraph.
Peak memory and clip time per option: README, "GPU memory" (``bash bench/gpu_check.sh`` measures them).

- ``none``: every network stays on the GPU. Fastest; the 14B model in bf16 needs an 80 GB-class GPU.
- ``text-encoder``: UMT5-XXL (11 GB in bf16) lives in CPU memory and visits the GPU only to encode a prompt it has
  not seen (encodings are cached); everything else as ``none``.
- ``model``: accelerate's model offload. Every network lives in CPU memory and moves to the GPU whole while it
  runs, so the transformer (35 GB) moves in and out once per clip.
- ``group``: diffusers' group offloading with CUDA streams for the transformer, the text encoder and the image
  encoder. Weights stream to the GPU layer by layer just ahead of use while the layer before computes, so only a
  few layers are on the GPU at once; meant for 24-48 GB GPUs. The VAE (0.5 GB) stays on the GPU: it runs through
  ``encode`` / ``decode`` rather than ``forward``, which diffusers' stream prefetching keys on.

Why leaf-level groups for ``group``: diffusers' block level onloads a block's group when that block's ``forward``
runs, but the released checkpoints' stitched memory runs each backbone block's submodules itself (one joint
self-attention over reference and target tokens, ``engine.models.transformer.memory_block``), so a block group
would never be onloaded there. Leaf-level hooks sit on every Linear / Conv / Embedding layer, which every path
calls. The tensors outside such layers (norm scales, modulation and rotary tables; well under 1 % of the weights)
are read directly by the model code, so they stay resident on the GPU instead of joining a group.
"""
from __future__ import annotations

from typing import Union

import torch

OFFLOAD_CHOICES = ("none", "text-encoder", "model", "group")
OFFLOAD_HELP = {
    "none": "every network stays on the GPU (fastest; 80 GB-class GPUs)",
    "text-encoder": "the text encoder waits in CPU memory and visits the GPU only to encode a new prompt",
    "model": "each network moves to the GPU whole while it runs (accelerate model offload)",
    "group": "weights stream to the GPU layer by layer while the one before computes (24-48 GB GPUs)",
}
# The networks' roles: where each lives depends on the option (Placement.resident).
TRANSFORMER, TEXT_ENCODER, IMAGE_ENCODER, VAE = "transformer", "text_encoder", "image_encoder", "vae"
# The layers diffusers' leaf-level group offloading hooks (its supported layer types); the rest stays resident.
STREAMED_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding)

Device = Union[str, torch.device]


class OffloadError(ValueError):
    """An offload option that does not exist; the message lists the ones that do."""


def check_offload(mode: str) -> str:
    """``mode`` when it is one of ``OFFLOAD_CHOICES``; else ``OffloadError``, one sentence naming the choices."""
    if mode not in OFFLOAD_CHOICES:
        raise OffloadError(f"GPU memory option {str(mode)[:40]!r} does not exist; choose one of: "
                           f"{', '.join(OFFLOAD_CHOICES)}.")
    return mode


def offload_help_text() -> str:
    """Every option with its one line, as the CLI's help and the demo's control show them."""
    return "; ".join(f"{name}: {OFFLOAD_HELP[name]}" for name in OFFLOAD_CHOICES)


class Placement:
    """One pipeline's offload option on one device: places each network and brings it in and out around use.

    ``load_device(role)`` is where a network should be loaded; ``place`` puts it where the option wants it (adding
    hooks); ``before_use`` / ``after_use`` wrap work that calls a network other than through its ``forward``
    hooks (the transformer's per-clip mask embedding) or that should free the GPU afterwards.
    """

    def __init__(self, mode: str = "none", device: Device = "cpu"):
        self.mode = check_offload(mode)
        self.device = torch.device(device)

    def resident(self, role: str) -> bool:
        """Whether ``role``'s network stays on the GPU between uses."""
        return (self.mode == "none" or (self.mode == "text-encoder" and role != TEXT_ENCODER)
                or (self.mode == "group" and role == VAE))

    def load_device(self, role: str) -> torch.device:
        return self.device if self.resident(role) else torch.device("cpu")

    def place(self, module: torch.nn.Module, role: str) -> torch.nn.Module:
        if self.resident(role) or self.mode == "text-encoder":
            return module.to(self.load_device(role))
        if self.mode == "model":
            from accelerate import cpu_offload_with_hook

            cpu_offload_with_hook(module.to("cpu"), self.device)
            return module
        group_offload(module, self.device)
        return module

    def before_use(self, module: torch.nn.Module, role: str) -> None:
        if self.mode == "text-encoder" and role == TEXT_ENCODER:
            module.to(self.device)
        elif self.mode == "model":
            # accelerate's hook moves the module when its forward is called; direct calls need it moved first
            module._hf_hook.pre_forward(module)

    def after_use(self, module: torch.nn.Module, role: str) -> None:
        if self.mode == "text-encoder" and role == TEXT_ENCODER:
            module.to("cpu")
        elif self.mode == "model":
            module._hf_hook.init_hook(module)  # accelerate's offload: back to CPU memory


def group_offload(module: torch.nn.Module, device: Device, offload_device: Device = "cpu") -> None:
    """diffusers' leaf-level group offloading of ``module`` onto ``device`` (CUDA streams and pinned memory on CUDA),
    with the tensors outside streamed layers kept resident on ``device`` (module notes)."""
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device)
    cuda = device.type == "cuda"
    resident = []
    for owner in module.modules():
        if isinstance(owner, STREAMED_LAYERS):
            continue
        for table in (owner._parameters, owner._buffers):
            for name in [n for n, t in table.items() if t is not None]:
                resident.append((table, name, table.pop(name)))
    try:
        apply_group_offloading(module, onload_device=device, offload_device=torch.device(offload_device),
                               offload_type="leaf_level", use_stream=cuda, record_stream=cuda, non_blocking=cuda)
    finally:
        for table, name, tensor in resident:
            tensor.data = tensor.data.to(device)
            table[name] = tensor
