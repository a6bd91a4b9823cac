"""The demo as a running server (``python app.py --engine preview`` on 127.0.0.1) driven through gradio_client:
eight concurrent clients, faults in the middle of a clip, cancel, and a SIGKILL followed by a restart and resume.

Everything is small (128×96 inputs, 2–4 trajectories of 3 frames) and every wait is bounded; the servers are
killed at the end of each test. The figures (peak RSS, wall time) are printed and kept in
tests/artifacts/server_load.json; docs/reliability.md quotes them.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liveserver import LiveServer

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.slow

FRAMES = 3
CLIENTS = 8
PEAK_RSS_LIMIT_MB = 1600  # idle server ~0.65 GiB, measured peak ~0.95 GiB for eight small scenes
SCENE_ID = re.compile(r"Scene `([0-9a-f]{16})`")


def make_input(path: Path, seed: int) -> Path:
    """A 128×96 photo of coloured 16-pixel blocks, different for every seed (so outputs can be told apart)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))).save(path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def generate_args(image: Path, trajectories, frames: int = FRAMES) -> list:
    # The Generate endpoint's inputs in ui.py's order (image, panorama, presets, views, angle, distance, frames,
    # camera.json, prompt, seed, engine, quality, GPU memory, how an example runs, prompts per trajectory); the
    # session State is kept by the server.
    return [handle_file(str(image)), False, list(trajectories), ["view0"], 0, 0, frames, None, "", 0, "preview", "fast",
            "none", "", ""]


def manifest(output_dir: Path, job_id: str) -> dict:
    return json.loads((output_dir / "jobs" / job_id / "scene" / "manifest.json").read_text())


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_ids(output_dir: Path) -> list[str]:
    root = output_dir / "jobs"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def committed_clips(output_dir: Path, job_id: str) -> int:
    try:
        return len(manifest(output_dir, job_id)["clips"])
    except (OSError, ValueError):
        return 0


def job_interval(folder: Path) -> tuple[float, float]:
    """First and last write of any file in a job folder."""
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()]
    return min(times), max(times)


# ---- load ---------------------------------------------------------------------------------------------

def test_eight_concurrent_clients_are_queued_and_each_gets_its_own_scene(tmp_path):
    out = tmp_path / "out"
    inputs = [make_input(tmp_path / f"client{i}.png", seed=100 + i) for i in range(CLIENTS)]
    with LiveServer(out) as server:
        idle_mb = server.rss_mb()
        clients = [Client(server.url, verbose=False, download_files=str(tmp_path / f"dl{i}")) for i in range(CLIENTS)]
        t0 = time.monotonic()
        jobs = [c.submit(*generate_args(img, ["left", "right"]), api_name="/generate") for c, img in zip(clients, inputs)]
        results = [job.result(timeout=170 - (time.monotonic() - t0)) for job in jobs]
        wall = time.monotonic() - t0
        peak_mb = server.peak_rss_mb()

    # Every client finished (none dropped) with a scene of its own.
    ids = []
    for i, result in enumerate(results):
        status, downloads = result[0], result[-1]
        assert "Done in" in status, status
        ids.append(SCENE_ID.search(status).group(1))
        names = {Path(p).name for p in downloads}
        assert {"00_left.mp4", "01_right.mp4", "scene.zip", "scene.ply"} <= names
    assert len(set(ids)) == CLIENTS and set(ids) == set(job_ids(out))

    # No cross-session leakage: each client's zip describes its own upload, and its first frame is its own image.
    starts = []
    for i, result in enumerate(results):
        zpath = next(Path(p) for p in result[-1] if Path(p).name == "scene.zip")
        with zipfile.ZipFile(zpath) as zf:
            m = json.loads(zf.read("manifest.json"))
            starts.append(np.asarray(Image.open(zf.open("input.png")).convert("RGB"), dtype=np.float32))
        assert m["input"]["sha256"] == sha256(inputs[i])
        assert [c["trajectory"] for c in m["clips"]] == ["left", "right"]
        assert all(c["frames"] == FRAMES for c in m["clips"])
        assert manifest(out, ids[i])["input"]["sha256"] == sha256(inputs[i])
    from engine.outputs import read_video

    for i, result in enumerate(results):
        clip = next(Path(p) for p in result[-1] if Path(p).name == "00_left.mp4")
        frame0 = read_video(clip)[0].permute(1, 2, 0).numpy() * 255.0
        errors = [float(np.mean((frame0 - s) ** 2)) for s in starts]
        assert int(np.argmin(errors)) == i, errors

    # The queue limit (--max-concurrent 1) held: the jobs' write intervals do not overlap.
    spans = sorted(job_interval(out / "jobs" / j) for j in ids)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s1 >= e0, f"two jobs ran at once: {(s0, e0)} and {(s1, e1)}"

    assert peak_mb < PEAK_RSS_LIMIT_MB, f"server peak RSS {peak_mb:.0f} MiB"
    figures = {"clients": CLIENTS, "served": len(results), "wall_s": round(wall, 1), "idle_rss_mib": round(idle_mb),
               "peak_rss_mib": round(peak_mb), "limit_mib": PEAK_RSS_LIMIT_MB, "frames": FRAMES, "trajectories": 2}
    print("server load:", figures)
    artifacts = Path(__file__).with_name("artifacts")
    artifacts.mkdir(exist_ok=True)
    (artifacts / "server_load.json").write_text(json.dumps(figures, indent=1) + "\n")


# ---- faults ---------------------------------------------------------------------------------------------

def test_a_fault_mid_scene_reaches_the_client_as_a_sentence_and_the_server_keeps_serving(tmp_path):
    out = tmp_path / "out"
    image = make_input(tmp_path / "in.png", seed=7)
    # Clip call 2 raises, clip call 4 runs out of (simulated CUDA) memory; every other call works.
    with LiveServer(out, faults="2:raise,4:oom") as server:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "dl"))
        with pytest.raises(AppError) as err:
            client.predict(*generate_args(image, ["left", "right"]), api_name="/generate")
        message = str(err.value)
        assert "internal error (RuntimeError: injected fault in clip call 2)" in message
        assert "1 finished clip(s) stay downloadable" in message and "Traceback" not in message
        (first,) = job_ids(out)
        m = manifest(out, first)
        assert [c["trajectory"] for c in m["clips"]] == ["left"]
        assert sorted(p.name for p in (out / "jobs" / first / "scene" / "clips").iterdir()) == ["00_left"]
        kept = sha256(out / "jobs" / first / "scene" / "clips" / "00_left" / "clip.mp4")

        with pytest.raises(AppError) as err:
            client.predict(*generate_args(image, ["up", "down"]), api_name="/generate")
        assert "OutOfMemoryError" in str(err.value) and "Traceback" not in str(err.value)

        # The next request succeeds, on the same server and the same session.
        status = client.predict(*generate_args(image, ["left"]), api_name="/generate")[0]
        assert "Done in" in status

        # The first scene kept its clip and resumes where it stopped, from another client, by its id.
        other = Client(server.url, verbose=False, download_files=str(tmp_path / "dl2"))
        status = other.predict(first, api_name="/resume")[0]
        assert "Done in" in status, status
        m = manifest(out, first)
        assert [c["trajectory"] for c in m["clips"]] == ["left", "right"]
        assert sha256(out / "jobs" / first / "scene" / "clips" / "00_left" / "clip.mp4") == kept
        assert server.proc.poll() is None
    assert "Traceback" in server.log()  # the details went to the server log, not to the person


# ---- cancel, kill, restart, resume ------------------------------------------------------------------------

def test_cancel_stops_within_one_step_and_a_killed_server_resumes_its_scene(tmp_path):
    out = tmp_path / "out"
    image = make_input(tmp_path / "in.png", seed=11)
    delay = 1.5  # each clip's generate step takes at least this long, so there is time to act mid-run
    server = LiveServer(out, clip_delay=delay, log_path=tmp_path / "first.log").start()
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "dl"))
        job = client.submit(*generate_args(image, ["left", "right", "up", "down"]), api_name="/generate")
        job_id = wait_for(lambda: job_ids(out) and job_ids(out)[0], 60, "the job folder")
        wait_for(lambda: committed_clips(out, job_id) >= 1, 60, "the first clip")
        calls_at_cancel = server.log().count("faulty_app: clip call")
        t_cancel = time.monotonic()
        client.predict(api_name="/cancel")
        status = job.result(timeout=60)[0]
        stopped_after = time.monotonic() - t_cancel
        assert "Cancelled." in status, status
        # Within one step: the clip call in flight may finish, no later one starts and no clip is added.
        clips = committed_clips(out, job_id)
        assert server.log().count("faulty_app: clip call") <= calls_at_cancel
        assert clips <= 2 and stopped_after < delay + 20
        time.sleep(delay + 0.5)
        folders = sorted(p.name for p in (out / "jobs" / job_id / "scene" / "clips").iterdir())
        assert len(folders) == clips == committed_clips(out, job_id)

        # A second run, killed (SIGKILL) after its first clip is committed.
        job = client.submit(*generate_args(image, ["left", "right", "up"]), api_name="/generate")
        killed = wait_for(lambda: [j for j in job_ids(out) if j != job_id], 60, "the second job folder")[0]
        wait_for(lambda: committed_clips(out, killed) >= 1, 60, "the first clip of the second job")
        server.kill()
        done_before = {p.name: sha256(p / "clip.mp4") for p in (out / "jobs" / killed / "scene" / "clips").iterdir()
                       if (p / "clip.mp4").is_file() and committed_clips(out, killed) > int(p.name[:2])}
    finally:
        server.stop()

    with LiveServer(out, log_path=tmp_path / "second.log") as restarted:
        listed = re.findall(r"Unfinished scene ([0-9a-f]{16}): (\d+) clip\(s\) done, still to generate: ([^(]*)\(",
                            restarted.log())
        by_id = {i: (int(n), rest.strip()) for i, n, rest in listed}
        n_done = committed_clips(out, killed)
        assert by_id[killed][0] == n_done >= 1
        remaining = ["left", "right", "up"][n_done:]
        assert by_id[killed][1] == ", ".join(remaining)
        # The cancelled scene is listed too: cancelling leaves it resumable.
        assert job_id in by_id

        client = Client(restarted.url, verbose=False, download_files=str(tmp_path / "dl-after"))
        with pytest.raises(AppError, match="not valid"):
            client.predict("../../etc", api_name="/resume")
        with pytest.raises(AppError, match="no scene with that id"):
            client.predict("0123456789abcdef", api_name="/resume")
        status = client.predict(killed, api_name="/resume")[0]
        assert "Done in" in status, status
        m = manifest(out, killed)
        assert [c["trajectory"] for c in m["clips"]] == ["left", "right", "up"]
        # Files lost: none — every clip committed before the kill is byte-identical after the resume.
        for name, digest in done_before.items():
            assert sha256(out / "jobs" / killed / "scene" / "clips" / name / "clip.mp4") == digest
        assert len(done_before) == n_done
        with pytest.raises(AppError, match="nothing left to generate"):
            client.predict(killed, api_name="/resume")
