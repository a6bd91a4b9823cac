"""Hugging Face hub access that never keeps a person waiting, and the hub's names for the released weights.

huggingface_hub retries a failed request with back-off (about 25 s before it gives up when there is no
network at all). One quick connection probe per process decides instead whether downloads are worth trying;
when they are not, every loader reads the local cache only.
"""
from __future__ import annotations

import functools
import os
import socket
from typing import Optional
from urllib.parse import urlparse

HUB_REPO = "hanshanxue/WorldStereo"  # the released checkpoints, one subfolder per variant
BASE_MODEL_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"  # the released configs' base_model (diffusers layout)
# The base model's folders besides transformer/ that the engine loads (engine.models.components).
BASE_COMPONENT_FOLDERS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
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


def download_commands(variant: str, base_weights: bool, base_model: str = BASE_MODEL_REPO,
                      local_dir: Optional[str] = None) -> list[str]:
    """The ``hf download`` lines that fetch exactly what ``variant`` needs: its folder of ``HUB_REPO``; of its base
    model ``model_index.json``, the transformer's config (and its weights when ``base_weights``: the checkpoint
    holds part of the transformer only) and the folders of ``BASE_COMPONENT_FOLDERS``. With ``local_dir``, into the
    ``--weights DIR`` layout: the variant folder and the base model's folder (its repo name) side by side. (``hf``
    takes one pattern per ``--include``.)"""
    into = f" --local-dir {local_dir}" if local_dir else ""
    base_into = f" --local-dir {local_dir}/{base_model.rsplit('/', 1)[-1]}" if local_dir else ""
    patterns = ["model_index.json", "transformer/*" if base_weights else "transformer/config.json"]
    patterns += [f"{folder}/*" for folder in BASE_COMPONENT_FOLDERS]
    return [f"hf download {HUB_REPO} --include '{variant}/*'{into}",
            f"hf download {base_model} {' '.join(f'--include {p!r}' for p in patterns)}{base_into}"]
