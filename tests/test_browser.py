"""The demo in a real browser: Debian's chromium driven by Playwright against `python app.py --engine preview`.

The server is started on a free loopback port with a temporary output folder; the tests use the page the way
a person does (upload, tick trajectories, move the frame slider, press Generate, download, Evaluate, look at the
splats; a panorama with its start views, planned paths, Continue, Show clip and the confidence slider; an example,
Cancel and Resume; place camera keyframes in the 3D editor, generate that path, remove the clip again, load a camera
file into the editor). What the page did is checked in the scene folders the server wrote. The file shares one
server and one browser page (each test starts by loading the page afresh).

With WORLDSTEREO_UPDATE_SCREENSHOT=1 the README's pictures in docs/ are refreshed (scaled down and reduced to a
palette, so they stay small).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
VIEW_SPLATS = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_out(tmp_path_factory) -> Path:
    """The server's --output-dir: its scenes are under jobs/<id>/scene."""
    return tmp_path_factory.mktemp("demo-out")


@pytest.fixture(scope="module")
def server(server_out):
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed; run `bash .ci/setup` (it installs Debian's chromium)")
    out = server_out
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = open(out / "server.log", "w")
    # Headless chromium draws WebGL in software, and once shown the splat view keeps drawing (about 1.6 cores here,
    # whichever tab is in front): the editor test, when it still looked at the splats, took 72 s alone with 40,000
    # splats and 58 s with 10,000.
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--engine", "preview", "--port", str(port),
                             "--output-dir", str(out), "--view-splats", str(VIEW_SPLATS)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{(out / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"app.py did not serve within 90 s:\n{(out / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shared_page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1500}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


@pytest.fixture
def page(shared_page, server):
    """The file's one page, loaded afresh: a new session of the app, nothing left of the test before."""
    shared_page.goto(server)
    shared_page.locator("#generate").wait_for()
    return shared_page


@contextlib.contextmanager
def _screenshot_on_failure(page, path: Path):
    """Keep what the page showed when a step failed (CI keeps tests/artifacts)."""
    try:
        yield
    except BaseException:
        try:
            page.screenshot(path=str(path), full_page=True, timeout=60_000)
        except Exception:  # noqa: BLE001 — a busy page must not hide the failure itself
            pass
        raise


def _upload(page, path: Path) -> None:
    page.locator("#input-file input[type=file]").set_input_files(str(path))


def _set_checkbox(page, group: str, label: str, checked: bool) -> None:
    box = page.locator(f"#{group} label").filter(has_text=re.compile(rf"^\s*{label}\s*$")).locator("input")
    if box.is_checked() != checked:
        box.click()


def test_generate_two_trajectories_download_and_splats(page, examples, artifacts, tmp_path):
    with _screenshot_on_failure(page, artifacts / "demo-failure.png"):
        _generate_and_download(page, examples, artifacts, tmp_path)


def _generate_and_download(page, examples, artifacts, tmp_path):
    _upload(page, examples / PHOTO)
    page.locator("#input-info").get_by_text("read as a photo").wait_for()
    _set_checkbox(page, "trajectories", "left", False)
    _set_checkbox(page, "trajectories", "up", True)
    _set_checkbox(page, "trajectories", "right", True)
    frames = page.locator("#frames input[type=number]")
    frames.fill("4")
    frames.press("Enter")
    page.locator("#generate").click()

    # The first clip's video appears while the second is still being made; the 3D viewer shows a canvas.
    page.locator("#clip-video video[src]").wait_for(timeout=120_000)
    downloads = page.locator("#downloads")
    downloads.locator('a[download="scene.zip"]').wait_for(timeout=120_000)
    page.locator("#status").get_by_text(re.compile(r"^Done in")).wait_for()
    for name in ("00_right.mp4", "01_up.mp4", "scene.ply", "scene.glb", "cameras.json", "nerfstudio-dataset.zip"):
        assert downloads.locator(f'a[download="{name}"]').count() == 1, name
    page.locator("#viewer canvas").wait_for()
    page.locator("#render-video video[src]").wait_for()
    page.locator("#mask-video video[src]").wait_for()

    with page.expect_download() as info:
        downloads.locator('a[download="scene.zip"]').click()
    zip_path = tmp_path / "scene.zip"
    info.value.save_as(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert zf.testzip() is None
    for required in ("scene.ply", "scene.glb", "cameras.json", "transforms.json", "manifest.json",
                     "clips/00_right/clip.mp4", "clips/01_up/clip.mp4", "clips/01_up/render.mp4",
                     "clips/01_up/render_mask.mp4", "clips/01_up/cameras.json"):
        assert required in names, (required, sorted(names)[:40])
    assert any(n.startswith("images/") for n in names)
    assert not any(n.startswith("state/") for n in names)

    page.locator("#depth-video video[src]").wait_for()
    page.wait_for_timeout(1500)  # let the viewer finish drawing the final cloud
    shot = artifacts / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    _update_docs_picture(shot, "screenshot.png", width=1000)

    # Evaluate: the per-clip table (what evaluation.json says, clip by clip) and the camera paths' picture.
    page.locator("#evaluate").click()
    table = page.locator("#evaluation-table")
    table.get_by_text("mean").wait_for(timeout=180_000)
    page.locator("#evaluation-plot img").wait_for()
    with page.expect_download() as info:
        downloads.locator('a[download="evaluation.json"]').click()
    report = json.loads(Path(info.value.path()).read_text())
    shown = " ".join(table.inner_text().split())
    assert "RotErr (deg)" in shown and [c["name"] for c in report["clips"]] == ["00_right", "01_up"]
    for clip in report["clips"]:
        assert re.search(rf"{clip['name']} {clip['registered']}/{clip['frames']} ", shown), (clip["name"], shown)
    page.screenshot(path=str(artifacts / "demo-evaluated.png"), full_page=True)

    # The splats: the viewer draws them (not a blank canvas). Last, as the page closes right after: once shown,
    # the splat view keeps software WebGL drawing whichever tab is in front.
    page.get_by_role("tab", name="Splats").click()
    canvas = page.locator("#splats canvas")
    canvas.wait_for()
    box = canvas.bounding_box()
    deadline = time.time() + 120
    while True:
        page.wait_for_timeout(3000)
        # Headless chromium draws WebGL in software: a frame of the splats takes seconds, so the picture is
        # taken of the page region (no wait for the canvas to settle) with a generous timeout.
        png = page.screenshot(clip=box, timeout=90_000)
        if _bright_fraction(png) > 0.05 or time.time() > deadline:
            break
    (artifacts / "splats.png").write_bytes(png)
    assert _bright_fraction(png) > 0.05, "the splat viewer stayed blank"


def _update_docs_picture(shot: Path, name: str, width: int) -> None:
    """The README's pictures: refreshed on request only, so a test run leaves the checkout unchanged."""
    if not os.environ.get("WORLDSTEREO_UPDATE_SCREENSHOT"):
        return
    from PIL import Image

    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        small = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(docs / name, optimize=True)


def test_invalid_upload_shows_sentence_and_page_keeps_working(page, examples, artifacts, tmp_path):
    with _screenshot_on_failure(page, artifacts / "invalid-upload-failure.png"):
        _invalid_upload(page, examples, tmp_path)


def _invalid_upload(page, examples, tmp_path):
    from engine.images import ImageInputError, load_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture at all\n" * 20)
    with pytest.raises(ImageInputError) as expected:
        load_image(bad)  # the engine's own sentence for this file is what the person must see
    _upload(page, bad)
    toast = page.locator(".toast-body").filter(has_text="broken.png")
    toast.wait_for()
    text = " ".join(toast.inner_text().split())
    tail = str(expected.value).split("broken.png", 1)[1].strip()
    assert tail[:40] in text, (tail, text)
    assert "Traceback" not in page.content()

    # The same page still serves: a good image is accepted and described.
    _upload(page, examples / PHOTO)
    page.locator("#input-info").get_by_text("read as a photo").wait_for()


# ---- the 3D camera-path editor and undo --------------------------------------------------------------

def test_camera_path_editor_generate_undo_and_load_a_camera_file(page, examples, artifacts, server_out):
    with _screenshot_on_failure(page, artifacts / "editor-failure.png"):
        _editor_path_and_undo(page, examples, artifacts)
        _load_camera_file_into_the_editor(page, examples, server_out)


def _bright_fraction(png: bytes) -> float:
    """Share of pixels clearly brighter than the viewers' dark background."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int32)
    return float((rgb.max(axis=2) > 60).mean())


def _editor_path_and_undo(page, examples, artifacts):
    _upload(page, examples / PHOTO)
    page.locator("#input-info").get_by_text("read as a photo").wait_for()
    frames = page.locator("#frames input[type=number]")
    frames.fill("5")
    frames.press("Enter")
    page.get_by_role("tab", name="3D camera-path editor").click()
    page.locator("#editor-open").click()
    editor = page.frame_locator("#editor-frame")
    add = editor.get_by_role("button", name="Add keyframe here")
    add.wait_for(timeout=120_000)
    editor.get_by_text("1 keyframe(s)").wait_for()
    # Three keyframes, each after turning the view a little (a drag orbits the viewer's camera).
    box = page.locator("#editor-frame").bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.7
    for k in range(3):
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 22, y - 4, steps=6)
        page.mouse.up()
        page.wait_for_timeout(400)
        add.click()
        editor.get_by_text(f"{k + 2} keyframe(s)").wait_for()
    # Step back to see the path over the cloud.
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5)
    page.mouse.wheel(0, 450)
    close = editor.locator('[class*="Notification"] button')
    if close.count():
        close.first.click()  # headless chromium draws WebGL in software, and viser says so in a pop-up

    page.locator("#path-preview").click()
    page.locator("#path-video video[src]").wait_for(timeout=60_000)
    page.locator("#path-save").click()
    page.locator('#path-file a[download="camera_path.json"]').wait_for()
    page.wait_for_timeout(1500)
    shot = artifacts / "editor.png"
    page.locator("#tab-editor").screenshot(path=str(shot))
    _update_docs_picture(shot, "editor.png", width=760)

    page.locator("#path-generate").click()
    page.locator("#status").get_by_text(re.compile(r"^Done in")).wait_for(timeout=180_000)
    page.locator("#clip-video video[src]").wait_for()
    page.locator("#depth-video video[src]").wait_for()
    downloads = page.locator("#downloads")
    for name in ("00_camera_path.mp4", "scene_splats.ply", "scene.zip"):
        downloads.locator(f'a[download="{name}"]').wait_for()

    # Undo: the clip goes, and with it its video and downloads.
    page.locator("#undo").click(timeout=120_000)
    # The page may stay busy for a while as the viewers let go of the cloud (software WebGL).
    page.locator("#status").get_by_text(re.compile(r"^Removed clip 00_camera_path")).wait_for(timeout=180_000)
    assert downloads.locator('a[download="00_camera_path.mp4"]').count() == 0
    assert page.locator("#clip-video video[src]").count() == 0


def _load_camera_file_into_the_editor(page, examples, server_out):
    """An official camera file (81 cameras, no keyframes) loaded into the open editor becomes 8 keyframes: its
    cameras at 8 evenly spread indices, keyframe 0 staying the start view; saving the path gives them back."""
    import json

    import numpy as np

    official = examples / PHOTO.replace("image.png", "camera.json")
    page.locator("#path-upload input[type=file]").set_input_files(str(official))
    page.locator("#status").get_by_text("Loaded 8 keyframes from camera.json; keyframe 0 stays the start view.").wait_for()
    page.frame_locator("#editor-frame").get_by_text("8 keyframe(s)").wait_for()
    clicked = time.time()
    page.locator("#path-save").click()  # the earlier save's link is still shown: wait for the new file itself
    deadline = clicked + 60
    while True:
        saved = [p for p in server_out.glob("jobs/*/downloads/camera_path.json") if p.stat().st_mtime >= clicked - 1]
        if saved or time.time() > deadline:
            break
        page.wait_for_timeout(300)
    assert saved, "Save camera.json wrote no file"
    keys = np.array(json.loads(saved[0].read_text())["keyframes"]["extrinsic"])
    cams = np.array(json.loads(official.read_text())["extrinsic"])
    picks = np.unique(np.linspace(0, len(cams) - 1, 8).round().astype(int))
    assert keys.shape == (8, 4, 4)
    np.testing.assert_allclose(keys[1:], cams[picks[1:]], atol=1e-6)


# ---- panorama, planned paths, Continue, Show clip, confidence; examples, Cancel, Resume ---------------------------

def _scene_id(page) -> str:
    """The scene id the status line shows ("Scene `<16 hex digits>` ...")."""
    text = page.locator("#status").inner_text()
    found = re.search(r"Scene\s*`?([0-9a-f]{16})", text)
    assert found, text[:400]
    return found.group(1)


def _manifest(server_out: Path, job: str) -> dict:
    import json

    return json.loads((server_out / "jobs" / job / "scene" / "manifest.json").read_text())


def _open_accordion(page, elem_id: str) -> None:
    page.locator(f"#{elem_id}").get_by_role("button").first.click()


def _set_frames(page, n: int) -> None:
    frames = page.locator("#frames input[type=number]")
    frames.fill(str(n))
    frames.press("Enter")


def test_panorama_start_views_plan_continue_show_clip_and_confidence(page, server_out, artifacts, tmp_path):
    with _screenshot_on_failure(page, artifacts / "panorama-failure.png"):
        _panorama_flow(page, server_out, tmp_path)


def _panorama_flow(page, server_out, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from engine.geometry.cameras import Cameras

    # A small 2:1 image (a smooth pattern): the upload is read as a panorama and the start views appear.
    yy, xx = np.mgrid[0:128, 0:256]
    rgb = np.stack([128 + 100 * np.sin(xx / 20), 128 + 100 * np.cos(yy / 15), 128 + 60 * np.sin((xx + yy) / 30)], -1)
    pano = tmp_path / "pano.png"
    Image.fromarray(rgb.astype(np.uint8)).save(pano)
    _upload(page, pano)
    page.locator("#input-info").get_by_text("read as a 360° panorama").wait_for()
    assert page.locator("#panorama input").is_checked()
    page.locator("#views").wait_for()
    _set_checkbox(page, "views", "view0", False)
    _set_checkbox(page, "views", "view1", True)
    _set_checkbox(page, "views", "view2", True)
    for name, on in (("left", False), ("right", False), ("forward", True)):
        _set_checkbox(page, "trajectories", name, on)
    _set_frames(page, 3)

    # Show planned paths: the scene is prepared and each planned path is listed (and drawn) before generating.
    _open_accordion(page, "camera-more")
    page.locator("#plan").click()
    status = page.locator("#status")
    status.get_by_text("Planned camera paths").wait_for(timeout=180_000)
    assert "view1:forward" in status.inner_text() and "view2:forward" in status.inner_text()
    page.locator("#viewer canvas").wait_for()

    page.locator("#generate").click()
    status.get_by_text(re.compile(r"^Done in")).wait_for(timeout=180_000)
    job = _scene_id(page)
    manifest = _manifest(server_out, job)
    assert [c["trajectory"] for c in manifest["clips"]] == ["view1:forward", "view2:forward"]
    assert len(list((server_out / "jobs").glob("*"))) >= 1
    scene_dir = server_out / "jobs" / job / "scene"
    for clip, view in zip(manifest["clips"], (1, 2)):  # each clip starts at its own start view
        first = Cameras.from_json(scene_dir / clip["folder"] / "cameras.json").w2c[0]
        assert torch.allclose(first, torch.tensor(manifest["start_views"][view], dtype=first.dtype), atol=1e-6)
    assert not torch.allclose(torch.tensor(manifest["start_views"][1]), torch.tensor(manifest["start_views"][2]))

    # Continue: one more trajectory (view1, left) in the same scene.
    _set_checkbox(page, "views", "view2", False)
    _set_checkbox(page, "trajectories", "forward", False)
    _set_checkbox(page, "trajectories", "left", True)
    page.locator("#continue").click()
    page.locator("#status").get_by_text("02_view1_left").wait_for(timeout=180_000)
    status.get_by_text(re.compile(r"^Done in")).wait_for(timeout=180_000)
    assert _scene_id(page) == job
    assert [c["name"] for c in _manifest(server_out, job)["clips"]] == ["00_view1_forward", "01_view2_forward",
                                                                         "02_view1_left"]

    # Show clip: an earlier clip's four videos (what the page plays is that clip's files, byte for byte).
    def played(viewer: str) -> bytes:
        return urllib.request.urlopen(page.locator(f"#{viewer} video").get_attribute("src"), timeout=30).read()

    last = scene_dir / "clips" / "02_view1_left"
    assert played("clip-video") == (last / "clip.mp4").read_bytes()
    page.locator("#clip-choice input").click()
    page.get_by_role("option", name="00_view1_forward").click()
    first_clip = scene_dir / "clips" / "00_view1_forward"
    deadline = time.time() + 60
    while played("clip-video") != (first_clip / "clip.mp4").read_bytes() and time.time() < deadline:
        page.wait_for_timeout(500)
    for viewer, name in (("clip-video", "clip.mp4"), ("render-video", "render.mp4"), ("mask-video", "render_mask.mp4"),
                         ("depth-video", "depth.mp4")):
        assert played(viewer) == (first_clip / name).read_bytes(), viewer

    # The confidence slider: the point viewer gets a cloud without the points under the threshold.
    slider = page.locator("#confidence input[type=range]")
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
    views = server_out / "jobs" / job / "view"
    deadline = time.time() + 60
    while not list(views.glob("*-0.75-*/scene.glb")) and time.time() < deadline:
        page.wait_for_timeout(500)
    shown = list(views.glob("*-0.75-*/scene.glb"))
    assert shown, sorted(p.name for p in views.glob("*"))
    import trimesh

    def points(path):
        return sum(len(g.vertices) for g in trimesh.load(path, force="scene").geometry.values())

    assert 0 < points(shown[0]) < points(scene_dir / "scene.glb")


def test_example_cancel_and_resume(page, server_out, artifacts):
    with _screenshot_on_failure(page, artifacts / "resume-failure.png"):
        _example_cancel_resume(page, server_out)


def _example_cancel_resume(page, server_out):
    # An example: its photo is loaded and its caption fills the prompt.
    page.locator("#examples img").first.click()
    page.locator("#input-info").get_by_text("read as a photo").wait_for()
    assert page.locator("#prompt textarea, #prompt input").first.input_value() != ""
    for name, on in (("left", True), ("right", True), ("up", True)):
        _set_checkbox(page, "trajectories", name, on)
    # 24 frames a clip: the first clip is shown while the second is made (its files written meanwhile), so the
    # cancel must land within the last two clips' time, under a loaded suite too.
    _set_frames(page, 24)
    page.locator("#generate").click()
    # Cancel once the first clip is shown: the run stops after the stage in progress, finished clips stay.
    page.locator("#clip-video video[src]").wait_for(timeout=180_000)
    page.locator("#cancel").click()
    status = page.locator("#status")
    status.get_by_text(re.compile(r"^Cancelled\. The \d finished clip")).wait_for(timeout=180_000)
    job = _scene_id(page)
    done = len(_manifest(server_out, job)["clips"])
    assert 1 <= done < 3

    # Resume by the scene's id, on a fresh page (as after a server restart): the rest is generated.
    page.goto(page.url)
    page.locator("#generate").wait_for()
    _open_accordion(page, "resume-more")
    page.locator("#resume-id textarea, #resume-id input").first.fill(job)
    page.locator("#resume").click()
    page.locator("#status").get_by_text(re.compile(r"^Done in")).wait_for(timeout=180_000)
    names = [c["trajectory"] for c in _manifest(server_out, job)["clips"]]
    assert names == ["left", "right", "up"], names
