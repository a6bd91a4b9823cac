"""The exported pieces of a `WorldStereoTransformer`, each an `nn.Module` with positional, named tensors.

Every piece reuses the model's own submodules (no weight copies) and reproduces the matching part of
`WorldStereoTransformer.forward`; chaining them (`run_chain`) gives the forward's velocity exactly, which the tests
check, so the graphs cannot drift from the model unnoticed. Names come from `engine.runtime.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from engine.models.transformer import LATENT_CHANNELS, VAE_SCALE, WorldStereoTransformer
from engine.runtime import spec

from .export_mode import rotary_tables

TEXT_TOKENS = 512


@dataclass
class ExportShape:
    """Sizes of the sample inputs a graph is traced and checked with (latent h, w; pixels are 8× that)."""

    batch: int = 1
    frames: int = 3
    height: int = 4
    width: int = 6
    refs: int = 2
    text_tokens: int = TEXT_TOKENS
    image_tokens: int = 257

    @classmethod
    def from_pixels(cls, height: int, width: int, frames: int, refs: int, image_tokens: int, batch: int = 1):
        if height % 16 or width % 16:
            raise ValueError(f"--height/--width must be multiples of 16 (VAE ×8 times 2×2 patches); got {height}×{width}.")
        return cls(batch, frames, height // VAE_SCALE, width // VAE_SCALE, refs, TEXT_TOKENS, image_tokens)


def timestep_embedding(model: WorldStereoTransformer, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """temb [B, D] exactly as `WanTimeTextImageEmbedding.forward` makes it (without the text/image parts)."""
    ce = model.condition_embedder
    t = ce.timesteps_proj(timestep)
    t = t.to(next(iter(ce.time_embedder.parameters())).dtype)
    return ce.time_embedder(t).to(dtype)


def _token_grid(frames: torch.Tensor, hp: int, wp: int, w_offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, h, w) [B, R·hp·wp] positions of patch tokens of the frames ``frames`` [B, R], frame-major, row-major."""
    b, r = frames.shape
    hh = torch.arange(hp, device=frames.device)
    ww = torch.arange(wp, device=frames.device) + w_offset
    t = frames.view(b, r, 1, 1).expand(b, r, hp, wp).reshape(b, -1)
    h = hh.view(1, 1, hp, 1).expand(b, r, hp, wp).reshape(b, -1)
    w = ww.view(1, 1, 1, wp).expand(b, r, hp, wp).reshape(b, -1)
    return t, h, w


def _frame_offsets(model: WorldStereoTransformer, codes: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    emb = model.camera_embedding(codes.to(model.camera_embedding[0].weight.dtype))
    b, f, d = emb.shape
    return emb.unsqueeze(2).expand(b, f, tokens_per_frame, d).reshape(b, -1, d)


class GraphModule(nn.Module):
    """One exported piece: ``input_names``/``output_names`` in forward order, ``dynamic_axes`` per tensor."""

    name: str = ""

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


def _latent_axes() -> dict[int, str]:
    return {0: "batch", 2: "frames", 3: "latent_height", 4: "latent_width"}


def _token_axes() -> dict[int, str]:
    return {0: "batch", 1: "tokens"}


class CameraBranchGraph(GraphModule):
    name = spec.CAMERA_BRANCH

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self.uses_rays = model.ws_config.controlnet_cfg.add_channels > 1
        pix = {0: "batch", 2: "frames", 3: "height", 4: "width"}  # one mask frame per keyframe (the release's form)
        self._add_input(spec.HIDDEN_STATES, _latent_axes())
        self._add_input(spec.TIMESTEP, {0: "batch"})
        self._add_input(spec.RENDER_LATENT, _latent_axes())
        self._add_input(spec.RENDER_MASK, pix)
        if self.uses_rays:
            self._add_input(spec.CAMERA_EMBEDDING, pix)
        self.output_names = [spec.residual_name(i) for i in range(model.ws_config.controlnet_cfg.num_layers)]
        self.dynamic_axes.update({n: _token_axes() for n in self.output_names})

    def forward(self, hidden_states, timestep, render_latent, render_mask, camera_embedding=None):
        temb = timestep_embedding(self.model, timestep, hidden_states.dtype)
        return tuple(self.model.camera_branch(hidden_states=hidden_states, render_latent=render_latent,
                                              render_mask=render_mask, camera_embedding=camera_embedding, temb=temb))

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        px = (s.batch, 1, s.frames, s.height * VAE_SCALE, s.width * VAE_SCALE)
        out = {spec.HIDDEN_STATES: torch.randn(s.batch, self.model.config.in_channels, s.frames, s.height, s.width,
                                               generator=g),
               spec.TIMESTEP: torch.rand(s.batch, generator=g) * 1000,
               spec.RENDER_LATENT: torch.randn(s.batch, LATENT_CHANNELS, s.frames, s.height, s.width, generator=g),
               spec.RENDER_MASK: (torch.rand(px, generator=g) > 0.3).float()}
        if self.uses_rays:
            out[spec.CAMERA_EMBEDDING] = torch.randn(s.batch, 6, *px[2:], generator=g)
        return out


class MemoryFrontendGraph(GraphModule):
    """Stitched memory, separable part: reference latents → reference tokens and their rotary tables."""

    name = spec.MEMORY_FRONTEND

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self.uses_codes = model.camera_embedding is not None
        self._add_input(spec.REFERENCE_LATENT, {0: "batch", 2: "refs", 3: "latent_height", 4: "latent_width"})
        self._add_input(spec.REF_INDEX, {0: "batch", 1: "refs"})
        if self.uses_codes:
            self._add_input(spec.CAMERA_QT_REF, {0: "batch", 1: "refs"})
        self.output_names = [spec.REF_TOKENS, spec.REF_ROTARY_COS, spec.REF_ROTARY_SIN]
        self.dynamic_axes.update({spec.REF_TOKENS: {0: "batch", 1: "ref_tokens"},
                                  spec.REF_ROTARY_COS: {0: "batch", 1: "ref_tokens"},
                                  spec.REF_ROTARY_SIN: {0: "batch", 1: "ref_tokens"}})

    def forward(self, reference_latent, ref_index, camera_qt_ref=None):
        m = self.model
        _, ph, pw = m.config.patch_size
        hp, wp = reference_latent.shape[3] // ph, reference_latent.shape[4] // pw
        tokens = m._tokens(m._reference_input(reference_latent))
        frames = ref_index + 1
        b, r = frames.shape
        if m.ref_index_embedding is not None:
            tokens = tokens + m.ref_index_embedding(frames).unsqueeze(2).expand(b, r, hp * wp, -1).reshape(
                b, -1, tokens.shape[-1]).to(tokens.dtype)
        if self.uses_codes:
            tokens = tokens + _frame_offsets(m, camera_qt_ref, hp * wp).to(tokens.dtype)
        t, h, w = _token_grid(frames, hp, wp, wp)  # right half of the 2W canvas, at the served frame's time
        cos, sin = rotary_tables(m.rope, t, h, w)
        return tokens, cos, sin

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        out = {spec.REFERENCE_LATENT: torch.randn(s.batch, LATENT_CHANNELS, s.refs, s.height, s.width, generator=g),
               spec.REF_INDEX: torch.randint(0, max(s.frames - 1, 1), (s.batch, s.refs), generator=g)}
        if self.uses_codes:
            out[spec.CAMERA_QT_REF] = torch.randn(s.batch, s.refs, self.model.ws_config.controlnet_cfg.camera_embedding_dim,
                                                  generator=g)
        return out


class MemoryBranchGraph(GraphModule):
    """The paper's SSM branch → residuals on the full target grid (zero where no reference serves a frame)."""

    name = spec.MEMORY_BRANCH

    def __init__(self, model: WorldStereoTransformer):
        super().__init__(model)
        self._add_input(spec.HIDDEN_STATES, _latent_axes())
        self._add_input(spec.TIMESTEP, {0: "batch"})
        self._add_input(spec.REFERENCE_LATENT, {0: "batch", 2: "refs", 3: "latent_height", 4: "latent_width"})
        self._add_input(spec.REF_INDEX, {0: "batch", 1: "refs"})
        self._add_input(spec.POINTMAP_LATENT, _latent_axes())
        self._add_input(spec.REF_POINTMAP_LATENT, {0: "batch", 2: "refs", 3: "latent_height", 4: "latent_width"})
        self.output_names = [spec.residual_name(i) for i in range(model.ws_config.memory_cfg.num_layers)]
        self.dynamic_axes.update({n: _token_axes() for n in self.output_names})

    def forward(self, hidden_states, timestep, reference_latent, ref_index, pointmap_latent, ref_pointmap_latent):
        temb = timestep_embedding(self.model, timestep, hidden_states.dtype)
        return tuple(self.model.memory_branch_residuals(
            hidden_states=hidden_states, reference_latent=reference_latent, ref_index=ref_index, temb=temb,
            pointmap_latent=pointmap_latent, ref_pointmap_latent=ref_pointmap_latent))

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        lat = (s.batch, LATENT_CHANNELS, s.frames, s.height, s.width)
        ref = (s.batch, LATENT_CHANNELS, s.refs, s.height, s.width)
        # distinct served frames: the branch scatters, and duplicates would add (fine, but a weaker check)
        idx = torch.stack([torch.randperm(max(s.frames - 1, 1), generator=g)[: s.refs] for _ in range(s.batch)])
        return {spec.HIDDEN_STATES: torch.randn(s.batch, self.model.config.in_channels, s.frames, s.height, s.width,
                                                generator=g),
                spec.TIMESTEP: torch.rand(s.batch, generator=g) * 1000,
                spec.REFERENCE_LATENT: torch.randn(ref, generator=g), spec.REF_INDEX: idx,
                spec.POINTMAP_LATENT: torch.randn(lat, generator=g), spec.REF_POINTMAP_LATENT: torch.randn(ref, generator=g)}


def num_residuals(model: WorldStereoTransformer) -> int:
    n = model.ws_config.controlnet_cfg.num_layers
    if model.memory_branch is not None:
        n = max(n, model.ws_config.memory_cfg.num_layers)
    return min(n, len(model.blocks))


class BackboneGraph(GraphModule):
    """Everything after the branches: embeddings, the 40 (tiny: 4) blocks with residuals added, the output head."""

    def __init__(self, model: WorldStereoTransformer, with_references: bool = False):
        super().__init__(model)
        self.name = spec.BACKBONE_MEMORY if with_references else spec.BACKBONE
        self.with_references = with_references
        self.uses_codes = model.camera_embedding is not None
        self.n_residuals = num_residuals(model)
        self._add_input(spec.HIDDEN_STATES, _latent_axes())
        self._add_input(spec.TIMESTEP, {0: "batch"})
        self._add_input(spec.TEXT, {0: "batch"})
        self._add_input(spec.IMAGE, {0: "batch"})
        if self.uses_codes:
            self._add_input(spec.CAMERA_QT, {0: "batch", 1: "frames"})
        for i in range(self.n_residuals):
            self._add_input(spec.residual_name(i), _token_axes())
        if with_references:
            for n in (spec.REF_TOKENS, spec.REF_ROTARY_COS, spec.REF_ROTARY_SIN):
                self._add_input(n, {0: "batch", 1: "ref_tokens"})
        self.output_names = [spec.VELOCITY]
        self.dynamic_axes[spec.VELOCITY] = _latent_axes()

    def forward(self, *args):
        named = dict(zip(self.input_names, args))
        residuals = [named[spec.residual_name(i)] for i in range(self.n_residuals)]
        refs = (named[spec.REF_TOKENS], named[spec.REF_ROTARY_COS], named[spec.REF_ROTARY_SIN]) \
            if self.with_references else None
        return backbone_forward(self.model, named[spec.HIDDEN_STATES], named[spec.TIMESTEP], named[spec.TEXT],
                                named[spec.IMAGE], named.get(spec.CAMERA_QT), residuals, refs)

    def sample_inputs(self, s: ExportShape, g: torch.Generator) -> dict[str, torch.Tensor]:
        m = self.model
        cfg = m.config
        n_tok = s.frames * (s.height // cfg.patch_size[1]) * (s.width // cfg.patch_size[2])
        out = {spec.HIDDEN_STATES: torch.randn(s.batch, cfg.in_channels, s.frames, s.height, s.width, generator=g),
               spec.TIMESTEP: torch.rand(s.batch, generator=g) * 1000,
               spec.TEXT: torch.randn(s.batch, s.text_tokens, cfg.text_dim, generator=g),
               spec.IMAGE: torch.randn(s.batch, s.image_tokens, cfg.image_dim, generator=g)}
        if self.uses_codes:
            out[spec.CAMERA_QT] = torch.randn(s.batch, s.frames, m.ws_config.controlnet_cfg.camera_embedding_dim,
                                              generator=g)
        for i in range(self.n_residuals):
            out[spec.residual_name(i)] = torch.randn(s.batch, n_tok, m.inner_dim, generator=g) * 0.1
        if self.with_references:
            front = MemoryFrontendGraph(m)
            with torch.no_grad():
                tokens, cos, sin = front(*front.sample_inputs(s, g).values())
            out.update({spec.REF_TOKENS: tokens, spec.REF_ROTARY_COS: cos, spec.REF_ROTARY_SIN: sin})
        return out


def backbone_forward(model: WorldStereoTransformer, hidden_states, timestep, text, image, camera_qt,
                     residuals: list[torch.Tensor], refs: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """`WorldStereoTransformer.forward` after its branches, with their outputs given."""
    m = model
    b, _, f, h, w = hidden_states.shape
    pt, ph, pw = m.config.patch_size
    fp, hp, wp = f // pt, h // ph, w // pw
    x = m._tokens(hidden_states)
    rotary = m.rope(hidden_states)
    temb, timestep_proj, context, context_img = m.condition_embedder(timestep, text, image)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if context_img is not None:
        context = torch.cat([context_img, context], dim=1)
    if m.camera_embedding is not None and camera_qt is not None:
        x = x + _frame_offsets(m, camera_qt, hp * wp).to(x.dtype)
    n_ref = 0
    if refs is not None:
        ref_tokens, ref_cos, ref_sin = refs
        rotary = tuple(torch.cat([rr.to(tr.dtype), tr.expand(b, -1, -1, -1)], dim=1)
                       for rr, tr in zip((ref_cos, ref_sin), rotary))
        x = torch.cat([ref_tokens.to(x.dtype), x], dim=1)
        n_ref = ref_tokens.shape[1]
    for i, block in enumerate(m.blocks):
        x = block(x, context, timestep_proj, rotary)
        if i < len(residuals):
            res = residuals[i].to(x.dtype)
            x = x + res if refs is None else torch.cat([x[:, :n_ref], x[:, n_ref:] + res], 1)
    x = x[:, n_ref:]
    shift, scale = (m.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    x = m.proj_out(x)
    x = x.reshape(b, fp, hp, wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


@dataclass
class GraphSet:
    graphs: list[GraphModule] = field(default_factory=list)

    def __iter__(self):
        return iter(self.graphs)

    def names(self) -> list[str]:
        return [g.name for g in self.graphs]


def graphs_for(model: WorldStereoTransformer) -> GraphSet:
    """The pieces this model's variant has, in run order."""
    out = [CameraBranchGraph(model)]
    stitched_memory = model.memory_branch is None and model.ws_config.has_memory
    if model.memory_branch is not None:
        out.append(MemoryBranchGraph(model))
    elif stitched_memory:
        out.append(MemoryFrontendGraph(model))
    out.append(BackboneGraph(model))
    if stitched_memory:
        out.append(BackboneGraph(model, with_references=True))
    return GraphSet(out)
