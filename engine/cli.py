"""Command line: ``python -m engine generate|revert|render|conditions|evaluate|inspect|engines`` — the same engine
the web demo drives.

Every error a person can cause ends in one sentence on stderr and exit code 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from engine.constants import KEYFRAMES
from engine.engines import ENGINES, engine_status, resolve_engine
from engine.offload import OFFLOAD_CHOICES, offload_help_text
from engine.runtime import BACKENDS


class _Bar:
    """Maps the engine's ``(fraction, message)`` progress onto one tqdm bar."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=desc, unit="‰", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        self.last = 0

    def __call__(self, fraction: float, message: str) -> None:
        pos = int(round(min(max(fraction, 0.0), 1.0) * 1000))
        if pos > self.last:
            self.bar.update(pos - self.last)
            self.last = pos
        self.bar.set_postfix_str(message[:60], refresh=True)

    def close(self) -> None:
        self.bar.close()


def _user_errors() -> tuple[type, ...]:
    from engine.geometry.cameras import CameraFormatError
    from engine.images import ImageInputError
    from engine.settings import SceneError

    # Every input error of the engine is a ValueError subclass with a one-sentence message.
    return (CameraFormatError, ImageInputError, SceneError, ValueError)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_generate(args) -> int:
    from engine import conditioning
    from engine.geometry import trajectories as traj
    from engine.geometry.cameras import Cameras
    from engine.jobfolder import CLIPS, JobFolder, check_same_input
    from engine.official_scene import is_official_scene, read_official_scene
    from engine.scene import (Scene, TrajectoryRequest, check_trajectory_prompts, default_trajectory_names,
                              parse_trajectory_prompts, with_trajectory_prompts)
    from engine.settings import SceneError, SceneSettings, check_frames

    official, render_arg = args.official_scene, args.render_dir
    if render_arg and is_official_scene(render_arg):  # a scene root: run it as the release runs it
        if official and Path(official).resolve() != Path(render_arg).resolve():
            raise SceneError("--render-dir names another official scene than --official-scene; give one of them.")
        official, render_arg = render_arg, None
    if sum(bool(x) for x in (args.image, args.panorama, official)) != 1:
        raise SceneError("Give exactly one input: --image PATH, --panorama PATH or --official-scene DIR.")
    if render_arg and not args.image:
        raise SceneError("--render-dir goes with --image (the trajectory's start frame), or names an official scene "
                         "folder (with pano_bank/).")
    names = [t.strip() for t in args.trajectories.split(",") if t.strip()] if args.trajectories else None
    for name in names or []:
        preset = name.split(":", 1)[-1]
        if preset not in traj.PRESETS:
            raise SceneError(f"Unknown trajectory '{preset}'; choose from: {', '.join(traj.PRESETS)}.")
    prompts = parse_trajectory_prompts(args.trajectory_prompt or [])
    render_dir = conditioning.check_render_dir(render_arg) if render_arg else None
    camera_files = [(Path(args.camera_json).stem, Path(args.camera_json), None)] if args.camera_json else []
    if render_dir is not None:  # the official example's trajectory is the first clip
        camera_files.insert(0, (render_dir.name, render_dir / "camera.json", render_dir))
    for label, path, _ in camera_files:  # refused before any folder is made
        check_frames(len(Cameras.from_json(path)), f"Camera file {path.name}")
    engine = resolve_engine(args.engine, Path(args.weights) if args.weights else None, announce=print,
                            device=args.device)
    out = Path(args.out)
    kind = "official" if official else "panorama" if args.panorama else "photo"
    source = official or args.image or args.panorama
    if prompts and not JobFolder(out).holds_scene():  # a prompt for no trajectory of the run: refused before starting
        planned = ([t.label for t in read_official_scene(official).trajectories] if official else [])
        planned += [label for label, _, _ in camera_files] + (names or [])
        check_trajectory_prompts(prompts, planned or default_trajectory_names(kind))
    if JobFolder(out).holds_scene():
        check_same_input(out, source, kind)
        scene = Scene.open(out, settings_override={"backend": args.backend, "graphs": args.graphs})
        print(f"Resuming the scene in {out} ({len(scene.clips)} clip(s) already done).")
    else:
        prompt = args.prompt
        if prompt is None and args.image:
            prompt = conditioning.example_prompt(args.image, render_dir)  # the official examples' captions
        settings = SceneSettings(engine=engine, seed=args.seed, prompt=prompt, device=args.device or _default_device(),
                                 weights=args.weights, depth=args.depth,
                                 frames=SceneSettings.frames if args.frames is None else args.frames,
                                 steps=args.steps, backend=args.backend, graphs=args.graphs, offload=args.offload)
        bar = _Bar("preparing")
        try:
            if official:
                scene = Scene.create_official(out, official, settings=settings, progress=bar)
            else:
                scene = Scene.create(out, source, panorama=bool(args.panorama), settings=settings,
                                     camera_json=camera_files[0][1] if camera_files else None, progress=bar)
        finally:
            bar.close()
    files = {path: TrajectoryRequest(name=label, cameras=scene.read_camera_file(path),
                                     render_dir=str(folder) if folder is not None else None)
             for label, path, folder in camera_files}
    # An official scene's trajectories come first (as the release runs them), then the pre-rendered trajectory (its
    # renders are of the start frame alone), the presets, a camera file last.
    requests = (scene.official_requests() + [r for r in files.values() if r.render_dir]
                + [TrajectoryRequest.parse(n) for n in names or []] + [r for r in files.values() if not r.render_dir])
    requests = with_trajectory_prompts(
        requests or [TrajectoryRequest.parse(t) for t in scene.default_trajectories()], prompts)
    evaluator = None
    if args.evaluate:  # each clip judged in a thread of its own as it is committed, those already done first
        from engine.evaluate import ClipEvaluator

        evaluator = ClipEvaluator(out, threads=1, seed=args.seed)
        for clip in scene.clips:
            evaluator.submit(clip)
    bar = _Bar("generating")
    t0 = time.perf_counter()
    try:
        scene.run(requests, progress=bar,
                  on_commit=(lambda c: evaluator.submit(c.clips[-1])) if evaluator is not None else None)
    except BaseException:
        if evaluator is not None:  # the error's sentence ends the command, not the evaluations still queued
            evaluator.cancel()
        raise
    finally:
        bar.close()
    print(f"Done in {time.perf_counter() - t0:.1f} s with the '{scene.settings.engine}' engine. Written to {out}:")
    for clip in scene.clips:
        print(f"  {clip['folder']}/  {_listing(scene.folder.clip_files(clip['name']).folder)}")
    if evaluator is not None:
        from engine.evaluate import table, write_scene_evaluation

        t1 = time.perf_counter()
        report = evaluator.report()
        write_scene_evaluation(out, report)  # the zip is written again to hold it
        print(table(report))
        print(f"Evaluated {len(report['clips'])} clip(s) beside the run ({time.perf_counter() - t1:.1f} s more after "
              f"it).")
    print(f"  {_listing(out, skip=(CLIPS,))}")
    return 0


def _listing(folder: Path, skip: Sequence[str] = ()) -> str:
    """What ``folder`` holds, one level deep, folders marked with a slash (hidden entries and ``skip`` left out)."""
    entries = (p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in skip)
    return " ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in entries))


def cmd_conditions(args) -> int:
    from engine.render_cli import RenderInputError, write_conditions, write_scene_conditions

    if bool(args.image) == bool(args.scene):
        raise RenderInputError("Give exactly one of --image PHOTO (its first clip) or --scene OUT (a scene's next "
                               "clip).")
    if args.scene:
        if args.render_dir or args.depth:
            raise RenderInputError("--render-dir and --depth go with --image; a scene's next clip uses the scene's "
                                   "own renders and depth.")
        cond, found = write_scene_conditions(args.scene, args.out, trajectory=args.trajectory,
                                             camera_json=args.camera_json, engine=args.engine, weights=args.weights,
                                             stride=args.stride)
        keys = ", ".join(f"{k} {list(v.shape)}" for k, v in cond.tensors().items())
        ids = f", ref_ids {found.references}" if cond.ref_index is not None else ""
        print(f"Wrote {args.out}: {keys}{ids}")
        return 0
    cond = write_conditions(args.image, args.out, camera_json=args.camera_json, trajectory=args.trajectory,
                            render_dir=args.render_dir, engine=args.engine, weights=args.weights, stride=args.stride,
                            depth=args.depth, announce=print)
    keys = ", ".join(f"{k} {list(v.shape)}" for k, v in cond.tensors().items())
    print(f"Wrote {args.out}: {keys}")
    return 0


def cmd_revert(args) -> int:
    from engine.scene import revert

    scene, removed = revert(Path(args.out))
    print(f"Removed clip {removed['name']}; {args.out} holds {len(scene.clips)} clip(s), its files as they were "
          "before that clip.")
    return 0


def cmd_render(args) -> int:
    from engine.render_cli import render_scene

    render_scene(args.scene, args.out, trajectory=args.trajectory, depth=args.depth, frames=args.frames,
                 max_side=args.max_side, announce=print)
    print(f"Wrote {args.out}/render.mp4, render_mask.mp4, cameras.json")
    return 0


def cmd_evaluate(args) -> int:
    from engine.evaluate import EvaluationError, evaluate_scene, table, write_evaluation, write_scene_evaluation

    if args.threads < 1:
        raise EvaluationError(f"--threads must be at least 1; got {args.threads}.")
    clips = [c.strip() for c in args.clips.split(",") if c.strip()] if args.clips else None
    bars = []  # the bar starts with the work, so a refused argument prints its sentence alone

    def progress(fraction: float, message: str) -> None:
        if not bars:
            bars.append(_Bar("evaluating"))
        bars[0](fraction, message)

    try:
        report = evaluate_scene(args.out, clips=clips, reference_cloud=args.reference_cloud, threshold=args.threshold,
                                align=args.align, threads=args.threads, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        json_path, png_path = write_evaluation(report, args.json, Path(args.json).with_suffix(".png"))
    else:  # the scene's own evaluation: its zip, when it has one, is written again to hold it
        json_path, png_path = write_scene_evaluation(args.out, report)
    print(table(report))
    print(f"Wrote {json_path} and {png_path}")
    return 0


def cmd_engines(args) -> int:
    for name in ENGINES:
        ok, reason = engine_status(name, Path(args.weights) if args.weights else None)
        print(f"{'available  ' if ok else 'unavailable'}  {reason}")
    return 0


def cmd_inspect(args) -> int:
    from engine.models.inventory import inspect_checkpoints

    for report in inspect_checkpoints(args.source, args.variant):
        print("\n".join(report.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="WorldStereo Studio engine")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one photo or panorama in: clips, point cloud, cameras, dataset out")
    g.add_argument("--image", help="input photo (PNG, JPEG, WebP)")
    g.add_argument("--panorama", help="input 360° equirectangular panorama (2:1)")
    g.add_argument("--trajectories", help="comma-separated presets, e.g. up,left,right,orbit (panorama: view0:forward,…)")
    g.add_argument("--camera-json", help="an official camera.json trajectory to generate as well")
    g.add_argument("--render-dir", help="an official pre-rendered trajectory folder (camera.json, render.mp4, "
                   "render_mask.mp4): the first clip, conditioned on its renders; given an official scene folder "
                   "(with pano_bank/), the same as --official-scene")
    g.add_argument("--official-scene", help="an official scene folder (pano_bank/ + view*/traj*/): run as the release "
                   "runs it (its bank, its trajectories in the release's order, each with its own caption)")
    g.add_argument("--trajectory-prompt", action="append", metavar="NAME=TEXT",
                   help="the prompt of one trajectory of this run (repeatable; NAME as the run names it: left, "
                   "view0:forward, view0/traj1, a camera file's name); others use --prompt or their own caption")
    g.add_argument("--engine", choices=list(ENGINES), help="default: worldstereo-memory-dmd on a GPU with weights, else preview")
    g.add_argument("--weights", help="local folder with the checkpoints (else the Hugging Face cache)")
    g.add_argument("--prompt", help="the scene's text prompt (default: the example's traj_caption.json or "
                   "prompt.json caption; an official scene's trajectories keep their own captions)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--frames", type=int, help=f"keyframes per clip (default {KEYFRAMES})")
    g.add_argument("--depth", help="depth model folder/repo, or a depth map (.npy metres / 16-bit PNG) for the input")
    g.add_argument("--device", help="cpu or cuda (default: cuda when present); cpu also runs a full engine (small "
                   "packages only)")
    g.add_argument("--steps", type=int, help="denoising steps (default: 4 for DMD, 40 otherwise)")
    g.add_argument("--backend", choices=list(BACKENDS), default="eager",
                   help="how the transformer runs (onnxruntime/tensorrt need --graphs from `python -m export`)")
    g.add_argument("--graphs", help="folder of exported ONNX graphs or TensorRT engines")
    g.add_argument("--offload", choices=list(OFFLOAD_CHOICES), default="none",
                   help="GPU memory: " + offload_help_text())
    g.add_argument("--out", default="outputs/scene", help="job folder (an existing one is resumed)")
    g.add_argument("--evaluate", action="store_true",
                   help="judge each clip's camera accuracy as it is committed (as `evaluate` does, in a thread beside "
                        "the loop) and write evaluation.json/.png with the scene")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("revert", help="remove a scene's last clip: cache, memory, manifest and downloads as before it")
    v.add_argument("out", help="the scene's job folder (generate --out)")
    v.set_defaults(func=cmd_revert)

    r = sub.add_parser("render", help="render a scene's 3D cache along a trajectory (GGM inputs)")
    r.add_argument("--scene", required=True, help="a folder with image.png (+ camera.json), or a job folder")
    r.add_argument("--out", required=True)
    r.add_argument("--trajectory", help="a preset name or a camera.json path (default: the scene's camera.json, else orbit)")
    r.add_argument("--depth", help="depth map of the image (.npy metres or 16-bit PNG)")
    r.add_argument("--frames", type=int, default=KEYFRAMES)
    r.add_argument("--max-side", type=int, default=768, help="longest image side of the renders")
    r.set_defaults(func=cmd_render)

    c = sub.add_parser("conditions", help="write a photo's first-clip model conditioning, or a scene's next clip's "
                       "(safetensors, no weights needed)")
    c.add_argument("--image", help="input photo (its first clip)")
    c.add_argument("--scene", help="a scene's job folder (generate --out): its next clip, with the references' "
                   "memory-bank indices (ref_ids)")
    c.add_argument("--camera-json", help="an official camera.json trajectory")
    c.add_argument("--trajectory", help="a preset trajectory name instead of a camera file (with --scene also "
                   "view<k>:preset, an official scene's view0/traj1, or an unfinished trajectory of the last run)")
    c.add_argument("--render-dir", help="an official pre-rendered trajectory folder instead of rendering the cache")
    c.add_argument("--engine", choices=list(ENGINES), default="worldstereo-memory-dmd",
                   help="whose conditioning (size, keyframes, memory inputs); default worldstereo-memory-dmd")
    c.add_argument("--weights", help="checkpoint folder (its config.json), else the Hugging Face cache or the defaults")
    c.add_argument("--depth", help="depth model folder/repo, or a depth map (.npy metres / 16-bit PNG) of the photo")
    c.add_argument("--stride", type=int, default=1, help="keep every N-th pixel row and column of per-pixel maps")
    c.add_argument("--out", required=True, help="output .safetensors file")
    c.set_defaults(func=cmd_conditions)

    ev = sub.add_parser("evaluate", help="camera accuracy of each clip (structure from motion vs the asked cameras) "
                        "and, given a reference cloud, the reconstruction's precision / recall / F1 / AUC")
    ev.add_argument("out", help="the scene's job folder (generate --out)")
    ev.add_argument("--clips", help="comma-separated clip names (default: every finished clip)")
    ev.add_argument("--reference-cloud", help="a reference point cloud (.ply) to judge scene.ply against")
    ev.add_argument("--threshold", type=float, help="distance threshold for F1 in scene units (default: 1%% of the "
                    "reference's bounding-box diagonal)")
    ev.add_argument("--align", action="store_true", help="align scene.ply to the reference first (similarity, ICP)")
    ev.add_argument("--json", help="where to write the report (default OUT/evaluation.json; the picture goes beside "
                    "it as .png)")
    ev.add_argument("--threads", type=int, default=2, help="CPU threads for structure from motion (default 2)")
    ev.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("inspect", help="what a checkpoint holds and needs, from its files' headers (reads no tensor)")
    i.add_argument("source", help="a checkpoint folder, a --weights folder with one folder per variant, or a hub "
                   "repository id (hanshanxue/WorldStereo)")
    i.add_argument("--variant", choices=[s.variant for s in ENGINES.values() if s.variant],
                   help="only this variant (default: every variant found)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("engines", help="list engines and whether they can run here")
    e.add_argument("--weights")
    e.set_defaults(func=cmd_engines)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from engine import distributed

    if distributed.launched():  # torchrun: rank 0 runs the command, the other ranks join its transformer forwards
        return distributed.run_launched(lambda: _run(build_parser().parse_args(argv)))
    return _run(build_parser().parse_args(argv))


def _run(args) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("Interrupted; finished clips are kept and the run resumes with the same --out.", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if type(e) is ValueError:
            raise  # a bare ValueError is a bug, not a user's mistake: keep its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Disk full, quota, permissions: the machine's fault, not the engine's; every write is atomic, so
        # the job folder holds its last committed state and the same command resumes.
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e.__class__.__name__}{where}; finished clips are kept, free the space or fix "
              "the folder and rerun the same command to resume.", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        print("error: The device ran out of memory during generation; finished clips are kept, rerun the same "
              "command with --offload group (or model) or fewer --frames to resume.", file=sys.stderr)
        return 1


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


if __name__ == "__main__":
    sys.exit(main())
