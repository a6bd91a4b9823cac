"""The Evaluate button's callbacks as plain functions (no browser): the table shows the engine's figures for the
session's scene, the report goes into the scene, its downloads and its zip, a clip added later is named as not judged,
and removing clips keeps an evaluation of the others and removes one that judged the removed clip."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from demo import editing, evaluation, generation, jobs
from demo.context import AppContext
from demo.generation import GenerationInputs
from demo.ui import CHECK_QUEUE, ENGINE_QUEUE, build_demo
from engine.evaluate import evaluate_scene

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
FRAMES = 5  # few frames, still enough for every figure (at least 3 registered)
EVALUATION = ("evaluation.json", "evaluation.png")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return AppContext(output_dir=tmp_path_factory.mktemp("demo-out"), default_engine="preview", device="cpu")


@pytest.fixture(scope="module")
def scene(ctx, examples):
    """A preview scene of two clips made through the Generate callback; ``(state, scene folder, inputs)``."""
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["up", "left"], frames=FRAMES)
    updates = list(generation.generate(ctx, {}, inp, session="s1"))
    state = updates[0]["state"]
    return state, jobs.job_dir(ctx.output_dir, state["job"]) / "scene", inp


def _table(update: dict) -> tuple[list, list]:
    table = update["evaluation_table"]
    assert table["visible"]
    return table["value"]["headers"], table["value"]["data"]


def _figure(cell: str):
    return None if cell == "-" else float(cell)


def _zip_names(path: Path) -> set:
    with zipfile.ZipFile(path) as zf:
        return set(zf.namelist())


def _page_function(ctx, elem_id: str, event: str):
    """The page's function bound to ``event`` of the component ``elem_id`` (gradio's ``BlockFunction``)."""
    page = build_demo(ctx)
    ids = {getattr(b, "elem_id", None): i for i, b in page.blocks.items()}
    [fn] = [f for f in page.fns.values() if (ids[elem_id], event) in [tuple(t) for t in f.targets]]
    return fn


def _on_status_change(ctx):
    """What the page runs when its status line changes (every run and undo writes it), checked to update the
    evaluation panel's three components."""
    fn = _page_function(ctx, "status", "change")
    assert [o.elem_id for o in fn.outputs] == ["evaluation-status", "evaluation-table", "evaluation-plot"]
    return fn.fn


def test_evaluate_shows_the_engines_figures_and_the_scene_keeps_them(ctx, scene):
    state, scene_dir, _ = scene
    assert not evaluation.evaluation_panel(ctx, state)["evaluation_table"]["visible"]  # nothing judged yet
    calls = []
    update = evaluation.evaluate(ctx, state, progress=lambda f, desc="": calls.append((f, desc)), threads=1)

    # The table: the figures of an independent evaluation of the same scene, clip by clip, then the means.
    expected = evaluate_scene(scene_dir, threads=1)
    headers, rows = _table(update)
    assert headers == ["clip", "registered", "RotErr (deg)", "TransErr", "ATE", "mapper"]
    assert [r[0] for r in rows] == ["00_up", "01_left", "mean"]
    for row, clip in zip(rows, expected["clips"] + [expected["scene"]]):
        registered, frames = (int(v) for v in row[1].split("/"))
        assert (registered, frames) == (clip["registered"], clip["frames"])
        for cell, key in zip(row[2:5], ("rot_err_deg", "trans_err", "ate")):
            assert clip[key] is not None and _figure(cell) == pytest.approx(clip[key], abs=5e-4), (row[0], key)
    assert all(r[1] == f"{FRAMES}/{FRAMES}" for r in rows[:2])

    # The picture is the scene's evaluation.png; the report is in the downloads and in the zip, byte for byte.
    assert Path(update["evaluation_plot"]["value"]) == scene_dir / "evaluation.png"
    assert (scene_dir / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((scene_dir / "evaluation.json").read_text())
    assert [c["name"] for c in report["clips"]] == ["00_up", "01_left"]
    downloads = {Path(p).name: Path(p) for p in update["downloads"]}
    assert downloads["evaluation.json"].read_bytes() == (scene_dir / "evaluation.json").read_bytes()
    with zipfile.ZipFile(downloads["scene.zip"]) as zf:
        for name in EVALUATION:
            assert zf.read(name) == (scene_dir / name).read_bytes(), name
    assert "Not judged" not in update["evaluation_status"]
    # Progress: forward, through both clips, to the end.
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(f"cameras of {name}" in " | ".join(d for _, d in calls) for name in ("00_up", "01_left"))


def test_a_new_clip_is_named_as_not_judged_and_revert_removes_the_evaluation_with_a_judged_clip(ctx, scene):
    state, scene_dir, inp = scene
    if not (scene_dir / "evaluation.json").exists():
        evaluation.evaluate(ctx, state, threads=1)
    before = {name: (scene_dir / name).read_bytes() for name in EVALUATION}

    # A clip added after the evaluation: the evaluation stays as it was, and the panel names the new clip.
    more = GenerationInputs(image=inp.image, trajectories=["right"], frames=FRAMES)
    updates = list(generation.generate(ctx, state, more, session="s1", continue_scene=True))
    assert {name: (scene_dir / name).read_bytes() for name in EVALUATION} == before
    assert set(EVALUATION) <= _zip_names(scene_dir / "scene.zip")  # the run's export packed it too
    assert "evaluation.json" in {Path(p).name for p in updates[-1]["downloads"]}
    panel = evaluation.evaluation_panel(ctx, state)
    assert "**Not judged:** `02_right`" in panel["evaluation_status"]
    assert [r[0] for r in _table(panel)[1]] == ["00_up", "01_left", "mean"]
    # The page shows it so after every run: the panel follows each change of the status line.
    assert _on_status_change(ctx)(state)[0] == panel["evaluation_status"]

    # Removing the clip it did not judge keeps it whole; the panel has nothing left to name.
    update = editing.remove_last_clip(ctx, state)
    assert {name: (scene_dir / name).read_bytes() for name in EVALUATION} == before
    assert set(EVALUATION) <= _zip_names(scene_dir / "scene.zip")
    assert "evaluation.json" in {Path(p).name for p in update["downloads"]}
    panel = evaluation.evaluation_panel(ctx, state)
    assert "Not judged" not in panel["evaluation_status"] and _table(panel)[1][-1][1] == f"{2 * FRAMES}/{2 * FRAMES}"

    # Removing a clip it judged removes it: from the scene, its zip and the downloads; the panel hides it.
    update = editing.remove_last_clip(ctx, state)
    assert not any((scene_dir / name).exists() for name in EVALUATION)
    assert not set(EVALUATION) & _zip_names(scene_dir / "scene.zip")
    assert "evaluation.json" not in {Path(p).name for p in update["downloads"]}
    assert not (jobs.job_dir(ctx.output_dir, state["job"]) / "downloads" / "evaluation.json").exists()
    panel = evaluation.evaluation_panel(ctx, state)
    assert not panel["evaluation_table"]["visible"] and not panel["evaluation_plot"]["visible"]
    assert "Evaluate" in panel["evaluation_status"]


def test_evaluations_run_in_a_group_of_their_own_one_at_a_time(ctx):
    fn = _page_function(ctx, "evaluate", "click")
    assert (fn.concurrency_id, fn.concurrency_limit) == (evaluation.EVALUATE_QUEUE, evaluation.EVALUATIONS_AT_ONCE)
    assert evaluation.EVALUATE_QUEUE not in {ENGINE_QUEUE, CHECK_QUEUE} and evaluation.EVALUATIONS_AT_ONCE == 1
    assert [o.elem_id for o in fn.outputs] == ["evaluation-status", "evaluation-table", "evaluation-plot", "downloads"]


def test_evaluate_refuses_in_one_sentence(ctx, examples):
    with pytest.raises(gr.Error) as e:
        evaluation.evaluate(ctx, {})
    assert e.value.message == evaluation.NO_SCENE
    # A scene only planned (depth, first cloud) has no clip to judge.
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["up"], frames=FRAMES)
    state, _, _ = generation.plan_paths(ctx, {}, inp)
    with pytest.raises(gr.Error) as e:
        evaluation.evaluate(ctx, state)
    assert e.value.message == evaluation.NO_CLIP
    # A scene being generated (or evaluated, or losing a clip) is not judged meanwhile.
    with ctx.runs.busy(state["job"]):
        with pytest.raises(gr.Error) as e:
            evaluation.evaluate(ctx, state)
    assert e.value.message == evaluation.BUSY
    assert state["job"] not in ctx.runs.busy_now()  # the refusal left the scene free
    with pytest.raises(gr.Error) as e:
        evaluation.evaluate(ctx, {"job": "0123456789abcdef"})
    assert e.value.message == evaluation.GONE
