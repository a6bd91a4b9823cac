"""What the Evaluate button does: judge how exactly each clip of the session's scene follows its cameras
(``engine.evaluate``: structure from motion against the asked cameras), keep the report in the scene (JSON, picture,
zip) and show its per-clip table and picture; and what the evaluation panel shows after the scene changed
(``evaluation_panel``: a clip added since the evaluation is named as not judged; removing a clip the evaluation
judged removed the evaluation, ``engine.jobfolder``).

Structure from motion takes tens of seconds per 21-frame clip on two cores. It runs in the page's worker threads
(pycolmap releases the GIL while it works, so the other requests go on), at most ``EVALUATIONS_AT_ONCE`` at a time in
a concurrency group of its own (``demo/ui.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

import gradio as gr

from demo import jobs
from demo.context import AppContext, user_errors
from demo.downloads import downloads_for
from engine.jobfolder import JobFolder

EVALUATE_QUEUE, EVALUATIONS_AT_ONCE = "evaluate", 1  # one at a time: each uses THREADS cores
THREADS = 2  # pycolmap's threads per evaluation
# What the evaluation panel and the Evaluate button update, in the order demo/ui.py binds them.
PANEL_KEYS = ("evaluation_status", "evaluation_table", "evaluation_plot")
EVALUATION_KEYS = PANEL_KEYS + ("downloads",)
NO_SCENE = "There is no scene yet; generate one, then press Evaluate."
GONE = "This scene is no longer on the server (old scenes are removed); generate it again."
NO_CLIP = "This scene has no finished clip yet; generate one, then press Evaluate."
BUSY = "This scene is being generated, evaluated or changed right now; press Evaluate once that is done."


def _scene_folder(ctx: AppContext, state: dict) -> JobFolder:
    if not (state or {}).get("job"):
        raise gr.Error(NO_SCENE)
    try:
        scene_dir, _ = ctx.job_paths(state["job"])
    except jobs.JobPathError as e:
        raise gr.Error(str(e)) from None
    folder = JobFolder(scene_dir)
    if not folder.holds_scene():
        raise gr.Error(GONE)
    return folder


def evaluation_panel(ctx: AppContext, state: dict) -> dict:
    """The evaluation panel as the session's scene stands: the table and picture of its evaluation, with a line
    naming the clips added since (not judged); hidden when the scene has none."""
    from engine.evaluate import TABLE_HEADER, read_scene_evaluation, table_notes, table_rows

    hidden = {"evaluation_table": gr.update(value=None, visible=False),
              "evaluation_plot": gr.update(value=None, visible=False)}
    try:
        folder = _scene_folder(ctx, state)
        evaluation = read_scene_evaluation(folder.path)
        clips = folder.read_manifest()["clips"]
    except (gr.Error,) + user_errors():  # no scene (any more), or one removed as it is read: nothing to show
        return {"evaluation_status": "", **hidden}
    if evaluation is None:
        status = ("**Evaluate** judges how exactly each clip follows its cameras (structure from motion; tens of "
                  "seconds per 21-frame clip)." if clips else "")
        return {"evaluation_status": status, **hidden}
    report = evaluation.report
    names = ", ".join(f"`{c['name']}`" for c in report["clips"])
    lines = [f"Camera accuracy of {names} (RotErr in degrees summed over a clip's frames; TransErr and ATE in units "
             "of the clip's path length; the README's *Evaluate a scene* defines each)."]
    if evaluation.unjudged:
        lines.append(f"**Not judged:** {', '.join(f'`{n}`' for n in evaluation.unjudged)} (added after this "
                     "evaluation, or left out of it); press **Evaluate** again to judge every clip.")
    lines += table_notes(report)
    rows = [list(row) for row in table_rows(report)]
    plot = folder.scene_files().evaluation_plot
    return {"evaluation_status": "  \n".join(lines),
            "evaluation_table": gr.update(value={"headers": list(TABLE_HEADER), "data": rows}, visible=True),
            "evaluation_plot": gr.update(value=str(plot) if plot.is_file() else None, visible=plot.is_file())}


def evaluate(ctx: AppContext, state: dict, progress: Optional[Callable] = None, threads: int = THREADS) -> dict:
    """Judge every finished clip of the session's scene (``engine.evaluate.evaluate_scene``), write the report into
    the scene (``write_scene_evaluation``: evaluation.json, evaluation.png, the zip again) and show it: the panel
    (``evaluation_panel``) and the downloads with ``evaluation.json``. Refused in one sentence while the scene is
    being generated (or evaluated, or a clip removed), and for a scene without a finished clip."""
    from engine.evaluate import evaluate_scene, write_scene_evaluation

    progress = progress or (lambda *a, **k: None)
    folder = _scene_folder(ctx, state)
    with ctx.runs.busy(state["job"], refuse=BUSY):
        try:
            if not folder.read_manifest()["clips"]:
                raise gr.Error(NO_CLIP)
            report = evaluate_scene(folder.path, threads=threads,
                                    progress=lambda f, m: progress(0.9 * f, desc=f"evaluating: {m}"))
            progress(0.9, desc="evaluating: drawing the camera paths, packing the zip")
            write_scene_evaluation(folder.path, report)
        except gr.Error:
            raise
        except user_errors() as e:
            raise gr.Error(str(e)) from None
        scene_dir, downloads_dir = ctx.job_paths(state["job"])
        downloads = downloads_for(scene_dir, downloads_dir, folder.read_manifest()["clips"],
                                  exported=folder.scene_files().zip.is_file())
    progress(1.0, desc="evaluation done")
    return {**evaluation_panel(ctx, state), "downloads": downloads}
