"""Sequence parallelism for the WorldStereo transformer, through diffusers' context parallelism.

Every rank of the default process group holds the whole transformer; `enable_sequence_parallel` hands it to
diffusers' `ModelMixin.enable_parallelism` with a `ContextParallelConfig` whose Ulysses degree is the number of ranks.
The model's `_cp_plan` (engine/models/transformer.py) splits the target tokens, the camera branch's tokens and the
reference tokens along the sequence; diffusers' `dispatch_attention_fn` runs the Ulysses all-to-all inside every
self-attention (backbone and branch), and the output projection gathers the target tokens. All ranks must call the
forward with the same inputs (engine.distributed sends rank 0's to the others).

Every rank gets an equal share: the number of ranks must divide the head count of every attention and, per forward,
the target and the reference token counts. The 14B backbone has 40 heads, the camera branch 16: 2, 4 or 8 ranks.
The release's buckets have 1440 tokens a frame, which all of them divide; the square 608×608 bucket has 1444, which 8
ranks do not divide when the clip holds an odd number of frames or references. Such a forward is refused in one
sentence before any rank starts it. (Padding would need an attention mask in every block, which the backbone's
blocks do not take; diffusers' "Ulysses anything" mode shares unequal counts but gathers the output with an uneven
all-gather that the CPU backend used by the tests lacks, so it is not used.)
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # the model module pulls in diffusers: a rank that refuses the machine or its input never needs it
    from .transformer import WorldStereoTransformer

ATTENTION_BACKEND = "native"  # torch SDPA (flash / memory-efficient kernels on CUDA); supports context parallelism
_TOKEN_HOOK = "worldstereo-token-check"


class ParallelError(ValueError):
    """A model or machine that sequence parallelism cannot run on; the message is one sentence."""


def attention_heads(model: WorldStereoTransformer) -> dict[str, int]:
    """Head count of each attention family of ``model`` (backbone, camera branch)."""
    return {"backbone": int(model.config.num_attention_heads),
            "camera branch": int(model.ws_config.controlnet_cfg.num_heads)}


def supported_degrees(model: WorldStereoTransformer, limit: int = 64) -> list[int]:
    """Numbers of ranks (≥ 2, ≤ ``limit``) that divide every head count of ``model``."""
    heads = attention_heads(model).values()
    return [d for d in range(2, limit + 1) if all(h % d == 0 for h in heads)]


def check_degree(model: WorldStereoTransformer, degree: int) -> None:
    """Refuse, in one sentence, a model that ``degree`` ranks cannot split."""
    if getattr(model, "memory_branch", None) is not None:
        raise ParallelError("The paper's branch-form memory (memory_mode 'branch') pairs each target frame with its "
                            "reference inside the branch and is not split across ranks; run it on one GPU.")
    for name, heads in attention_heads(model).items():
        if heads % degree:
            options = ", ".join(map(str, supported_degrees(model))) or "none"
            raise ParallelError(f"{degree} ranks do not divide the {heads} attention heads of the {name}; use one of "
                                f"these rank counts: {options}.")


def check_accelerator() -> None:
    """Refuse, in one sentence, a machine without the accelerator diffusers builds its device mesh for."""
    if torch.accelerator.device_count() < 1:
        raise ParallelError("Sequence parallelism needs a CUDA GPU for every rank and this machine has none; run "
                            "`python -m engine` without torchrun instead.")


def tokens_per_forward(model: WorldStereoTransformer, hidden_states: torch.Tensor,
                       reference_latent: Optional[torch.Tensor]) -> tuple[int, int]:
    """(target tokens, reference tokens) of one forward: frames × patches per frame, references likewise."""
    pt, ph, pw = model.config.patch_size
    per_frame = (hidden_states.shape[3] // ph) * (hidden_states.shape[4] // pw)
    targets = (hidden_states.shape[2] // pt) * per_frame
    refs = 0 if reference_latent is None else reference_latent.shape[2] * per_frame
    return targets, refs


def check_tokens(model: WorldStereoTransformer, degree: int, targets: int, refs: int) -> None:
    """Refuse, in one sentence, a forward whose token counts ``degree`` ranks cannot share equally."""
    if targets % degree or refs % degree:
        from .transformer import InputError

        fit = [d for d in supported_degrees(model) if targets % d == 0 and refs % d == 0]
        counts = f"{targets} target tokens" + (f" and {refs} reference tokens" if refs else "")
        advice = f"launch {' or '.join(map(str, fit[:4]))} ranks for this size" if fit else "use one GPU for this size"
        raise InputError(f"This clip has {counts}, which {degree} ranks cannot share equally; {advice}, or choose an "
                         "image whose aspect falls in another bucket.")


def _token_check_hook(model: WorldStereoTransformer, degree: int):
    """A diffusers model hook that refuses a forward `check_tokens` refuses, before any rank starts it (every rank
    gets the same inputs, so every rank refuses it alike)."""
    from diffusers.hooks import ModelHook

    class TokenCheck(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            hidden = kwargs.get("hidden_states")
            if hidden is not None:
                check_tokens(model, degree, *tokens_per_forward(model, hidden, kwargs.get("reference_latent")))
            return args, kwargs

    return TokenCheck()


def enable_sequence_parallel(model: WorldStereoTransformer) -> int:
    """Split every later forward of ``model`` over the ranks of the default process group; returns their number.

    Needs `torch.distributed` initialised on every rank and the same call on every rank (building the device mesh is
    a collective). Each rank keeps the whole model; its weights are not sharded.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.hooks import HookRegistry
    from diffusers.utils import logging as diffusers_logging

    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelError("Sequence parallelism needs torch.distributed to be initialised on every rank "
                            "(launch with torchrun).")
    degree = dist.get_world_size()
    if degree < 2:
        raise ParallelError("Sequence parallelism needs at least two ranks.")
    check_degree(model, degree)
    check_accelerator()
    # diffusers' output gather calls a torch collective that torch now marks deprecated; the notice says nothing to
    # a user and would print on every rank at the first forward
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "experimental feature" notices would print once per rank
    try:
        model.set_attention_backend(ATTENTION_BACKEND)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_token_check_hook(model, degree), _TOKEN_HOOK)
    return degree
