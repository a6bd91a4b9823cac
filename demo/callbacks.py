"""What the demo's buttons do, as plain functions over an ``AppContext``.

Nothing here draws a widget: ``demo/ui.py`` binds these to components. Every function takes plain values
(file paths, lists, numbers) and returns plain values or yields dicts keyed by ``OUTPUT_KEYS``, so the tests
call them without a browser. All scene work goes through ``engine.scene``; errors a person can cause come
back as ``gr.Error`` with the engine's one sentence.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import gradio as gr
import torch

from demo import jobs
from demo.examples import Example, example_input
from demo.planview import write_plan_glb
from demo.viewer import scene_confidence, write_views
from engine import outputs
from engine.atomicio import file_sha256
from engine.constants import KEYFRAMES
from engine.engines import ENGINES, engine_status, resolve_engine, unknown_engine
from engine.geometry import trajectories as traj
from engine.jobfolder import JobFolder
from engine.offload import OFFLOAD_CHOICES, check_offload
from engine.scene_start import gltf_axes
from engine.settings import SceneError

log = logging.getLogger("worldstereo.demo")

# Everything a generation run can update, in the order ui.py binds them.
OUTPUT_KEYS = ("state", "status", "banner", "model3d", "splats", "clip_video", "render_video", "mask_video",
               "depth_video", "clip_choice", "downloads")
FAST, QUALITY = "fast", "quality"
QUALITY_ENGINES = {FAST: "worldstereo-memory-dmd", QUALITY: "worldstereo-memory"}
PANORAMA_VIEWS = ("view0", "view1", "view2", "view3")


@dataclass
class AppContext:
    """What every callback needs to know about the running app."""

    output_dir: Path
    default_engine: str
    weights: Optional[str] = None
    examples: list = field(default_factory=list)
    max_age_s: float = 24 * 3600.0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    startup_note: str = ""  # why the app fell back to preview, when it did
    cancel_flags: dict = field(default_factory=dict)  # session -> cancel flags of its runs in progress
    active_jobs: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    editors: Optional[object] = None  # demo.editor.EditorPool of the 3D path editors; None: no editor here
    view_splats: Optional[int] = None  # splats sent to the splat view; None: demo.viewer.MAX_VIEW_SPLATS

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def start_run(self, session: str) -> threading.Event:
        """A new run's cancel flag; ``end_run`` drops it, so a long-lived server keeps no flag of a finished run."""
        flag = threading.Event()
        with self.lock:
            self.cancel_flags.setdefault(session or "-", set()).add(flag)
        return flag

    def end_run(self, session: str, flag: threading.Event) -> None:
        with self.lock:
            flags = self.cancel_flags.get(session or "-", set())
            flags.discard(flag)
            if not flags:
                self.cancel_flags.pop(session or "-", None)

    def cancel_runs(self, session: str) -> None:
        """Set the cancel flag of every run of ``session`` in progress (none: nothing to do)."""
        with self.lock:
            for flag in self.cancel_flags.get(session or "-", ()):
                flag.set()


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
    """The banner that names the engine in use and says plainly what the cheap engines are."""
    spec = ENGINES[engine]
    if engine == "preview":
        text = ("**Engine in use: `preview`** — no video model runs here. Each clip is the 3D point cloud "
                "rendered along the camera path, with its holes filled by classical inpainting. It shows the whole "
                "geometric loop (depth → point cloud → render → fuse → next trajectory) on a CPU; it is not "
                "WorldStereo's generation.")
    elif engine == "tiny-random":
        text = ("**Engine in use: `tiny-random`** — the WorldStereo architecture at a tiny size with random "
                "weights. Its frames are noise by design: use it to see the pipeline run, not to judge results.")
    else:
        text = f"**Engine in use: `{engine}`** — {spec.description}."
    if note:
        text += f"\n\n{note}"
    return text


# ---- input ------------------------------------------------------------------------------------------

def _user_errors() -> tuple[type, ...]:
    from engine.geometry.cameras import CameraFormatError
    from engine.images import ImageInputError

    return (ImageInputError, CameraFormatError, SceneError, jobs.JobPathError, ValueError)


def logged(handler: Callable) -> Callable:
    """A UI handler whose ``gr.Error`` goes to the log in one line and to the page without gradio printing its
    traceback: such an error is a person's mistake, or a fault already logged with its traceback where it happened
    (``_generate``). Any other exception is a fault and keeps gradio's traceback in the log."""
    import functools
    import inspect

    def quiet(e: gr.Error) -> None:
        e.print_exception = False
        log.info("refused (%s): %s", handler.__name__, " ".join(str(e.message).split())[:300])

    if inspect.isgeneratorfunction(handler):  # gradio streams a generator's updates: the wrapper must be one too
        @functools.wraps(handler)
        def wrapped_generator(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except gr.Error as e:
                quiet(e)
                raise
        return wrapped_generator

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error as e:
            quiet(e)
            raise
    return wrapped


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


def trajectory_requests(inp: GenerationInputs):
    """The engine's ``TrajectoryRequest`` list for the chosen presets, amounts, frames and camera file."""
    from engine.geometry.cameras import Cameras
    from engine.scene import TrajectoryRequest

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
    """What fixes a scene's start (input, panorama, start camera, engine, seed, prompt)."""
    parts = [_file_sha(inp.image), str(bool(inp.panorama)), _file_sha(inp.camera_json), engine, str(int(inp.seed or 0)),
             (inp.prompt or "").strip()]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


# ---- scenes -----------------------------------------------------------------------------------------

class _Announcements(list):
    def __call__(self, message: str) -> None:
        log.info(message)
        self.append(str(message))


def _job_paths(ctx: AppContext, job_id: str) -> tuple[Path, Path]:
    root = jobs.job_dir(ctx.output_dir, job_id)
    return root / "scene", root / "downloads"


def _open_or_create(ctx: AppContext, state: dict, inp: GenerationInputs, engine: str,
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
        scene_dir, _ = _job_paths(ctx, job_id)
        if JobFolder(scene_dir).holds_scene():
            scene = Scene.open(scene_dir, announce=announce, settings_override={"offload": offload} if fresh else None)
            if not fresh or not scene.clips:
                return dict(state), scene
    job_id = jobs.new_job_id()
    with ctx.lock:
        ctx.active_jobs.add(job_id)
        keep = tuple(ctx.active_jobs)
    jobs.cleanup_old_jobs(ctx.output_dir, ctx.max_age_s, keep=keep)
    scene_dir, _ = _job_paths(ctx, job_id)
    settings = SceneSettings(engine=engine, seed=int(inp.seed or 0), prompt=(inp.prompt or "").strip() or None,
                             frames=int(inp.frames or KEYFRAMES), device=ctx.device, weights=ctx.weights,
                             offload=offload)
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
    announce = _Announcements()
    engine = choose_engine(inp.engine, inp.quality, ctx, warn=announce)
    requests = trajectory_requests(inp)
    try:
        state, scene = _open_or_create(ctx, state, inp, engine,
                                       lambda f, m: progress(f, desc=m), announce, fresh=False)
        glb, legend, frames = _plan_glb(scene, requests, jobs.job_dir(ctx.output_dir, state["job"]))
    except _user_errors() as e:
        raise gr.Error(str(e)) from None
    notes = "".join(f"  \n{m}" for m in announce)
    return state, str(glb), _legend_markdown(legend, frames) + notes


def _clip_files(scene_dir: Path, clip: dict) -> tuple[str, str, str, Optional[str]]:
    """Clip, GGM render, hole mask and depth video of one clip (scenes made before depth videos have none)."""
    files = JobFolder(scene_dir).clip_files(clip["name"])
    jobs.safe_path(scene_dir, files.folder.relative_to(scene_dir))  # a name that leaves the scene is refused
    return (str(files.video), str(files.render), str(files.render_mask),
            str(files.depth) if files.depth.is_file() else None)


def zip_dataset(scene_dir: Path, target: Path) -> Path:
    """The nerfstudio dataset alone (``transforms.json`` + ``images/``), for people who only want to train."""
    files = JobFolder(scene_dir).scene_files()
    return outputs.zip_folder(scene_dir, target, only=(files.transforms.name, f"{files.images.name}/*"))


def downloads_for(scene_dir: Path, downloads_dir: Path, clips: Sequence[dict], exported: bool) -> list[str]:
    """Readable file names for everything downloadable now (clips first, then the scene-level files)."""
    out = []
    folder = JobFolder(scene_dir)
    for clip in clips:
        src = folder.clip_files(clip["name"]).video
        if src.is_file():
            out.append(str(jobs.link_or_copy(src, downloads_dir / f"{clip['name']}.mp4")))
    files = folder.scene_files()
    for src in [files.cloud, files.glb, files.splats] + ([files.cameras, files.zip] if exported else []):
        if src.is_file():
            out.append(str(jobs.link_or_copy(src, downloads_dir / src.name)))
    if exported and files.transforms.is_file():
        out.append(str(zip_dataset(scene_dir, downloads_dir / "nerfstudio-dataset.zip")))
    return out


def _clip_update(scene_dir: Path, clips: list[dict], show: Optional[dict]) -> dict:
    update = {"clip_choice": gr.update(choices=[c["name"] for c in clips], value=show["name"] if show else None)}
    if show:
        update["clip_video"], update["render_video"], update["mask_video"], update["depth_video"] = \
            _clip_files(scene_dir, show)
    else:
        update.update(clip_video=None, render_video=None, mask_video=None, depth_video=None)
    return update


def generate(ctx: AppContext, state: dict, inp: GenerationInputs, session: str = "-", continue_scene: bool = False,
             progress: Callable = None, requests: Optional[Sequence] = None) -> Iterator[dict]:
    """Generate the chosen trajectories, yielding an update after the scene is ready and after every clip.

    ``continue_scene`` adds the trajectories to the session's current scene instead of starting a new one.
    A cancel (``cancel``) stops after the current stage; every finished clip stays in the scene and in the
    downloads. Errors a person can cause end as ``gr.Error`` after the last good state was yielded.
    """
    flag = ctx.start_run(session)
    try:
        yield from _generate(ctx, state, inp, flag, continue_scene, progress, requests)
    finally:
        ctx.end_run(session, flag)


def _generate(ctx: AppContext, state: dict, inp: GenerationInputs, flag: threading.Event, continue_scene: bool,
              progress: Optional[Callable], requests: Optional[Sequence]) -> Iterator[dict]:
    from engine.scene import GenerationCancelled, Scene

    progress = progress or (lambda *a, **k: None)
    announce = _Announcements()
    warnings = _Announcements()
    requests = list(requests) if requests is not None else trajectory_requests(inp)
    if continue_scene:
        if not (state or {}).get("job"):
            raise gr.Error("There is no scene to continue yet; press Generate first.")
        scene_dir, _ = _job_paths(ctx, state["job"])
        try:
            scene = Scene.open(scene_dir, announce=announce)
        except _user_errors() as e:
            raise gr.Error(f"{e} Press Generate to start a new scene.") from None
        engine = scene.settings.engine
    else:
        engine = choose_engine(inp.engine, inp.quality, ctx, warn=warnings)
        for w in warnings:
            gr.Warning(w)
        try:
            state, scene = _open_or_create(ctx, state, inp, engine,
                                           lambda f, m: progress(0.08 * f, desc=f"preparing: {m}"), announce, fresh=True)
        except _user_errors() as e:
            raise gr.Error(str(e)) from None
    job_root = jobs.job_dir(ctx.output_dir, state["job"])
    scene_dir, downloads_dir = _job_paths(ctx, state["job"])
    with ctx.lock:
        ctx.active_jobs.add(state["job"])
    notes = list(dict.fromkeys(list(warnings) + list(announce)))  # in order, once each
    if not any(n.lower().startswith("depth") for n in notes) and scene.manifest.get("depth_note"):
        notes.append(f"Depth of the input: {scene.manifest['depth_note']}.")
    banner = banner_markdown(engine, "  \n".join(notes))
    lines = [f"Scene `{state['job']}` ({scene.manifest['kind']}, {scene.manifest['size'][1]}×{scene.manifest['size'][0]}, "
             f"engine `{engine}`): {len(requests)} trajectory(ies) to generate."]
    try:
        glb, legend, counts = _plan_glb(scene, requests, job_root)
    except _user_errors() as e:
        raise gr.Error(str(e)) from None
    scene.plan_run(requests)  # the scene's resume record: a run cut short (a restart, a kill) resumes from it
    # Every viewer gets a value in every message that changes it (None until the first clip): gradio hands a
    # viewer in a tab not yet shown the last message for it, and a skip there reaches it as a file without a path.
    yield {"state": state, "banner": banner, "model3d": str(glb), "splats": None,
           "status": "\n\n".join(lines + [_legend_markdown(legend, counts)])}

    n = len(requests)
    t_run = time.perf_counter()
    try:
        for i, req in enumerate(requests):
            if flag.is_set():
                raise GenerationCancelled()
            lo, hi = 0.08 + 0.84 * i / n, 0.08 + 0.84 * (i + 1) / n

            def report(f, m, lo=lo, hi=hi, i=i):
                progress(lo + (hi - lo) * min(max(f, 0.0), 1.0), desc=f"clip {i + 1}/{n} · {m}")

            record = scene.generate(req, progress=report, cancel=flag.is_set)
            secs = ", ".join(f"{k} {v:.1f} s" for k, v in record.seconds.items() if k != "total")
            lines.append(f"Clip {i + 1}/{n} `{record.name}` done in {record.seconds.get('total', 0):.1f} s "
                         f"({record.frames} frames, {record.references} reference views; {secs}).")
            clips = scene.clips
            views = _views(ctx, scene, job_root, state)
            yield {"status": "\n\n".join(lines), **views,
                   "downloads": downloads_for(scene_dir, downloads_dir, clips, exported=False),
                   **_clip_update(scene_dir, clips, clips[-1])}
        progress(0.93, desc="export: cameras, 3DGS dataset, zip")
        scene.export(progress=lambda f, m: progress(0.93 + 0.07 * f, desc=f"export: {m}"))
        lines.append(f"Done in {time.perf_counter() - t_run:.1f} s. Everything is in the downloads; "
                     f"**Continue this scene** adds more trajectories to the same point cloud.")
        yield {"status": "\n\n".join(lines), **views,
               "downloads": downloads_for(scene_dir, downloads_dir, scene.clips, exported=True)}
    except GenerationCancelled:
        lines.append(f"Cancelled. The {len(scene.clips)} finished clip(s) are kept and downloadable.")
        yield {"status": "\n\n".join(lines), **_finish_partial(ctx, scene, scene_dir, downloads_dir, job_root, state)}
    except Exception as e:  # noqa: BLE001 — every failure must reach the person as one sentence
        user = isinstance(e, _user_errors())
        if not user:
            log.error("generation failed in job %s:\n%s", state["job"], traceback.format_exc())
        message = _sentence(str(e)) if user else (
            f"The engine stopped with an internal error ({type(e).__name__}: {_first_line(e)}).")
        lines.append(f"**Stopped:** {message} Finished clips are kept.")
        yield {"status": "\n\n".join(lines), **_finish_partial(ctx, scene, scene_dir, downloads_dir, job_root, state)}
        raise gr.Error(f"{message} The {len(scene.clips)} finished clip(s) stay downloadable.") from None
    finally:
        with ctx.lock:
            ctx.active_jobs.discard(state["job"])


def resume(ctx: AppContext, state: dict, job_id: str, session: str = "-", progress: Callable = None) -> Iterator[dict]:
    """Generate what a scene's last run left undone (the server was stopped or killed during it), by scene id.

    The id is the 16-hex-digit one shown in the status line; it is the only key to a scene, so the page never
    lists other people's scenes (the operator sees the list in the server log at start-up)."""
    job_id = (job_id or "").strip().strip("`")
    try:
        job_root = jobs.job_dir(ctx.output_dir, job_id)
    except jobs.JobPathError as e:
        raise gr.Error(str(e)) from None
    from engine.scene import TrajectoryRequest

    folder = JobFolder(job_root / "scene")
    if not folder.holds_scene():
        raise gr.Error("There is no scene with that id on this server (old scenes are removed); start a new one.")
    with ctx.lock:
        if job_id in ctx.active_jobs:
            raise gr.Error("That scene is being generated right now; wait for it to finish.")
    try:
        requests = [TrajectoryRequest.from_dict(r) for r in folder.unfinished()]
    except (_user_errors() + (KeyError, TypeError, AttributeError)) as e:
        raise gr.Error(f"The scene's unfinished run cannot be read ({_first_line(e)}); start a new scene.") from None
    if not requests and jobs.made_by_an_older_version(job_root):
        raise gr.Error("That scene was made by an older version of this server, whose unfinished runs cannot be "
                       "resumed; start a new scene.")
    if not requests:
        raise gr.Error("That scene has nothing left to generate; use Continue this scene to add trajectories.")
    yield from generate(ctx, {"job": job_id, "key": None}, GenerationInputs(image=None), session=session,
                        continue_scene=True, progress=progress, requests=requests)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "!", "?")) else text + "."


def _finish_partial(ctx: AppContext, scene, scene_dir: Path, downloads_dir: Path, job_root: Path, state: dict) -> dict:
    """Export what exists after a cancel or an error (best effort: the clips are downloadable either way), and
    give the viewers the scene's cloud again."""
    exported, update = False, {}
    if scene.clips:
        try:
            scene.export()
            exported = True
            update.update(_views(ctx, scene, job_root, state))
        except Exception:  # noqa: BLE001 — a failed export must not hide the clips that are done
            log.warning("export after a stopped run failed:\n%s", traceback.format_exc())
    update["downloads"] = downloads_for(scene_dir, downloads_dir, scene.clips, exported=exported)
    return update


def cancel(ctx: AppContext, session: str = "-") -> str:
    ctx.cancel_runs(session)
    return "Cancelling after the current stage… finished clips are kept."


def show_clip(ctx: AppContext, state: dict, name: Optional[str]) -> tuple[Optional[str], ...]:
    """The clip, GGM render, hole mask and depth videos of one finished clip of the session's scene."""
    if not name or not (state or {}).get("job"):
        return None, None, None, None
    try:
        scene_dir, _ = _job_paths(ctx, state["job"])
    except jobs.JobPathError as e:
        raise gr.Error(str(e)) from None

    try:
        manifest = JobFolder(scene_dir).read_manifest()
    except SceneError:
        raise gr.Error("This scene is no longer on the server (old scenes are removed); generate it again.") from None
    for clip in manifest.get("clips", []):
        if clip.get("name") == name:
            return _clip_files(scene_dir, clip)
    raise gr.Error(f"The clip '{name}' is not part of this scene.")


# ---- viewers: confidence filter ------------------------------------------------------------------------

def _views(ctx: AppContext, scene, job_root: Path, state: dict) -> dict:
    """``model3d`` and ``splats`` for the scene's current cloud, without the points under the session's
    confidence threshold; the splats in the viewer's frame (``demo.viewer.write_views``). The full files stay
    the downloads; earlier views of the job are removed.

    Every call hands the splat viewer a file of its own name (a hard link): gradio's viewer restarts its
    loading only for a new file, and a repeated one arriving while it loads can leave it blank."""
    import shutil

    threshold = float((state or {}).get("min_confidence") or 0.0)
    name = f"{Path(scene.manifest['state']['cache']).stem}-{threshold:.2f}-{ctx.view_splats or 'default'}"
    views = job_root / "view"
    for old in views.glob("*") if views.is_dir() else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    folder = views / name
    if (folder / "scene_splats.ply").is_file() and (threshold <= 0 or (folder / "scene.glb").is_file()):
        paths = {"glb": folder / "scene.glb" if threshold > 0 else None, "splats": folder / "scene_splats.ply"}
    else:
        paths = write_views(scene, folder, threshold, with_glb=threshold > 0, max_splats=ctx.view_splats)
    alias = folder / f"scene_splats-{len(list(folder.glob('scene_splats-*.ply')))}.ply"
    jobs.link_or_copy(paths["splats"], alias)
    return {"model3d": str(paths["glb"] or scene.folder.scene_files().glb), "splats": str(alias)}


def _open_files(ctx: AppContext, state: dict):
    """The session's scene opened without any model (for views, the editor and undo)."""
    from engine.scene import open_for_files

    if not (state or {}).get("job"):
        raise gr.Error("There is no scene yet; press Generate (or Open the 3D editor) first.")
    scene_dir, _ = _job_paths(ctx, state["job"])
    if not JobFolder(scene_dir).holds_scene():
        raise gr.Error("This scene is no longer on the server (old scenes are removed); start a new one.")
    try:
        return open_for_files(scene_dir)
    except _user_errors() as e:
        raise gr.Error(str(e)) from None


def set_confidence(ctx: AppContext, state: dict, threshold: float) -> tuple[dict, Optional[str], Optional[str]]:
    """Hide points under ``threshold`` in the point and splat viewers (and the 3D editor): ``(state, glb, splats)``."""
    state = dict(state or {})
    state["min_confidence"] = min(max(float(threshold or 0.0), 0.0), 1.0)
    if not state.get("job"):
        return state, None, None
    scene = _open_files(ctx, state)
    if not scene.clips:
        return state, None, None
    try:
        views = _views(ctx, scene, jobs.job_dir(ctx.output_dir, state["job"]), state)
    except _user_errors() as e:
        raise gr.Error(str(e)) from None
    return state, views["model3d"], views["splats"]


# ---- the 3D camera-path editor -------------------------------------------------------------------------

def editor_html(editor) -> str:
    """The iframe that embeds a session's editor (a relative address: it works behind a path prefix too)."""
    return (f'<iframe src="viser/{editor.token}/" title="3D camera-path editor" id="editor-frame" '
            'style="width:100%;height:520px;border:0;border-radius:6px" allow="fullscreen"></iframe>')


def _editor(ctx: AppContext, session: str, create: bool = False):
    if ctx.editors is None:
        raise gr.Error("The 3D editor is switched off on this server (--max-editors 0).")
    editor = ctx.editors.open(session) if create else ctx.editors.get(session)
    if editor is None:
        raise gr.Error("Open the 3D editor first (it closes when the page has been idle for a while).")
    return editor


def _show_in_editor(ctx: AppContext, editor, scene, state: dict, frames: int) -> None:
    """The scene's cloud (without the points under the session's confidence threshold) in the editor; the
    keyframes stay while it is the same scene."""
    keep = scene_confidence(scene) >= float((state or {}).get("min_confidence") or 0.0)
    editor.show_scene(state["job"], scene.cache.points[keep].numpy(), scene.cache.colors[keep].numpy(),
                      scene.start_camera, float(scene.manifest.get("median_depth") or 1.0),
                      "+z" if scene.manifest["kind"] == "panorama" else "-y", frames)


def open_editor(ctx: AppContext, state: dict, inp: GenerationInputs, session: str = "-",
                progress: Callable = None) -> tuple[dict, str, str]:
    """Prepare the scene if needed (depth, first cloud) and show it in the session's 3D editor:
    ``(state, iframe html, status)``."""
    from demo.editor import EditorBusy

    progress = progress or (lambda *a, **k: None)
    state = dict(state or {})
    try:  # first: a request the pool refuses prepares no scene
        editor = _editor(ctx, session, create=True)
    except EditorBusy as e:
        raise gr.Error(str(e)) from None
    if not state.get("job"):
        announce = _Announcements()
        engine = choose_engine(inp.engine, inp.quality, ctx, warn=announce)
        try:
            new_state, _ = _open_or_create(ctx, state, inp, engine, lambda f, m: progress(f, desc=m),
                                           announce, fresh=False)
        except _user_errors() as e:
            raise gr.Error(str(e)) from None
        state.update(new_state)
    scene = _open_files(ctx, state)
    _show_in_editor(ctx, editor, scene, state, int(inp.frames or KEYFRAMES))
    return state, editor_html(editor), (f"3D editor of scene `{state['job']}`: add keyframes in the view, then "
                                        "**Preview path** or **Generate this path**.")


def _path_cameras(ctx: AppContext, state: dict, session: str, frames: int):
    from engine.geometry.camera_path import path_cameras

    scene = _open_files(ctx, state)
    editor = _editor(ctx, session)
    if editor.job != state.get("job"):
        raise gr.Error("The 3D editor shows another scene; press Open the 3D editor again.")
    keys = editor.snapshot()
    if len(keys) < 2:
        raise gr.Error("Add at least one keyframe after the start view (Add keyframe here, in the 3D view).")
    try:
        from engine.settings import check_frames

        check_frames(int(frames), "Frames per clip")
        return scene, keys, path_cameras(keys, int(frames), scene.start_camera)
    except _user_errors() as e:
        raise gr.Error(str(e)) from None


def preview_path(ctx: AppContext, state: dict, frames: int, session: str = "-") -> str:
    """The 3D cache rendered along the editor's path, as a video (what a clip along it is conditioned on)."""
    scene, _, cams = _path_cameras(ctx, state, session, frames)
    render = scene.cache.render(cams, radius=scene.splat_radius(cams))
    folder = jobs.job_dir(ctx.output_dir, state["job"]) / "plan"
    index = len(list(folder.glob("path-preview-*.mp4"))) if folder.is_dir() else 0
    return str(outputs.write_video(folder / f"path-preview-{index:03d}.mp4", render.image))


def save_editor_path(ctx: AppContext, state: dict, frames: int, session: str = "-") -> str:
    """The editor's path as an official camera.json (with its keyframes), for download."""
    from engine.geometry.camera_path import save_path

    scene, keys, _ = _path_cameras(ctx, state, session, frames)
    _, downloads = _job_paths(ctx, state["job"])
    return str(save_path(downloads / "camera_path.json", keys, int(frames), scene.start_camera))


def load_editor_path(ctx: AppContext, state: dict, path: Optional[str], session: str = "-") -> str:
    """Keyframes from an uploaded camera.json into the editor; returns a status line."""
    from engine.geometry.camera_path import load_path

    if not path:
        return ""
    scene = _open_files(ctx, state)
    editor = _editor(ctx, session)
    try:
        keys = load_path(path, scene.start_camera)
    except _user_errors() as e:
        raise gr.Error(str(e), title="camera.json cannot be used") from None
    editor.set_keyframes(keys)
    return f"Loaded {len(keys)} keyframes from {Path(path).name}; keyframe 0 stays the start view."


def generate_path(ctx: AppContext, state: dict, frames: int, session: str = "-",
                  progress: Callable = None) -> Iterator[dict]:
    """Generate the editor's path as one more clip of the session's scene, then show the grown cloud in the editor."""
    from engine.scene import TrajectoryRequest

    _, _, cams = _path_cameras(ctx, state, session, frames)
    request = TrajectoryRequest(name="camera_path", cameras=cams)
    yield from generate(ctx, state, GenerationInputs(image=None, frames=int(frames)), session=session,
                        continue_scene=True, progress=progress, requests=[request])
    editor = ctx.editors.get(session) if ctx.editors is not None else None
    if editor is not None:
        _show_in_editor(ctx, editor, _open_files(ctx, state), state, int(frames))


def close_session(ctx: AppContext, session: str) -> None:
    """The page was closed: stop its 3D editor."""
    if ctx.editors is not None:
        ctx.editors.close(session)


# ---- undo ----------------------------------------------------------------------------------------------

def remove_last_clip(ctx: AppContext, state: dict, session: str = "-") -> dict:
    """Put the session's scene back to its state before its last clip (cache, memory, downloads)."""
    state = dict(state or {})
    if not state.get("job"):
        raise gr.Error("There is no scene yet, so there is no clip to remove.")
    with ctx.lock:
        if state["job"] in ctx.active_jobs:
            raise gr.Error("This scene is being generated right now; cancel or wait before removing a clip.")
        ctx.active_jobs.add(state["job"])
    try:
        scene = _open_files(ctx, state)
        job_root = jobs.job_dir(ctx.output_dir, state["job"])
        unfinished = scene.unfinished()  # what a stopped run left undone stays resumable
        try:
            removed = scene.revert()
        except _user_errors() as e:
            raise gr.Error(str(e)) from None
        scene_dir, downloads_dir = _job_paths(ctx, state["job"])
        # Readable download names are links to the scene's files: rebuild them so none of the removed clip stays.
        import shutil

        shutil.rmtree(downloads_dir, ignore_errors=True)
        scene.plan_run(unfinished)
        clips = scene.clips
        update = {"state": state, **_clip_update(scene_dir, clips, clips[-1] if clips else None),
                  "downloads": downloads_for(scene_dir, downloads_dir, clips, exported=bool(clips))}
        if clips:
            update.update(_views(ctx, scene, job_root, state))
        else:
            update.update(model3d=None, splats=None)
        update["status"] = (f"Removed clip `{removed['name']}`: the scene is back as it was before it "
                            f"({len(clips)} clip(s); point cloud, memory and downloads as they were).")
        editor = ctx.editors.get(session) if ctx.editors is not None else None
        if editor is not None and editor.job == state["job"]:
            _show_in_editor(ctx, editor, scene, state, editor.frames)
        return update
    finally:
        with ctx.lock:
            ctx.active_jobs.discard(state["job"])
