"""ONNX Runtime backend: the exported graphs (see `spec`) chained branch → memory → backbone.

Meant for parity checks and CPU runs; with ``providers=['CUDAExecutionProvider', ...]`` it runs on a GPU (through
host copies: numpy in and out — the TensorRT backend is the one without copies).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .base import Backend, BackendUnavailable
from .chain import GraphChain, read_manifest


class _OrtRunner:
    def __init__(self, folder: Path, manifest: dict, providers: Sequence[str], threads: Optional[int]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for g in manifest["graphs"]:
            self.sessions[g["name"]] = ort.InferenceSession(str(folder / g["file"]), opts, providers=list(providers))
        self.output_names = {g["name"]: list(g["outputs"]) for g in manifest["graphs"]}

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(iter(feeds.values())).device
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        names = self.output_names[graph]
        outs = self.sessions[graph].run(names, arrays)
        return {n: torch.from_numpy(np.ascontiguousarray(o)).to(device) for n, o in zip(names, outs)}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, graphs_dir: Union[str, Path], model: Optional[torch.nn.Module] = None,
                 providers: Optional[Sequence[str]] = None, threads: Optional[int] = None):
        super().__init__(model)
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime).") from e
        folder = Path(graphs_dir)
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, ValueError) as e:
            raise BackendUnavailable(str(e)) from e
        if manifest.get("runtime", "onnx") != "onnx":
            raise BackendUnavailable(f"{folder} holds {manifest.get('runtime')} engines, not ONNX graphs.")
        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
        if not providers:
            raise BackendUnavailable(f"none of the requested ONNX Runtime providers is available (have {available}).")
        self.manifest = manifest
        self.providers = providers
        self.chain = GraphChain(manifest, _OrtRunner(folder, manifest, providers, threads))

    def __call__(self, **forward_kwargs: Any):
        return self.chain(**forward_kwargs)
