"""The exported pieces of a `WorldStereoTransformer`, each an `nn.Module` with positional, named tensors.

Every piece calls the model's own forward steps (`embed`, `encode_mask_and_rays`, `camera_branch`,
`reference_tokens`, `memory_branch_residuals`, `run_blocks`, `head`) on the model's own submodules: there is one
implementation of the forward, and chaining the graphs gives the forward's velocity exactly (tested). Names come
from `engine.runtime.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from engine.constants import IMAGE_TOKENS, LATENT_CHANNELS, SIZE_MULTIPLE, TEXT_TOKENS, VAE_SCALE
from engine.models.transformer import WorldStereoTransformer
from engine.runtime import spec


@dataclass
class ExportShape:
    """Sizes of the sample inputs a graph is traced and checked with (latent h, w; pixels are VAE_SCALE× that)."""

    batch: int = 1
    frames: int = 3
    height: int = 4
    width: int = 6
    refs: int = 2
    text_tokens: int = TEXT_TOKENS
    image_tokens: int = IMAGE_TOKENS

    @classmethod
    def from_pixels(cls, height: int, width: int, frames: int, refs: int, image_tokens: int, batch: int = 1):
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"--height/--width must be multiples of {SIZE_MULTIPLE} (VAE ×{VAE_SCALE} times 2×2 "
                             f"patches); got {height}×{width}.")
        return cls(batch, frames, height // VAE_SCALE, width // VAE_SCALE, refs, TEXT_TOKENS, image_tokens)


class GraphModule(nn.Module):
    """One exported piece: ``input_names``/``output_names`` in forward order, ``dynamic_axes`` per tensor.

    ``min_refs``: the fewest references the graph runs with (the size its dynamic axes are verified at).
    """

    name: str = ""
    min_refs: int = 1

    def __init__(self, model: WorldStereoTransformer):
        super().__init__()
        self.model = model
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.dynamic_axes: dict[str, dict[int, str]] = {}

    def sample_inputs(self, shape: ExportShape, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _add_input(self, name: str, axes: dict[int, str]) -> None:
        self.input_names.append(name)
        if axes:
            self.dynamic_axes[name] = axes

    def _randn(self, g: torch.Generator, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(self.model.dtype)

    def _noisy_inputs(self, s: "ExportShape", g: torch.Generator) -> dict[str, torch.Tensor]:
        """Sample noisy latents and time steps, the first two inputs of the branches and the backbone."""
        return {spec.HIDDEN_STATES: self._randn(g, s.batch, self.model.config.in_channels, s.frames, s.height, s.width),
                spec.TIMESTEP: torch.rand(s.batch, generator=g) * 1000}


LATENT_AXES = {0: "batch", 2: "frames", 3: "latent_height", 4: "latent_width"}
REF_LATENT_AXES = {0: "batch", 2: "refs", 3: "latent_height", 4: "latent_width"}
TOKEN_AXES = {0: "batch", 1: "tokens"}
PIXEL_AXES = {0: "batch", 2: "frames", 3: "height", 4: "width"}  # one mask frame per keyframe (the release's form)


class CameraMaskGraph(GraphModule):
    """Render mask + Plücker rays → the camera branch's mask tokens (once per clip)."""

    name = spec.CAMERA_MASK

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self.uses_rays = model.ws_config.controlnet_cfg.add_channels > 1
        self._add_input(spec.RENDER_MASK, PIXEL_AXES)
        if self.uses_rays:
            self._add_input(spec.CAMERA_EMBEDDING, PIXEL_AXES)
        self.output_names = [spec.MASK_TOKENS]
        self.dynamic_axes[spec.MASK_TOKENS] = TOKEN_AXES

    def forward(self, render_mask, camera_embedding=None):
        return self.model.encode_mask_and_rays(render_mask, camera_embedding, render_mask.shape[2])

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        px = (s.batch, 1, s.frames, s.height * VAE_SCALE, s.width * VAE_SCALE)
        out = {spec.RENDER_MASK: (torch.rand(px, generator=g) > 0.3).to(self.model.dtype)}
        if self.uses_rays:
            out[spec.CAMERA_EMBEDDING] = self._randn(g, s.batch, 6, *px[2:])
        return out


class _BranchGraph(GraphModule):
    """A control branch: noisy latents, the time step and the branch's own inputs -> one residual per block."""

    def __init__(self, model: WorldStereoTransformer, inputs: dict[str, dict[int, str]], num_layers: int):
        super().__init__(model)
        self._add_input(spec.HIDDEN_STATES, LATENT_AXES)
        self._add_input(spec.TIMESTEP, {0: "batch"})
        for name, axes in inputs.items():
            self._add_input(name, axes)
        self.output_names = [spec.residual_name(i) for i in range(num_layers)]
        self.dynamic_axes.update({n: TOKEN_AXES for n in self.output_names})

    def forward(self, hidden_states, timestep, *inputs):
        temb = self.model.timestep_embedding(timestep, hidden_states.dtype)
        return tuple(self.residuals(hidden_states, temb, *inputs))

    def residuals(self, hidden_states, temb, *inputs) -> list[torch.Tensor]:
        raise NotImplementedError


class CameraBranchGraph(_BranchGraph):
    name = spec.CAMERA_BRANCH

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model, {spec.RENDER_LATENT: LATENT_AXES, spec.MASK_TOKENS: TOKEN_AXES},
                         model.ws_config.controlnet_cfg.num_layers)

    def residuals(self, hidden_states, temb, render_latent, mask_tokens):
        return self.model.camera_branch(hidden_states, render_latent, temb, mask_tokens)

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        mask = CameraMaskGraph(self.model)
        with torch.no_grad():
            tokens = mask(*mask.sample_inputs(s, g).values())
        return {**self._noisy_inputs(s, g),
                spec.RENDER_LATENT: self._randn(g, s.batch, LATENT_CHANNELS, s.frames, s.height, s.width),
                spec.MASK_TOKENS: tokens + 0.1 * torch.randn(tokens.shape, generator=g).to(tokens.dtype)}


class MemoryFrontendGraph(GraphModule):
    """Stitched memory, separable part: reference latents → reference tokens and their rotary tables."""

    name = spec.MEMORY_FRONTEND

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self.uses_codes = model.camera_embedding is not None
        self._add_input(spec.REFERENCE_LATENT, REF_LATENT_AXES)
        self._add_input(spec.REF_INDEX, {0: "batch", 1: "refs"})
        if self.uses_codes:
            self._add_input(spec.CAMERA_QT_REF, {0: "batch", 1: "refs"})
        self.output_names = [spec.REF_TOKENS, spec.REF_ROTARY_COS, spec.REF_ROTARY_SIN]
        self.dynamic_axes.update({n: {0: "batch", 1: "ref_tokens"} for n in self.output_names})

    def forward(self, reference_latent, ref_index, camera_qt_ref=None):
        tokens, (cos, sin) = self.model.reference_tokens(reference_latent, ref_index, camera_qt_ref)
        return tokens, cos.float(), sin.float()  # float32 between graphs (the export mode's rotary dtype)

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        out = {spec.REFERENCE_LATENT: self._randn(g, s.batch, LATENT_CHANNELS, s.refs, s.height, s.width),
               spec.REF_INDEX: torch.randint(0, max(s.frames - 1, 1), (s.batch, s.refs), generator=g)}
        if self.uses_codes:
            code = self.model.ws_config.controlnet_cfg.camera_embedding_dim
            out[spec.CAMERA_QT_REF] = self._randn(g, s.batch, s.refs, code)
        return out


class MemoryBranchGraph(_BranchGraph):
    """The paper's SSM branch → residuals on the full target grid (zero where no reference serves a frame)."""

    name = spec.MEMORY_BRANCH

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model, {spec.REFERENCE_LATENT: REF_LATENT_AXES, spec.REF_INDEX: {0: "batch", 1: "refs"},
                                 spec.POINTMAP_LATENT: LATENT_AXES, spec.REF_POINTMAP_LATENT: REF_LATENT_AXES},
                         model.ws_config.memory_cfg.num_layers)

    def residuals(self, hidden_states, temb, reference_latent, ref_index, pointmap_latent, ref_pointmap_latent):
        return self.model.memory_branch_residuals(hidden_states, reference_latent, ref_index, temb, pointmap_latent,
                                                  ref_pointmap_latent)

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        lat = (s.batch, LATENT_CHANNELS, s.frames, s.height, s.width)
        ref = (s.batch, LATENT_CHANNELS, s.refs, s.height, s.width)
        # distinct served frames: the branch scatters, and duplicates would add (fine, but a weaker check)
        idx = torch.stack([torch.randperm(max(s.frames - 1, 1), generator=g)[: s.refs] for _ in range(s.batch)])
        return {**self._noisy_inputs(s, g),
                spec.REFERENCE_LATENT: self._randn(g, *ref), spec.REF_INDEX: idx,
                spec.POINTMAP_LATENT: self._randn(g, *lat), spec.REF_POINTMAP_LATENT: self._randn(g, *ref)}


def num_residuals(model: WorldStereoTransformer) -> int:
    n = model.ws_config.controlnet_cfg.num_layers
    if model.memory_branch is not None:
        n = max(n, model.ws_config.memory_cfg.num_layers)
    return min(n, len(model.blocks))


def takes_reference_tokens(model: WorldStereoTransformer) -> bool:
    """Whether the backbone graph has reference inputs (the stitched memory's)."""
    return model.ws_config.has_memory and model.memory_branch is None


class BackboneGraph(GraphModule):
    """Everything after the branches: embeddings, the blocks with residuals added, the output head. For the stitched
    memory the reference tokens and rotary tables are inputs, which may hold zero tokens (no references)."""

    name = spec.BACKBONE
    min_refs = 0

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self.with_references = takes_reference_tokens(model)
        self.uses_codes = model.camera_embedding is not None
        self.n_residuals = num_residuals(model)
        self._add_input(spec.HIDDEN_STATES, LATENT_AXES)
        self._add_input(spec.TIMESTEP, {0: "batch"})
        self._add_input(spec.TEXT, {0: "batch"})
        self._add_input(spec.IMAGE, {0: "batch"})
        if self.uses_codes:
            self._add_input(spec.CAMERA_QT, {0: "batch", 1: "frames"})
        for i in range(self.n_residuals):
            self._add_input(spec.residual_name(i), TOKEN_AXES)
        if self.with_references:
            for n in (spec.REF_TOKENS, spec.REF_ROTARY_COS, spec.REF_ROTARY_SIN):
                self._add_input(n, {0: "batch", 1: "ref_tokens"})
        self.output_names = [spec.VELOCITY]
        self.dynamic_axes[spec.VELOCITY] = LATENT_AXES

    def forward(self, *args):
        m = self.model
        named = dict(zip(self.input_names, args))
        hidden = named[spec.HIDDEN_STATES]
        embedded = m.embed(hidden, named[spec.TIMESTEP], named[spec.TEXT], named[spec.IMAGE], named.get(spec.CAMERA_QT))
        residuals = [named[spec.residual_name(i)] for i in range(self.n_residuals)]
        refs = None
        if self.with_references:
            refs = (named[spec.REF_TOKENS], (named[spec.REF_ROTARY_COS], named[spec.REF_ROTARY_SIN]))
        return m.head(m.run_blocks(embedded, residuals, refs), embedded.temb, hidden.shape)

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        m = self.model
        cfg = m.config
        n_tok = s.frames * (s.height // cfg.patch_size[1]) * (s.width // cfg.patch_size[2])
        out = {**self._noisy_inputs(s, g),
               spec.TEXT: self._randn(g, s.batch, s.text_tokens, cfg.text_dim),
               spec.IMAGE: self._randn(g, s.batch, s.image_tokens, cfg.image_dim)}
        if self.uses_codes:
            out[spec.CAMERA_QT] = self._randn(g, s.batch, s.frames, m.ws_config.controlnet_cfg.camera_embedding_dim)
        for i in range(self.n_residuals):
            out[spec.residual_name(i)] = self._randn(g, s.batch, n_tok, m.inner_dim) * 0.1
        if self.with_references:
            out.update(reference_inputs(m, s, g))
        return out


def reference_inputs(model: WorldStereoTransformer, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The backbone's reference inputs for ``s.refs`` random references (zero tokens when s.refs is 0)."""
    if s.refs == 0:
        return empty_reference_inputs(model, s.batch)
    front = MemoryFrontendGraph(model)
    with torch.no_grad():
        tokens, cos, sin = front(*front.sample_inputs(s, g).values())
    return {spec.REF_TOKENS: tokens, spec.REF_ROTARY_COS: cos, spec.REF_ROTARY_SIN: sin}


def empty_reference_inputs(model: WorldStereoTransformer, batch: int, device=None) -> dict[str, torch.Tensor]:
    """Zero reference tokens: what the backbone graph takes when a clip has no references."""
    rotary = torch.zeros(batch, 0, 1, model.config.attention_head_dim, device=device)
    return {spec.REF_TOKENS: torch.zeros(batch, 0, model.inner_dim, dtype=model.dtype, device=device),
            spec.REF_ROTARY_COS: rotary, spec.REF_ROTARY_SIN: rotary}


@dataclass
class GraphSet:
    graphs: list[GraphModule] = field(default_factory=list)

    def __iter__(self):
        return iter(self.graphs)

    def names(self) -> list[str]:
        return [g.name for g in self.graphs]


def graphs_for(model: WorldStereoTransformer) -> GraphSet:
    """The pieces this model's variant has, in run order."""
    out: list[GraphModule] = [CameraMaskGraph(model), CameraBranchGraph(model)]
    if model.memory_branch is not None:
        out.append(MemoryBranchGraph(model))
    elif takes_reference_tokens(model):
        out.append(MemoryFrontendGraph(model))
    out.append(BackboneGraph(model))
    return GraphSet(out)
