"""The demo server with faults injected into the preview engine, for tests/test_server.py only.

``WS_TEST_FAULTS="2:raise,4:oom"`` makes the 2nd call of the clip generator raise a RuntimeError and the 4th a
simulated CUDA out-of-memory error; ``WS_TEST_CLIP_DELAY`` (seconds) makes each clip take at least that long, so a
test can cancel or kill the server while a run is in flight. The production app has no such hooks: this wrapper
patches the engine from outside and then runs ``app.main`` with the same arguments.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import app  # noqa: E402
from engine import generators  # noqa: E402

FAULTS = {int(k): v for k, v in (item.split(":") for item in os.environ.get("WS_TEST_FAULTS", "").split(",") if item)}
DELAY = float(os.environ.get("WS_TEST_CLIP_DELAY") or 0)
_real_preview_clip = generators.preview_clip
_calls = 0
_lock = threading.Lock()


def faulty_preview_clip(*args, **kwargs):
    global _calls
    with _lock:
        _calls += 1
        call = _calls
    print(f"faulty_app: clip call {call}", flush=True)
    if DELAY:
        time.sleep(DELAY)
    fault = FAULTS.get(call)
    if fault == "raise":
        raise RuntimeError(f"injected fault in clip call {call}")
    if fault == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated in clip call {call}). Tried to allocate 2.00 GiB")
    return _real_preview_clip(*args, **kwargs)


generators.preview_clip = faulty_preview_clip

if __name__ == "__main__":
    sys.exit(app.main(sys.argv[1:]))
