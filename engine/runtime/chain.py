"""Run the exported graphs of one transformer forward in order: camera mask → camera branch → memory → backbone.

Shared by the ONNX Runtime and TensorRT backends; each supplies a `GraphRunner` that runs one named graph on
torch tensors. The keyword arguments are exactly those of `WorldStereoTransformer.forward` (``spec.FORWARD_INPUTS``),
including ``mask_tokens``, which skips the camera-mask graph.
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

    def __call__(self, **inputs: Any) -> torch.Tensor:
        """The transformer forward: the keyword arguments of `WorldStereoTransformer.forward`
        (``spec.FORWARD_INPUTS``)."""
        unknown = sorted(set(inputs) - set(spec.FORWARD_INPUTS))
        if unknown:
            raise GraphInputError(f"unknown forward argument(s) {', '.join(unknown)}; the transformer takes "
                                  f"{', '.join(spec.FORWARD_INPUTS)}.")
        # extrinsics/intrinsics are accepted like the model accepts them; neither it nor the graphs read them.
        values: dict[str, Any] = {k: inputs.get(k) for k in spec.FORWARD_INPUTS}
        hidden_states = values[spec.HIDDEN_STATES]
        device = hidden_states.device
        b, _, f, h, w = hidden_states.shape
        t = torch.as_tensor(values[spec.TIMESTEP], device=device).float().reshape(-1)
        values[spec.TIMESTEP] = t.expand(b) if t.numel() == 1 else t
        pt, ph, pw = self.model["patch_size"]
        n_tokens = (f // pt) * (h // ph) * (w // pw)
        residuals: list[Optional[torch.Tensor]] = [None] * self.model["num_residuals"]

        render_latent, render_mask = values[spec.RENDER_LATENT], values[spec.RENDER_MASK]
        if render_latent is not None or render_mask is not None or values[spec.MASK_TOKENS] is not None:
            if render_latent is None or (render_mask is None and values[spec.MASK_TOKENS] is None):
                raise GraphInputError("the camera branch needs render_latent and render_mask (or its mask_tokens); "
                                      "pass both or neither.")
            if values[spec.MASK_TOKENS] is None:
                if render_mask.shape[2] != f:
                    raise GraphInputError(f"the exported camera branch takes one render_mask frame per keyframe "
                                          f"({f}); got {render_mask.shape[2]}.")
                values.update(self._run(spec.CAMERA_MASK, values, device))
            residuals = _add_residuals(residuals, self._run(spec.CAMERA_BRANCH, values, device))

        reference_latent = values[spec.REFERENCE_LATENT]
        if reference_latent is not None:
            if not self.model["has_memory"]:
                raise GraphInputError(f"the {self.model['variant'] or 'camera'} variant was not trained with "
                                      "references; pass no reference_latent.")
            r = reference_latent.shape[2]
            ref_index = values[spec.REF_INDEX]
            idx = torch.arange(r, device=device) if ref_index is None else torch.as_tensor(ref_index, device=device)
            values[spec.REF_INDEX] = idx.long().reshape(-1, r).expand(b, r)
            if spec.MEMORY_FRONTEND in self.graphs:
                values.update(self._run(spec.MEMORY_FRONTEND, values, device))
            else:
                residuals = _add_residuals(residuals, self._run(spec.MEMORY_BRANCH, values, device))
        if self.model["reference_tokens"] and values.get(spec.REF_TOKENS) is None:
            values.update(self._empty_references(b, device))  # a clip without references: zero tokens

        dtype = _DTYPES[self._inputs(spec.BACKBONE)[spec.HIDDEN_STATES]["dtype"]]
        for i, r in enumerate(residuals):
            values[spec.residual_name(i)] = r if r is not None else \
                torch.zeros(b, n_tokens, self.model["inner_dim"], device=device, dtype=dtype)
        velocity = self._run(spec.BACKBONE, values, device)[spec.VELOCITY]
        if values[spec.RETURN_DICT]:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=velocity)
        return velocity

    def _run(self, graph: str, values: dict[str, Any], device) -> dict[str, torch.Tensor]:
        return self.runner.run(graph, self._feeds(graph, values, device))

    def _empty_references(self, batch: int, device) -> dict[str, torch.Tensor]:
        inputs = self._inputs(spec.BACKBONE)
        tokens = (batch, 0, self.model["inner_dim"])
        rotary = (batch, 0, 1, self.model["head_dim"])
        return {name: torch.zeros(shape, device=device, dtype=_DTYPES[inputs[name]["dtype"]])
                for name, shape in ((spec.REF_TOKENS, tokens), (spec.REF_ROTARY_COS, rotary),
                                    (spec.REF_ROTARY_SIN, rotary))}


def _add_residuals(acc: list[Optional[torch.Tensor]], outputs: dict[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    out = list(acc)
    for i in range(len(out)):
        r = outputs.get(spec.residual_name(i))
        if r is not None:
            out[i] = r if out[i] is None else out[i] + r
    return out
