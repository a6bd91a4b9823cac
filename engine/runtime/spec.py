"""The contract between the transformer, its exported graphs and the runtime: input names, graph names, manifest.

`WorldStereoTransformer.forward` takes exactly the keywords of ``FORWARD_INPUTS`` (a test holds them equal); the
runtime backends accept the same keywords; `export/` writes graphs under these names and `engine/runtime/` runs them.
A name is spelled once, here. The forward is cut into (at most) four graphs, run in this order:

1. ``camera_mask`` — render mask + Plücker rays → the camera branch's mask tokens (constant over a clip; skipped
   when the caller passes ``mask_tokens``).
2. ``camera_branch`` — the camera/GGM ControlNet: noisy input + render latent + mask tokens → one residual per
   branch block (``residual_00``, ``residual_01``, ...).
3. the memory, in one of two forms:
   - ``memory_frontend`` (stitched form, the released checkpoints): reference latents → reference tokens (patch
     embedding + camera-code offset) and their rotary tables. The memory's attention lives inside every backbone
     block, so the backbone graph takes these as inputs.
   - ``memory_branch`` (the paper's branch form): its own ControlNet → residuals, summed with the camera branch's.
4. ``backbone`` — everything else → the velocity. One graph: for the stitched memory its reference inputs may hold
   zero tokens (no references).
"""
from __future__ import annotations

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "worldstereo-graphs/2"

CAMERA_MASK = "camera_mask"
CAMERA_BRANCH = "camera_branch"
MEMORY_FRONTEND = "memory_frontend"
MEMORY_BRANCH = "memory_branch"
BACKBONE = "backbone"

# The transformer forward's keyword arguments, in signature order; graph inputs use the same names.
HIDDEN_STATES = "hidden_states"
TIMESTEP = "timestep"
TEXT = "encoder_hidden_states"
IMAGE = "encoder_hidden_states_image"
RENDER_LATENT = "render_latent"
RENDER_MASK = "render_mask"
CAMERA_EMBEDDING = "camera_embedding"
EXTRINSICS = "extrinsics"
INTRINSICS = "intrinsics"
REFERENCE_LATENT = "reference_latent"
REF_INDEX = "ref_index"
CAMERA_QT = "camera_qt"
CAMERA_QT_REF = "camera_qt_ref"
POINTMAP_LATENT = "pointmap_latent"
REF_POINTMAP_LATENT = "ref_pointmap_latent"
MASK_TOKENS = "mask_tokens"
RETURN_DICT = "return_dict"
FORWARD_INPUTS = (HIDDEN_STATES, TIMESTEP, TEXT, IMAGE, RENDER_LATENT, RENDER_MASK, CAMERA_EMBEDDING, EXTRINSICS,
                  INTRINSICS, REFERENCE_LATENT, REF_INDEX, CAMERA_QT, CAMERA_QT_REF, POINTMAP_LATENT,
                  REF_POINTMAP_LATENT, MASK_TOKENS, RETURN_DICT)

# Tensors passed between graphs.
REF_TOKENS = "ref_tokens"
REF_ROTARY_COS = "ref_rotary_cos"
REF_ROTARY_SIN = "ref_rotary_sin"
VELOCITY = "velocity"


def residual_name(i: int) -> str:
    return f"residual_{i:02d}"
