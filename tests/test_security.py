"""The demo serves only its own outputs, limits uploads, binds to loopback by default, and keeps user strings out
of shells and paths — checked against a running server with plain HTTP, plus the parser and the source."""
from __future__ import annotations

import ast
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveserver import REPO, LiveServer

import app
from demo import jobs

UPLOAD_LIMIT_MB = 1


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_upload(url: str, name: str, data: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    secret = root / "secret.txt"  # outside the output folder: must never be served
    secret.write_text("TOP-SECRET-outside-output-dir\n")
    # host=None: the parser's default decides where it binds.
    with LiveServer(root / "out", extra_args=["--max-upload-mb", str(UPLOAD_LIMIT_MB)], host=None) as srv:
        srv.secret = secret
        yield srv


# ---- defaults ----------------------------------------------------------------------------------------------

def test_parser_defaults_are_the_safe_ones():
    args = app.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.share is False
    assert args.max_upload_mb == 50 and args.max_concurrent == 1


def test_server_binds_to_loopback_only_by_default(server):
    psutil = pytest.importorskip("psutil")
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and {a.ip for a in listening} == {"127.0.0.1"}
    assert {a.port for a in listening} == {server.port}


# ---- the file route ---------------------------------------------------------------------------------------

def _job_with_files(server) -> Path:
    folder = server.output_dir / "jobs" / jobs.new_job_id() / "scene"
    folder.mkdir(parents=True)
    (folder / "served.txt").write_text("an output of this app\n")
    os.symlink(server.secret, folder / "leak.txt")
    os.symlink("/etc/passwd", folder / "passwd.txt")
    return folder


def test_own_outputs_are_served(server):
    folder = _job_with_files(server)
    status, body = http_get(f"{server.url}gradio_api/file={folder / 'served.txt'}")
    assert status == 200 and body == b"an output of this app\n"  # the route is right: refusals below mean something


@pytest.mark.parametrize("prefix", ["gradio_api/file=", "file="])
def test_other_paths_are_refused(server, prefix):
    folder = _job_with_files(server)
    out = server.output_dir.resolve()
    depth = len(out.parts) - 1
    up = "../" * (depth + 2)
    attempts = {
        "absolute": "/etc/passwd",
        "absolute secret": str(server.secret),
        "traversal from the output dir": f"{out}/{up}etc/passwd",
        "traversal from a job folder": f"{folder}/../../../../{up}etc/passwd",
        "traversal to the secret": f"{out}/../secret.txt",
        "relative traversal": f"{up}etc/passwd",
        "url-encoded absolute": urllib.parse.quote("/etc/passwd", safe=""),
        "url-encoded traversal": urllib.parse.quote(f"{out}/{up}etc/passwd", safe=""),
        "double-encoded traversal": urllib.parse.quote(urllib.parse.quote(f"{out}/{up}etc/passwd", safe=""), safe=""),
        "dot-dot with backslashes": f"{out}\\..\\..\\etc\\passwd",
        "symlink in a job folder to the secret": str(folder / "leak.txt"),
        "symlink in a job folder to /etc/passwd": str(folder / "passwd.txt"),
        "the app's own source (cwd)": "app.py",
        "the repository's README": str(REPO / "README.md"),
        "proc of the server": f"/proc/{server.proc.pid}/environ",
        "loopback URL (SSRF)": f"http://127.0.0.1:{server.port}/config",
    }
    served = {}
    for what, path in attempts.items():
        status, body = http_get(f"{server.url}{prefix}{path}")
        assert b"root:" not in body and b"TOP-SECRET" not in body and b"def main" not in body, what
        if status < 400 or status >= 500:
            served[what] = status
    assert not served, f"not refused with 4xx: {served}"
    # The figure docs/reliability.md quotes, written by the run rather than typed by hand.
    summary_path = Path(__file__).with_name("artifacts") / "security.json"
    summary_path.parent.mkdir(exist_ok=True)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary[prefix] = {"refused": len(attempts) - len(served), "tried": len(attempts), "attempts": list(attempts)}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")


def test_an_unknown_job_id_is_not_a_path():
    for bad in ["../../etc", "/etc/passwd", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef/..", ""]:
        with pytest.raises(jobs.JobPathError):
            jobs.job_dir("/tmp/out", bad)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_job_dir_accepts_only_ids_it_could_have_made(text):
    if re.fullmatch(r"[0-9a-f]{16}", text):
        assert jobs.job_dir("/tmp/out", text) == Path("/tmp/out").resolve() / "jobs" / text
    else:
        with pytest.raises(jobs.JobPathError):
            jobs.job_dir("/tmp/out", text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "a", "b.mp4", "/", "clips", "~", "%2e%2e"]), min_size=1, max_size=6))
def test_safe_path_never_leaves_its_root(tmp_path_factory, parts):
    """Every path is refused exactly when it is absolute or climbs with '..' (decided here from the string alone);
    every other one is the file under the root its parts name, '.' and empty parts dropped."""
    root = tmp_path_factory.getbasetemp() / "safe-root"
    root.mkdir(exist_ok=True)
    rel = "/".join(parts)
    should_refuse = rel.startswith("/") or ".." in rel.split("/")
    try:
        target = jobs.safe_path(root, rel)
    except jobs.JobPathError as e:
        assert should_refuse, f"{rel!r} was refused: {e}"
        assert str(e) == f"'{rel}' is not a file of this scene."
        return
    assert not should_refuse, f"{rel!r} was accepted as {target}"
    assert target == root.resolve().joinpath(*[p for p in rel.split("/") if p not in ("", ".")])
    assert target == root.resolve() or root.resolve() in target.parents


def test_safe_path_refuses_a_link_out(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink("/etc", tmp_path / "root" / "out")
    with pytest.raises(jobs.JobPathError):
        jobs.safe_path(tmp_path / "root", "out/passwd")


def test_job_ids_are_random():
    ids = {jobs.new_job_id() for _ in range(2000)}
    assert len(ids) == 2000 and all(jobs.JOB_ID.match(i) for i in ids)


# ---- uploads ----------------------------------------------------------------------------------------------

def test_uploads_over_the_limit_are_refused(server):
    url = f"{server.url}gradio_api/upload"
    assert http_upload(url, "small.png", b"\0" * 100_000) == 200
    assert http_upload(url, "big.png", b"\0" * (UPLOAD_LIMIT_MB * 1024 * 1024 + 1)) == 413
    # Nothing of the refused file stays on disk.
    cache = server.output_dir / "gradio-cache"
    assert not [p for p in cache.rglob("big.png")]


@pytest.mark.parametrize("name", ["notes.txt", "drawing.svg", "clip.mp4", "page.html"])
def test_uploads_of_other_types_are_refused_by_the_image_input(server, tmp_path, name):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / name
    path.write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>" if name.endswith(".svg") else b"not an image")
    client = Client(server.url, verbose=False, download_files=str(tmp_path / "dl"))
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(handle_file(str(path)), api_name="/inspect_upload")
    assert server.proc.poll() is None


def test_upload_with_a_traversal_file_name_stays_in_the_cache(server):
    url = f"{server.url}gradio_api/upload"
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"../../../escape.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"x" * 10 + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        (stored,) = json.loads(r.read())
    cache = (server.output_dir / "gradio-cache").resolve()
    assert cache in Path(stored).resolve().parents
    assert not (server.output_dir.parent / "escape.png").exists()


# ---- source ----------------------------------------------------------------------------------------------

FORBIDDEN_CALLS = {("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("os", "spawnv"),
                   (None, "eval"), (None, "exec"), (None, "compile"), (None, "__import__")}


def _sources():
    return [REPO / "app.py", *sorted((REPO / "demo").glob("*.py"))]


def test_the_demo_never_reaches_a_shell():
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"subprocess", "pty", "commands"} & {str(n).split(".")[0] for n in names}, path
            if isinstance(node, ast.Call):
                f = node.func
                key = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else (
                    (None, f.id) if isinstance(f, ast.Name) else None)
                assert key not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {key}"
                assert not any(k.arg == "shell" for k in node.keywords), f"{path.name}:{node.lineno} passes shell="


def test_paths_are_built_from_ids_and_checked_names_only():
    """Job folders are made only by ``jobs.job_dir`` (which accepts nothing but a random id), and no value taken
    from state, a manifest or a request (a subscript) is joined onto a path unless ``jobs.safe_path`` checks it."""
    clip_file_functions = []
    for path in _sources():
        text = path.read_text()
        if path.name != "jobs.py":
            assert '"jobs"' not in text, f"{path.name} builds a jobs folder itself"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Subscript):
                line = text.splitlines()[node.lineno - 1]
                raise AssertionError(f"{path.name}:{node.lineno}: {line.strip()}")
        # A clip the manifest names is reached through the engine's paths (JobFolder.clip_files) in functions that
        # check the result with jobs.safe_path, and only there.
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            calls = {c.func.attr for c in ast.walk(function) if isinstance(c, ast.Call)
                     and isinstance(c.func, ast.Attribute)}
            if "clip_files" in calls:
                clip_file_functions.append(f"{path.name}:{function.name}")
                assert "safe_path" in calls, f"{path.name}: {function.name} reaches a clip's files unchecked"
    assert clip_file_functions == ["downloads.py:clip_files"]
