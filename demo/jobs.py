"""Job folders of the web demo: one random id per scene, safe paths inside it, removal by age.

Layout under the app's ``--output-dir``::

    jobs/<id>/scene/       the engine's job folder (``engine.scene.Scene``), zipped as a whole by its export
    jobs/<id>/downloads/   readable names for what the person downloads (hard links into scene/)
    jobs/<id>/plan/        the planned-path view (cloud + cameras) drawn before generating
    jobs/<id>/view/        what the page's 3D viewers show (``demo.viewer``)

A run cut short (the server killed or restarted) is resumed from the scene's own resume record (its manifest).

Ids are random (``secrets``), so one person cannot guess another's folder, and every path handed to the
browser is checked to lie inside its job folder.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]
JOB_ID = re.compile(r"^[0-9a-f]{16}$")


class JobPathError(ValueError):
    """A job id or file name that does not point inside a job folder."""


def new_job_id() -> str:
    return secrets.token_hex(8)


def jobs_root(output_dir: PathLike) -> Path:
    return Path(output_dir).resolve() / "jobs"


def job_dir(output_dir: PathLike, job_id: str) -> Path:
    """The folder of ``job_id``; refuses anything that is not an id this module made."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise JobPathError("That job id is not valid; start a new scene.")
    return jobs_root(output_dir) / job_id


def safe_path(root: PathLike, relative: PathLike) -> Path:
    """``root / relative`` resolved, refusing absolute paths, ``..`` and links that leave ``root``."""
    root = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute() or any(part == ".." for part in rel.parts):
        raise JobPathError(f"'{relative}' is not a file of this scene.")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise JobPathError(f"'{relative}' is not a file of this scene.")
    return target


def link_or_copy(src: Path, dest: Path) -> Path:
    """Put ``src`` at ``dest`` (a hard link where the file system allows, else a copy), replacing ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and os.path.samefile(src, dest):
        # Already that file: renaming a second link of the same file onto it does nothing and leaves the link behind.
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    return dest


def cleanup_old_jobs(output_dir: PathLike, max_age_s: float, keep: tuple[str, ...] = (), now: float | None = None) -> list[str]:
    """Delete job folders not modified for ``max_age_s`` seconds (except ids in ``keep``); returns the ids."""
    root = jobs_root(output_dir)
    if not root.is_dir() or max_age_s <= 0:
        return []
    now = time.time() if now is None else now
    removed = []
    for folder in root.iterdir():
        if not folder.is_dir() or not JOB_ID.match(folder.name) or folder.name in keep:
            continue
        try:
            newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
        except OSError:
            continue
        if now - newest > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


# ---- runs that did not finish (server killed or restarted mid-run) -------------------------------------

LEGACY_PENDING = "pending.json"  # where older versions kept a run's requests, beside the scene


def made_by_an_older_version(job_root: Path) -> bool:
    """Whether the job's unfinished run was recorded the older way (``LEGACY_PENDING``), which is not resumed."""
    return (Path(job_root) / LEGACY_PENDING).is_file()


def unfinished_jobs(output_dir: PathLike) -> list[dict]:
    """Job folders whose last run stopped before all its trajectories were generated (the scene's resume record,
    ``engine.jobfolder.unfinished_requests``), newest first: ``{"id", "remaining": [trajectory names], "clips":
    committed clip count}``."""
    from engine.jobfolder import JobFolder, unfinished_requests
    from engine.settings import SceneError

    root = jobs_root(output_dir)
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        if not (folder.is_dir() and JOB_ID.match(folder.name)):
            continue
        try:
            manifest = JobFolder(folder / "scene").read_manifest()
            remaining = unfinished_requests(manifest)
        except (SceneError, KeyError, TypeError, ValueError):  # no scene yet, or one that cannot be read
            continue
        if remaining:
            found.append((folder.stat().st_mtime, {"id": folder.name, "remaining": [r.get("name") for r in remaining],
                                                   "clips": len(manifest.get("clips", []))}))
    return [job for _, job in sorted(found, key=lambda t: -t[0])]
