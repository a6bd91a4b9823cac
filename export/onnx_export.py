"""Write each graph of a WorldStereo transformer to ONNX and check it against PyTorch with ONNX Runtime.

Exporter: torch's TorchScript-based ONNX exporter (``dynamo=False``) at opset 18, on the model in `export_mode`
(plain-matmul attention, decomposed norms, float32 rotary tables), in the model's own dtype. It keeps
``dynamic_axes`` as symbolic dimensions; whether ONNX Runtime really accepts other sizes is then tested, not assumed:
every graph is run at the traced sizes and at a second set of sizes, and an axis that fails there is recorded as
static in the manifest (the graph is re-exported without it).

Host memory stays near one copy of the model, whatever its size: the graph is traced without its weights
(``export_params=False``, so the exporter neither copies nor constant-folds them; its shape inference is handed the
graph alone, see `_shape_inference_without_weights`), and the weights are then streamed tensor by tensor from the
model into one external data file, ``<graph>.onnx.data``, that the graph's initializers point into. ONNX Runtime
and TensorRT fold the remaining weight transposes when they load the graph.

Parity is part of export for float32 graphs: relative error max|ort − torch| / max|torch| must stay ≤
``PARITY_RTOL`` for every output, or export fails with `ParityError`. ONNX Runtime's CPU provider has no bfloat16
kernels (a bfloat16 graph fails to load: no `Div` for bfloat16), so bfloat16/float16 graphs are written unchecked
and the manifest says so; their structure is the float32 graphs' (tested by running a bfloat16 export with its
types widened to float32).
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .export_mode import export_mode
from .graphs import ExportShape, GraphModule

OPSET = 18
PARITY_RTOL = 1e-4
DATA_ALIGNMENT = 4096  # offsets of external tensors: page-aligned, so runtimes may map them instead of copying
NOT_CHECKED_ON_CPU = ("not checked: ONNX Runtime's CPU provider has no {dtype} kernels; export in float32 "
                      "(--precision fp32) to check parity on a CPU")


class ParityError(RuntimeError):
    """An exported graph whose ONNX Runtime output differs from PyTorch beyond the stated tolerance."""


def _onnx_dtype(dtype: torch.dtype) -> int:
    import onnx

    table = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
             torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
             torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL}
    return table[dtype]


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
    del sess
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


def _attach_weights(proto, tensors: dict[str, torch.Tensor], data_path: Path) -> None:
    """Turn the graph inputs named after model tensors into initializers stored in ``data_path``, written one
    tensor at a time straight from the model's memory (no second copy of the weights)."""
    import onnx

    graph_inputs = list(proto.graph.input)
    del proto.graph.input[:]
    offset = 0
    with open(data_path, "wb") as fh:
        for value in graph_inputs:
            tensor = tensors.get(value.name)
            if tensor is None:
                proto.graph.input.append(value)
                continue
            t = tensor.detach().to("cpu").contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy()  # a view: bfloat16 has no numpy dtype, bytes do
            pad = -offset % DATA_ALIGNMENT
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(memoryview(raw))
            init = onnx.TensorProto(name=value.name, data_type=_onnx_dtype(t.dtype), dims=list(t.shape),
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, val in (("location", data_path.name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, val
            proto.graph.initializer.append(init)
            offset += raw.nbytes


@contextlib.contextmanager
def _shape_inference_without_weights():
    """Run the TorchScript exporter's whole-graph ONNX shape inference without the weight values.

    That pass serialises the graph together with every parameter as an initializer, a full copy of the weights
    (measured: a 304 MB bf16 checkpoint exported with a peak resident growth of 1.91x its size; with this, 1.0x).
    Shapes and types of the weights are already on the graph's inputs, which is all inference needs, so it is handed
    an empty parameter table (the exported graphs are the same). A torch without this pass is left alone.
    """
    original = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if original is None:
        yield
        return
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda graph, params, opset: original(graph, {}, opset)
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def _export_once(graph: GraphModule, inputs: dict[str, torch.Tensor], path: Path,
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        bare = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints; dynamic sizes are verified after
            with torch.no_grad(), export_mode(graph.model), _shape_inference_without_weights():
                torch.onnx.export(graph, tuple(inputs.values()), str(bare), input_names=list(inputs),
                                  output_names=graph.output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                                  dynamo=False, export_params=False, do_constant_folding=False)
        proto = onnx.load(str(bare))
    tensors = dict(graph.named_parameters())
    tensors.update(graph.named_buffers())
    data = path.parent / (path.name + ".data")
    _attach_weights(proto, tensors, data)
    stray = [i.name for i in proto.graph.input if i.name not in inputs]
    if stray:
        raise RuntimeError(f"{graph.name}: the exporter left graph inputs that are no model tensor: {stray[:4]}.")
    onnx.save_model(proto, str(path))


def _other_shape(shape: ExportShape, graph: GraphModule) -> ExportShape:
    """A second size on every dynamic axis, to test that ONNX Runtime really takes the graph at other sizes; the
    fewest references the graph runs with (zero for the backbone: a clip without references)."""
    return dataclasses.replace(shape, batch=shape.batch + 1, frames=shape.frames + 1, height=shape.height + 2,
                               width=shape.width + 4, refs=graph.min_refs)


@dataclasses.dataclass
class ExportedGraph:
    name: str
    file: str
    external_data: str
    inputs: dict
    outputs: dict
    dynamic_axes: dict
    static_axes_note: Optional[str]
    parity: dict


def _sample(graph: GraphModule, shape: ExportShape, seed: int) -> dict[str, torch.Tensor]:
    inputs = graph.sample_inputs(shape, torch.Generator().manual_seed(seed))
    return {k: v for k, v in inputs.items() if k in graph.input_names}


def export_graph(graph: GraphModule, out_dir: Path, shape: ExportShape, seed: int = 0,
                 rtol: float = PARITY_RTOL, log: Callable[[str], None] = print) -> ExportedGraph:
    """Export one graph to ``out_dir/<name>.onnx`` (+ ``.onnx.data``), verify dynamic sizes and parity where ONNX
    Runtime can run the graph's dtype; return its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{graph.name}.onnx"
    inputs = _sample(graph, shape, seed)
    dynamic = {k: dict(v) for k, v in graph.dynamic_axes.items()}
    note = None
    _export_once(graph, inputs, path, dynamic)
    dtype = graph.model.dtype
    if dtype == torch.float32:
        try:
            check_parity(graph, path, _sample(graph, _other_shape(shape, graph), seed + 1), rtol)
        except Exception as e:  # shape-specialised somewhere: fall back to the traced sizes and say so
            note = (f"dynamic axes refused by ONNX Runtime ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "exported with static shapes")
            log(f"{graph.name}: {note}")
            dynamic = {}
            _export_once(graph, inputs, path, dynamic)
        errors = check_parity(graph, path, inputs, rtol)
        parity = {"max_relative_error": errors, "tolerance": rtol}
        log(f"{graph.name}: parity ok (max relative error {max(errors.values()):.1e} ≤ {rtol:.0e})")
    else:
        parity = {"max_relative_error": None, "tolerance": rtol,
                  "note": NOT_CHECKED_ON_CPU.format(dtype=str(dtype).replace("torch.", ""))}
        log(f"{graph.name}: written in {dtype}, parity {parity['note']}")
    with torch.no_grad():
        outs = graph(*inputs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)

    def meta(name: str, t: torch.Tensor) -> dict:
        return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                "dynamic": {str(a): n for a, n in dynamic.get(name, {}).items()}}

    return ExportedGraph(
        name=graph.name, file=path.name, external_data=path.name + ".data",
        inputs={k: meta(k, v) for k, v in inputs.items()},
        outputs={n: meta(n, o) for n, o in zip(graph.output_names, outs)},
        dynamic_axes=dynamic, static_axes_note=note, parity=parity)
