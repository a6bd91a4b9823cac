"""Run the exported graphs of one transformer forward in order: branches → (memory) → backbone.

Shared by the ONNX Runtime and TensorRT backends; each supplies a `GraphRunner` that runs one named graph on
torch tensors. The keyword arguments are exactly those of `WorldStereoTransformer.forward`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from . import spec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool}


class GraphInputError(ValueError):
    """Forward arguments the exported graphs cannot take; the message says what to pass or re-export."""


class GraphRunner(Protocol):
    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / spec.MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; export the graphs first with `python -m export`.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != spec.MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a WorldStereo graph manifest ({spec.MANIFEST_FORMAT}); re-export the graphs.")
    return manifest


class GraphChain:
    """The orchestration of one forward over a manifest's graphs; `runner` does the actual execution."""

    def __init__(self, manifest: dict[str, Any], runner: GraphRunner):
        self.manifest = manifest
        self.runner = runner
        self.graphs = {g["name"]: g for g in manifest["graphs"]}
        self.model = manifest["model"]

    def _inputs(self, graph: str) -> dict[str, dict]:
        return self.graphs[graph]["inputs"]

    def _feeds(self, graph: str, values: dict[str, Optional[torch.Tensor]], device) -> dict[str, torch.Tensor]:
        feeds = {}
        for name, meta in self._inputs(graph).items():
            v = values.get(name)
            if v is None:
                raise GraphInputError(f"the exported {graph} graph needs {name}, which was not given; pass it, or "
                                      "export a variant whose graphs do not take it.")
            feeds[name] = torch.as_tensor(v).to(device=device, dtype=_DTYPES[meta["dtype"]]).contiguous()
        return feeds

    def __call__(self, *, hidden_states: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_image: Optional[torch.Tensor] = None,
                 render_latent: Optional[torch.Tensor] = None, render_mask: Optional[torch.Tensor] = None,
                 camera_embedding: Optional[torch.Tensor] = None, extrinsics: Optional[torch.Tensor] = None,
                 intrinsics: Optional[torch.Tensor] = None, reference_latent: Optional[torch.Tensor] = None,
                 ref_index: Optional[torch.Tensor] = None, camera_qt: Optional[torch.Tensor] = None,
                 camera_qt_ref: Optional[torch.Tensor] = None, pointmap_latent: Optional[torch.Tensor] = None,
                 ref_pointmap_latent: Optional[torch.Tensor] = None, return_dict: bool = False) -> torch.Tensor:
        # extrinsics/intrinsics are accepted for signature parity; the model does not read them (nor do the graphs).
        device = hidden_states.device
        b, _, f, h, w = hidden_states.shape
        t = torch.as_tensor(timestep, device=device).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        values: dict[str, Optional[torch.Tensor]] = {
            spec.HIDDEN_STATES: hidden_states, spec.TIMESTEP: t, spec.TEXT: encoder_hidden_states,
            spec.IMAGE: encoder_hidden_states_image, spec.RENDER_LATENT: render_latent, spec.RENDER_MASK: render_mask,
            spec.CAMERA_EMBEDDING: camera_embedding, spec.CAMERA_QT: camera_qt, spec.CAMERA_QT_REF: camera_qt_ref,
            spec.POINTMAP_LATENT: pointmap_latent, spec.REF_POINTMAP_LATENT: ref_pointmap_latent,
        }
        pt, ph, pw = self.model["patch_size"]
        n_tokens = (f // pt) * (h // ph) * (w // pw)
        n_res = self.model["num_residuals"]
        residuals: list[Optional[torch.Tensor]] = [None] * n_res

        if (render_latent is None) != (render_mask is None):
            raise GraphInputError("the camera branch needs both render_latent and render_mask; pass both or neither.")
        if render_latent is not None:
            if render_mask.shape[2] != f:
                raise GraphInputError(f"the exported camera branch takes one render_mask frame per keyframe ({f}); "
                                      f"got {render_mask.shape[2]}.")
            out = self.runner.run(spec.CAMERA_BRANCH, self._feeds(spec.CAMERA_BRANCH, values, device))
            residuals = _add_residuals(residuals, out)

        backbone = spec.BACKBONE
        if reference_latent is not None:
            r = reference_latent.shape[2]
            idx = torch.arange(r, device=device) if ref_index is None else torch.as_tensor(ref_index, device=device)
            idx = idx.long().reshape(-1, r).expand(b, r)
            values[spec.REFERENCE_LATENT] = reference_latent
            values[spec.REF_INDEX] = idx
            if spec.MEMORY_FRONTEND in self.graphs:
                out = self.runner.run(spec.MEMORY_FRONTEND, self._feeds(spec.MEMORY_FRONTEND, values, device))
                values.update(out)
                backbone = spec.BACKBONE_MEMORY
            elif spec.MEMORY_BRANCH in self.graphs:
                out = self.runner.run(spec.MEMORY_BRANCH, self._feeds(spec.MEMORY_BRANCH, values, device))
                residuals = _add_residuals(residuals, out)
            # a variant without memory ignores references, as the model does

        dtype = _DTYPES[self._inputs(backbone)[spec.HIDDEN_STATES]["dtype"]]
        for i, r in enumerate(residuals):
            values[spec.residual_name(i)] = r if r is not None else \
                torch.zeros(b, n_tokens, self.model["inner_dim"], device=device, dtype=dtype)
        velocity = self.runner.run(backbone, self._feeds(backbone, values, device))[spec.VELOCITY]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=velocity)
        return velocity


def _add_residuals(acc: list[Optional[torch.Tensor]], outputs: dict[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    out = list(acc)
    for i in range(len(out)):
        r = outputs.get(spec.residual_name(i))
        if r is not None:
            out[i] = r if out[i] is None else out[i] + r
    return out
