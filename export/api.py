"""Export a WorldStereo transformer to ONNX graphs + manifest (the step before a TensorRT build)."""
from __future__ import annotations

import dataclasses
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from engine.atomicio import atomic_write_json, file_sha256
from engine.models.transformer import WorldStereoTransformer
from engine.runtime import spec

from .graphs import ExportShape, graphs_for, num_residuals, takes_reference_tokens
from .onnx_export import OPSET, PARITY_RTOL, export_graph

# The dtype the graphs (and the engines built from them) hold the weights and compute in.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many tokens the traced/parity-checked sample is a small one; the graphs' dynamic axes carry the
# target size (ONNX Runtime on a CPU would take hours on a 14B forward at 30k tokens).
MAX_CHECK_TOKENS = 4096


def exporter_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "onnxscript", "diffusers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _tokens(model: WorldStereoTransformer, s: ExportShape) -> int:
    pt, ph, pw = model.config.patch_size
    return (s.frames // pt) * (s.height // ph) * (s.width // pw) * (1 + s.refs / max(s.frames, 1))


def check_shape(model: WorldStereoTransformer, target: ExportShape) -> ExportShape:
    if _tokens(model, target) <= MAX_CHECK_TOKENS:
        return target
    return dataclasses.replace(target, frames=3, height=4, width=6, refs=min(target.refs, 2) or 1)


def model_info(model: WorldStereoTransformer) -> dict[str, Any]:
    cfg = model.config
    return {"inner_dim": model.inner_dim, "patch_size": list(cfg.patch_size), "num_residuals": num_residuals(model),
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "text_dim": cfg.text_dim,
            "image_dim": cfg.image_dim, "num_layers": cfg.num_layers, "variant": model.ws_config.variant,
            "memory_mode": model.ws_config.memory_mode, "has_memory": model.ws_config.has_memory,
            "reference_tokens": takes_reference_tokens(model), "head_dim": cfg.attention_head_dim,
            "mask_frames": "one render_mask/camera_embedding frame per keyframe (the released 2.0 layout)",
            "reference_channels": 16}


def export_onnx(model: WorldStereoTransformer, out_dir: Path, target: ExportShape, *, engine: str = "",
                source: Optional[Path] = None, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write every graph of ``model`` (export mode, in the model's own dtype) to ``out_dir`` with a manifest; return
    the manifest. No copy of the model is made: load it in the precision the graphs should have.

    Float32 graphs are checked against PyTorch with ONNX Runtime (CPU) on the same random inputs and export fails
    (`ParityError`) above ``PARITY_RTOL`` relative error; other dtypes are recorded as unchecked (no CPU kernels).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    check = check_shape(model, target)
    entries = []
    for graph in graphs_for(model):
        entries.append(dataclasses.asdict(export_graph(graph, out_dir, check, seed=seed, log=log)))
    dtype = str(model.dtype).replace("torch.", "")
    manifest = {
        "format": spec.MANIFEST_FORMAT,
        "runtime": "onnx",
        "engine": engine,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(model),
        "graph_order": [e["name"] for e in entries],
        "graphs": entries,
        "shapes": {"target": dataclasses.asdict(target), "traced_and_checked": dataclasses.asdict(check)},
        "precision": {"dtype": dtype,
                      "note": "weights and activations in the model's dtype; norms, softmax and rotary in float32"},
        "parity": {"runtime": "onnxruntime CPUExecutionProvider", "metric": "max|ort - torch| / max|torch| per output",
                   "tolerance": PARITY_RTOL, "dtype": dtype, "checked": model.dtype == torch.float32},
        "exporter": {"name": "torch.onnx TorchScript exporter (dynamo=False) on the export mode, weights streamed "
                             "to external data", "opset": OPSET,
                     "versions": exporter_versions(), "python": platform.python_version()},
        "source": {"weights": str(source) if source else None,
                   "sha256": file_sha256(source) if source and Path(source).is_file() else None},
    }
    atomic_write_json(out_dir / spec.MANIFEST_NAME, manifest)
    log(f"wrote {len(entries)} graphs and {spec.MANIFEST_NAME} to {out_dir}")
    return manifest
