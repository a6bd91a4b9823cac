"""Hostile requests against a running demo (``python app.py --engine preview`` on loopback, its address space capped
at 8 GiB, ``--max-editors 1``), as a visitor would send them: four 49-megapixel uploads at once, every hostile camera
file of tests/hostile.py through *Show planned paths* and the editor's *Load a camera.json*, a bare WebSocket to an
editor's own port, a cross-origin and a malformed-token WebSocket to the relay, more WebSockets than a token may
hold, an editor request over ``--max-editors``. After each kind of hostile request a client generates a scene, so
the server is shown to still do its work, not only to be alive. One server for the file; figures go to
tests/artifacts/hostile_server.json (docs/reliability.md).
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hostile import hostile_camera_files, png_bomb
from liveserver import LiveServer
from test_server import generate_args, make_input, wait_for

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.slow

ADDRESS_SPACE_GIB = 8
UPLOAD_GROWTH_LIMIT_MIB = 1536  # the budget for four 49 MP checks at once
SECONDS_PER_REFUSAL = 5.0  # a round trip through gradio's queue on a busy 2-core machine
FIGURES: dict = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-server")
    with LiveServer(root / "out", extra_args=["--max-editors", "1"], address_space_gib=ADDRESS_SPACE_GIB) as srv:
        srv.root = root
        srv.image = make_input(root / "photo.png", seed=3)
        yield srv
    artifacts = Path(__file__).with_name("artifacts")
    artifacts.mkdir(exist_ok=True)
    (artifacts / "hostile_server.json").write_text(json.dumps(FIGURES, indent=1) + "\n")


def client(server) -> Client:
    return Client(server.url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def editing(server):
    """The client holding the server's one editor (``--max-editors 1``), and that editor's iframe."""
    owner = client(server)
    html = owner.predict(*generate_args(server.image, [], frames=2), api_name="/open_editor")[0]
    return owner, html


def still_generates(server, after: str) -> None:
    """A new client generates a one-clip scene: the server did not only survive, it still works."""
    status = client(server).predict(*generate_args(server.image, ["left"], frames=2), api_name="/generate")[0]
    assert "Done in" in status, f"after {after}: {status}"
    assert server.proc.poll() is None
    FIGURES.setdefault("scenes_generated_after", []).append(after)


class RssSampler:
    """The server process's resident memory, sampled every 20 ms in a thread."""

    def __init__(self, server):
        self.server, self.samples, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.server.rss_mb())
            time.sleep(0.02)

    def __enter__(self) -> "RssSampler":
        self.baseline = self.server.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return max(self.samples) - self.baseline


# ---- uploads -------------------------------------------------------------------------------------------------

def test_four_concurrent_49_megapixel_16_bit_uploads_stay_within_the_memory_budget(server):
    bomb = server.root / "grey16_7000x7000.png"
    bomb.write_bytes(png_bomb(7000, 7000, bit_depth=16))  # 95 KB on disk, 98 MB as 16-bit pixels
    clients = [client(server) for _ in range(4)]
    with RssSampler(server) as rss:
        t0 = time.monotonic()
        jobs = [c.submit(handle_file(str(bomb)), api_name="/inspect_upload") for c in clients]
        results = [job.result(timeout=120) for job in jobs]
        wall = time.monotonic() - t0
    for result in results:
        assert "7000×7000 pixels" in result[-1], result
    assert rss.growth <= UPLOAD_GROWTH_LIMIT_MIB, f"server grew by {rss.growth:.0f} MiB"
    FIGURES["uploads"] = {"uploads": 4, "megapixels": 49, "bits": 16, "file_kb": round(bomb.stat().st_size / 1024),
                          "rss_before_mib": round(rss.baseline), "rss_growth_mib": round(rss.growth),
                          "limit_mib": UPLOAD_GROWTH_LIMIT_MIB, "wall_s": round(wall, 1)}
    print("uploads:", FIGURES["uploads"])
    still_generates(server, "four concurrent 49 MP uploads")


# ---- camera files ----------------------------------------------------------------------------------------------

def _refused(call, needle: str, what: str) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(AppError) as err:
        call()
    seconds = time.monotonic() - t0
    message = str(err.value)
    assert needle in message, f"{what}: {message!r} does not say {needle!r}"
    assert "Traceback" not in message and "\n" not in message.strip(), f"{what}: {message!r}"
    assert seconds < SECONDS_PER_REFUSAL, f"{what}: {seconds:.1f} s"
    return message, seconds


def test_hostile_camera_files_are_refused_by_the_plan_view_and_the_editor_load(server, editing):
    corpus = hostile_camera_files(server.root / "cameras")
    planner, editor_page = client(server), editing[0]
    refusals = {}
    with RssSampler(server) as rss:
        for h in corpus:
            if "plan" in h.surfaces:
                args = generate_args(server.image, [], frames=2)
                args[7] = handle_file(str(h.path))  # the camera.json input
                refusals[f"{h.name} · plan"] = _refused(lambda: planner.predict(*args, api_name="/plan"), h.needle,
                                                        f"{h.name} plan")
            if "editor" in h.surfaces:
                refusals[f"{h.name} · editor load"] = _refused(
                    lambda: editor_page.predict(handle_file(str(h.path)), api_name="/load_path"), h.needle,
                    f"{h.name} editor load")
            assert server.proc.poll() is None, h.name
    plans = sum("plan" in h.surfaces for h in corpus)
    assert plans >= 25 and len(refusals) == plans + sum("editor" in h.surfaces for h in corpus)
    FIGURES["camera_files"] = {"files": len(corpus), "requests": len(refusals), "refused": len(refusals),
                               "slowest_s": round(max(s for _, s in refusals.values()), 2),
                               "rss_growth_mib": round(rss.growth), "address_space_gib": ADDRESS_SPACE_GIB}
    print("camera files:", FIGURES["camera_files"])
    still_generates(server, "the hostile camera files")


# ---- the editor --------------------------------------------------------------------------------------------------

def _editor_token_and_port(server, html: str) -> tuple[str, int]:
    token = re.search(r'src="viser/([A-Za-z0-9_-]+)/"', html).group(1)
    port = int(wait_for(lambda: re.findall(r"3D editor \d+/\d+ started on 127\.0\.0\.1:(\d+)", server.log()), 10,
                        "the editor's port in the log")[-1])
    return token, port


def test_the_editor_cannot_be_reached_without_its_token_and_origin(server, editing):
    import viser
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    from demo.editor import MAX_CONNECTIONS_PER_EDITOR

    token, port = _editor_token_and_port(server, editing[1])
    protocol = [f"viser-v{viser.__version__}"]
    host = f"127.0.0.1:{server.port}"
    relay = f"ws://{host}/viser/{token}"
    with connect(relay, subprotocols=protocol, origin=f"http://{host}", open_timeout=10) as ws:
        assert len(ws.recv(timeout=10)) > 0  # the page's own connection is relayed

    # A bare connection to the editor's port reads nothing and is closed before anything it sends is read.
    received, closed = [], None
    try:
        with connect(f"ws://127.0.0.1:{port}", subprotocols=protocol, open_timeout=10) as bare:
            while True:
                received.append(bare.recv(timeout=10))
    except ConnectionClosed as e:
        closed = e
    assert received == [] and closed.rcvd is not None and closed.rcvd.code == 1008
    still_generates(server, "a bare WebSocket to the editor's port")

    with pytest.raises(InvalidStatus) as cross:
        connect(relay, subprotocols=protocol, origin="http://evil.example", open_timeout=10)
    assert cross.value.response.status_code == 403
    still_generates(server, "a cross-origin WebSocket to the relay")

    for path in ("%C3%A9/", "%C3%A9", "%FF%FE/", token + "x/"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{host}/viser/{path}", timeout=10)
        assert missing.value.code == 404, path
    with pytest.raises(InvalidStatus) as malformed:
        connect(f"ws://{host}/viser/%C3%A9", subprotocols=protocol, open_timeout=10)
    assert malformed.value.response.status_code == 403
    still_generates(server, "non-ASCII and malformed tokens")

    held = [connect(relay, subprotocols=protocol, open_timeout=10) for _ in range(MAX_CONNECTIONS_PER_EDITOR)]
    try:
        with pytest.raises(InvalidStatus) as over:
            connect(relay, subprotocols=protocol, open_timeout=10)
        assert over.value.response.status_code == 403
    finally:
        for ws in held:
            ws.close()
    still_generates(server, f"{MAX_CONNECTIONS_PER_EDITOR + 1} WebSockets on one token")

    # --max-editors 1: a second page's request is refused and prepares no scene.
    jobs_before = set((server.output_dir / "jobs").iterdir())
    with pytest.raises(AppError, match="All 1 3D editors"):
        client(server).predict(*generate_args(server.image, [], frames=2), api_name="/open_editor")
    assert set((server.output_dir / "jobs").iterdir()) == jobs_before
    still_generates(server, "an editor request over --max-editors")
    FIGURES["editor"] = {"bare_websocket_messages": len(received), "bare_close_code": closed.rcvd.code,
                         "cross_origin_status": 403, "malformed_token_status": 404,
                         "connections_per_token": MAX_CONNECTIONS_PER_EDITOR}


def test_refusals_are_logged_in_one_line_and_nothing_crashed(server):
    log = server.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    refused = [line for line in log.splitlines() if "worldstereo.demo: refused (" in line]
    assert len(refused) >= 25 and all(len(line) < 600 for line in refused)
    FIGURES["log"] = {"refusal_lines": len(refused), "tracebacks": 0}
