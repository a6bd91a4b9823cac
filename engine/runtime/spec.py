"""The contract between exported graphs and the runtime: graph names, tensor names, the manifest file.

`export/` writes graphs under these names and `engine/runtime/` runs them; both import this module, so a name is
spelled once. The forward of `WorldStereoTransformer` is cut into (at most) three graphs, run in this order:

1. ``camera_branch`` — the camera/GGM ControlNet: noisy input + render latent + mask + Plücker rays → one residual
   per branch block (``residual_00``, ``residual_01``, ...).
2. the memory, in one of two forms:
   - ``memory_frontend`` (stitched form, the released checkpoints): the separable part of the spatial-stereo memory
     — reference latents → reference tokens (patch embedding + reference-index embedding + camera-code offset) and
     their rotary tables. The memory's attention lives inside every backbone block and cannot be cut out.
   - ``memory_branch`` (the paper's branch form): its own ControlNet → residuals, summed with the camera branch's.
3. ``backbone`` (no references) or ``backbone_memory`` (stitched references as extra inputs): everything else →
   the velocity.
"""
from __future__ import annotations

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "worldstereo-graphs/1"

CAMERA_BRANCH = "camera_branch"
MEMORY_FRONTEND = "memory_frontend"
MEMORY_BRANCH = "memory_branch"
BACKBONE = "backbone"
BACKBONE_MEMORY = "backbone_memory"
GRAPH_ORDER = (CAMERA_BRANCH, MEMORY_FRONTEND, MEMORY_BRANCH, BACKBONE, BACKBONE_MEMORY)

# Inputs that come straight from the transformer's forward keyword arguments (same names).
HIDDEN_STATES = "hidden_states"
TIMESTEP = "timestep"
TEXT = "encoder_hidden_states"
IMAGE = "encoder_hidden_states_image"
RENDER_LATENT = "render_latent"
RENDER_MASK = "render_mask"
CAMERA_EMBEDDING = "camera_embedding"
CAMERA_QT = "camera_qt"
CAMERA_QT_REF = "camera_qt_ref"
REFERENCE_LATENT = "reference_latent"
REF_INDEX = "ref_index"
POINTMAP_LATENT = "pointmap_latent"
REF_POINTMAP_LATENT = "ref_pointmap_latent"

# Tensors passed between graphs.
REF_TOKENS = "ref_tokens"
REF_ROTARY_COS = "ref_rotary_cos"
REF_ROTARY_SIN = "ref_rotary_sin"
VELOCITY = "velocity"


def residual_name(i: int) -> str:
    return f"residual_{i:02d}"
