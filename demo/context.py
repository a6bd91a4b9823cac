"""What every callback of the page knows: the running app (``AppContext``), its runs in progress (``Runs``) and
the few helpers all callbacks share.

The demo's callbacks are plain functions over an ``AppContext``, split by concern: ``demo.generation`` (inputs,
engine choice, Generate, Resume, Cancel), ``demo.downloads`` (clip players and downloads), ``demo.viewer`` (the 3D
views), ``demo.editing`` (the 3D path editor and undo) and ``demo.evaluation`` (Evaluate and its panel). Nothing
there draws a widget: ``demo/ui.py`` binds them to components. Every callback takes plain values (file paths, lists,
numbers) and returns plain values or yields dicts keyed by ``demo.generation.OUTPUT_KEYS`` (``demo.evaluation``:
``EVALUATION_KEYS``), so the tests call them without a browser. All scene work goes through ``engine.scene`` (the
evaluation through ``engine.evaluate``); errors a person can cause come back as ``gr.Error`` with the engine's one
sentence.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import gradio as gr
import torch

from demo import jobs
from engine.jobfolder import JobFolder
from engine.settings import SceneError

log = logging.getLogger("worldstereo.demo")


class Runs:
    """The runs in progress: each session's cancel flags, and the scenes being worked on (``busy``): a busy scene is
    not cleaned up, and a second run that must not overlap one is refused."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cancel_flags: dict[str, set] = {}  # session -> cancel flags of its runs in progress
        self.busy_jobs: dict[str, int] = {}  # job id -> runs working on it

    @contextlib.contextmanager
    def run(self, session: str) -> Iterator[threading.Event]:
        """A run of ``session``: its cancel flag while the block runs (``cancel`` sets it), dropped afterwards, so a
        long-lived server keeps no flag of a finished run."""
        flag, session = threading.Event(), session or "-"
        with self.lock:
            self.cancel_flags.setdefault(session, set()).add(flag)
        try:
            yield flag
        finally:
            with self.lock:
                flags = self.cancel_flags.get(session, set())
                flags.discard(flag)
                if not flags:
                    self.cancel_flags.pop(session, None)

    def cancel(self, session: str) -> None:
        """Set the cancel flag of every run of ``session`` in progress (none: nothing to do)."""
        with self.lock:
            for flag in self.cancel_flags.get(session or "-", ()):
                flag.set()

    @contextlib.contextmanager
    def busy(self, job: str, refuse: Optional[str] = None) -> Iterator[None]:
        """The scene ``job`` is worked on while the block runs. With ``refuse``, a scene already busy is refused
        with that sentence instead."""
        with self.lock:
            if refuse is not None and self.busy_jobs.get(job):
                raise gr.Error(refuse)
            self.busy_jobs[job] = self.busy_jobs.get(job, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.busy_jobs[job] -= 1
                if not self.busy_jobs[job]:
                    del self.busy_jobs[job]

    def busy_now(self) -> tuple[str, ...]:
        with self.lock:
            return tuple(self.busy_jobs)


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
    runs: Runs = field(default_factory=Runs)
    editors: Optional[object] = None  # demo.editor.EditorPool of the 3D path editors; None: no editor here
    view_splats: Optional[int] = None  # splats sent to the splat view; None: demo.viewer.MAX_VIEW_SPLATS

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def job_paths(self, job_id: str) -> tuple[Path, Path]:
        """``(scene folder, downloads folder)`` of the job ``job_id`` (``demo.jobs`` layout)."""
        root = jobs.job_dir(self.output_dir, job_id)
        return root / "scene", root / "downloads"


def user_errors() -> tuple[type, ...]:
    """The errors a person can cause, each one sentence (every input error of the engine is a ValueError)."""
    from engine.geometry.cameras import CameraFormatError
    from engine.images import ImageInputError

    return (ImageInputError, CameraFormatError, SceneError, jobs.JobPathError, ValueError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"


def sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "!", "?")) else text + "."


class Announcements(list):
    """The engine's one-line notes of a run, logged and kept for the page."""

    def __call__(self, message: str) -> None:
        log.info(message)
        self.append(str(message))


def logged(handler: Callable) -> Callable:
    """A UI handler whose ``gr.Error`` goes to the log in one line and to the page without gradio printing its
    traceback: such an error is a person's mistake, or a fault already logged with its traceback where it happened
    (``demo.generation``). Any other exception is a fault and keeps gradio's traceback in the log."""

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


def open_files(ctx: AppContext, state: dict):
    """The session's scene opened without any model (for views, the editor and undo)."""
    from engine.scene import open_for_files

    if not (state or {}).get("job"):
        raise gr.Error("There is no scene yet; press Generate (or Open the 3D editor) first.")
    scene_dir, _ = ctx.job_paths(state["job"])
    if not JobFolder(scene_dir).holds_scene():
        raise gr.Error("This scene is no longer on the server (old scenes are removed); start a new one.")
    try:
        return open_for_files(scene_dir)
    except user_errors() as e:
        raise gr.Error(str(e)) from None
