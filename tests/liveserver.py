"""A real demo server for the tests: ``python app.py --engine preview`` on 127.0.0.1 as a child process.

Used by tests/test_server.py and tests/test_security.py. Every wait is bounded and the process is killed at the
end whatever happened, so a broken server fails a test instead of hanging CI.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
FAULTY_APP = Path(__file__).with_name("faulty_app.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """One server process; ``faults``/``clip_delay`` start it through tests/faulty_app.py instead of app.py."""

    def __init__(self, output_dir: Path, extra_args: Sequence[str] = (), faults: str = "", clip_delay: float = 0.0,
                 log_path: Optional[Path] = None, host: Optional[str] = "127.0.0.1",
                 address_space_gib: Optional[float] = None):
        self.output_dir = Path(output_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_path or self.output_dir.parent / f"server-{self.port}.log")
        script = FAULTY_APP if (faults or clip_delay) else REPO / "app.py"
        # host=None leaves --host out, so the parser's default (loopback) is what binds.
        self.cmd = [sys.executable, str(script), "--engine", "preview", *(["--host", host] if host else []),
                    "--port", str(self.port), "--output-dir", str(self.output_dir), *extra_args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
        self.env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        WS_TEST_FAULTS=faults, WS_TEST_CLIP_DELAY=str(clip_delay))
        self.proc: Optional[subprocess.Popen] = None
        self.address_space_gib = address_space_gib  # RLIMIT_AS of the server process, None: no limit

    def start(self, timeout: float = 120.0) -> "LiveServer":
        self._log = open(self.log_path, "ab")
        limit = self.address_space_gib

        def cap_address_space() -> None:  # runs in the child before app.py: every allocation counts against it
            import resource

            size = int(limit * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=cap_address_space if limit else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmHWM not found")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmRSS not found")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no clean-up code runs."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
