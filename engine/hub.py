"""Hugging Face hub access that never keeps a person waiting, and the hub's names for the released weights.

huggingface_hub retries a failed request with back-off (about 25 s before it gives up when there is no
network at all). One quick connection probe per process decides instead whether downloads are worth trying;
when they are not, every loader reads the local cache only. ``hub_file`` is the one way the engine fetches a file:
the cache's copy when it has one, else a download with a short timeout, unless the hub is off or out of reach.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

HUB_REPO = "hanshanxue/WorldStereo"  # the released checkpoints, one subfolder per variant
BASE_MODEL_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"  # the released configs' base_model (diffusers layout)
# The base model's folders besides transformer/ that the engine loads (engine.models.components).
BASE_COMPONENT_FOLDERS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")
MOGE_REPO = "Ruicheng/moge-2-vitl-normal"  # the depth model (MoGe-2 ViT-L with normals)
DINOV2_REPO = "facebook/dinov2-base"  # the reference selector's image features (release: src/retrieval_wm.py)
PROBE_TIMEOUT_S = 2.0
DOWNLOAD_TIMEOUT_S = 10.0  # how long a download waits for the hub's first answer


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


class HubFileUnavailable(RuntimeError):
    """A hub file that cannot be had here. ``why`` says which case it is, for the caller's sentence: "invalid" (the
    name is no repository id), "offline" (not in the cache, and the hub switched off or out of reach) or "failed"
    (the download failed; the error it raised is the ``__cause__``)."""

    def __init__(self, repo: str, filename: str, why: str):
        super().__init__(f"{repo}/{filename}: {why}")
        self.repo, self.filename, self.why = repo, filename, why


def hub_file(repo: str, filename: str, timeout: float = DOWNLOAD_TIMEOUT_S, cache_only: Optional[bool] = None) -> Path:
    """The local path of ``filename`` of the hub repository ``repo``: the Hugging Face cache's copy when it holds one,
    else downloaded into the cache (waiting at most ``timeout`` seconds for the hub's answer) unless ``cache_only``
    (default: ``local_files_only()``). Raises ``HubFileUnavailable``."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
        if local_files_only() if cache_only is None else cache_only:
            raise HubFileUnavailable(repo, filename, "offline")
        return Path(hf_hub_download(repo, filename, etag_timeout=timeout))
    except HFValidationError as e:
        raise HubFileUnavailable(repo, filename, "invalid") from e
    except HubFileUnavailable:
        raise
    except Exception as e:  # network, authentication, a missing file or repository: all mean "not here"
        raise HubFileUnavailable(repo, filename, "failed") from e


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
