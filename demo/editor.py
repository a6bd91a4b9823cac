"""The 3D camera-path editor: a viser view of the scene's cloud where a person places camera keyframes.

One editor per browser session. Each is its own viser server, bound to 127.0.0.1 on a free port, and the
browser never reaches it directly: the page's iframe loads ``viser/<token>/`` from the app itself (the viser
client is one self-contained HTML file shipped in the viser wheel) and its WebSocket ``viser/<token>`` is
relayed by the app to that server (``routes``). Only the app's port is exposed, and the token (random, one per
session, never listed) is the only key to an editor. The pool holds at most ``max_editors``; an editor whose
page was closed, or that nobody used for ``idle_s``, is stopped.

Who may drive an editor:
- Its viser server admits only the app's relay, which presents the editor's own secret (``SECRET_HEADER``, never
  sent to a browser) in its WebSocket handshake; any other connection to the port is closed before a message is
  read or sent (``PathEditor._guard``), so another local process or a web page that finds the port gets nothing.
- The relay answers only well-formed live tokens (anything else, non-ASCII included, is a 404 or a refused
  WebSocket), only a browser page of the app's own origin (``Origin`` must name the host the request was sent to,
  or the proxy's ``X-Forwarded-Host``; clients that are not browsers send none), and at most
  ``MAX_CONNECTIONS_PER_EDITOR`` WebSockets per token at once.

The path maths lives in ``engine.geometry.camera_path``; here are only the widgets: the cloud, a frustum per
keyframe (keyframe 0, the start view, fixed), a gizmo on the selected keyframe, the splined path with a few of
its cameras, and a small panel (add at the current view, select, field of view, delete).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from engine.constants import KEYFRAMES
from engine.geometry.camera_path import MAX_KEYFRAMES, MIN_FOV, Keyframe, keyframes_from_cameras, path_cameras
from engine.geometry.cameras import Cameras

log = logging.getLogger("worldstereo.demo")

MAX_VIEW_POINTS = 300_000  # points sent to the browser (a random subset beyond that)
START_COLOR, KEY_COLOR, SELECTED_COLOR, PATH_COLOR = (255, 200, 0), (40, 200, 255), (255, 60, 60), (255, 120, 200)
PATH_FRUSTA = 6
TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")  # what secrets.token_urlsafe(16) makes; nothing else is looked up
SECRET_HEADER = "X-Editor-Secret"  # the relay's key to an editor's viser server
MAX_CONNECTIONS_PER_EDITOR = 4  # WebSockets one token may hold open at once (a page needs one; reloads overlap)


class EditorBusy(RuntimeError):
    """Every editor of the pool is in use; the message is one sentence."""


class _Refused(Exception):
    """A connection to an editor's viser port without the editor's secret."""


class _QuietRefusals(logging.Filter):
    """The websockets library logs a refused connection as a failed handler with its traceback; it is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Refused))


logging.getLogger("websockets.server").addFilter(_QuietRefusals())


class PathEditor:
    """One session's editor: a viser server with the cloud, the keyframes and the splined path."""

    def __init__(self, token: str):
        import viser

        self.token = token
        self.secret = secrets.token_urlsafe(32)
        # viser prints a banner with its address for every server; the pool's log line replaces it.
        with contextlib.redirect_stdout(io.StringIO()):
            self.server = viser.ViserServer(host="127.0.0.1", port=0, verbose=False)
        self.port = self.server.get_port()
        self._guard()
        self.connections = 0  # the relay's WebSockets open to this editor
        self.lock = threading.RLock()
        self.last_used = time.monotonic()
        self.keyframes: list[Keyframe] = []
        self.base: Optional[Cameras] = None
        self.scale = 1.0
        self.frames = KEYFRAMES
        self.selected = 0
        self.job: Optional[str] = None
        self._handles: list = []
        self._path_handles: list = []
        self._refused = ""  # why the last keyframe change was not applied, shown once by the next redraw
        self._build_panel()

    # ---- who may connect ---------------------------------------------------------------------------------
    def _guard(self) -> None:
        """Admit to the viser server only connections whose handshake carries ``self.secret`` (module notes).

        viser 1.1.1 has no authentication of its own, but its WebSocket server runs every connect callback before it
        starts the tasks that read and send messages: a callback that raises ends the connection with nothing read
        or sent either way. (Closing from the callback would not do: frames already received would still be read.)
        The port opened inside ``ViserServer()``, a moment before this callback exists, so any connection made in
        that moment is closed here, before the panel (and any id a message could name) exists."""
        ws = self.server._websock_server  # viser's WebSocket server: its connect callbacks and live connections
        secret = self.secret.encode()

        async def admit(client) -> None:
            connection = ws._live_connections.get(client.client_id)
            supplied = connection.request.headers.get(SECRET_HEADER, "") if connection and connection.request else ""
            if secrets.compare_digest(supplied.encode("utf-8", "replace"), secret):
                return
            ws._live_connections.pop(client.client_id, None)  # viser keeps both until its handler's end, never reached
            ws._client_state_from_id.pop(client.client_id, None)
            log.warning("3D editor on port %d: refused a connection without the app's secret", self.port)
            if connection is not None:
                await connection.close(1008, "use the app's /viser/<token> address")
            raise _Refused()

        ws.on_client_connect(admit)
        loop = ws._background_event_loop
        for connection in list(ws._live_connections.values()):
            asyncio.run_coroutine_threadsafe(connection.close(1008), loop).result(timeout=10)

    def enter(self) -> bool:
        """Count one more relay connection, unless the token already holds ``MAX_CONNECTIONS_PER_EDITOR``."""
        with self.lock:
            if self.connections >= MAX_CONNECTIONS_PER_EDITOR:
                return False
            self.connections += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.connections -= 1

    # ---- panel ------------------------------------------------------------------------------------------
    def _build_panel(self) -> None:
        gui = self.server.gui
        gui.add_markdown("**Camera path.** Keyframe 0 is the start view. Look around (drag, scroll, right-drag), "
                         "press *Add keyframe here*, and drag the selected keyframe's gizmo to move or turn it.")
        self.info = gui.add_markdown("")
        add = gui.add_button("Add keyframe here")
        self.choice = gui.add_dropdown("Selected keyframe", ("0",), initial_value="0")
        self.fov = gui.add_slider("Field of view (°)", min=MIN_FOV, max=120.0, step=1.0, initial_value=60.0)
        delete = gui.add_button("Delete selected keyframe", color="red")

        @add.on_click
        def _(event) -> None:
            camera = event.client.camera if event.client is not None else None
            if camera is not None:
                with self._refusals():
                    self.add_keyframe(Keyframe.make(camera.position, camera.wxyz, self.fov.value))

        @self.choice.on_update
        def _(_) -> None:
            with self.lock:
                i = int(self.choice.value)
                if i != self.selected and 0 <= i < len(self.keyframes):
                    self.selected = i
                    self._redraw()

        @self.fov.on_update
        def _(_) -> None:
            with self.lock:
                i = self.selected
                if 0 < i < len(self.keyframes) and abs(self.keyframes[i].fov - self.fov.value) > 1e-9:
                    with self._refusals():
                        self.keyframes[i] = self.keyframes[i].moved(fov=float(self.fov.value))
                    self._redraw()

        @delete.on_click
        def _(_) -> None:
            self.delete_keyframe(self.selected)

    @contextlib.contextmanager
    def _refusals(self):
        """A keyframe the engine refuses (a pose beyond ``MAX_CENTRE``, a field of view out of range — what a page
        can send, whatever its sliders allow) leaves the keyframes as they were; the panel and the log say why."""
        try:
            yield
        except ValueError as e:
            log.info("3D editor on port %d: refused a keyframe: %s", self.port, e)
            self._refused = str(e)
            self.info.content = f"**Not applied:** {e}"

    # ---- scene ------------------------------------------------------------------------------------------
    def show_scene(self, job: str, points, colors, start: Cameras, scale: float, up: str, frames: int) -> None:
        """Show a scene's cloud; the keyframes start as the scene's start view and stay while it is the same
        scene (``job``)."""
        pts = np.asarray(points, dtype=np.float32)
        cols = np.asarray(colors)
        if cols.dtype != np.uint8:
            cols = (np.clip(cols, 0, 1) * 255).round().astype(np.uint8)
        if len(pts) > MAX_VIEW_POINTS:
            keep = np.random.default_rng(0).choice(len(pts), MAX_VIEW_POINTS, replace=False)
            pts, cols = pts[keep], cols[keep]
        with self.lock:
            self.touch()
            same = self.job == job and self.keyframes
            self.job, self.base, self.scale, self.frames = job, start[0:1], float(scale), int(frames)
            if not same:
                self.keyframes = keyframes_from_cameras(self.base)
            self.selected = min(self.selected, len(self.keyframes) - 1)
            self.server.scene.set_up_direction(up)
            self.server.scene.add_point_cloud("/cloud", points=pts, colors=cols, point_size=self.scale / 250.0,
                                              point_shape="rounded")
            self._redraw()
        if not same:
            self._place_clients()

    def _place_clients(self) -> None:
        """Put every viewer a step behind the start view, looking at the scene."""
        if self.base is None:
            return
        c2w = self.base.c2w[0].detach().cpu().double().numpy()
        forward, down = c2w[:3, 2], c2w[:3, 1]
        for client in self.server.get_clients().values():
            self._place(client, c2w[:3, 3], forward, down)

    def _place(self, client, centre, forward, down) -> None:
        with client.atomic():
            client.camera.position = centre - 0.6 * self.scale * forward - 0.25 * self.scale * down
            client.camera.look_at = centre + self.scale * forward
            client.camera.up_direction = -down

    def on_connect(self, client) -> None:
        if self.base is not None:
            c2w = self.base.c2w[0].detach().cpu().double().numpy()
            self._place(client, c2w[:3, 3], c2w[:3, 2], c2w[:3, 1])

    # ---- keyframes --------------------------------------------------------------------------------------
    def add_keyframe(self, key: Keyframe) -> None:
        with self.lock:
            self.touch()
            if len(self.keyframes) >= MAX_KEYFRAMES:
                return
            self.keyframes.append(key.checked())
            self.selected = len(self.keyframes) - 1
            self._redraw()

    def delete_keyframe(self, index: int) -> None:
        with self.lock:
            self.touch()
            if 0 < index < len(self.keyframes):  # keyframe 0 is the start view
                del self.keyframes[index]
                self.selected = min(index, len(self.keyframes) - 1)
                self._redraw()

    def set_keyframes(self, keyframes: list[Keyframe]) -> None:
        """Replace the keyframes (a loaded file); keyframe 0 stays the scene's start view."""
        with self.lock:
            self.touch()
            start = keyframes_from_cameras(self.base)[0] if self.base is not None else keyframes[0]
            self.keyframes = [start] + [k.checked() for k in keyframes[1:]]
            self.selected = len(self.keyframes) - 1
            self._redraw()

    def snapshot(self) -> list[Keyframe]:
        with self.lock:
            self.touch()
            return list(self.keyframes)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    # ---- drawing ----------------------------------------------------------------------------------------
    def _redraw(self) -> None:
        """Frusta of the keyframes (a gizmo on the selected one, the frustum riding on it), then the path."""
        scene = self.server.scene
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.base is None:
            return
        aspect = self.base.width / self.base.height
        size = 0.12 * self.scale
        for i, key in enumerate(self.keyframes):
            color = START_COLOR if i == 0 else (SELECTED_COLOR if i == self.selected else KEY_COLOR)
            node = f"/keyframe-{i}"
            if i == self.selected and i > 0:
                gizmo = scene.add_transform_controls(node, scale=1.2 * size, wxyz=key.wxyz, position=key.position,
                                                     disable_sliders=True)
                gizmo.on_update(self._gizmo_moved(i, gizmo))
                self._handles.append(gizmo)
            else:
                self._handles.append(scene.add_frame(node, show_axes=False, wxyz=key.wxyz, position=key.position))
            # Children of the node: removing the node removes them.
            frustum = scene.add_camera_frustum(f"{node}/frustum", fov=float(np.radians(key.fov)), aspect=aspect,
                                               scale=size, color=color)
            frustum.on_click(self._clicked(i))
            scene.add_label(f"{node}/label", str(i))
        self._draw_path()
        self.choice.options = tuple(str(i) for i in range(len(self.keyframes)))
        self.choice.value = str(self.selected)
        self.fov.value = float(self.keyframes[self.selected].fov)
        self.fov.disabled = self.selected == 0
        note, self._refused = (f"**Not applied:** {self._refused}  \n" if self._refused else ""), ""
        self.info.content = note + (f"{len(self.keyframes)} keyframe(s); the path is sampled at {self.frames} frames "
                                    "(*Frames per clip* on the page).")

    def _draw_path(self) -> None:
        """The splined path and a few of the cameras a clip along it will use (drawn from the engine's maths)."""
        scene = self.server.scene
        for handle in self._path_handles:
            handle.remove()
        self._path_handles = []
        if self.base is None or len(self.keyframes) < 2:
            return
        size = 0.06 * self.scale
        dense = path_cameras(self.keyframes, 8 * len(self.keyframes) + 1, self.base).centers.double().numpy()
        segments = np.stack([dense[:-1], dense[1:]], axis=1).astype(np.float32)
        self._path_handles.append(scene.add_line_segments("/path", points=segments, colors=PATH_COLOR,
                                                          thickness=self.scale / 300.0))
        cams = path_cameras(self.keyframes, max(self.frames, 2), self.base)
        c2w = cams.c2w.detach().cpu().double().numpy()
        fov = 2 * np.arctan(0.5 * cams.height / cams.K[:, 1, 1].detach().cpu().double().numpy())
        for j in np.unique(np.linspace(0, len(cams) - 1, PATH_FRUSTA).round().astype(int)):
            pose = Keyframe(c2w[j], 60.0)
            self._path_handles.append(scene.add_camera_frustum(
                f"/path-frustum-{j}", fov=float(fov[j]), aspect=cams.width / cams.height, scale=size,
                color=PATH_COLOR, wxyz=pose.wxyz, position=pose.position))

    def _gizmo_moved(self, index: int, gizmo):
        def moved(_) -> None:
            with self.lock:
                self.touch()
                if index < len(self.keyframes):
                    with self._refusals():
                        self.keyframes[index] = self.keyframes[index].moved(position=np.asarray(gizmo.position),
                                                                            wxyz=np.asarray(gizmo.wxyz))
                    # Only the path follows: rebuilding the gizmo being dragged would drop the drag.
                    self._draw_path()
        return moved

    def _clicked(self, index: int):
        def clicked(_) -> None:
            with self.lock:
                self.touch()
                if index < len(self.keyframes) and index != self.selected:
                    self.selected = index
                    self._redraw()
        return clicked

    def stop(self) -> None:
        try:
            self.server.stop()
        except Exception:  # noqa: BLE001 — a server that is already down is stopped
            log.debug("viser server %s was already stopped", self.port)


class EditorPool:
    """At most ``max_editors`` editors, one per session; idle or closed ones are stopped."""

    def __init__(self, max_editors: int = 4, idle_s: float = 900.0):
        self.max_editors = int(max_editors)
        self.idle_s = float(idle_s)
        self.lock = threading.Lock()
        self.by_session: dict[str, PathEditor] = {}
        self._reaper: Optional[threading.Thread] = None

    def open(self, session: str) -> PathEditor:
        """The session's editor, started if needed; raises ``EditorBusy`` when the pool is full."""
        self.reap()
        with self.lock:
            editor = self.by_session.get(session)
            if editor is not None:
                editor.touch()
                return editor
            if len(self.by_session) >= self.max_editors:
                raise EditorBusy(f"All {self.max_editors} 3D editors of this server are in use; try again in a few "
                                 "minutes (an editor is freed when its page is closed or left idle).")
            editor = PathEditor(secrets.token_urlsafe(16))
            editor.server.on_client_connect(editor.on_connect)
            log.info("3D editor %d/%d started on 127.0.0.1:%d", len(self.by_session) + 1, self.max_editors, editor.port)
            self.by_session[session] = editor
            self._start_reaper()
            return editor

    def get(self, session: str) -> Optional[PathEditor]:
        with self.lock:
            return self.by_session.get(session)

    def by_token(self, token: str) -> Optional[PathEditor]:
        """The live editor of ``token``; None for any other string (malformed and non-ASCII ones included)."""
        if not isinstance(token, str) or not TOKEN.fullmatch(token):
            return None
        with self.lock:
            for editor in self.by_session.values():
                if secrets.compare_digest(editor.token.encode(), token.encode()):
                    return editor
        return None

    def close(self, session: str) -> None:
        with self.lock:
            editor = self.by_session.pop(session, None)
        if editor is not None:
            editor.stop()

    def reap(self, now: Optional[float] = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = [s for s, e in self.by_session.items() if now - e.last_used > self.idle_s]
        for session in idle:
            self.close(session)
        return idle

    def close_all(self) -> None:
        with self.lock:
            sessions = list(self.by_session)
        for session in sessions:
            self.close(session)

    def _start_reaper(self) -> None:
        if self._reaper is None:
            def loop() -> None:
                while True:
                    time.sleep(min(60.0, max(self.idle_s / 4, 1.0)))
                    self.reap()

            self._reaper = threading.Thread(target=loop, name="editor-reaper", daemon=True)
            self._reaper.start()


# ---- the app's routes to the editors ------------------------------------------------------------------

def _client_html() -> bytes:
    import viser

    return (Path(viser.__file__).resolve().parent / "client" / "build" / "index.html").read_bytes()


def same_origin(headers) -> bool:
    """A WebSocket handshake from a page of the app's own origin, or from a client that is not a browser (browsers
    always send ``Origin``; others need the token all the same): ``Origin``'s host must be the ``Host`` the request
    was sent to, or one a reverse proxy names in ``X-Forwarded-Host``."""
    origin = headers.get("origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:  # not a URL at all ("http://[" ...)
        return False
    hosts = {headers.get("host", "")} | {h.strip() for h in headers.get("x-forwarded-host", "").split(",")}
    return bool(netloc) and netloc in {h.lower() for h in hosts if h}


def routes(pool: EditorPool) -> list:
    """Starlette routes that serve the viser client at ``/viser/<token>/`` and relay its WebSocket."""
    from starlette.responses import PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    html = _client_html()

    async def page(request):
        if pool.by_token(request.path_params["token"]) is None:
            return PlainTextResponse("This 3D editor is closed; open it again from the page.", status_code=404)
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.path + "/")
        # Framed by the app's own page only: a leaked address cannot be put inside another site.
        return Response(html, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": "frame-ancestors 'self'"})

    async def relay(websocket: WebSocket):
        editor = pool.by_token(websocket.path_params["token"])
        if editor is None or not same_origin(websocket.headers):
            await websocket.close(code=1008)  # before accepting: the browser sees HTTP 403
            return
        if not editor.enter():
            log.warning("3D editor on port %d: refused a WebSocket over the limit of %d", editor.port,
                        MAX_CONNECTIONS_PER_EDITOR)
            await websocket.close(code=1008)
            return
        try:
            await _relay(websocket, editor)
        finally:
            editor.leave()

    async def _relay(websocket: WebSocket, editor: PathEditor) -> None:
        import websockets

        offered = list(websocket.scope.get("subprotocols") or [])
        try:
            upstream = await websockets.connect(f"ws://127.0.0.1:{editor.port}", subprotocols=offered or None,
                                                additional_headers={SECRET_HEADER: editor.secret},
                                                max_size=None, compression=None, open_timeout=10)
        except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
            await websocket.close(code=1011)
            return
        await websocket.accept(subprotocol=upstream.subprotocol)

        async def down():
            async for message in upstream:
                editor.touch()
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)

        async def up():
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                editor.touch()
                data = message.get("bytes")
                await upstream.send(data if data is not None else message.get("text", ""))

        tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            # Either side hanging up ends both directions; their errors are that hang-up, nothing to report.
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            try:
                await websocket.close()
            except Exception:  # noqa: BLE001 — the browser already went (uvicorn's ClientDisconnected, ...)
                pass

    return [Route("/viser/{token}/", page), Route("/viser/{token}", page), WebSocketRoute("/viser/{token}", relay)]
