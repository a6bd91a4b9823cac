"""The demo in a real browser: Debian's chromium driven by Playwright against `python app.py --engine preview`.

The server is started on a free loopback port with a temporary output folder; the tests use the page the way
a person does (upload, tick trajectories, move the frame slider, press Generate, download).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
    log = open(out / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--engine", "preview", "--port", str(port),
                             "--output-dir", str(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        page.screenshot(path=str(path), full_page=True)
        raise


def _upload(page, path: Path) -> None:
    page.locator("#input-file input[type=file]").set_input_files(str(path))


def _set_checkbox(page, group: str, label: str, checked: bool) -> None:
    box = page.locator(f"#{group} label").filter(has_text=re.compile(rf"^\s*{label}\s*$")).locator("input")
    if box.is_checked() != checked:
        box.click()


def test_generate_two_trajectories_and_download(page, examples, artifacts, tmp_path):
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

    page.wait_for_timeout(1500)  # let the viewer finish drawing the final cloud
    shot = artifacts / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("WORLDSTEREO_UPDATE_SCREENSHOT"):
        # The README's picture: refreshed on request only, so a test run leaves the checkout unchanged.
        docs = REPO / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs / "screenshot.png")


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
