"""The 3D camera-path editor without a browser: the bounded pool of per-session viser servers, the app's routes
that serve and relay them, and the page's path buttons (preview, save, load, generate, undo) as plain calls."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from demo import editing, generation
from demo.context import AppContext, open_files
from demo.generation import GenerationInputs
from demo.viewer import set_confidence
from demo import jobs
from demo.editor import EditorBusy, EditorPool, routes
from engine import outputs
from engine.geometry.camera_path import Keyframe, load_path, path_cameras
from engine.geometry.cameras import Cameras

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
FRAMES = 4


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_pool_is_bounded_per_session_on_loopback_and_reaps_idle_editors():
    pool = EditorPool(max_editors=2, idle_s=60.0)
    try:
        a, b = pool.open("session-a"), pool.open("session-b")
        assert pool.open("session-a") is a and a.token != b.token and a.port != b.port
        for editor in (a, b):
            assert editor.server.get_host() == "127.0.0.1" and _listening(editor.port)
            assert pool.by_token(editor.token) is editor
        assert pool.by_token("not-a-token") is None
        with pytest.raises(EditorBusy, match="All 2 3D editors"):
            pool.open("session-c")
        pool.close("session-a")  # the page was closed
        assert pool.get("session-a") is None and not _listening(a.port)
        c = pool.open("session-c")
        b.last_used -= 120.0  # idle for two minutes
        assert pool.reap() == ["session-b"]
        assert not _listening(b.port) and pool.get("session-c") is c
    finally:
        pool.close_all()
    assert not pool.by_session


@pytest.fixture(scope="module")
def relay():
    """The routes in a real ASGI server (uvicorn, as gradio runs them) on a free loopback port, with a pool of one
    editor that shows a tiny scene with a second keyframe selected: ``(pool, editor, base url)``."""
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette

    pool = EditorPool(max_editors=1)
    editor = pool.open("s")
    start = Cameras(torch.eye(4, dtype=torch.float64), torch.tensor([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]]),
                    128, 96)
    rng = np.random.default_rng(0)
    editor.show_scene("job", rng.normal(size=(50, 3)) + [0, 0, 3], rng.random((50, 3)), start, 1.0, "-y", FRAMES)
    c2w = np.eye(4)
    c2w[0, 3] = 0.5
    editor.add_keyframe(Keyframe(c2w, 50.0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes(pool)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield pool, editor, f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        pool.close_all()


def _protocol() -> list[str]:
    import viser

    return [f"viser-v{viser.__version__}"]


def test_routes_serve_the_client_and_relay_its_websocket_only_for_live_tokens(relay):
    import urllib.error
    import urllib.request

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    pool, editor, host = relay
    base = f"http://{host}/viser"
    with urllib.request.urlopen(f"{base}/{editor.token}/", timeout=10) as page:
        assert page.status == 200 and b"<title>Viser</title>" in page.read()
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'self'"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base}/guessed-token/", timeout=10)
    assert missing.value.code == 404
    with connect(f"ws://{host}/viser/{editor.token}", subprotocols=_protocol(), open_timeout=10) as ws:
        assert ws.subprotocol == _protocol()[0]
        assert len(ws.recv(timeout=10)) > 0  # the server's scene and panel state, relayed unchanged
    with pytest.raises((InvalidStatus, ConnectionError, OSError)):
        with connect(f"ws://{host}/viser/guessed-token", subprotocols=_protocol(), open_timeout=10) as ws:
            ws.recv(timeout=10)


def _set_fov(editor, value: float) -> list[bytes]:
    """What a viser client sends to drag the editor's field-of-view slider to ``value``: its camera first (viser
    runs a panel's callbacks only for a client that has reported one), then the slider's new value."""
    import msgspec

    camera = {"type": "ViewerCameraMessage", "wxyz": [1.0, 0, 0, 0], "position": [0.0, 0, 0], "fov": 1.0,
              "near": 0.01, "far": 100.0, "image_height": 480, "image_width": 640, "look_at": [0.0, 0, 1],
              "up_direction": [0.0, -1, 0]}
    slider = {"type": "GuiUpdateMessage", "uuid": editor.fov._impl.uuid, "updates": {"value": value}}
    return [msgspec.msgpack.encode(camera), msgspec.msgpack.encode(slider)]


def _wait(predicate, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_bare_websocket_to_an_editor_port_can_read_and_change_nothing(relay):
    """Through the relay the slider message changes the selected keyframe's field of view (so the message is one that
    works); sent straight to the editor's port, without the relay's secret or with a wrong one, it changes nothing
    and nothing of the scene comes back."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from demo.editor import SECRET_HEADER

    pool, editor, host = relay
    assert editor.selected == 1 and editor.keyframes[1].fov == 50.0
    with connect(f"ws://{host}/viser/{editor.token}", subprotocols=_protocol(), open_timeout=10) as ws:
        assert len(ws.recv(timeout=10)) > 0
        for message in _set_fov(editor, 30.0):
            ws.send(message)
        assert _wait(lambda: editor.fov.value == 30.0 and editor.keyframes[1].fov == 30.0)
    for headers in ({}, {SECRET_HEADER: "not-the-secret"}, {SECRET_HEADER: editor.token}):
        received, closed = [], None
        try:
            with connect(f"ws://127.0.0.1:{editor.port}", subprotocols=_protocol(), additional_headers=headers,
                         open_timeout=10) as bare:
                for message in _set_fov(editor, 40.0):  # sent at once, before the server could close
                    bare.send(message)
                while True:
                    received.append(bare.recv(timeout=10))
        except ConnectionClosed as e:
            closed = e
        assert received == [] and closed is not None and closed.rcvd is not None and closed.rcvd.code == 1008
    assert not _wait(lambda: editor.fov.value != 30.0, timeout=1.0)
    assert editor.fov.value == 30.0 and editor.keyframes[1].fov == 30.0
    assert not editor.server._websock_server._live_connections  # nothing of the refused connections is kept


def test_a_page_cannot_push_a_keyframe_out_of_bounds(relay):
    """Whatever a page's sliders allow, a keyframe the engine refuses (a field of view of 500 degrees, a pose 1e300
    away) leaves the keyframes as they were and the panel says why."""
    from websockets.sync.client import connect

    pool, editor, host = relay
    before = editor.snapshot()
    with connect(f"ws://{host}/viser/{editor.token}", subprotocols=_protocol(), open_timeout=10) as ws:
        ws.recv(timeout=10)
        for message in _set_fov(editor, 500.0):
            ws.send(message)
        assert _wait(lambda: "Not applied" in editor.info.content)
    assert [k.fov for k in editor.snapshot()] == [k.fov for k in before]
    assert _wait(lambda: editor.fov.value == before[editor.selected].fov)  # the slider is put back
    with pytest.raises(ValueError, match="within 10000 scene units"):
        Keyframe.make([1e300, 0, 0], [1, 0, 0, 0], 60.0)


def test_the_relay_refuses_other_origins_malformed_tokens_and_connections_over_the_cap(relay):
    import urllib.error
    import urllib.request

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from demo.editor import MAX_CONNECTIONS_PER_EDITOR

    pool, editor, host = relay
    url = f"ws://{host}/viser/{editor.token}"
    for origin, headers in [("http://evil.example", {}), ("null", {}), (f"http://{host}.evil.example", {}),
                            ("http://[", {}), ("https://evil.example", {"X-Forwarded-Host": "studio.example"})]:
        with pytest.raises(InvalidStatus) as refused:
            connect(url, subprotocols=_protocol(), origin=origin, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 403, origin
    for origin, headers in [(f"http://{host}", {}), ("https://studio.example", {"X-Forwarded-Host": "studio.example"})]:
        with connect(url, subprotocols=_protocol(), origin=origin, additional_headers=headers, open_timeout=10) as ws:
            assert len(ws.recv(timeout=10)) > 0, origin

    for bad in ["%C3%A9", "%00", "a" * 23, "a" * 21, "..%2F..%2Fetc", editor.token[:-1] + "%C3%A9",
                "%F0%9F%98%80" * 6]:
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{host}/viser/{bad}/", timeout=10)
        assert missing.value.code == 404, bad
        with pytest.raises(InvalidStatus):
            connect(f"ws://{host}/viser/{bad}", subprotocols=_protocol(), open_timeout=10)

    held = [connect(url, subprotocols=_protocol(), open_timeout=10) for _ in range(MAX_CONNECTIONS_PER_EDITOR)]
    try:
        with pytest.raises(InvalidStatus) as over:
            connect(url, subprotocols=_protocol(), open_timeout=10)
        assert over.value.response.status_code == 403
        held.pop().close()
        assert _wait(lambda: editor.connections < MAX_CONNECTIONS_PER_EDITOR)
        held.append(connect(url, subprotocols=_protocol(), open_timeout=10))  # a freed place can be taken again
    finally:
        for ws in held:
            ws.close()
    assert _wait(lambda: editor.connections == 0)


def test_an_editor_request_the_pool_refuses_prepares_nothing(tmp_path, examples):
    pool = EditorPool(max_editors=1)
    context = AppContext(output_dir=tmp_path / "out", default_engine="preview", device="cpu", editors=pool)
    try:
        pool.open("someone-else")  # the only editor is taken
        inp = GenerationInputs(image=str(examples / PHOTO), trajectories=[], frames=FRAMES)
        with pytest.raises(gr.Error, match="All 1 3D editors"):
            editing.open_editor(context, {}, inp, session="late")
        assert not (tmp_path / "out" / "jobs").exists() or not any((tmp_path / "out" / "jobs").iterdir())
        assert pool.get("late") is None
    finally:
        pool.close_all()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = AppContext(output_dir=tmp_path_factory.mktemp("editor-out"), default_engine="preview", device="cpu",
                            editors=EditorPool(max_editors=2))
    yield context
    context.editors.close_all()


@pytest.fixture(scope="module")
def opened(ctx, examples):
    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=[], frames=FRAMES)
    state, html, status = editing.open_editor(ctx, {}, inp, session="p1")
    return state, html


def test_open_editor_prepares_the_scene_and_starts_at_the_start_view(ctx, opened):
    state, html = opened
    editor = ctx.editors.get("p1")
    assert f'src="viser/{editor.token}/"' in html and editor.job == state["job"]
    scene = open_files(ctx, state)
    assert len(editor.keyframes) == 1
    np.testing.assert_allclose(editor.keyframes[0].c2w, scene.start_camera.c2w[0].numpy(), atol=1e-12)
    with pytest.raises(gr.Error, match="at least one keyframe"):
        editing.preview_path(ctx, state, FRAMES, session="p1")
    with pytest.raises(gr.Error, match="Open the 3D editor first"):
        editing.preview_path(ctx, state, FRAMES, session="someone-else")


def _add_keyframes(editor, scene):
    c2w = scene.start_camera.c2w[0].numpy()
    d = float(scene.manifest["median_depth"])
    for k, (dx, fov) in enumerate([(0.15, 50.0), (0.3, 40.0)]):
        moved = c2w.copy()
        moved[:3, 3] += dx * d * c2w[:3, 0]
        editor.add_keyframe(Keyframe(moved, fov))


def test_path_buttons_preview_save_load_generate_and_undo(ctx, opened, tmp_path):
    state, _ = opened
    editor = ctx.editors.get("p1")
    scene = open_files(ctx, state)
    _add_keyframes(editor, scene)
    expected = path_cameras(editor.snapshot(), FRAMES, scene.start_camera)

    preview = editing.preview_path(ctx, state, FRAMES, session="p1")
    frames = outputs.read_video(preview)
    rendered = scene.cache.render(expected, radius=scene.splat_radius(expected)).image
    assert frames.shape[0] == FRAMES and (frames - rendered[:, :, : frames.shape[2], : frames.shape[3]]).abs().mean() < 0.03

    saved = Path(editing.save_editor_path(ctx, state, FRAMES, session="p1"))
    assert torch.allclose(Cameras.from_json(saved).w2c, expected.w2c, atol=1e-12)
    editor.delete_keyframe(2)
    assert len(editor.keyframes) == 2
    assert "Loaded 3 keyframes" in editing.load_editor_path(ctx, state, str(saved), session="p1")
    for a, b in zip(editor.snapshot(), load_path(saved, scene.start_camera)):
        np.testing.assert_allclose(a.c2w, b.c2w, atol=1e-12)

    updates = list(editing.generate_path(ctx, state, FRAMES, session="p1"))
    scene_dir = jobs.job_dir(ctx.output_dir, state["job"]) / "scene"
    manifest = json.loads((scene_dir / "manifest.json").read_text())
    assert [c["name"] for c in manifest["clips"]] == ["00_camera_path"]
    written = Cameras.from_json(scene_dir / "clips" / "00_camera_path" / "cameras.json")
    assert torch.allclose(written.w2c, expected.w2c, atol=1e-9)
    last_clip = [u for u in updates if u.get("depth_video")][-1]
    assert outputs.read_video(last_clip["depth_video"]).shape[0] == FRAMES
    assert Path(last_clip["splats"]).name.startswith("scene_splats")
    assert any(Path(p).name == "00_camera_path.mp4" for p in updates[-1]["downloads"])

    update = editing.remove_last_clip(ctx, state, session="p1")
    assert "Removed clip `00_camera_path`" in update["status"]
    assert update["clip_choice"]["choices"] == [] and update["clip_video"] is None and update["downloads"] == []
    assert not (scene_dir / "clips" / "00_camera_path").exists()
    downloads = jobs.job_dir(ctx.output_dir, state["job"]) / "downloads"
    assert not downloads.exists() or not any(downloads.iterdir())
    with pytest.raises(gr.Error, match="no clip to remove"):
        editing.remove_last_clip(ctx, state, session="p1")
    assert len(editor.keyframes) == 3  # the path stays for another try


def test_confidence_slider_keeps_exactly_the_points_at_or_above_it(ctx, examples):
    import trimesh

    inp = GenerationInputs(image=str(examples / PHOTO), trajectories=["left"], frames=FRAMES)
    updates = list(generation.generate(ctx, {}, inp, session="c1"))
    state = updates[0]["state"]
    scene_dir = jobs.job_dir(ctx.output_dir, state["job"]) / "scene"
    manifest = json.loads((scene_dir / "manifest.json").read_text())
    # Independently of the engine's code: the rule of the README from the cache file's confidence column.
    from demo.viewer import FAR_FACTOR
    from engine.geometry.cache import PointCache

    cache = PointCache.load_ply(scene_dir / manifest["state"]["cache"])
    centre = Cameras.from_json(scene_dir / "state" / "start.json").centers[0].float()
    dist = (cache.points - centre).norm(dim=1).double()
    reach = FAR_FACTOR * manifest["median_depth"]
    conf = cache.confidence.double() * torch.clamp(reach / dist, max=1.0)
    assert bool((conf < 0.75).any()) and bool((conf >= 0.75).any())
    state, glb, splats = set_confidence(ctx, state, 0.75)
    points = sum(len(g.vertices) for g in trimesh.load(glb).geometry.values())
    assert points == int((conf >= 0.75).sum()) < len(cache)
    assert state["min_confidence"] == 0.75 and Path(splats).is_file()
    state, glb, _ = set_confidence(ctx, state, 0.0)
    assert Path(glb) == scene_dir / "scene.glb"
    # The splat view holds every shown point up to the server's --view-splats, a fixed subset beyond that.
    from conftest import read_vertex_ply
    from demo.viewer import MAX_VIEW_SPLATS

    kept = int((conf >= 0.75).sum())
    state, _, splats = set_confidence(ctx, state, 0.75)
    assert len(read_vertex_ply(splats)[1]) == min(kept, MAX_VIEW_SPLATS)
    ctx.view_splats = 500
    try:
        state, _, splats = set_confidence(ctx, state, 0.75)
    finally:
        ctx.view_splats = None
    assert kept > 500 and len(read_vertex_ply(splats)[1]) == 500
