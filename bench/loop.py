"""Seconds per clip by stage of the scene loop, and the preview scene of a photo as the CLI runs it.

Two measurements, each in a fresh process of the checkout measured (``--engine-root``, default: this one):

1. ``stages``: a scene of ``--clips`` clips at the real size (the official 480x768 bucket, ``--frames`` 21) run by
   ``Scene.run``, the network replaced by the ``preview`` engine (the 3D cache's render with its holes filled by
   OpenCV inpainting) scaled up to the full bucket; depth comes from the depth door's constant-depth fallback (no
   model is read). Per clip, the stage seconds the manifest records (``manifest["clips"][i]["seconds"]``: every
   number there is a stage, other keys are ignored), and ``export`` (``Scene.export``, timed around the call).
2. ``scene``: ``python -m engine generate --image PHOTO --engine preview --out DIR`` (4 clips x 21 frames at the
   preview's own size), its own "Done in" figure and the process's wall time, ``--repeats`` times (median).

``--baseline-root DIR`` runs the same measurements on another checkout of the project (e.g. a ``git worktree`` of
the commit before a change), alternating with this one repeat by repeat so that both see the same load, and prints
the ratio of each figure to the baseline's. The table starts with the machine: CPU model, cores this process may
use, load average before and after (the machine may be shared: a high load makes every figure slower).

    python bench/loop.py --repeats 3
    python bench/loop.py --repeats 3 --baseline-root ../base
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = "../shared/examples/perspective/photorealistic-indoor-dining_spaces-030/image.png"
STAGES = ("render", "retrieve", "generate", "fuse", "write", "export", "total")
DONE = re.compile(r"Done in ([0-9.]+) s")


# ---- the machine ---------------------------------------------------------------------------------------------

def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# ---- the measurements, run inside the measured checkout ------------------------------------------------------

def stage_seconds(clip: dict) -> dict:
    """The stage seconds of a manifest's clip record: every number under ``seconds`` (other keys, such as a timeline
    of when each step ran, are left out)."""
    seconds = clip.get("seconds") or {}
    return {k: float(v) for k, v in seconds.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def measure_stages(out: Path, image: Path, clips: int, frames: int) -> dict:
    """One ``stages`` measurement (module doc) in this process; the engine is whatever ``sys.path`` finds first."""
    import engine
    import engine.settings as settings_mod
    from engine.scene import Scene
    from engine.settings import SceneSettings

    settings_mod.ENGINE_SCALE["preview"] = 1.0  # the preview engine at the real (official) bucket size
    settings = SceneSettings(engine="preview", frames=frames, seed=0)
    scene = Scene.create(out, image, settings=settings, announce=lambda m: None)  # depth: as the CLI finds it
    exported = {}
    real_export = Scene.export

    def timed_export(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real_export(self, *args, **kwargs)
        finally:
            exported["seconds"] = exported.get("seconds", 0.0) + time.perf_counter() - t

    Scene.export = timed_export
    names = ["up", "left", "right", "orbit", "down", "forward", "backward", "pan_left", "pan_right", "eloop"]
    t = time.perf_counter()
    scene.run([names[i % len(names)] for i in range(clips)])
    run_seconds = time.perf_counter() - t
    manifest = json.loads((out / "manifest.json").read_text())
    per_clip = [stage_seconds(c) for c in manifest["clips"]]
    return {"engine": str(Path(engine.__file__).resolve().parent), "size": list(manifest["size"]), "frames": frames, "clips": per_clip,
            "export": exported.get("seconds", float("nan")), "run": run_seconds}


def worker_env(root: Path, threads) -> dict:
    """The measured process's environment: the engine of ``root`` first, the hub off, and ``threads`` (when given)
    as the CPU threads of torch's kernels (``OMP_NUM_THREADS``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def measure_scene(root: Path, out: Path, image: Path, threads=None) -> dict:
    """One ``scene`` measurement (module doc): the CLI in a fresh process, cwd the measured checkout."""
    env = worker_env(root, threads)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine", "generate", "--image", str(image), "--engine", "preview",
                           "--out", str(out)], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    found = DONE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"The CLI in {root} failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"done": float(found.group(1)), "wall": wall, "size": list(manifest["size"]),
            "clips": len(manifest["clips"]), "frames": manifest["clips"][0]["frames"] if manifest["clips"] else 0}


def run_worker(root: Path, what: str, image: Path, clips: int, frames: int, threads=None) -> dict:
    """A measurement in a fresh process whose ``engine`` is the one under ``root``."""
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        out = Path(tmp) / "scene"
        if what == "scene":
            return measure_scene(root, out, image, threads)
        env = worker_env(root, threads)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "stages", "--image", str(image),
                               "--clips", str(clips), "--frames", str(frames), "--out", str(out)],
                              cwd=root, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"The stage measurement in {root} failed: {done.stderr[-1500:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if Path(result["engine"]) != root / "engine":
            raise SystemExit(f"The stage measurement of {root} imported the engine in {result['engine']}.")
        return result


# ---- the table -----------------------------------------------------------------------------------------------

def stage_medians(runs: list[dict]) -> dict:
    """Per stage, the median over every clip of every run (seconds per clip); ``export`` once per scene."""
    table = {}
    for stage in STAGES:
        if stage == "export":
            values = [r["export"] for r in runs]
        else:
            values = [c[stage] for r in runs for c in r["clips"] if stage in c]
        if values:
            table[stage] = statistics.median(values)
    return table


def _ratio(value: float, base) -> str:
    return f"{value / base:.2f}" if base else "—"


def print_tables(results: dict, names: list[str], args, loads: tuple[str, str]) -> None:
    from render import cpu_model  # bench/render.py, beside this script (imported here: it puts this checkout first)

    print(f"Machine: {cpu_model()}, {cores()} cores usable, load average before {loads[0]} / after {loads[1]}")
    threads = args.torch_threads or "unset (torch's default: one per core)"
    print(f"Python {platform.python_version()}; repeats {args.repeats}; OMP_NUM_THREADS {threads}; "
          f"date {time.strftime('%Y-%m-%d')}")
    for name in names:
        print(f"  {name}: {results[name]['root']}")
    base = names[1] if len(names) > 1 else None
    if not args.skip_stages:
        runs = results[names[0]]["stages"]
        h, w = runs[0]["size"]
        print(f"\nStages, seconds per clip (median over {args.clips} clips x {args.repeats} runs), {h}x{w}, "
              f"{args.frames} frames, stand-in: the preview engine at the full bucket; export once per scene")
        header = "| stage | " + " | ".join(names) + (" | ratio |" if base else " |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        medians = {n: stage_medians(results[n]["stages"]) for n in names}
        for stage in STAGES:
            row = [f"{medians[n].get(stage, float('nan')):.3f}" for n in names]
            ratio = f" {_ratio(medians[names[0]].get(stage, 0), medians[base].get(stage))} |" if base else ""
            print(f"| {stage} | " + " | ".join(row) + " |" + ratio)
    if not args.skip_scene:
        runs = results[names[0]]["scene"]
        print(f"\nPreview scene (python -m engine generate --image {Path(args.image).name} --engine preview): "
              f"{runs[0]['clips']} clips x {runs[0]['frames']} frames at {runs[0]['size'][0]}x{runs[0]['size'][1]}, "
              f"median of {args.repeats}")
        header = "| figure | " + " | ".join(names) + (" | ratio |" if base else " |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for key, label in (("done", "Done in (s)"), ("wall", "process wall (s)")):
            med = {n: statistics.median(r[key] for r in results[n]["scene"]) for n in names}
            every = {n: "/".join(f"{r[key]:.1f}" for r in results[n]["scene"]) for n in names}
            ratio = f" {_ratio(med[names[0]], med[base])} |" if base else ""
            print(f"| {label} | " + " | ".join(f"{med[n]:.2f} ({every[n]})" for n in names) + " |" + ratio)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-root", default=str(REPO), help="the checkout to measure (default: this one)")
    p.add_argument("--baseline-root", help="another checkout measured the same way, the ratios' denominator")
    p.add_argument("--image", default=str(REPO / DEFAULT_PHOTO), help="the photo (default: a shared example)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=4, help="clips of the stage measurement")
    p.add_argument("--frames", type=int, default=21, help="frames per clip of the stage measurement")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--skip-scene", action="store_true")
    p.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS of the measured processes (default: unset, "
                   "torch's choice: one per core)")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--worker", choices=("stages",), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    image = Path(args.image).resolve()
    if args.worker:
        print(json.dumps(measure_stages(Path(args.out), image, args.clips, args.frames)))
        return 0
    if not image.is_file():
        raise SystemExit(f"The photo {image} does not exist; give one with --image.")
    roots = {"this": Path(args.engine_root).resolve()}
    if args.baseline_root:
        roots["baseline"] = Path(args.baseline_root).resolve()
    for name, root in roots.items():
        if not (root / "engine" / "scene.py").is_file():
            raise SystemExit(f"{root} is not a checkout of this project (no engine/scene.py).")
    results = {name: {"root": str(root), "stages": [], "scene": []} for name, root in roots.items()}
    loads = [load_average()]
    for _ in range(args.repeats):  # alternating checkouts: both see the same load
        for name, root in roots.items():
            if not args.skip_stages:
                results[name]["stages"].append(run_worker(root, "stages", image, args.clips, args.frames,
                                                          args.torch_threads))
            if not args.skip_scene:
                results[name]["scene"].append(run_worker(root, "scene", image, args.clips, args.frames,
                                                         args.torch_threads))
    loads.append(load_average())
    print_tables(results, list(roots), args, tuple(loads))
    if args.json:
        from render import cpu_model

        Path(args.json).write_text(json.dumps({"machine": {"cpu": cpu_model(), "cores": cores(), "load": loads},
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
