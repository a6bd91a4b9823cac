"""What a person takes away from a scene: the clip players' files and the downloads under readable names (hard links
to the scene's own files, ``engine.jobfolder``), plus the nerfstudio dataset alone."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from demo import jobs
from demo.context import AppContext
from engine import outputs
from engine.jobfolder import ClipFiles, JobFolder
from engine.settings import SceneError


def clip_files(scene_dir: Path, clip: dict) -> ClipFiles:
    """The files of a clip the manifest lists (``engine.jobfolder.ClipFiles``); a name that would lead out of the
    scene's folder is refused (``jobs.safe_path``)."""
    files = JobFolder(scene_dir).clip_files(clip["name"])
    jobs.safe_path(scene_dir, files.folder.relative_to(scene_dir))
    return files


def clip_players(scene_dir: Path, clip: dict) -> tuple[str, str, str, Optional[str]]:
    """Clip, GGM render, hole mask and depth video of one clip (scenes made before depth videos have none)."""
    files = clip_files(scene_dir, clip)
    return (str(files.video), str(files.render), str(files.render_mask),
            str(files.depth) if files.depth.is_file() else None)


def zip_dataset(scene_dir: Path, target: Path) -> Path:
    """The nerfstudio dataset alone (``transforms.json`` + ``images/``), for people who only want to train."""
    files = JobFolder(scene_dir).scene_files()
    return outputs.zip_folder(scene_dir, target, only=(files.transforms.name, f"{files.images.name}/*"))


def downloads_for(scene_dir: Path, downloads_dir: Path, clips: Sequence[dict], exported: bool) -> list[str]:
    """Readable file names for everything downloadable now (clips first, then the scene-level files, the scene's
    evaluation last when it has one)."""
    out = []
    for clip in clips:
        src = clip_files(scene_dir, clip).video
        if src.is_file():
            out.append(str(jobs.link_or_copy(src, downloads_dir / f"{clip['name']}.mp4")))
    files = JobFolder(scene_dir).scene_files()
    for src in [files.cloud, files.glb, files.splats] + ([files.cameras, files.zip] if exported else []):
        if src.is_file():
            out.append(str(jobs.link_or_copy(src, downloads_dir / src.name)))
    if exported and files.transforms.is_file():
        out.append(str(zip_dataset(scene_dir, downloads_dir / "nerfstudio-dataset.zip")))
    if files.evaluation.is_file():
        out.append(str(jobs.link_or_copy(files.evaluation, downloads_dir / files.evaluation.name)))
    return out


def clip_update(scene_dir: Path, clips: list[dict], show: Optional[dict]) -> dict:
    """The clip chooser and the players, showing clip ``show`` (none: empty players)."""
    update = {"clip_choice": gr.update(choices=[c["name"] for c in clips], value=show["name"] if show else None)}
    if show:
        update["clip_video"], update["render_video"], update["mask_video"], update["depth_video"] = \
            clip_players(scene_dir, show)
    else:
        update.update(clip_video=None, render_video=None, mask_video=None, depth_video=None)
    return update


def show_clip(ctx: AppContext, state: dict, name: Optional[str]) -> tuple[Optional[str], ...]:
    """The clip, GGM render, hole mask and depth videos of one finished clip of the session's scene."""
    if not name or not (state or {}).get("job"):
        return None, None, None, None
    try:
        scene_dir, _ = ctx.job_paths(state["job"])
    except jobs.JobPathError as e:
        raise gr.Error(str(e)) from None

    try:
        manifest = JobFolder(scene_dir).read_manifest()
    except SceneError:
        raise gr.Error("This scene is no longer on the server (old scenes are removed); generate it again.") from None
    for clip in manifest.get("clips", []):
        if clip.get("name") == name:
            return clip_players(scene_dir, clip)
    raise gr.Error(f"The clip '{name}' is not part of this scene.")
