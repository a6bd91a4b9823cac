"""Backends that run the WorldStereo transformer: eager PyTorch, torch.compile, ONNX Runtime, TensorRT.

All share one interface (`Backend`): called with the keyword arguments of `WorldStereoTransformer.forward`,
returning the velocity. `make_backend` picks one by name and falls back to eager, with a one-line reason, when the
requested one cannot run here.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .base import Backend, BackendUnavailable, CompileBackend, EagerBackend

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
log = logging.getLogger("engine.runtime")


def make_backend(name: str, model: torch.nn.Module, *, graphs_dir: Optional[Union[str, Path]] = None,
                 fallback: bool = True, **options: Any) -> Backend:
    """A backend by name. ``graphs_dir``: the folder `python -m export` wrote (ONNX graphs or TensorRT engines).

    ``options`` go to the backend (compile: mode, cuda_graphs, compile_backend; onnxruntime: providers, threads;
    tensorrt: device). When the backend cannot run here and ``fallback`` is true, returns the eager backend with
    ``fallback_reason`` set (and logged); otherwise raises `BackendUnavailable`.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    try:
        if name == "eager":
            return EagerBackend(model)
        if name == "compile":
            if not hasattr(torch, "compile"):
                raise BackendUnavailable("this PyTorch has no torch.compile.")
            return CompileBackend(model, **options)
        if graphs_dir is None:
            raise BackendUnavailable(f"the {name} backend needs exported graphs (graphs_dir); "
                                     f"make them with python -m export --format {'onnx' if name == 'onnxruntime' else 'tensorrt'}.")
        if name == "onnxruntime":
            from .onnxruntime_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(graphs_dir, model=model, **options)
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(graphs_dir, model=model, **options)
    except BackendUnavailable as e:
        if not fallback:
            raise
        backend = EagerBackend(model)
        backend.fallback_reason = f"{name} backend unavailable, using eager: {e}"
        log.warning(backend.fallback_reason)
        return backend


__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "CompileBackend", "EagerBackend", "make_backend"]
