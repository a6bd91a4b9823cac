"""The demo in a real browser: Debian's chromium driven by Playwright against `python app.py --engine preview`.

The server is started on a free loopback port with a temporary output folder; the tests use the page the way
a person does (upload, tick trajectories, move the frame slider, press Generate, download, look at the splats;
place camera keyframes in the 3D editor, generate that path, remove the clip again).

With WORLDSTEREO_UPDATE_SCREENSHOT=1 the README's pictures in docs/ are refreshed (scaled down and reduced to a
palette, so they stay small).
"""
from __future__ import annotations

import contextlib
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
def server(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail("chromium is not installed; run `bash .ci/setup` (it installs Debian's chromium)")
    out = tmp_path_factory.mktemp("demo-out")
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


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1500}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(server)
    pg.locator("#generate").wait_for()
    yield pg
    context.close()


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

def test_camera_path_editor_generate_and_undo(page, examples, artifacts):
    with _screenshot_on_failure(page, artifacts / "editor-failure.png"):
        _editor_path_and_undo(page, examples, artifacts)


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
