"""The demo's callbacks as plain functions (no browser): a whole preview run on a shared example, the planned
path drawing, cancel, errors as one sentence with earlier clips kept, and the safety of job paths."""
from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from demo import editing, generation
from demo.context import AppContext
from demo.generation import GenerationInputs
from demo.downloads import show_clip
from demo import jobs
from engine import outputs
from engine.engines import ENGINES, engine_status
from engine.geometry.cameras import Cameras
from engine.images import ImageInputError, load_image, save_image
from engine.jobfolder import JobFolder

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
FRAMES = 3


class Recorder:
    """Stands in for gr.Progress: keeps every (fraction, stage name)."""

    def __init__(self, on_call=None):
        self.calls = []
        self.on_call = on_call

    def __call__(self, fraction, desc=""):
        self.calls.append((float(fraction), desc))
        if self.on_call:
            self.on_call(fraction, desc)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return AppContext(output_dir=tmp_path_factory.mktemp("demo-out"), default_engine="preview", device="cpu")


@pytest.fixture(scope="module")
def run(ctx, examples):
    """One preview scene with two trajectories, generated through the Generate callback."""
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["left", "up"], frames=FRAMES)
    progress = Recorder()
    updates = list(generation.generate(ctx, {}, inp, session="s1", progress=progress))
    return inp, updates, progress


def test_generate_streams_each_clip_then_the_exported_scene(ctx, run):
    inp, updates, progress = run
    state = updates[0]["state"]
    assert jobs.JOB_ID.match(state["job"])
    scene_dir = jobs.job_dir(ctx.output_dir, state["job"]) / "scene"
    # First the planned paths, then one update per finished clip, then the export.
    assert Path(updates[0]["model3d"]).parent.name == "plan"
    clip_updates = [u for u in updates if "clip_video" in u]
    assert len(clip_updates) == 2
    for k, u in enumerate(clip_updates):
        frames = outputs.read_video(u["clip_video"])
        assert frames.shape[0] == FRAMES
        assert outputs.read_video(u["render_video"]).shape[0] == FRAMES
        assert u["clip_choice"]["choices"] == [c["name"] for c in json.loads((scene_dir / "manifest.json").read_text())["clips"]][: k + 1]
        assert Path(u["model3d"]) == scene_dir / "scene.glb"
        names = [Path(p).name for p in u["downloads"]]
        assert names[: k + 1] == [f"{c}.mp4" for c in u["clip_choice"]["choices"]]
    final = [Path(p).name for p in updates[-1]["downloads"]]
    assert {"00_left.mp4", "01_up.mp4", "scene.ply", "scene.glb", "cameras.json", "scene.zip",
            "nerfstudio-dataset.zip"} <= set(final)
    assert updates[-1]["status"].splitlines()[-1].startswith("Done in")
    # Downloads are the engine's files under readable names, not copies that could drift.
    dl = jobs.job_dir(ctx.output_dir, state["job"]) / "downloads"
    assert (dl / "01_up.mp4").read_bytes() == (scene_dir / "clips" / "01_up" / "clip.mp4").read_bytes()
    with zipfile.ZipFile(dl / "scene.zip") as zf:
        names = set(zf.namelist())
    assert {"clips/00_left/clip.mp4", "clips/01_up/render_mask.mp4", "transforms.json", "cameras.json"} <= names
    with zipfile.ZipFile(dl / "nerfstudio-dataset.zip") as zf:
        ds = set(zf.namelist())
        transforms = json.loads(zf.read("transforms.json"))
    assert {f["file_path"] for f in transforms["frames"]} <= ds  # every frame's image is in the dataset zip
    # Progress went forward through named stages of both clips and the export.
    fractions = [f for f, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    stages = " | ".join(d for _, d in progress.calls)
    for stage in ("preparing", "clip 1/2", "clip 2/2", "rendering", "export"):
        assert stage in stages


def test_planned_paths_are_drawn_at_the_planned_camera_centres(ctx, run):
    import trimesh

    from engine.scene import Scene

    inp, updates, _ = run
    state = updates[0]["state"]
    scene = Scene.open(jobs.job_dir(ctx.output_dir, state["job"]) / "scene")
    state2, glb, legend = generation.plan_paths(ctx, state, GenerationInputs(image=inp.image, trajectories=["orbit"],
                                                                         frames=7))
    assert state2["job"] == state["job"]  # an existing scene is reused for planning, not re-made
    assert "`orbit` (7 cameras)" in legend
    loaded = trimesh.load(glb, force="scene")
    pts = np.concatenate([np.asarray(g.vertices) for g in loaded.geometry.values()])
    centres = scene.plan(generation.trajectory_requests(GenerationInputs(image=inp.image, trajectories=["orbit"],
                                                                    frames=7))[0]).centers.numpy()
    # The GLB is in glTF axes (y up, z back): the OpenCV world turned by diag(1, -1, -1).
    expected = centres @ np.diag([1.0, -1.0, -1.0])
    dist = np.linalg.norm(pts[None, :, :] - expected[:, None, :], axis=-1).min(axis=1)
    assert dist.max() < 1e-3 * scene.manifest["median_depth"]


def test_continue_adds_trajectories_to_the_same_scene(ctx, run):
    inp, updates, _ = run
    state = updates[0]["state"]
    more = GenerationInputs(image=inp.image, trajectories=["right"], frames=FRAMES)
    out = list(generation.generate(ctx, state, more, session="s1", continue_scene=True))
    assert all(u.get("state", state)["job"] == state["job"] for u in out)
    manifest = json.loads((jobs.job_dir(ctx.output_dir, state["job"]) / "scene" / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["left", "up", "right"]
    clip, render, mask, depth = show_clip(ctx, state, manifest["clips"][0]["name"])
    assert Path(clip).is_file() and Path(mask).name == "render_mask.mp4"


def test_each_clip_is_shown_while_the_next_one_is_being_made(ctx, examples, monkeypatch):
    """The second clip's steps are held until the page has shown the first clip (its video, the viewers, its
    download): a page that showed a clip only after the next one ended would never release them (the test fails
    after 60 s instead of hanging)."""
    import threading

    from engine.scene import Scene

    shown_first, real = threading.Event(), Scene.make_clip

    def held(self, request, *a, **kw):
        if len(self.manifest["clips"]) == 1:  # the second clip waits for the page
            assert shown_first.wait(60), "the first clip was not shown while the second was being made"
        return real(self, request, *a, **kw)

    monkeypatch.setattr(Scene, "make_clip", held)
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["left", "up"], frames=FRAMES)
    updates = []
    for u in generation.generate(ctx, {}, inp, session="s-stream"):
        updates.append(u)
        if "clip_video" in u:
            scene_dir = Path(u["clip_video"]).parents[2]
            committed = [c["name"] for c in json.loads((scene_dir / "manifest.json").read_text())["clips"]]
            if not shown_first.is_set():
                assert committed == ["00_left"] and Path(u["clip_video"]).parent.name == "00_left"
                assert "00_left.mp4" in [Path(p).name for p in u["downloads"]]
                shown_first.set()
    assert [u["clip_choice"]["choices"][-1] for u in updates if "clip_video" in u] == ["00_left", "01_up"]
    assert updates[-1]["status"].splitlines()[-1].startswith("Done in")


def test_cancel_stops_after_the_current_stage_and_keeps_finished_clips(ctx, examples):
    def cancel_in_second_clip(fraction, desc):
        if desc.startswith("clip 2/2"):
            generation.cancel(ctx, "s2")

    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["left", "right"], frames=FRAMES)
    updates = list(generation.generate(ctx, {}, inp, session="s2", progress=Recorder(cancel_in_second_clip)))
    assert "Cancelled" in updates[-1]["status"]
    job = updates[0]["state"]["job"]
    manifest = json.loads((jobs.job_dir(ctx.output_dir, job) / "scene" / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["left"]
    assert "00_left.mp4" in [Path(p).name for p in updates[-1]["downloads"]]
    assert "s2" not in ctx.runs.cancel_flags  # the run's flag went with it: the next run starts uncancelled
    generation.cancel(ctx, "idle")  # a cancel with no run in progress leaves nothing behind either
    assert not ctx.runs.cancel_flags

    # Removing the finished clip keeps the cancelled run's unfinished trajectory resumable (it used to be dropped).
    job_root = jobs.job_dir(ctx.output_dir, job)
    unfinished = JobFolder(job_root / "scene").unfinished
    assert [r["name"] for r in unfinished()] == ["right"]
    editing.remove_last_clip(ctx, updates[0]["state"], session="s2")
    assert [r["name"] for r in unfinished()] == ["right"]
    assert "Done in" in list(generation.resume(ctx, {}, job, session="s2"))[-1]["status"]
    manifest = json.loads((job_root / "scene" / "manifest.json").read_text())
    assert [c["trajectory"] for c in manifest["clips"]] == ["right"] and not unfinished()


def test_a_busy_scene_refuses_what_must_not_overlap_it_and_is_free_once_every_run_on_it_ends():
    from demo.context import Runs

    runs = Runs()
    with runs.busy("a"):
        with runs.busy("a"):  # a run inside a resume of the same scene
            pass
        with pytest.raises(gr.Error) as refused:
            with runs.busy("a", refuse="in use"):
                pass
        assert refused.value.message == "in use"
        with runs.busy("b", refuse="in use"):  # another scene is free
            assert runs.busy_now() == ("a", "b")
        assert runs.busy_now() == ("a",)
    with pytest.raises(RuntimeError):
        with runs.busy("a", refuse="in use"):  # free again; a failure inside frees it too
            raise RuntimeError("boom")
    assert runs.busy_now() == ()


def test_engine_error_mid_run_is_one_sentence_and_keeps_earlier_clips(ctx, examples, monkeypatch):
    from engine.scene import Scene
    from engine.settings import SceneError

    original = Scene.make_clip
    calls = []

    def failing_second(self, request, *a, **kw):
        calls.append(request)
        if len(calls) == 2:
            raise SceneError("The 3D cache has no points in front of this trajectory; choose a smaller angle.")
        return original(self, request, *a, **kw)

    monkeypatch.setattr(Scene, "make_clip", failing_second)
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["left", "right"], frames=FRAMES)
    updates = []
    with pytest.raises(gr.Error) as err:
        for u in generation.generate(ctx, {}, inp, session="s3"):
            updates.append(u)
    assert err.value.message.startswith("The 3D cache has no points in front of this trajectory; choose a smaller angle.")
    assert "\n" not in err.value.message and "Traceback" not in err.value.message
    assert "00_left.mp4" in [Path(p).name for p in updates[-1]["downloads"]]
    assert "Stopped" in updates[-1]["status"]
    assert "s3" not in ctx.runs.cancel_flags


def test_unreadable_upload_gives_the_engines_sentence(tmp_path):
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(ImageInputError) as expected:
        load_image(bad)
    with pytest.raises(gr.Error) as err:
        generation.inspect_upload(str(bad))
    assert err.value.message == str(expected.value)
    assert "holiday.png" in err.value.message


def test_generate_without_image_or_trajectory_says_what_to_do(ctx, examples):
    with pytest.raises(gr.Error, match="Upload a photo"):
        list(generation.generate(ctx, {}, GenerationInputs(image=None)))
    with pytest.raises(gr.Error, match="at least one trajectory"):
        list(generation.generate(ctx, {}, GenerationInputs(image=str(examples / PHOTO), trajectories=[])))


def test_bad_camera_json_is_refused_with_the_camera_modules_sentence(ctx, examples, tmp_path):
    from engine.geometry.cameras import CameraFormatError

    bad = tmp_path / "camera.json"
    bad.write_text(json.dumps({"extrinsic": [[1, 2, 3]], "intrinsic": []}))
    with pytest.raises(CameraFormatError) as expected:
        Cameras.from_json(bad)
    with pytest.raises(gr.Error) as err:
        list(generation.generate(ctx, {}, GenerationInputs(image=str(examples / PHOTO), camera_json=str(bad))))
    assert err.value.message == str(expected.value)


def test_official_camera_json_becomes_one_request_with_its_cameras(examples):
    cam_file = examples / "perspective" / "photorealistic-indoor-dining_spaces-030" / "camera.json"
    reqs = generation.trajectory_requests(GenerationInputs(image="x", trajectories=["up"], camera_json=str(cam_file)))
    official = json.loads(cam_file.read_text())
    assert [r.name for r in reqs] == ["up", "camera_json"]
    assert len(reqs[1].cameras) == len(official["extrinsic"])
    np.testing.assert_allclose(reqs[1].cameras.w2c.numpy(), np.array(official["extrinsic"]), atol=1e-6)


def test_amounts_go_to_the_right_presets_and_are_capped(examples):
    from engine.geometry.trajectories import PRESETS

    reqs = generation.trajectory_requests(GenerationInputs(image="x", trajectories=["left", "forward", "up"], angle=500,
                                                      distance=0.25, frames=9))
    by = {r.name: r for r in reqs}
    assert by["left"].amount == PRESETS["left"].max_amount  # 500 degrees is more than a left turn allows
    assert by["forward"].amount == 0.25 and by["up"].amount == PRESETS["up"].max_amount
    assert all(r.frames == 9 for r in reqs)
    pano = generation.trajectory_requests(GenerationInputs(image="x", panorama=True, trajectories=["forward"],
                                                      views=["view0", "view2"]))
    assert [r.name for r in pano] == ["view0:forward", "view2:forward"]
    default = generation.trajectory_requests(GenerationInputs(image="x", trajectories=["left"], angle=0))
    assert default[0].amount is None  # 0 keeps the preset's own amount


def test_gpu_memory_option_reaches_the_scene_and_unknown_ones_are_refused(ctx, examples, monkeypatch):
    from dataclasses import replace

    from engine.scene import GenerationCancelled, Scene

    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["up"], frames=FRAMES, offload="group")
    state, _, _ = generation.plan_paths(ctx, {}, inp)  # a new scene, only planned
    manifest = json.loads((jobs.job_dir(ctx.output_dir, state["job"]) / "scene" / "manifest.json").read_text())
    assert manifest["settings"]["offload"] == "group"
    # Generating the planned scene runs with the option chosen when Generate is pressed.
    ran_with = []

    def stop(self, request, *_, **__):
        ran_with.append(self.settings.offload)
        raise GenerationCancelled("stopped by the test")

    monkeypatch.setattr(Scene, "make_clip", stop)
    updates = list(generation.generate(ctx, state, replace(inp, offload="model"), session="off"))
    assert ran_with == ["model"] and updates[0]["state"]["job"] == state["job"]
    with pytest.raises(gr.Error, match="choose one of: none, text-encoder, model, group"):
        generation.plan_paths(ctx, {}, replace(inp, offload="cpu"))


def test_the_page_offers_every_gpu_memory_option_with_its_help(ctx):
    from demo.ui import build_demo
    from engine.offload import OFFLOAD_CHOICES, OFFLOAD_HELP

    page = build_demo(ctx)
    [control] = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "offload"]
    assert [value for _, value in control.choices] == list(OFFLOAD_CHOICES) and control.value == "none"
    assert all(f"{name}: {text}" in control.info for name, text in OFFLOAD_HELP.items())


def test_upload_detects_panoramas_by_aspect(tmp_path):
    for (w, h), pano in (((256, 128), True), ((240, 160), False), ((128, 256), False)):
        path = tmp_path / f"img-{w}x{h}.png"
        save_image(path, torch.rand(3, h, w))
        shown, is_pano, info = generation.inspect_upload(str(path))
        assert shown == str(path) and is_pano is pano
        assert f"{w}×{h}" in info


def test_engine_dropdown_names_why_an_engine_cannot_run():
    labels = dict((value, label) for label, value in generation.engine_choices())
    assert set(labels) == set(ENGINES)
    for name in ENGINES:
        ok, reason = engine_status(name)
        assert (labels[name] == name) if ok else (reason in labels[name] and "unavailable" in labels[name])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_unavailable_engine_falls_back_to_preview_with_a_warning(ctx):
    warnings = []
    engine = generation.choose_engine("worldstereo-memory-dmd", generation.QUALITY, ctx, warn=warnings.append)
    assert engine == "preview"
    # The quality choice picked the 40-step variant, and the warning says why it cannot run.
    assert len(warnings) == 1 and warnings[0].startswith(engine_status("worldstereo-memory")[1])


def test_banner_says_plainly_what_the_cheap_engines_are():
    assert "no video model" in generation.banner_markdown("preview")
    assert "noise" in generation.banner_markdown("tiny-random")
    assert ENGINES["worldstereo-memory"].description in generation.banner_markdown("worldstereo-memory")


# ---- path safety ------------------------------------------------------------------------------------

def test_job_ids_and_paths_cannot_leave_the_job_folder(tmp_path):
    root = tmp_path / "job"
    (root / "clips").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    assert jobs.safe_path(root, "clips") == (root / "clips").resolve()
    for bad in ("../secret.txt", "clips/../../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd"):
        with pytest.raises(jobs.JobPathError):
            jobs.safe_path(root, bad)
    os.symlink(tmp_path / "secret.txt", root / "clips" / "link.txt")
    with pytest.raises(jobs.JobPathError):
        jobs.safe_path(root, "clips/link.txt")  # a link that points outside is refused too
    for bad_id in ("../../etc", "ABCDEF0123456789", "0123", "", None, "0123456789abcdef/.."):
        with pytest.raises(jobs.JobPathError):
            jobs.job_dir(tmp_path, bad_id)
    assert jobs.JOB_ID.match(jobs.new_job_id()) and jobs.new_job_id() != jobs.new_job_id()


def test_show_clip_only_serves_clips_of_the_sessions_scene(ctx, run):
    _, updates, _ = run
    state = updates[0]["state"]
    with pytest.raises(gr.Error):
        show_clip(ctx, state, "../../manifest")
    with pytest.raises(gr.Error):
        show_clip(ctx, {"job": "../" + state["job"]}, "00_left")
    assert show_clip(ctx, {}, "00_left") == (None, None, None, None)


def test_old_job_folders_are_removed_by_age(tmp_path):
    root = jobs.jobs_root(tmp_path)
    ids = [jobs.new_job_id() for _ in range(3)]
    now = time.time()
    for i, job in enumerate(ids):
        d = root / job / "scene"
        d.mkdir(parents=True)
        (d / "f.txt").write_text("x")
        age = 10_000 if i < 2 else 10
        for p in (d / "f.txt", d, d.parent):
            os.utime(p, (now - age, now - age))
    (root / "not-a-job").mkdir()
    os.utime(root / "not-a-job", (now - 10_000, now - 10_000))
    removed = jobs.cleanup_old_jobs(tmp_path, max_age_s=3600, keep=(ids[1],), now=now)
    assert removed == [ids[0]]
    assert sorted(p.name for p in root.iterdir()) == sorted([ids[1], ids[2], "not-a-job"])


def test_examples_are_read_in_place(examples, tmp_path):
    from demo.examples import find_examples

    found = find_examples(examples)
    ctx = AppContext(output_dir=tmp_path, default_engine="preview", examples=found)
    photos = [e for e in found if not e.panorama]
    assert photos and all(e.image.is_relative_to(examples) for e in photos)
    index = found.index(photos[0])
    path, pano, prompt, _ = generation.pick_example(ctx, index)
    assert Path(path) == photos[0].image and pano is False
    assert prompt == json.loads((photos[0].image.parent / "prompt.json").read_text())["short caption"]
    assert any(e.panorama for e in found)  # the shared folder has a panorama bank to stitch
    with pytest.raises(gr.Error):
        generation.pick_example(ctx, len(found))
    assert not list(tmp_path.rglob("*.png"))  # nothing was copied


def test_app_defaults_are_local_and_one_job_at_a_time():
    import app

    args = app.build_parser().parse_args([])
    assert (args.host, args.share, args.max_concurrent, args.output_dir) == ("127.0.0.1", False, 1, "outputs")


def test_download_links_leave_nothing_else_in_the_folder(tmp_path):
    src = tmp_path / "scene" / "clip.mp4"
    src.parent.mkdir()
    src.write_bytes(b"first")
    downloads = tmp_path / "downloads"
    for _ in range(2):  # the second call finds the link already there
        assert jobs.link_or_copy(src, downloads / "00_up.mp4").read_bytes() == b"first"
    assert sorted(p.name for p in downloads.iterdir()) == ["00_up.mp4"]
    src.unlink()
    src.write_bytes(b"second")  # a new file under the same name replaces the old link
    assert jobs.link_or_copy(src, downloads / "00_up.mp4").read_bytes() == b"second"
    assert sorted(p.name for p in downloads.iterdir()) == ["00_up.mp4"]


def test_app_refuses_a_splat_view_without_splats(capsys, tmp_path):
    import app

    assert app.main(["--view-splats", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --view-splats must be at least 1."
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_plan_view_drawing_is_sized_by_point_count_not_by_scene_scale():
    """A path 20,000 scene units long in a scene of median depth 1e-6 (points every 1/150 of it would be 3e12 points)
    is drawn with at most MAX_PATH_POINTS points, still through every camera centre; a short path keeps its density."""
    from demo.planview import MAX_PATH_POINTS, path_points
    from engine.geometry.cameras import Cameras, intrinsics_from_fov

    def line(length: float, n: int = 9) -> Cameras:
        w2c = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
        w2c[:, 0, 3] = -torch.linspace(-length / 2, length / 2, n, dtype=torch.float64)  # centres along x
        return Cameras(w2c, intrinsics_from_fov(192, 128, 60.0, n=n), 192, 128)

    far = line(2.0e4)
    pts = path_points(far, scale=1e-6)
    assert len(pts) <= MAX_PATH_POINTS and np.isfinite(pts).all()
    dist = np.linalg.norm(pts[None] - far.centers.numpy()[:, None], axis=-1).min(axis=1)
    assert dist.max() == 0.0  # every centre is a drawn point
    near = path_points(line(1.0), scale=1.0)
    polyline = near[np.abs(near[:, 1]) + np.abs(near[:, 2]) == 0]  # the points on the x axis
    gaps = np.diff(np.sort(polyline[:, 0]))
    assert gaps.max() <= 1.0 / 150 + 1e-12  # the usual density: a point every 1/150 of the median depth


def test_the_corridor_example_runs_as_the_release_runs_it(examples, tmp_path, monkeypatch):
    """Choosing the shared corridor example offers its official run: its three trajectories in the release's order,
    each with its own caption unless the page gives that trajectory a prompt, and the release's references."""
    from dataclasses import replace

    from demo.examples import find_examples
    from engine import scene_start
    from engine import settings as settings_mod

    monkeypatch.setattr(scene_start, "OFFICIAL_PANORAMA_SIZE", (128, 256))  # small: the run, not the pixels
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 1 / 8)
    found = find_examples(examples)
    ctx = AppContext(output_dir=tmp_path, default_engine="preview", examples=found)
    corridor = next(i for i, e in enumerate(found) if e.scene is not None)
    photo = next(i for i, e in enumerate(found) if not e.panorama)
    choices, offered = generation.example_run_choices(ctx, corridor)
    assert offered and [v for _, v in choices] == ["", found[corridor].name]
    assert {v for _, v in choices} <= {v for _, v in generation.all_run_choices(ctx)}  # the page accepts each
    assert generation.example_run_choices(ctx, photo) == ([(generation.OWN_CHOICE, "")], False)
    path, pano, _, _ = generation.pick_example(ctx, corridor)
    inp = GenerationInputs(image=path, panorama=pano, trajectories=["left"], official=found[corridor].name,
                           trajectory_prompts="view0/traj0 = the corridor, seen anew\n")
    updates = list(generation.generate(ctx, {}, inp))
    scene_dir, _ = ctx.job_paths(updates[0]["state"]["job"])
    manifest = json.loads((scene_dir / "manifest.json").read_text())
    golden = json.loads((examples.parent / "reference/golden/corridor_retrieval.json").read_text())["trajectories"]
    assert manifest["kind"] == "official"
    assert [c["trajectory"] for c in manifest["clips"]] == [g["trajectory"] for g in golden]
    for clip, expected in zip(manifest["clips"], golden):
        refs = json.loads((scene_dir / clip["folder"] / "references.json").read_text())
        assert (refs["references"], refs["ref_index"]) == (expected["references"], expected["ref_index"])
    caption = {t: json.loads((found[corridor].scene / "view0" / t / "traj_caption.json").read_text())["prompt"]
               for t in ("traj2", "traj1")}
    assert [r["prompt"] for r in manifest["run"]["requests"]] == [caption["traj2"], "the corridor, seen anew",
                                                                  caption["traj1"]]
    with pytest.raises(gr.Error, match="cannot run as the release"):
        generation.official_scene(ctx, replace(inp, official="no-such-example"))
    with pytest.raises(gr.Error, match="does not generate"):
        generation.trajectory_requests(replace(inp, trajectory_prompts="left=x"), found[corridor].scene)
