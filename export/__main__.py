"""`python -m export --engine NAME --format onnx|tensorrt --out DIR [...]`: graphs/engines for the runtime backends.

Examples::

    python -m export --engine tiny-random --format onnx --out exported/tiny
    python -m export --engine worldstereo-memory-dmd --weights ckpts/WorldStereo --format tensorrt \\
        --out exported/dmd --height 480 --width 768 --frames 21 --refs 8 --precision bf16

The model is loaded once, in the precision the graphs get (default: the dtype its weights file holds), and exported
without a copy. TensorRT is an optional extra (``pip install tensorrt``) and needs a CUDA GPU; without them the
tensorrt format refuses in one sentence and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from engine.constants import IMAGE_TOKENS, MAX_REFERENCES

from .api import PRECISIONS

ENGINE_VARIANTS = {"worldstereo-memory-dmd": "worldstereo-memory-dmd", "worldstereo-memory": "worldstereo-memory",
                   "worldstereo-camera": "worldstereo-camera"}
TINY = "tiny-random"
TINY_DEFAULT_VARIANT = "worldstereo-memory-dmd"  # the one the tiny-random engine runs


class ExportUsageError(ValueError):
    """Command-line input that cannot be exported; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description="Export WorldStereo to ONNX graphs or TensorRT engines.")
    p.add_argument("--engine", required=True, choices=[TINY, *ENGINE_VARIANTS])
    p.add_argument("--weights", type=Path, help="checkpoint folder (variant folder or one holding variant subfolders)")
    p.add_argument("--format", required=True, choices=["onnx", "tensorrt"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--height", type=int, help="pixel height of the clip (default: 480, tiny: 64)")
    p.add_argument("--width", type=int, help="pixel width of the clip (default: 768, tiny: 64)")
    p.add_argument("--frames", type=int, help="keyframes per clip (default: the config's nframe)")
    p.add_argument("--refs", type=int, default=2,
                   help=f"memory references in the sample inputs (1-{MAX_REFERENCES}; default 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="dtype of the graphs and engines (default: the dtype of the checkpoint's weights); "
                        "ONNX Runtime on a CPU checks parity of fp32 graphs only")
    p.add_argument("--variant", choices=list(ENGINE_VARIANTS), help="tiny-random only: which variant to build tiny")
    p.add_argument("--memory-mode", choices=["stitched", "branch"], default="stitched",
                   help="tiny-random only: stitched (released) or branch (paper) memory")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load(args) -> tuple:
    from engine.models.loading import load_transformer, resolve_checkpoint

    dtype = PRECISIONS[args.precision] if args.precision else None  # None: as stored, no cast
    if args.engine == TINY:
        variant = args.variant or TINY_DEFAULT_VARIANT
        folder = args.weights
        if folder is None:
            from engine.models.tiny import cached_tiny_package

            folder = cached_tiny_package(variant, args.memory_mode)
        model = load_transformer(folder, dtype=dtype)
    else:
        if args.variant or args.memory_mode != "stitched":
            raise ExportUsageError("--variant and --memory-mode apply to tiny-random only; a checkpoint brings its own.")
        if args.weights is None:
            from engine.hub import HUB_REPO

            folder = HUB_REPO
        else:
            folder = args.weights
        model = load_transformer(folder, variant=ENGINE_VARIANTS[args.engine], dtype=dtype)
    _, weights = resolve_checkpoint(folder, None if args.engine == TINY else ENGINE_VARIANTS[args.engine])
    return model, weights


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "tensorrt":
            from .tensorrt_build import require_tensorrt

            require_tensorrt()  # refuse before minutes of ONNX export
        if not 1 <= args.refs <= MAX_REFERENCES:
            raise ExportUsageError(f"--refs must lie in 1..{MAX_REFERENCES} (the sample references); got {args.refs}.")
        from engine.models.tiny import TINY_IMAGE_TOKENS

        from .api import export_onnx
        from .graphs import ExportShape

        model, weights = _load(args)
        tiny = args.engine == TINY
        shape = ExportShape.from_pixels(args.height or (64 if tiny else 480), args.width or (64 if tiny else 768),
                                        args.frames or model.ws_config.nframe, args.refs,
                                        TINY_IMAGE_TOKENS if tiny else IMAGE_TOKENS, batch=args.batch)
        onnx_dir = args.out if args.format == "onnx" else args.out / "onnx"
        export_onnx(model, onnx_dir, shape, engine=args.engine, source=weights, seed=args.seed)
        if args.format == "tensorrt":
            import dataclasses

            from .tensorrt_build import build_engines

            del model
            build_engines(onnx_dir, args.out, target=dataclasses.asdict(shape))
    except ValueError as e:  # user-fixable input: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
