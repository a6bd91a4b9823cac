"""The one interface the pipeline calls: a `Backend` is "the transformer forward", same keyword arguments.

``backend(hidden_states=..., timestep=..., encoder_hidden_states=..., **branch_inputs)`` returns the velocity
tensor [B, 16, F, h, w] (or diffusers' output with ``return_dict=True``), exactly like
`WorldStereoTransformer.forward`. Attribute reads that a backend does not answer itself go to the wrapped model
(``memory_branch``, ``config``, ``ws_config``, ...), so code written against the model keeps working.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (missing package, no GPU, no exported graphs); the message says why."""


class Backend:
    name = "backend"

    def __init__(self, model: Optional[torch.nn.Module]):
        self.model = model
        self.fallback_reason: Optional[str] = None

    def __call__(self, **forward_kwargs: Any):
        raise NotImplementedError

    def __getattr__(self, item: str):
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(item)
        return getattr(model, item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class EagerBackend(Backend):
    """The PyTorch model as it is."""

    name = "eager"

    def __call__(self, **forward_kwargs: Any):
        return self.model(**forward_kwargs)


class CompileBackend(Backend):
    """`torch.compile` of the model's forward at fixed shapes (``dynamic=False``: one graph per input size, the
    fastest kernels); ``cuda_graphs=True`` uses mode='reduce-overhead', which replays CUDA graphs and removes the
    per-kernel launch cost (inputs are copied into static buffers, so keep shapes fixed across steps)."""

    name = "compile"

    def __init__(self, model: torch.nn.Module, mode: Optional[str] = None, cuda_graphs: bool = False,
                 compile_backend: str = "inductor", fullgraph: bool = False):
        super().__init__(model)
        if cuda_graphs:
            mode = "reduce-overhead"
        self.mode = mode
        self._compiled = torch.compile(model, mode=mode, dynamic=False, backend=compile_backend, fullgraph=fullgraph)

    def __call__(self, **forward_kwargs: Any):
        out = self._compiled(**forward_kwargs)
        if self.mode == "reduce-overhead" and torch.is_tensor(out):
            out = out.clone()  # CUDA-graph outputs are overwritten by the next replay
        return out
