"""What the 3D camera-path editor's buttons and the undo button do: open the session's editor on its scene, preview,
save, load and generate the edited path, and remove the scene's last clip."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import gradio as gr

from demo import jobs
from demo.context import AppContext, Announcements, open_files, user_errors
from demo.downloads import clip_update, downloads_for
from demo.generation import GenerationInputs, choose_engine, generate, open_or_create
from demo.viewer import scene_confidence, viewer_update
from engine import outputs
from engine.constants import KEYFRAMES


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


def _show_in_editor(editor, scene, state: dict, frames: int) -> None:
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
        announce = Announcements()
        engine = choose_engine(inp.engine, inp.quality, ctx, warn=announce)
        try:
            new_state, _ = open_or_create(ctx, state, inp, engine, lambda f, m: progress(f, desc=m),
                                          announce, fresh=False)
        except user_errors() as e:
            raise gr.Error(str(e)) from None
        state.update(new_state)
    scene = open_files(ctx, state)
    _show_in_editor(editor, scene, state, int(inp.frames or KEYFRAMES))
    return state, editor_html(editor), (f"3D editor of scene `{state['job']}`: add keyframes in the view, then "
                                        "**Preview path** or **Generate this path**.")


def _path_cameras(ctx: AppContext, state: dict, session: str, frames: int):
    from engine.geometry.camera_path import path_cameras
    from engine.settings import check_frames

    scene = open_files(ctx, state)
    editor = _editor(ctx, session)
    if editor.job != state.get("job"):
        raise gr.Error("The 3D editor shows another scene; press Open the 3D editor again.")
    keys = editor.snapshot()
    if len(keys) < 2:
        raise gr.Error("Add at least one keyframe after the start view (Add keyframe here, in the 3D view).")
    try:
        check_frames(int(frames), "Frames per clip")
        return scene, keys, path_cameras(keys, int(frames), scene.start_camera)
    except user_errors() as e:
        raise gr.Error(str(e)) from None


def preview_path(ctx: AppContext, state: dict, frames: int, session: str = "-") -> str:
    """The 3D cache rendered along the editor's path, as a video (what a clip along it is conditioned on)."""
    scene, _, cams = _path_cameras(ctx, state, session, frames)
    render = scene.render_cache(cams)
    folder = jobs.job_dir(ctx.output_dir, state["job"]) / "plan"
    index = len(list(folder.glob("path-preview-*.mp4"))) if folder.is_dir() else 0
    return str(outputs.write_video(folder / f"path-preview-{index:03d}.mp4", render.image))


def save_editor_path(ctx: AppContext, state: dict, frames: int, session: str = "-") -> str:
    """The editor's path as an official camera.json (with its keyframes), for download."""
    from engine.geometry.camera_path import save_path

    scene, keys, _ = _path_cameras(ctx, state, session, frames)
    _, downloads = ctx.job_paths(state["job"])
    return str(save_path(downloads / "camera_path.json", keys, int(frames), scene.start_camera))


def load_editor_path(ctx: AppContext, state: dict, path: Optional[str], session: str = "-") -> str:
    """Keyframes from an uploaded camera.json into the editor; returns a status line."""
    from engine.geometry.camera_path import load_path

    if not path:
        return ""
    scene = open_files(ctx, state)
    editor = _editor(ctx, session)
    try:
        keys = load_path(path, scene.start_camera)
    except user_errors() as e:
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
        _show_in_editor(editor, open_files(ctx, state), state, int(frames))


def close_session(ctx: AppContext, session: str) -> None:
    """The page was closed: stop its 3D editor."""
    if ctx.editors is not None:
        ctx.editors.close(session)


# ---- undo ----------------------------------------------------------------------------------------------

def remove_last_clip(ctx: AppContext, state: dict, session: str = "-") -> dict:
    """Put the session's scene back to its state before its last clip (cache, memory, downloads); what a stopped run
    left undone stays resumable."""
    state = dict(state or {})
    if not state.get("job"):
        raise gr.Error("There is no scene yet, so there is no clip to remove.")
    with ctx.runs.busy(state["job"], refuse="This scene is being generated or evaluated right now; cancel or wait "
                                            "before removing a clip."):
        scene = open_files(ctx, state)
        job_root = jobs.job_dir(ctx.output_dir, state["job"])
        unfinished = scene.unfinished()
        try:
            removed = scene.revert()
        except user_errors() as e:
            raise gr.Error(str(e)) from None
        scene_dir, downloads_dir = ctx.job_paths(state["job"])
        # Readable download names are links to the scene's files: rebuild them so none of the removed clip stays.
        shutil.rmtree(downloads_dir, ignore_errors=True)
        scene.plan_run(unfinished)
        clips = scene.clips
        update = {"state": state, **clip_update(scene_dir, clips, clips[-1] if clips else None),
                  "downloads": downloads_for(scene_dir, downloads_dir, clips, exported=bool(clips))}
        if clips:
            update.update(viewer_update(ctx, scene, job_root, state))
        else:
            update.update(model3d=None, splats=None)
        update["status"] = (f"Removed clip `{removed['name']}`: the scene is back as it was before it "
                            f"({len(clips)} clip(s); point cloud, memory and downloads as they were).")
        editor = ctx.editors.get(session) if ctx.editors is not None else None
        if editor is not None and editor.job == state["job"]:
            _show_in_editor(editor, scene, state, editor.frames)
        return update
