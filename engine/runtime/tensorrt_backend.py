"""TensorRT backend: engines built by `python -m export --format tensorrt`, chained like the ONNX graphs.

Inputs and outputs stay torch CUDA tensors: each binding is set to the tensor's ``data_ptr()`` and the engines run
on the current torch stream, so nothing is copied to the host. Needs a CUDA GPU and the optional `tensorrt`
package (``pip install tensorrt``; not part of requirements.txt).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from .base import Backend, BackendUnavailable
from .chain import GraphChain, read_manifest


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when engines can be built/run here, else one sentence saying what is missing."""
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible to PyTorch."
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (it is an optional extra: pip install tensorrt)."
    return None


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, dt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = dt
    return table[trt_dtype]


class _TrtRunner:
    def __init__(self, folder: Path, manifest: dict, device: torch.device):
        import tensorrt as trt

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.device = device
        self.engines, self.contexts, self.outputs = {}, {}, {}
        for g in manifest["graphs"]:
            engine = self.runtime.deserialize_cuda_engine((folder / g["engine"]).read_bytes())
            if engine is None:
                raise BackendUnavailable(f"TensorRT could not load {g['engine']} (built for another GPU or TensorRT "
                                         "version?); rebuild it with python -m export --format tensorrt.")
            self.engines[g["name"]] = engine
            self.contexts[g["name"]] = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            self.outputs[g["name"]] = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine, ctx = self.engines[graph], self.contexts[graph]
        keep = []
        for name, t in feeds.items():
            t = t.to(self.device, _torch_dtype(engine.get_tensor_dtype(name))).contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            if t.numel() == 0:  # zero reference tokens: TensorRT wants a valid address even for an empty tensor
                t = torch.empty(1, dtype=t.dtype, device=self.device)
            keep.append(t)
            ctx.set_tensor_address(name, t.data_ptr())
        out = {}
        for name in self.outputs[graph]:
            shape = tuple(ctx.get_tensor_shape(name))
            out[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, out[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {graph} engine.")
        return out


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engines_dir: Union[str, Path], model: Optional[torch.nn.Module] = None,
                 device: Union[str, torch.device] = "cuda"):
        super().__init__(model)
        reason = tensorrt_unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        folder = Path(engines_dir)
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, ValueError) as e:
            raise BackendUnavailable(str(e)) from e
        if manifest.get("runtime") != "tensorrt":
            raise BackendUnavailable(f"{folder} holds no TensorRT engines; build them with "
                                     "python -m export --format tensorrt.")
        self.manifest = manifest
        self.chain = GraphChain(manifest, _TrtRunner(folder, manifest, torch.device(device)))

    def __call__(self, **forward_kwargs: Any):
        return self.chain(**forward_kwargs)
