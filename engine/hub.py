"""Hugging Face hub access that never keeps a person waiting, and the hub's names for the released weights.

huggingface_hub retries a failed request with back-off (about 25 s before it gives up when there is no
network at all). One quick connection probe per process decides instead whether downloads are worth trying;
when they are not, every loader reads the local cache only.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

HUB_REPO = "hanshanxue/WorldStereo"  # the released checkpoints, one subfolder per variant
MOGE_REPO = "Ruicheng/moge-2-vitl-normal"  # the depth model (MoGe-2 ViT-L with normals)
DINOV2_REPO = "facebook/dinov2-base"  # the reference selector's image features (release: src/retrieval_wm.py)
PROBE_TIMEOUT_S = 2.0


def looks_like_repo_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a hub repository id (``owner/name``) rather than of a local path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec


def hub_offline() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def local_files_only() -> bool:
    """Whether loaders should read the local cache only (switched off, or no route to the hub)."""
    return hub_offline() or not hub_reachable()
