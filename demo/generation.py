"""What the input column and the Generate, Resume and Cancel buttons do: the inputs read as trajectory requests,
the engine a run gets and its banner, the session's scene (reused or made), the planned paths, and the generation
run itself, streaming an update after the scene is ready and after every clip (``OUTPUT_KEYS``)."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import gradio as gr

from demo import jobs
from demo.context import AppContext, Announcements, first_line, log, sentence, user_errors
from demo.downloads import clip_update, downloads_for
from demo.examples import Example, example_input
from demo.planview import write_plan_glb
from demo.viewer import viewer_update
from engine.atomicio import file_sha256
from engine.constants import KEYFRAMES
from engine.engines import ENGINES, engine_status, resolve_engine, unknown_engine
from engine.geometry import trajectories as traj
from engine.jobfolder import JobFolder
from engine.offload import OFFLOAD_CHOICES, check_offload
from engine.scene_start import gltf_axes

# Everything a generation run can update, in the order ui.py binds them.
OUTPUT_KEYS = ("state", "status", "banner", "model3d", "splats", "clip_video", "render_video", "mask_video",
               "depth_video", "clip_choice", "downloads")
FAST, QUALITY = "fast", "quality"
QUALITY_ENGINES = {FAST: "worldstereo-memory-dmd", QUALITY: "worldstereo-memory"}
PANORAMA_VIEWS = ("view0", "view1", "view2", "view3")
BUSY = "That scene is being generated right now; wait for it to finish."


@dataclass
class GenerationInputs:
    """The values of the input column at the moment a button is pressed."""

    image: Optional[str]
    panorama: bool = False
    trajectories: Sequence[str] = ("left", "right")
    views: Sequence[str] = ("view0",)
    angle: float = 0.0  # degrees for angle presets; 0 keeps each preset's own amount
    distance: float = 0.0  # fraction of the median depth for distance presets; 0 keeps the preset's own
    frames: int = KEYFRAMES
    camera_json: Optional[str] = None
    prompt: str = ""
    seed: int = 0
    engine: Optional[str] = None
    quality: str = FAST
    offload: str = OFFLOAD_CHOICES[0]  # GPU memory (engine.offload) of a new scene
    official: str = ""  # an example's name: run its official scene as the release does (``official_scene``)
    trajectory_prompts: str = ""  # one ``NAME=TEXT`` per line: a trajectory's own prompt (engine.scene)


# ---- engines and the banner ---------------------------------------------------------------------------

def engine_choices(weights: Optional[str] = None) -> list[tuple[str, str]]:
    """Dropdown ``(label, value)`` pairs; an engine that cannot run here says why in its label."""
    out = []
    for name in ENGINES:
        ok, reason = engine_status(name, Path(weights) if weights else None)
        out.append((name if ok else f"{name} (unavailable: {reason})", name))
    return out


def choose_engine(requested: Optional[str], quality: str, ctx: AppContext,
                  warn: Callable[[str], None] = lambda m: None) -> str:
    """The engine a run uses: the quality choice picks the DMD or the 40-step variant of the full model (each
    samples with its own step count); an engine that cannot run here falls back to ``preview`` with a one-line
    warning."""
    name = requested or ctx.default_engine
    if name in QUALITY_ENGINES.values():
        name = QUALITY_ENGINES.get(quality, name)
    if name not in ENGINES:
        raise gr.Error(unknown_engine(name))
    return resolve_engine(name, Path(ctx.weights) if ctx.weights else None, announce=warn)


def banner_markdown(engine: str, note: str = "") -> str:
    """The banner that names the engine in use and says plainly what the cheap engines are (their caveat)."""
    spec = ENGINES[engine]
    text = f"**Engine in use: `{engine}`** — {spec.caveat or spec.description + '.'}"
    if note:
        text += f"\n\n{note}"
    return text


# ---- input ------------------------------------------------------------------------------------------

def inspect_upload(path: Optional[str]) -> tuple[Optional[str], bool, str]:
    """Check an uploaded image as the engine's loader would, within the check's memory budget
    (``engine.images.check_image``): ``(preview path, looks like a panorama, info)``.

    A file the engine cannot use raises ``gr.Error`` with its one sentence; nothing else changes."""
    from engine.geometry.panorama import is_equirect
    from engine.images import ImageInputError, check_image

    if not path:
        return None, False, ""
    try:
        w, h = check_image(path)
    except ImageInputError as e:
        raise gr.Error(str(e), title="This file cannot be used") from None
    pano = is_equirect(w, h)
    kind = "a 360° panorama (2:1 equirectangular)" if pano else "a photo"
    return path, pano, f"{w}×{h} pixels, read as {kind}. Change the panorama switch if that is wrong."


def pick_example(ctx: AppContext, index: int) -> tuple[str, bool, str, Optional[str]]:
    """``(image path, panorama, prompt, camera.json)`` of the ``index``-th example."""
    if not 0 <= int(index) < len(ctx.examples):
        raise gr.Error("That example is not available.")
    ex: Example = ctx.examples[int(index)]
    return str(example_input(ex, ctx.output_dir)), ex.panorama, ex.prompt, None


OFFICIAL_CHOICE = "As the release runs it: the example's official trajectories, each with its own caption"
OWN_CHOICE = "The camera paths chosen here"


def example_run_choices(ctx: AppContext, index: int) -> tuple[list[tuple[str, str]], bool]:
    """How the ``index``-th example can run: ``([(label, value)], offered)``; an example holding an official scene
    offers the release's run (value: the example's name, ``official_scene``) beside the paths chosen on the page."""
    ex: Example = ctx.examples[int(index)]
    if ex.scene is None:
        return [(OWN_CHOICE, "")], False
    return [(OWN_CHOICE, ""), (OFFICIAL_CHOICE, ex.name)], True


def all_run_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """Every way an example may run (``example_run_choices`` shows one example's), so the page accepts each."""
    return [(OWN_CHOICE, "")] + [(f"{OFFICIAL_CHOICE} ({ex.name})", ex.name) for ex in ctx.examples if ex.scene]


def official_scene(ctx: AppContext, inp: GenerationInputs) -> Optional[Path]:
    """The official scene folder the run is asked to run as the release does (an example's, by its name), or
    None."""
    if not inp.official:
        return None
    for ex in ctx.examples:
        if ex.name == inp.official and ex.scene is not None:
            return ex.scene
    raise gr.Error("That example cannot run as the release does here; choose it again from the examples.")


def trajectory_requests(inp: GenerationInputs, official: Optional[Path] = None):
    """The engine's ``TrajectoryRequest`` list for the chosen presets, amounts, frames and camera file, or the official
    scene's trajectories (``official``), each with its prompt from ``inp.trajectory_prompts``."""
    from engine.scene import parse_trajectory_prompts, with_trajectory_prompts

    requests = _chosen_requests(inp, official)
    try:
        return with_trajectory_prompts(requests, parse_trajectory_prompts((inp.trajectory_prompts or "").splitlines()))
    except user_errors() as e:
        raise gr.Error(str(e)) from None


def _chosen_requests(inp: GenerationInputs, official: Optional[Path]):
    from engine.geometry.cameras import Cameras
    from engine.official_scene import read_official_scene
    from engine.scene import TrajectoryRequest

    if official is not None:
        try:
            return [TrajectoryRequest.official(t) for t in read_official_scene(official).trajectories]
        except user_errors() as e:
            raise gr.Error(str(e)) from None
    frames = int(inp.frames) if inp.frames else None
    out = []
    for preset in inp.trajectories or ():
        spec = traj.PRESETS.get(preset)
        if spec is None:
            raise gr.Error(f"Unknown trajectory '{preset}'; choose from: {', '.join(traj.PRESETS)}.")
        amount = float(inp.angle or 0) if spec.kind == "angle" else float(inp.distance or 0)
        amount = min(amount, spec.max_amount) if amount > 0 else None
        if inp.panorama:
            for view in inp.views or PANORAMA_VIEWS[:1]:
                out.append(TrajectoryRequest(name=f"{view}:{preset}", amount=amount, frames=frames))
        else:
            out.append(TrajectoryRequest(name=preset, amount=amount, frames=frames))
    if inp.camera_json:
        try:
            cams = Cameras.from_json(inp.camera_json)
        except ValueError as e:
            raise gr.Error(str(e), title="camera.json cannot be used") from None
        out.append(TrajectoryRequest(name="camera_json", cameras=cams))
    if not out:
        raise gr.Error("Choose at least one trajectory or upload a camera.json.")
    return out


def _file_sha(path: Optional[str]) -> str:
    return file_sha256(path) if path else ""


def scene_key(inp: GenerationInputs, engine: str) -> str:
    """What fixes a scene's start (input, panorama, start camera, engine, seed, prompt, an official scene run)."""
    parts = [_file_sha(inp.image), str(bool(inp.panorama)), _file_sha(inp.camera_json), engine, str(int(inp.seed or 0)),
             (inp.prompt or "").strip(), inp.official or ""]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


# ---- scenes -----------------------------------------------------------------------------------------

def open_or_create(ctx: AppContext, state: dict, inp: GenerationInputs, engine: str,
                   report: Callable[[float, str], None], announce, fresh: bool):
    """The session's scene for these inputs: reused when it matches and (for a fresh run) has no clips yet,
    else a new job folder with a random id. Returns ``(state, scene)``. A fresh run on a reused scene (one only
    planned) runs with the GPU memory option chosen now."""
    from engine.scene import Scene
    from engine.settings import SceneSettings

    if not inp.image:
        raise gr.Error("Upload a photo or a 360° panorama first (or pick an example).")
    offload = check_offload(inp.offload or OFFLOAD_CHOICES[0])
    key = scene_key(inp, engine)
    job_id = (state or {}).get("job")
    if job_id and (state or {}).get("key") == key:
        scene_dir, _ = ctx.job_paths(job_id)
        if JobFolder(scene_dir).holds_scene():
            scene = Scene.open(scene_dir, announce=announce, settings_override={"offload": offload} if fresh else None)
            if not fresh or not scene.clips:
                return dict(state), scene
    job_id = jobs.new_job_id()
    scene_dir, _ = ctx.job_paths(job_id)
    settings = SceneSettings(engine=engine, seed=int(inp.seed or 0), prompt=(inp.prompt or "").strip() or None,
                             frames=int(inp.frames or KEYFRAMES), device=ctx.device, weights=ctx.weights,
                             offload=offload)
    official = official_scene(ctx, inp)
    with ctx.runs.busy(job_id):  # a folder being made is not cleaned up meanwhile
        jobs.cleanup_old_jobs(ctx.output_dir, ctx.max_age_s, keep=ctx.runs.busy_now())
        if official is not None:
            scene = Scene.create_official(scene_dir, official, settings=settings, progress=report, announce=announce)
        else:
            scene = Scene.create(scene_dir, inp.image, panorama=bool(inp.panorama), settings=settings,
                                 camera_json=inp.camera_json or None, progress=report, announce=announce)
    return {"job": job_id, "key": key}, scene


def _plan_glb(scene, requests, job_root: Path) -> tuple[Path, dict, dict]:
    """Draw the planned paths into the scene's cloud: ``(glb, legend colours, cameras per path)``."""
    plans = [(r.name, scene.plan(r)) for r in requests]
    scale = float(scene.manifest.get("median_depth") or 1.0)
    index = len(list((job_root / "plan").glob("plan-*.glb"))) if (job_root / "plan").is_dir() else 0
    target = job_root / "plan" / f"plan-{index:03d}.glb"
    legend = write_plan_glb(target, scene.cache.points, scene.cache.colors, plans, scale,
                            axes=gltf_axes(scene.manifest["kind"]))
    return target, legend, {name: len(cams) for name, cams in plans}


def _legend_markdown(legend: dict, frames: dict) -> str:
    rows = [f"<span style='color:rgb({c[0]},{c[1]},{c[2]})'>■</span> `{name}` ({frames.get(name, '?')} cameras)"
            for name, c in legend.items()]
    return "Planned camera paths (drawn into the point cloud, with a few camera frusta each):  \n" + "  \n".join(rows)


def plan_paths(ctx: AppContext, state: dict, inp: GenerationInputs,
               progress: Callable = None) -> tuple[dict, str, str]:
    """Prepare the scene (depth, first point cloud) and draw the planned paths: ``(state, glb, legend)``."""
    progress = progress or (lambda *a, **k: None)
    announce = Announcements()
    engine = choose_engine(inp.engine, inp.quality, ctx, warn=announce)
    requests = trajectory_requests(inp, official_scene(ctx, inp))
    try:
        state, scene = open_or_create(ctx, state, inp, engine, lambda f, m: progress(f, desc=m), announce,
                                      fresh=False)
        glb, legend, frames = _plan_glb(scene, requests, jobs.job_dir(ctx.output_dir, state["job"]))
    except user_errors() as e:
        raise gr.Error(str(e)) from None
    notes = "".join(f"  \n{m}" for m in announce)
    return state, str(glb), _legend_markdown(legend, frames) + notes


# ---- the run ----------------------------------------------------------------------------------------

def generate(ctx: AppContext, state: dict, inp: GenerationInputs, session: str = "-", continue_scene: bool = False,
             progress: Callable = None, requests: Optional[Sequence] = None) -> Iterator[dict]:
    """Generate the chosen trajectories, yielding an update after the scene is ready and after every clip.

    ``continue_scene`` adds the trajectories to the session's current scene instead of starting a new one.
    A cancel (``cancel``) stops after the current stage; every finished clip stays in the scene and in the
    downloads. Errors a person can cause end as ``gr.Error`` after the last good state was yielded.
    """
    with ctx.runs.run(session) as flag:
        yield from _generate(ctx, state, inp, flag, continue_scene, progress, requests)


def _generate(ctx: AppContext, state: dict, inp: GenerationInputs, flag, continue_scene: bool,
              progress: Optional[Callable], requests: Optional[Sequence]) -> Iterator[dict]:
    from engine.scene import Scene

    progress = progress or (lambda *a, **k: None)
    announce = Announcements()
    warnings = Announcements()
    requests = list(requests) if requests is not None else trajectory_requests(inp, official_scene(ctx, inp))
    if continue_scene:
        if not (state or {}).get("job"):
            raise gr.Error("There is no scene to continue yet; press Generate first.")
        scene_dir, _ = ctx.job_paths(state["job"])
        try:
            scene = Scene.open(scene_dir, announce=announce)
        except user_errors() as e:
            raise gr.Error(f"{e} Press Generate to start a new scene.") from None
        engine = scene.settings.engine
    else:
        engine = choose_engine(inp.engine, inp.quality, ctx, warn=warnings)
        for w in warnings:
            gr.Warning(w)
        try:
            state, scene = open_or_create(ctx, state, inp, engine,
                                          lambda f, m: progress(0.08 * f, desc=f"preparing: {m}"), announce, fresh=True)
        except user_errors() as e:
            raise gr.Error(str(e)) from None
    with ctx.runs.busy(state["job"]):
        yield from _run(ctx, state, scene, engine, requests, flag, progress, list(warnings) + list(announce))


def _run(ctx: AppContext, state: dict, scene, engine: str, requests: list, flag, progress: Callable,
         notes: list) -> Iterator[dict]:
    """The clips of one run of the session's scene, then its export (``generate``)."""
    from engine.scene import GenerationCancelled

    job_root = jobs.job_dir(ctx.output_dir, state["job"])
    scene_dir, downloads_dir = ctx.job_paths(state["job"])
    notes = list(dict.fromkeys(notes))  # in order, once each
    if not any(n.lower().startswith("depth") for n in notes) and scene.manifest.get("depth_note"):
        notes.append(f"Depth of the input: {scene.manifest['depth_note']}.")
    banner = banner_markdown(engine, "  \n".join(notes))
    height, width = scene.manifest["size"]
    lines = [f"Scene `{state['job']}` ({scene.manifest['kind']}, {width}×{height}, engine `{engine}`): "
             f"{len(requests)} trajectory(ies) to generate."]
    try:
        glb, legend, counts = _plan_glb(scene, requests, job_root)
    except user_errors() as e:
        raise gr.Error(str(e)) from None
    scene.plan_run(requests)  # the scene's resume record: a run cut short (a restart, a kill) resumes from it
    # Every viewer gets a value in every message that changes it (None until the first clip): gradio hands a
    # viewer in a tab not yet shown the last message for it, and a skip there reaches it as a file without a path.
    yield {"state": state, "banner": banner, "model3d": str(glb), "splats": None,
           "status": "\n\n".join(lines + [_legend_markdown(legend, counts)])}

    n = len(requests)
    t_run = time.perf_counter()
    try:
        with contextlib.closing(_clips_in_background(scene, requests, progress, flag)) as events:
            for i, committed in enumerate(events):
                record, clips = committed.record, committed.clips
                secs = ", ".join(f"{k} {v:.1f} s" for k, v in record.seconds.items() if k != "total")
                lines.append(f"Clip {i + 1}/{n} `{record.name}` done in {record.seconds.get('total', 0):.1f} s "
                             f"({record.frames} frames, {record.references} reference views; {secs}).")
                # Shown as soon as the clip is committed, while the next clip is being made.
                yield {"status": "\n\n".join(lines), **viewer_update(ctx, committed, job_root, state),
                       "downloads": downloads_for(scene_dir, downloads_dir, clips, exported=False),
                       **clip_update(scene_dir, clips, clips[-1])}
        progress(0.93, desc="export: cameras, 3DGS dataset, zip")
        scene.export(progress=lambda f, m: progress(0.93 + 0.07 * f, desc=f"export: {m}"))
        lines.append(f"Done in {time.perf_counter() - t_run:.1f} s. Everything is in the downloads; "
                     f"**Continue this scene** adds more trajectories to the same point cloud.")
        # The viewers get the last clip's cloud again under a new file name: the same file sent again while the
        # viewer still loads it (the export takes a fraction of a second now) can leave the splat view blank.
        yield {"status": "\n\n".join(lines), **viewer_update(ctx, scene, job_root, state),
               "downloads": downloads_for(scene_dir, downloads_dir, scene.clips, exported=True)}
    except GenerationCancelled:
        lines.append(f"Cancelled. The {len(scene.clips)} finished clip(s) are kept and downloadable.")
        yield {"status": "\n\n".join(lines), **_finish_partial(ctx, scene, scene_dir, downloads_dir, job_root, state)}
    except Exception as e:  # noqa: BLE001 — every failure must reach the person as one sentence
        user = isinstance(e, user_errors())
        if not user:
            log.error("generation failed in job %s:\n%s", state["job"], traceback.format_exc())
        message = sentence(str(e)) if user else (
            f"The engine stopped with an internal error ({type(e).__name__}: {first_line(e)}).")
        lines.append(f"**Stopped:** {message} Finished clips are kept.")
        yield {"status": "\n\n".join(lines), **_finish_partial(ctx, scene, scene_dir, downloads_dir, job_root, state)}
        raise gr.Error(f"{message} The {len(scene.clips)} finished clip(s) stay downloadable.") from None


def _clips_in_background(scene, requests: list, progress: Callable, flag) -> Iterator:
    """Run ``scene.generate_clips`` in a thread of its own and give each clip as it is committed
    (``engine.scene.Committed``): the page shows clip k while clip k+1 is made. The thread's failure or cancel is
    raised here; a caller that stops early (the page was closed) cancels the run and waits for it to end."""
    events: queue.Queue = queue.Queue()
    done = object()

    def work():
        try:
            scene.generate_clips(requests, progress=lambda f, m: progress(0.08 + 0.84 * f, desc=m),
                                 cancel=flag.is_set, on_commit=events.put)
            events.put(done)
        except BaseException as e:  # noqa: BLE001 — handed to the page's thread, which words it
            events.put(e)

    # gradio's progress bar finds its event through context variables, which a new thread does not inherit.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="generation", daemon=True)
    worker.start()
    try:
        while (event := events.get()) is not done:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        if worker.is_alive():
            flag.set()
            worker.join()


def _finish_partial(ctx: AppContext, scene, scene_dir: Path, downloads_dir: Path, job_root: Path, state: dict) -> dict:
    """Export what exists after a cancel or an error (best effort: the clips are downloadable either way), and
    give the viewers the scene's cloud again."""
    exported, update = False, {}
    if scene.clips:
        try:
            scene.export()
            exported = True
            update.update(viewer_update(ctx, scene, job_root, state))
        except Exception:  # noqa: BLE001 — a failed export must not hide the clips that are done
            log.warning("export after a stopped run failed:\n%s", traceback.format_exc())
    update["downloads"] = downloads_for(scene_dir, downloads_dir, scene.clips, exported=exported)
    return update


def resume(ctx: AppContext, state: dict, job_id: str, session: str = "-", progress: Callable = None) -> Iterator[dict]:
    """Generate what a scene's last run left undone (the server was stopped or killed during it), by scene id: the
    requests of the scene's resume record (``engine.jobfolder.unfinished_requests``).

    The id is the 16-hex-digit one shown in the status line; it is the only key to a scene, so the page never
    lists other people's scenes (the operator sees the list in the server log at start-up)."""
    from engine.scene import TrajectoryRequest

    job_id = (job_id or "").strip().strip("`")
    try:
        job_root = jobs.job_dir(ctx.output_dir, job_id)
    except jobs.JobPathError as e:
        raise gr.Error(str(e)) from None
    folder = JobFolder(job_root / "scene")
    if not folder.holds_scene():
        raise gr.Error("There is no scene with that id on this server (old scenes are removed); start a new one.")
    with ctx.runs.busy(job_id, refuse=BUSY):
        try:
            requests = [TrajectoryRequest.from_dict(r) for r in folder.unfinished()]
        except (user_errors() + (KeyError, TypeError, AttributeError)) as e:
            raise gr.Error(f"The scene's unfinished run cannot be read ({first_line(e)}); start a new scene.") from None
        if not requests and jobs.made_by_an_older_version(job_root):
            raise gr.Error("That scene was made by an older version of this server, whose unfinished runs cannot be "
                           "resumed; start a new scene.")
        if not requests:
            raise gr.Error("That scene has nothing left to generate; use Continue this scene to add trajectories.")
        yield from generate(ctx, {"job": job_id, "key": None}, GenerationInputs(image=None), session=session,
                            continue_scene=True, progress=progress, requests=requests)


def cancel(ctx: AppContext, session: str = "-") -> str:
    ctx.runs.cancel(session)
    return "Cancelling after the current stage… finished clips are kept."
