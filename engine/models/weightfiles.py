"""Weight files read by their headers, and where a checkpoint's base model lives.

A model folder in the diffusers / transformers layout keeps its weights in one ``*.safetensors`` file or in shards
listed by a ``*.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file). ``WeightFolder`` reads
such a folder, local or in a hub repository, by the headers of its files only (the 8-byte length and the JSON
header: safetensors' ``safe_open`` for a file here, huggingface_hub's ranged request for one on the hub), so knowing
what 65 GB of shards hold costs milliseconds and no download. ``locate_base_model`` finds the base model a
checkpoint's ``config.json`` names: a folder beside the checkpoint (the ``--weights DIR`` layout) or a hub id.

Hub access never keeps a person waiting: offline (or with the hub unreachable) only the local cache is read, and
a file that is not there is reported in one sentence with the ``hf download`` line that gets it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from engine.hub import HUB_REPO, HubFileUnavailable, hub_file, local_files_only, looks_like_repo_id

INDEX_SUFFIX = ".safetensors.index.json"
ETAG_TIMEOUT_S = 5.0
# Bytes per element of safetensors' dtype names (the format's own list).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

PathLike = Union[str, os.PathLike]


class WeightsNotFoundError(ValueError):
    """A checkpoint (or its base model) that is not here; the message says how to get it."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: str  # the file holding it: a local path, or a path inside a hub repository
    shape: tuple[int, ...]
    dtype: str  # safetensors' dtype name: "F32", "BF16", ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def file_tensors(path: PathLike) -> dict[str, TensorInfo]:
    """The tensors of one local safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = TensorInfo(str(path), tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as e:  # safetensors raises its own error type for a damaged or truncated file
        raise WeightsNotFoundError(f"{path} cannot be read as a safetensors file ({str(e).splitlines()[0][:80]}); "
                                   "download it again.") from e


def hub_weights_file(repo: str, filename: str, how_to_get: str) -> Path:
    """A file of a hub repository (``engine.hub.hub_file``: the cache's copy, else a download unless offline), or
    the one sentence that says why it is not here and ``how_to_get`` it."""
    try:
        return hub_file(repo, filename, timeout=ETAG_TIMEOUT_S)
    except HubFileUnavailable as e:
        if e.why == "invalid":
            raise WeightsNotFoundError(f"{repo!r} is neither an existing folder nor a valid Hugging Face repo id; "
                                       f"pass the checkpoint folder or a repo id like {HUB_REPO}.") from e
        where = ("the Hugging Face cache (the hub is switched off or unreachable)" if e.why == "offline"
                 else "the Hugging Face hub or its local cache")
        raise WeightsNotFoundError(f"{repo}/{filename} is not available from {where}; {how_to_get}.") from e


def download_hint(repo: str, include: Optional[str] = None) -> str:
    """How to get files of a hub repository, as one clause."""
    pattern = f" --include '{include}'" if include else ""
    return f"download it with `hf download {repo}{pattern}` (when online) or pass --weights DIR with a local copy"


class WeightFolder:
    """The safetensors weights of one model folder: a local folder, or ``subfolder`` of a hub repository.

    ``weights_name`` fixes the file (a WorldStereo checkpoint's ``model.safetensors``); without it the folder's
    ``*.safetensors.index.json`` lists the shards, or its one ``*.safetensors`` file is the weights. On the hub,
    ``download=False`` reads headers from the local cache or, for files not there, from the hub itself.
    """

    def __init__(self, root: PathLike, subfolder: str = "", weights_name: Optional[str] = None):
        self.root = str(root)
        self.subfolder = subfolder.strip("/")
        self.weights_name = weights_name
        self.local = Path(self.root).expanduser().is_dir()
        self._index: Optional[dict] = None

    @property
    def where(self) -> str:
        """The folder as a person would name it."""
        base = str(Path(self.root).expanduser()) if self.local else self.root
        return f"{base}/{self.subfolder}" if self.subfolder else base

    def _name(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def _hint(self) -> str:
        if self.local:
            return "copy the complete folder there again"
        return download_hint(self.root, f"{self.subfolder}/*" if self.subfolder else None)

    def path(self, name: str) -> Path:
        """A local path of the folder's file ``name``; a hub file is taken from the cache or downloaded."""
        if self.local:
            p = Path(self.root).expanduser() / self._name(name)
            if not p.is_file():
                raise WeightsNotFoundError(f"{self.where} has no {name}; {self._hint()}.")
            return p
        return hub_weights_file(self.root, self._name(name), self._hint())

    def cached(self, name: str) -> Optional[Path]:
        """The local path of ``name`` when it is here (a local folder, or the hub cache), else None."""
        if self.local:
            p = Path(self.root).expanduser() / self._name(name)
            return p if p.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.root, self._name(name))
        return Path(hit) if isinstance(hit, str) else None

    def listing(self) -> dict[str, int]:
        """Every file of the folder (names relative to it) with its size in bytes. A hub folder is listed by the
        hub; offline, only what the cache holds is known."""
        if self.local:
            top = Path(self.root).expanduser() / self.subfolder
            return {p.relative_to(top).as_posix(): p.stat().st_size for p in sorted(top.rglob("*")) if p.is_file()}
        if not local_files_only():
            try:
                from huggingface_hub import HfApi

                prefix = f"{self.subfolder}/" if self.subfolder else ""
                entries = HfApi().list_repo_tree(self.root, path_in_repo=self.subfolder or None, recursive=True)
                return {e.path[len(prefix):]: int(e.size) for e in entries if getattr(e, "size", None) is not None
                        and e.path.startswith(prefix)}
            except Exception:  # unreachable, gated: fall back to what the cache knows
                pass
        return self._cached_listing()

    def _cached_listing(self) -> dict[str, int]:
        from huggingface_hub import scan_cache_dir

        try:
            repos = [r for r in scan_cache_dir().repos if r.repo_id == self.root]
        except Exception:  # no cache folder yet
            return {}
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        out: dict[str, int] = {}
        for repo in repos:
            for rev in repo.revisions:
                for f in rev.files:
                    name = f.file_path.relative_to(rev.snapshot_path).as_posix()
                    if name.startswith(prefix):
                        out.setdefault(name[len(prefix):], f.size_on_disk)
        return out

    def weight_map(self) -> Optional[dict[str, str]]:
        """tensor name -> file of a sharded folder (its index), or None when the weights are one file."""
        if self._index is None:
            self._index = {"map": None}
            if self.weights_name is None:
                name = self._index_name()
                if name is not None:
                    try:
                        data = json.loads(self.path(name).read_text())
                        self._index = {"map": dict(data["weight_map"])}
                    except (OSError, ValueError, KeyError, TypeError) as e:
                        raise WeightsNotFoundError(f"{self.where}/{name} is not a safetensors index "
                                                   f"({e.__class__.__name__}); download it again.") from e
        return self._index["map"]

    def _index_name(self) -> Optional[str]:
        if self.local:
            found = sorted((Path(self.root).expanduser() / self.subfolder).glob("*" + INDEX_SUFFIX))
            return found[0].name if found else None
        names = [n for n in self._candidate_names() if n.endswith(INDEX_SUFFIX)]
        return names[0] if names else None

    def _candidate_names(self) -> list[str]:
        # diffusers and transformers names, in the order their loaders try them
        listed = [n for n in self.listing() if "/" not in n]
        known = ["diffusion_pytorch_model" + INDEX_SUFFIX, "model" + INDEX_SUFFIX,
                 "diffusion_pytorch_model.safetensors", "model.safetensors"]
        return [n for n in known if n in listed] or [n for n in listed if n.endswith((INDEX_SUFFIX, ".safetensors"))]

    def files(self) -> list[str]:
        """The weight files (names in the folder), shards in the index's order."""
        if self.weights_name is not None:
            return [self.weights_name]
        wmap = self.weight_map()
        if wmap is not None:
            return list(dict.fromkeys(wmap.values()))
        if self.local:
            found = sorted((Path(self.root).expanduser() / self.subfolder).glob("*.safetensors"))
            names = [p.name for p in found]
        else:
            names = [n for n in self._candidate_names() if n.endswith(".safetensors")]
        if not names:
            raise WeightsNotFoundError(f"{self.where} holds no safetensors weights; {self._hint()}.")
        return names[:1]

    def header(self, name: str, download: bool = True) -> dict[str, TensorInfo]:
        """The tensors of file ``name`` from its header. A hub file not in the cache is downloaded, or with
        ``download=False`` its header alone is fetched from the hub."""
        if self.local or download:
            return file_tensors(self.path(name))
        here = self.cached(name)
        if here is not None:
            return file_tensors(here)
        if local_files_only():
            raise WeightsNotFoundError(f"{self.root}/{self._name(name)} is not in the Hugging Face cache and the hub "
                                       f"is switched off or unreachable; {self._hint()}.")
        from huggingface_hub import HfApi

        try:
            meta = HfApi().parse_safetensors_file_metadata(self.root, self._name(name))
        except Exception as e:
            raise WeightsNotFoundError(f"the header of {self.root}/{self._name(name)} could not be read from the hub "
                                       f"({e.__class__.__name__}); {self._hint()}.") from e
        return {k: TensorInfo(self._name(name), tuple(t.shape), t.dtype) for k, t in meta.tensors.items()}

    def tensors(self, keys: Optional[Iterable[str]] = None, download: bool = True) -> dict[str, TensorInfo]:
        """The folder's tensors (those among ``keys`` when given), header by header: only the shards that hold one
        of ``keys`` are opened (or, on the hub, fetched), one at a time."""
        wanted = None if keys is None else set(keys)
        wmap = self.weight_map()
        names = self.files()
        if wmap is not None and wanted is not None:
            holding = {wmap[k] for k in wanted if k in wmap}
            names = [n for n in names if n in holding]
        out: dict[str, TensorInfo] = {}
        for name in names:
            for key, info in self.header(name, download=download).items():
                if wanted is None or key in wanted:
                    out[key] = info
        return out

    def read_json(self, name: str) -> dict:
        """A JSON file of the folder (``config.json``...), downloaded when on the hub."""
        path = self.path(name)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise WeightsNotFoundError(f"{path} cannot be read as JSON ({e.__class__.__name__}); download it "
                                       "again.") from e


def locate_base_model(base_model: PathLike, checkpoint_folder: Optional[PathLike] = None) -> str:
    """The base model a checkpoint's ``config.json`` names, as a local folder (absolute) or a hub repo id.

    A folder is looked for first beside the checkpoint: in the checkpoint folder and in the folder above it (the
    ``--weights DIR`` root holding one folder per variant), each under the full name and under its last part, so a
    ``base_model`` of ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` is found as ``DIR/Wan2.1-I2V-14B-480P-Diffusers``
    (what ``hf download ... --local-dir`` makes) or ``DIR/Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``. Then the name as
    a path; else it is returned as given (a hub id, read through the Hugging Face cache).
    """
    text = str(base_model)
    names = list(dict.fromkeys([text, Path(text).name]))
    anchors = []
    if checkpoint_folder is not None and not Path(text).is_absolute():
        folder = Path(checkpoint_folder).expanduser()
        anchors = [folder, folder.parent]
    for anchor in anchors:
        for name in names:
            if (anchor / name).is_dir():
                return str((anchor / name).resolve())
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser().resolve())
    return text


def base_transformer(base_model: PathLike, checkpoint_folder: Optional[PathLike] = None) -> WeightFolder:
    """The ``transformer/`` folder of the base model a checkpoint names (``locate_base_model``)."""
    where = locate_base_model(base_model, checkpoint_folder)
    if not Path(where).is_dir() and not looks_like_repo_id(where):
        raise WeightsNotFoundError(f"base model folder {base_model} (named in config.json) was not found beside the "
                                   "checkpoint; put the Wan2.1 I2V diffusers folder there or name its hub id.")
    return WeightFolder(where, "transformer")


def human_bytes(n: float) -> str:
    """Bytes as a person reads them (decimal units, as the hub shows file sizes)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    """A parameter count: 5.45 B, 149.4 k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return f"{int(n)}"
