"""WorldStereo Studio web demo: ``python app.py`` serves it on http://127.0.0.1:7860.

Without a CUDA GPU or the official weights it falls back to the CPU ``preview`` engine and says so in a
banner. Flags: ``--host``, ``--port``, ``--engine``, ``--weights DIR``, ``--max-concurrent``, ``--output-dir``,
``--keep-hours``, ``--max-upload-mb``, ``--max-editors``, ``--editor-idle-minutes``, ``--view-splats``,
``--share`` (off by default; see "Serving publicly" in README.md), ``--gpus`` and ``--workers-per-gpu`` (see "More
than one GPU").
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine.engines import ENGINES

    p = argparse.ArgumentParser(description="WorldStereo Studio web demo")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--engine", choices=list(ENGINES),
                   help="default engine (default: worldstereo-memory-dmd on a GPU with weights, else preview)")
    p.add_argument("--weights", help="local folder with the checkpoints (else the Hugging Face cache)")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="generation jobs run at the same time; others wait in a visible queue (default 1)")
    p.add_argument("--output-dir", default="outputs", help="where job folders go (default ./outputs)")
    p.add_argument("--keep-hours", type=float, default=24.0, help="job folders older than this are removed (0: never)")
    p.add_argument("--examples-dir", help="example inputs (default ../shared/examples when present)")
    p.add_argument("--max-upload-mb", type=float, default=50.0,
                   help="largest upload accepted, in MB; bigger files are refused before they are stored (default 50)")
    p.add_argument("--max-editors", type=int, default=4,
                   help="3D camera-path editors open at once, one per page; each is a viser server on 127.0.0.1 "
                        "reached through this app (default 4, 0 switches the editor off)")
    p.add_argument("--editor-idle-minutes", type=float, default=15.0,
                   help="an editor nobody used for this long is closed (default 15)")
    p.add_argument("--view-splats", type=int,
                   help="splats sent to the browser's splat view (default 100000; a fixed subset beyond that, each "
                        "grown to cover the same area); browsers without GPU acceleration draw fewer faster")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--gpus", help="comma-separated CUDA GPUs, e.g. 0,1,2,3: one sequence-parallel group over them "
                   "(worker processes started and stopped by the app)")
    p.add_argument("--workers-per-gpu", type=int, help="instead of one group: one pipeline per GPU of --gpus (default "
                   "every GPU), serving this many scenes at once on each")
    return p


@dataclass
class Serving:
    """How the app serves its GPUs (``--gpus``, ``--workers-per-gpu``)."""

    device: str  # where scenes compute depth and renders (and, without a pool, everything)
    max_concurrent: int  # scenes served at once
    description: str


def parse_gpus(text: Optional[str]) -> list[int]:
    """``"0,1,3"`` → [0, 1, 3], checked against the CUDA GPUs present; None → every GPU present."""
    import torch

    from engine.distributed import GroupError

    if not torch.cuda.is_available():
        raise GroupError("--gpus and --workers-per-gpu need CUDA GPUs and this machine has none.")
    count = torch.cuda.device_count()
    if text is None:
        return list(range(count))
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GroupError(f"--gpus takes comma-separated GPU indices such as 0,1; got {text!r:.40}.") from None
    if not gpus or len(set(gpus)) != len(gpus) or any(g < 0 or g >= count for g in gpus):
        raise GroupError(f"--gpus must name distinct GPUs among 0..{count - 1}; got {text!r:.40}.")
    return gpus


def start_serving(gpus_text: Optional[str], workers_per_gpu: Optional[int], max_concurrent: int = 1) -> Serving:
    """What `python app.py --gpus ... [--workers-per-gpu N]` asks for: a sequence-parallel group over the GPUs
    (worker processes started here, stopped at exit; ``engine.distributed``), or one pipeline per GPU serving N
    scenes each (``engine.generators.GpuPool``)."""
    from engine.distributed import GroupError, start_group
    from engine.generators import set_gpu_pool
    from engine.models.parallel import ParallelError

    if workers_per_gpu is not None and workers_per_gpu < 1:
        raise GroupError("--workers-per-gpu must be at least 1.")
    gpus = parse_gpus(gpus_text)
    devices = [f"cuda:{g}" for g in gpus]
    if workers_per_gpu is not None:
        if max_concurrent != 1:
            raise GroupError("--workers-per-gpu sets how many scenes run at once; drop --max-concurrent.")
        set_gpu_pool(devices)
        jobs = len(devices) * workers_per_gpu
        return Serving(devices[0], jobs, f"{len(devices)} GPU(s) ({', '.join(map(str, gpus))}), one pipeline each, "
                                         f"{workers_per_gpu} scene(s) per GPU at once ({jobs} in all)")
    if len(devices) == 1:
        return Serving(devices[0], max_concurrent, f"GPU {gpus[0]}")
    try:
        start_group(devices)
    except ParallelError as e:
        raise GroupError(str(e)) from None
    return Serving(devices[0], max_concurrent, f"one sequence-parallel group over GPUs {', '.join(map(str, gpus))}")


def make_context(args):
    from demo.context import AppContext
    from demo.examples import default_examples_dir, find_examples
    from engine.engines import resolve_engine

    notes = []
    engine = resolve_engine(args.engine, Path(args.weights) if args.weights else None, announce=notes.append)
    examples_dir = Path(args.examples_dir) if args.examples_dir else default_examples_dir()
    for note in notes:
        print(note, flush=True)
    return AppContext(output_dir=Path(args.output_dir), default_engine=engine, weights=args.weights,
                      examples=find_examples(examples_dir), max_age_s=args.keep_hours * 3600.0,
                      startup_note=" ".join(notes)), examples_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_concurrent < 1:
        print("error: --max-concurrent must be at least 1.", file=sys.stderr)
        return 2
    if not args.max_upload_mb > 0:
        print("error: --max-upload-mb must be more than 0.", file=sys.stderr)
        return 2
    if args.max_editors < 0 or not args.editor_idle_minutes > 0:
        print("error: --max-editors must be 0 or more and --editor-idle-minutes more than 0.", file=sys.stderr)
        return 2
    if args.view_splats is not None and args.view_splats < 1:
        print("error: --view-splats must be at least 1.", file=sys.stderr)
        return 2
    serving = None
    if args.gpus is not None or args.workers_per_gpu is not None:
        from engine.distributed import GroupError

        try:
            serving = start_serving(args.gpus, args.workers_per_gpu, args.max_concurrent)
        except GroupError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Gradio's copies of served files live beside the jobs, so one folder holds (and cleans) everything.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out / "gradio-cache"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from demo import jobs
    from demo.ui import CSS, build_demo

    ctx, examples_dir = make_context(args)
    ctx.view_splats = args.view_splats
    routes = []
    if args.max_editors > 0:
        from demo.editor import EditorPool, routes as editor_routes

        ctx.editors = EditorPool(args.max_editors, idle_s=60.0 * args.editor_idle_minutes)
        routes = editor_routes(ctx.editors)
    if serving is not None:
        ctx.device = serving.device
        print(f"GPUs: {serving.description}.", flush=True)
    removed = jobs.cleanup_old_jobs(ctx.output_dir, ctx.max_age_s)
    if removed:
        print(f"Removed {len(removed)} job folder(s) older than {args.keep_hours:g} h.", flush=True)
    for job in jobs.unfinished_jobs(ctx.output_dir):
        # Listed here, not on the page: a scene id is its only key, so visitors never see each other's.
        print(f"Unfinished scene {job['id']}: {job['clips']} clip(s) done, still to generate: "
              f"{', '.join(map(str, job['remaining']))} (Resume it by id on the page).", flush=True)
    demo = build_demo(ctx, max_concurrent=serving.max_concurrent if serving else args.max_concurrent)
    allowed = [str(ctx.output_dir)] + ([str(examples_dir)] if examples_dir.is_dir() else [])
    print(f"Engine: {ctx.default_engine}. Serving on http://{args.host}:{args.port}", flush=True)
    try:
        # The editors' routes (/viser/<token>/ and its WebSocket) are the app's own: one port serves everything.
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed,
                    css=CSS, show_error=True, footer_links=[], max_file_size=int(args.max_upload_mb * 1024 * 1024),
                    app_kwargs={"routes": routes})
    finally:
        if ctx.editors is not None:
            ctx.editors.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
