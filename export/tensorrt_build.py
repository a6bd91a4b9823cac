"""Build TensorRT engines from the exported ONNX graphs (one engine per graph, plus a manifest).

Needs a CUDA GPU and the optional `tensorrt` package — ``pip install tensorrt`` (the NVIDIA wheel; it is not in
requirements.txt, so the CPU install stays small). Without either, `build_engines` refuses with one sentence.

Per graph: parse the ONNX file (external weights included), one optimization profile covering the dynamic axes
(batch 1–2 so CFG's doubled batch fits; frames 2–F; latent height/width across the landscape and portrait aspect
buckets of the target size; 1–8 references (``MAX_REFERENCES``), and 0–8 references' tokens for the backbone), the
precision flag of the graphs' dtype (bf16 / fp16), a timing cache shared by all graphs and kept on disk so rebuilds
are fast, then ``<name>.engine`` and ``manifest.json`` beside it.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from engine.atomicio import atomic_write_bytes, atomic_write_json
from engine.constants import MAX_REFERENCES, VAE_SCALE
from engine.runtime import spec
from engine.runtime.chain import read_manifest
from engine.runtime.tensorrt_backend import tensorrt_unavailable_reason

TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 16 * 1024 ** 3


class TensorRTUnavailable(ValueError):
    """No CUDA GPU or no tensorrt package: engines cannot be built here."""


def require_tensorrt() -> None:
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailable(f"Cannot build TensorRT engines: {reason}")


def axis_ranges(target: dict[str, int], patch: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic axis the exporter names, for a target shape (latent sizes)."""
    _, ph, pw = patch
    b, f, h, w, r = target["batch"], target["frames"], target["height"], target["width"], max(target["refs"], 1)
    lo, hi = min(h, w), max(h, w)  # the transposed aspect bucket fits the same engine
    tok = lambda n, a, c: n * (a // ph) * (c // pw)  # noqa: E731
    return {
        "batch": (1, b, max(2, b)),
        "frames": (2, f, f),
        "latent_height": (lo, h, hi), "latent_width": (lo, w, hi),
        "height": tuple(VAE_SCALE * n for n in (lo, h, hi)), "width": tuple(VAE_SCALE * n for n in (lo, w, hi)),
        "refs": (1, r, MAX_REFERENCES),
        "tokens": (tok(2, lo, lo), tok(f, h, w), tok(f, hi, hi)),
        "ref_tokens": (0, tok(r, h, w), tok(MAX_REFERENCES, hi, hi)),  # 0: a clip without references
    }


def input_profile(entry: dict[str, Any], ranges: dict[str, tuple[int, int, int]]) -> dict[str, tuple[list, list, list]]:
    """Per input of a manifest graph entry: (min, opt, max) shapes."""
    out = {}
    for name, meta in entry["inputs"].items():
        shapes = [list(meta["shape"]) for _ in range(3)]
        for axis, symbol in meta.get("dynamic", {}).items():
            for k in range(3):
                shapes[k][int(axis)] = ranges[symbol][k]
        out[name] = tuple(shapes)
    return out


def build_engines(onnx_dir: Path, out_dir: Path, target: Optional[dict[str, int]] = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build one engine per graph of ``onnx_dir``'s manifest into ``out_dir``, in the graphs' dtype; returns the
    engine manifest."""
    require_tensorrt()
    import tensorrt as trt

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(onnx_dir)
    precision = manifest["precision"]["dtype"]
    target = target or manifest["shapes"]["target"]
    ranges = axis_ranges(target, tuple(manifest["model"]["patch_size"]))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out_dir / TIMING_CACHE
    timing_cache = None
    engines = []
    for entry in manifest["graphs"]:
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_dir / entry["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {entry['file']}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if precision == "bfloat16":
            config.set_flag(trt.BuilderFlag.BF16)
        if precision == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
        if timing_cache is None:
            timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        shapes = input_profile(entry, ranges)
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            lo, opt, hi = shapes[name]
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        log(f"building {entry['name']} ({precision}) ...")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {entry['file']} (see its log above).")
        engine_file = f"{entry['name']}.engine"
        atomic_write_bytes(out_dir / engine_file, bytes(plan))
        new = copy.deepcopy(entry)
        new.update(engine=engine_file, onnx=str((onnx_dir / entry["file"]).resolve()),
                   profile={k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in shapes.items()})
        engines.append(new)
    if timing_cache is not None:
        atomic_write_bytes(cache_path, bytes(timing_cache.serialize()))
    out = dict(manifest)
    out.update(runtime="tensorrt", graphs=engines, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               tensorrt={"version": trt.__version__, "precision": precision, "timing_cache": TIMING_CACHE,
                         "workspace_bytes": WORKSPACE_BYTES, "axis_ranges": ranges})
    out["precision"] = dict(manifest["precision"], engines=precision)
    atomic_write_json(out_dir / spec.MANIFEST_NAME, json.loads(json.dumps(out)))
    log(f"wrote {len(engines)} engines and {spec.MANIFEST_NAME} to {out_dir}")
    return out
