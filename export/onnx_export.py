"""Write each graph of a WorldStereo transformer to ONNX and check it against PyTorch with ONNX Runtime.

Exporter: torch's TorchScript-based ONNX exporter (``dynamo=False``) at opset 18, on the model in `export_mode`
(plain-matmul attention, decomposed norms, real-valued rotary). It keeps ``dynamic_axes`` as symbolic dimensions
and takes seconds on the tiny model; whether ONNX Runtime really accepts other sizes is then tested, not assumed:
every graph is run at the traced sizes and at a second set of sizes, and an axis that fails there is recorded as
static in the manifest (the graph is re-exported without it).

Parity is part of export: float32 relative error max|ort − torch| / max|torch| must stay ≤ ``PARITY_RTOL`` for
every output, or export fails with `ParityError`.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .export_mode import export_mode
from .graphs import ExportShape, GraphModule

OPSET = 18
PARITY_RTOL = 1e-4
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GB cap, with room for the graph itself


class ParityError(RuntimeError):
    """An exported graph whose ONNX Runtime output differs from PyTorch beyond the stated tolerance."""


def _param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def relative_error(ref: torch.Tensor, got: np.ndarray) -> float:
    ref64 = ref.detach().double().cpu()
    diff = (ref64 - torch.from_numpy(np.asarray(got)).double()).abs().max().item()
    return diff / max(ref64.abs().max().item(), 1e-12)


def ort_session(path: Path, providers: Optional[list[str]] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def check_parity(graph: GraphModule, path: Path, inputs: dict[str, torch.Tensor],
                 rtol: float = PARITY_RTOL) -> dict[str, float]:
    """Run ``path`` with ONNX Runtime and ``graph`` with PyTorch (normal mode) on ``inputs``; raise above rtol."""
    with torch.no_grad():
        ref = graph(*inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    sess = ort_session(path)
    feed_names = {i.name for i in sess.get_inputs()}
    got = sess.run(graph.output_names, {k: _numpy(v) for k, v in inputs.items() if k in feed_names})
    errors = {}
    for name, r, o in zip(graph.output_names, ref, got):
        if tuple(o.shape) != tuple(r.shape):
            raise ParityError(f"{graph.name}: output {name} has shape {tuple(o.shape)} in ONNX Runtime but "
                              f"{tuple(r.shape)} in PyTorch.")
        errors[name] = relative_error(r, o)
    worst = max(errors, key=errors.get)
    if errors[worst] > rtol:
        raise ParityError(f"{graph.name}: ONNX Runtime differs from PyTorch by relative error {errors[worst]:.2e} "
                          f"on {worst} (tolerance {rtol:.0e}); the graph is not trustworthy.")
    return errors


def _export_once(graph: GraphModule, inputs: dict[str, torch.Tensor], path: Path,
                 dynamic_axes: dict[str, dict[int, str]], external: bool) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        # Over 2 GB the exporter scatters one file per tensor; trace into a scratch folder and re-save as one file.
        target = Path(tmp) / path.name if external else path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints; dynamic sizes are verified after
            with torch.no_grad(), export_mode(graph.model):
                torch.onnx.export(graph, tuple(inputs.values()), str(target), input_names=list(inputs),
                                  output_names=graph.output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                                  dynamo=False, do_constant_folding=True)
        if external:
            import onnx

            proto = onnx.load(str(target))
            data = path.parent / (path.name + ".data")
            data.unlink(missing_ok=True)
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)


def _other_shape(shape: ExportShape) -> ExportShape:
    """A second size on every dynamic axis, to test that ONNX Runtime really takes the graph at other sizes."""
    return dataclasses.replace(shape, batch=shape.batch + 1, frames=shape.frames + 1, height=shape.height + 2,
                               width=shape.width + 4, refs=max(1, shape.refs - 1))


@dataclasses.dataclass
class ExportedGraph:
    name: str
    file: str
    inputs: dict
    outputs: dict
    dynamic_axes: dict
    static_axes_note: Optional[str]
    parity: dict
    external_data: Optional[str]


def export_graph(graph: GraphModule, out_dir: Path, shape: ExportShape, seed: int = 0,
                 rtol: float = PARITY_RTOL, log: Callable[[str], None] = print) -> ExportedGraph:
    """Export one graph to ``out_dir/<name>.onnx``, verify dynamic sizes, check parity; return its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{graph.name}.onnx"
    inputs = graph.sample_inputs(shape, torch.Generator().manual_seed(seed))
    inputs = {k: v for k, v in inputs.items() if k in graph.input_names}
    external = _param_bytes(graph) > EXTERNAL_DATA_BYTES
    dynamic = {k: dict(v) for k, v in graph.dynamic_axes.items()}
    note = None
    _export_once(graph, inputs, path, dynamic, external)
    other = {k: v for k, v in graph.sample_inputs(_other_shape(shape), torch.Generator().manual_seed(seed + 1)).items()
             if k in graph.input_names}
    try:
        check_parity(graph, path, other, rtol)
    except Exception as e:  # shape-specialised somewhere: fall back to the traced sizes and say so
        note = (f"dynamic axes refused by ONNX Runtime ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "exported with static shapes")
        log(f"{graph.name}: {note}")
        dynamic = {}
        _export_once(graph, inputs, path, dynamic, external)
    errors = check_parity(graph, path, inputs, rtol)
    log(f"{graph.name}: parity ok (max relative error {max(errors.values()):.1e} ≤ {rtol:.0e})")
    with torch.no_grad():
        outs = graph(*inputs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    return ExportedGraph(
        name=graph.name, file=path.name,
        inputs={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                    "dynamic": {str(a): n for a, n in dynamic.get(k, {}).items()}} for k, v in inputs.items()},
        outputs={n: {"shape": list(o.shape), "dtype": str(o.dtype).replace("torch.", ""),
                     "dynamic": {str(a): d for a, d in dynamic.get(n, {}).items()}}
                 for n, o in zip(graph.output_names, outs)},
        dynamic_axes=dynamic, static_axes_note=note, parity={"max_relative_error": errors, "tolerance": rtol},
        external_data=(path.name + ".data") if external else None)
