"""Official-checkpoint IO: build, save and load WorldStereo transformers, as the release loads them.

A checkpoint folder holds `config.json` + `model.safetensors`. The model's structure comes from
`<base_model>/transformer/config.json` and the checkpoint's config.json; its weights from the base model's
`transformer/` weights (one file, or shards with their `*.safetensors.index.json`, as diffusers writes them) with
`model.safetensors` over them: every tensor the file holds wins, every other keeps the base value (release:
models/worldstereo_wrapper.py `_load_transformer`). The released `worldstereo-camera` and `worldstereo-memory` files
hold the branches and part of the backbone; the DMD file is the whole model, and then no base tensor is read.

Memory stays bounded: the model is built once, on the meta device, and each tensor is allocated at its target dtype
and device and filled from the mapped file as it is read; one file is mapped at a time, and of it a window of at most
``MAPPED_BYTES`` of tensors (a base shard or the checkpoint is read window by window), so loading on the host needs
the model plus one window — less than one of the base's 5 GB shards.
What is wrong with a checkpoint (keys neither source holds, checkpoint keys the model lacks, other shapes) is read
from the files' headers and refused in one sentence before any tensor is read. Folders come from a local path or
the Hugging Face cache (`hanshanxue/WorldStereo`, one subfolder per variant); loading never waits long on the
network, and anything missing is reported in one sentence that says how to get it.
"""
from __future__ import annotations

import gc
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from engine.atomicio import atomic_path, atomic_write_text
from engine.constants import KEYFRAMES, TINY_FRAME_SCALE
from engine.hub import HUB_REPO, looks_like_repo_id
from engine.progress import Progress, ensure, span

from .config import (VARIANTS, ConfigError, ControlNetConfig, WorldStereoConfig, variant_has_memory,
                     variant_is_distilled)
from .transformer import WorldStereoTransformer
from .weightfiles import (TensorInfo, WeightFolder, WeightsNotFoundError, base_transformer, download_hint,
                          hub_weights_file, human_bytes, human_count)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_LISTED_KEYS = 4
# Tensors of one file mapped at once while loading (a window of a base shard or of the checkpoint; a larger tensor
# alone): what loading needs on the host beyond the model itself. Reopening a file per window costs its header.
MAPPED_BYTES = 64 << 20
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

log = logging.getLogger("engine.models.loading")
PathLike = Union[str, os.PathLike]

__all__ = ["CheckpointMismatchError", "WeightsNotFoundError", "WeightPlan", "build_transformer", "load_transformer",
           "plan_weights", "resolve_checkpoint", "save_checkpoint", "tiny_transformer_config"]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors (with its base model's) do not fit the model its config describes."""


# ---------------------------------------------------------------------------------------------------- tiny configs
# The numbers of ../shared/reference/official_state_dict_tiny.json (the official code built at a tiny size), except
# mask_downsample: 1 as in the released configs (with one render-mask frame per keyframe, 21 of them, the release's
# mask embedding takes no other value: a temporal kernel of 4 after 3 padded frames would give 6 token frames).
_TINY_BASE = {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 36,
    "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 4, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": 24, "added_kv_proj_dim": 32,
    "rope_max_seq_len": 64,
}
_TINY_CONTROLNET = {
    "dim": 32, "ffn_dim": 64, "num_heads": 2, "time_embed_dim": 32, "num_layers": 2, "conv_out_dim": 32,
    "add_channels": 7, "mid_channels": 16, "mask_downsample": 1, "interp": False, "update_ref": False,
    "ref_embedding": True, "main_camera_embedding": True, "camera_embedding_dim": 7,
}


def tiny_transformer_config(variant: str = "worldstereo-memory", base_model: str = "base_model",
                            memory_mode: str = "stitched") -> tuple[WorldStereoConfig, dict[str, Any]]:
    """(checkpoint config, backbone `transformer/config.json` dict) of the tiny official-shaped model.

    ``base_model`` is written into config.json; a relative folder is resolved against the checkpoint folder.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    cn = dict(_TINY_CONTROLNET)
    memory = variant_has_memory(variant)
    cn["ref_embedding"] = cn["main_camera_embedding"] = memory
    if memory_mode == "branch":
        cn["ref_embedding"] = False  # the paper's branch positions references by pairing, not by an index table
    extra: dict[str, Any] = {}
    if variant_is_distilled(variant):
        # Sampler settings of the DMD variant; the shift value is a plausible stand-in (the tiny model is random).
        extra = {"gen_shift": 5.0, "dmd_steps": 4, "dmd_start_steps": 250, "dmd_end_steps": 1000}
    from engine.conditioning import DEFAULT_SCALE_MAP, scale_bucket

    cfg = WorldStereoConfig(
        base_model=base_model, controlnet_cfg=ControlNetConfig.from_dict(cn), negative_prompt="",
        nframe=5, memory_mode=memory_mode, variant=variant,
        # the official buckets at the tiny scale: a full engine running a tiny package on a CPU takes seconds
        scale_map=[list(scale_bucket(b, TINY_FRAME_SCALE)) for b in DEFAULT_SCALE_MAP],
        memory_cfg={"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2} if memory_mode == "branch" else None,
        **extra,
    )
    base = {"_class_name": "WanTransformer3DModel", **{k: (list(v) if isinstance(v, list) else v)
                                                      for k, v in _TINY_BASE.items()}}
    return cfg, base


# The Wan2.1 I2V-14B backbone (diffusers `transformer/config.json` of the base model) and a camera branch of the
# Uni3C form the release builds on (dim 1024, 20 blocks, 16 heads, 5120-wide patch/time embeddings and outputs).
# The branch FFN width and mask-embedding channels are not stated anywhere public: 8192 and 256 are assumptions,
# used only for benchmarks with random weights (a real checkpoint brings its own config.json); mask_downsample is
# the released configs' 1.
_FULL_BASE = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 36,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": 1280,
    "added_kv_proj_dim": 5120, "rope_max_seq_len": 1024,
}
_FULL_CONTROLNET = {
    "dim": 1024, "ffn_dim": 8192, "num_heads": 16, "time_embed_dim": 5120, "num_layers": 20, "conv_out_dim": 5120,
    "add_channels": 7, "mid_channels": 256, "mask_downsample": 1, "interp": False, "update_ref": False,
    "ref_embedding": True, "main_camera_embedding": True, "camera_embedding_dim": 7,
}


def full_size_transformer_config(variant: str = "worldstereo-memory-dmd") -> tuple[WorldStereoConfig, dict[str, Any]]:
    """(checkpoint config, backbone config) at the real 14B size, for benchmarks with random weights."""
    cfg, _ = tiny_transformer_config(variant)
    cn = dict(_FULL_CONTROLNET)
    cn["ref_embedding"] = cn["main_camera_embedding"] = variant_has_memory(variant)
    cfg.controlnet_cfg = ControlNetConfig.from_dict(cn)
    cfg.nframe, cfg.scale_map = KEYFRAMES, None
    return cfg, {"_class_name": "WanTransformer3DModel", **_FULL_BASE}


# ---------------------------------------------------------------------------------------------------- build / save
def build_transformer(config: WorldStereoConfig, base_transformer_config: dict[str, Any], seed: int = 0,
                      device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> WorldStereoTransformer:
    """A randomly initialised model (zero-initialised where the official one is); ``seed`` fixes the weights
    without touching the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WorldStereoTransformer.from_checkpoint_config(config, base_transformer_config)
    place_model(model, device, dtype)
    return model.eval()


def place_model(model: WorldStereoTransformer, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = None) -> WorldStereoTransformer:
    """Move to ``device`` and cast floating parameters to ``dtype``, keeping diffusers' float32 modules (time
    embedding, modulation tables, norms) in float32 at half precision; rotary tables keep their precision."""
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, p in model.named_parameters():
        target = _target_dtype(name, dtype, keep_fp32) if p.is_floating_point() else None
        p.data = p.data.to(device=device, dtype=target if target is not None else p.dtype)
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[bname] = buf.to(device)
    return model


def save_checkpoint(model: WorldStereoTransformer, config: WorldStereoConfig, folder: PathLike,
                    base_transformer_config: Optional[dict[str, Any]] = None,
                    keys: Optional[Iterable[str]] = None) -> Path:
    """Write `config.json` + `model.safetensors` (official layout) into ``folder``; returns the folder.

    ``keys``: the state-dict keys the file holds (default: all); the rest come from the base model when loading, as
    for the released camera and memory checkpoints. ``base_transformer_config`` is not part of a checkpoint (it
    lives in `<base_model>/transformer/`); when given it is also written to
    `folder/<base_model>/transformer/config.json` if base_model is a relative path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    chosen = list(state) if keys is None else list(keys)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file({k: state[k].detach().to("cpu").contiguous() for k in chosen}, str(tmp), metadata={"format": "pt"})
    config.to_json(folder / CONFIG_NAME)
    if base_transformer_config is not None and not Path(config.base_model).is_absolute():
        target = folder / config.base_model / "transformer" / CONFIG_NAME
        atomic_write_text(target, json.dumps(base_transformer_config, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------- locating files
def resolve_checkpoint(checkpoint_dir_or_repo: PathLike, variant: Optional[str] = None) -> tuple[Path, Path]:
    """(config.json, model.safetensors) paths of a checkpoint, from a folder or a hub repo (variant subfolder)."""
    src = str(checkpoint_dir_or_repo)
    path = Path(src).expanduser()
    include = f"{variant}/*" if variant else None
    if path.is_dir():
        for cand in ([path / variant] if variant else []) + [path]:
            if (cand / CONFIG_NAME).is_file():
                weights = cand / WEIGHTS_NAME
                if not weights.is_file():
                    raise WeightsNotFoundError(f"{cand} has config.json but no {WEIGHTS_NAME}; copy the checkpoint's "
                                               f"weights there or {download_hint(HUB_REPO, include)}.")
                return cand / CONFIG_NAME, weights
        raise WeightsNotFoundError(f"{path} holds no {CONFIG_NAME}{f' (nor {variant}/{CONFIG_NAME})' if variant else ''}; "
                                   f"point to a WorldStereo checkpoint folder or {download_hint(HUB_REPO, include)}.")
    if not looks_like_repo_id(src):
        raise WeightsNotFoundError(f"checkpoint folder {src} does not exist; pass an existing folder or a hub repo id "
                                   f"like {HUB_REPO}.")
    prefix = f"{variant}/" if variant else ""
    hint = download_hint(src, include)
    return hub_weights_file(src, prefix + CONFIG_NAME, hint), hub_weights_file(src, prefix + WEIGHTS_NAME, hint)


def read_checkpoint_config(config_path: Path, variant: Optional[str] = None) -> WorldStereoConfig:
    """A checkpoint's config; camera or memory is decided by the variant, as the release decides it from the hub
    subfolder it reads (a folder named after a variant counts as naming it)."""
    folder_variant = config_path.parent.name if config_path.parent.name in VARIANTS else None
    return WorldStereoConfig.from_json(config_path, variant=variant or folder_variant)


# ---------------------------------------------------------------------------------------------------- the plan
def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


@dataclass
class WeightPlan:
    """Where every tensor of a model comes from, read from the files' headers: the checkpoint's file where it holds
    the key, else the base model's `transformer/` weights."""

    checkpoint: WeightFolder
    base: WeightFolder
    from_checkpoint: dict[str, TensorInfo] = field(default_factory=dict)
    from_base: dict[str, TensorInfo] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # keys neither holds
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have
    wrong_shape: list[str] = field(default_factory=list)  # "key [file shape] in <source>, [model shape] in the model"
    base_files: list[str] = field(default_factory=list)  # the base weight files (all of them, in order)

    @property
    def base_files_read(self) -> list[str]:
        """The base weight files the load opens (names in the folder)."""
        used = {Path(i.file).name for i in self.from_base.values()}
        return [f for f in self.base_files if Path(f).name in used]

    def mismatch(self) -> Optional[str]:
        """One sentence naming the first few keys of each problem and their count, or None."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} key(s) that neither the checkpoint nor the base model holds "
                         f"({_listed(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint key(s) the model does not have "
                         f"({_listed(self.unexpected)})")
        if self.wrong_shape:
            parts.append(f"{len(self.wrong_shape)} key(s) of another shape ({_listed(self.wrong_shape)})")
        if not parts:
            return None
        return (f"{self.checkpoint.where}/{WEIGHTS_NAME} over the base model {self.base.where} does not fit the model "
                f"its config.json describes: {'; '.join(parts)}; use the config.json shipped with these weights and "
                "the base model it names.")

    def split(self) -> str:
        """Tensors and parameters from each source, in one line (the log of a load and `python -m engine inspect`)."""
        def part(infos: dict[str, TensorInfo]) -> str:
            return f"{len(infos)} tensors ({human_count(sum(i.numel for i in infos.values()))} parameters)"

        base = "none from the base model"
        if self.from_base:
            base = (f"{part(self.from_base)} from the base model's transformer/ ({len(self.base_files_read)} of "
                    f"{len(self.base_files)} file(s))")
        missing = f"{len(self.missing)} missing" if self.missing else "none missing"
        return f"{part(self.from_checkpoint)} from {WEIGHTS_NAME}, {base}, {missing}"

    def checkpoint_dtype(self) -> torch.dtype:
        """The floating dtype most of the checkpoint's tensors are stored in (float32 when it holds none)."""
        kinds = Counter(i.dtype for i in self.from_checkpoint.values() if i.dtype in FLOAT_DTYPES)
        return FLOAT_DTYPES[kinds.most_common(1)[0][0]] if kinds else torch.float32


def plan_weights(shapes: dict[str, tuple[int, ...]], checkpoint: WeightFolder, base: WeightFolder,
                 download: bool = True) -> WeightPlan:
    """Which tensors of a model with state-dict ``shapes`` come from ``checkpoint`` and which from ``base``, and what
    does not fit, from headers alone. The base is read only when the checkpoint lacks keys, and then only the shards
    that hold one of them."""
    plan = WeightPlan(checkpoint, base)
    held = checkpoint.tensors(download=download)
    for key, info in held.items():
        if key not in shapes:
            plan.unexpected.append(key)
        elif info.shape != shapes[key]:
            plan.wrong_shape.append(f"{key} {list(info.shape)} in {WEIGHTS_NAME}, {list(shapes[key])} in the model")
        else:
            plan.from_checkpoint[key] = info
    needed = [k for k in shapes if k not in held]
    if needed:
        plan.base_files = base.files()
        found = base.tensors(needed, download=download)
        for key in needed:
            info = found.get(key)
            if info is None:
                plan.missing.append(key)
            elif info.shape != shapes[key]:
                plan.wrong_shape.append(f"{key} {list(info.shape)} in the base model, {list(shapes[key])} in the model")
            else:
                plan.from_base[key] = info
    return plan


# ---------------------------------------------------------------------------------------------------- loading
def _target_dtype(name: str, dtype: Optional[torch.dtype], keep_fp32: list[str]) -> Optional[torch.dtype]:
    # Like diffusers' from_pretrained: time embedding, modulation tables and norms stay float32 at half precision.
    if dtype in (torch.float16, torch.bfloat16) and any(m in name.split(".") for m in keep_fp32):
        return torch.float32
    return dtype


def read_order(plan: WeightPlan) -> list[tuple[str, list[str]]]:
    """(file, keys) in reading order, one mapping each: the needed base shards, then the checkpoint, each cut into
    windows of at most ``MAPPED_BYTES`` of tensors (one larger tensor alone), so at most one window of one file is
    mapped at any time."""
    infos = {**plan.from_base, **plan.from_checkpoint}
    by_file: dict[str, list[str]] = {}
    for key, info in infos.items():
        by_file.setdefault(info.file, []).append(key)
    reads = []
    for path, keys in by_file.items():
        window: list[str] = []
        size = 0
        for key in keys:
            if window and size + infos[key].nbytes > MAPPED_BYTES:
                reads.append((path, window))
                window, size = [], 0
            window.append(key)
            size += infos[key].nbytes
        reads.append((path, window))
    return reads


def _origins(infos: dict[str, TensorInfo], dtype_of: Callable[[str, TensorInfo], torch.dtype],
             device: torch.device) -> dict[str, tuple]:
    """What each loaded tensor is: its file (path, size, modification time), dtype and device (its name is the key).
    Two models whose tensor has the same origin hold the same values (``load_transformer(reuse=...)``)."""
    stats = {f: os.stat(f) for f in {i.file for i in infos.values()}}
    return {k: (i.file, stats[i.file].st_size, stats[i.file].st_mtime_ns, str(dtype_of(k, i)), str(device))
            for k, i in infos.items()}


def _tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def _fill(model: WorldStereoTransformer, plan: WeightPlan, device: torch.device, dtype: torch.dtype,
          report: Callable[[float, str], None], reuse: Optional[torch.nn.Module] = None) -> None:
    """Give every tensor of ``model`` (built on meta) its value, tensor by tensor, as ``plan`` says; tensors of
    ``reuse`` (a model this process loaded before) whose origin is the same are taken over instead of read again,
    and the rest of ``reuse`` is released before the first tensor is read."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    infos = {**plan.from_base, **plan.from_checkpoint}

    def target(key: str, info: TensorInfo) -> torch.dtype:
        stored = FLOAT_DTYPES.get(info.dtype)
        return _target_dtype(key, dtype, keep_fp32) if stored is not None else _tensor(model, key).dtype

    def put(key: str, value: torch.Tensor) -> None:
        set_module_tensor_to_device(model, key, device, value=value, dtype=value.dtype, clear_cache=False)

    origins = _origins(infos, target, device)
    taken = set()
    if reuse is not None:
        old = getattr(reuse, "weight_origin", {})
        for key, origin in origins.items():
            if old.get(key) == origin:
                put(key, _tensor(reuse, key))
                taken.add(key)
        reuse.to("meta")  # the old model's other tensors go now: two transformers are never held together
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = max(sum(infos[k].nbytes for k in infos if k not in taken), 1)
    done = 0
    for path, keys in read_order(plan):
        keys = [k for k in keys if k not in taken]
        if not keys:
            continue
        with safe_open(path, framework="pt", device="cpu") as fh:
            for key in keys:
                src = fh.get_tensor(key)  # a view of the mapped file: nothing is copied yet
                value = torch.empty(src.shape, dtype=target(key, infos[key]), device=device)
                value.copy_(src)  # read, cast and placed in one copy
                del src
                put(key, value)
                done += infos[key].nbytes
            report(done / total, f"loading weights {human_bytes(done)} / {human_bytes(total)}")
    model.weight_origin = origins


def load_transformer(checkpoint_dir_or_repo: PathLike, variant: Optional[str] = None, base_model: Optional[str] = None,
                     device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                     lenient: bool = False, progress: Optional[Progress] = None,
                     announce: Optional[Callable[[str], None]] = None,
                     reuse: Optional[torch.nn.Module] = None) -> WorldStereoTransformer:
    """Load a WorldStereo transformer from a checkpoint folder or a hub repo (``variant`` = its subfolder) over its
    base model (``base_model`` overrides config.json's), as the release does.

    ``dtype``: the model's dtype (default: the checkpoint's; float32 modules stay float32 at half precision).
    Strict by default: keys neither source holds, checkpoint keys the model lacks and other shapes raise
    `CheckpointMismatchError` (one sentence) before any tensor is read; ``lenient=True`` loads what fits and keeps
    a fresh initialisation elsewhere (the model is then built with weights first). The split of tensors between the
    checkpoint and the base goes to ``announce`` (default: this module's log) once. ``reuse``: a transformer this
    process loaded before, emptied here — its tensors that the new model would read from the same file are taken
    over, and the rest is released before anything is read (switching variants re-reads only what differs).
    """
    from accelerate import init_empty_weights

    report = ensure(progress)
    report(0.0, "locating checkpoint")
    config_path, weights_path = resolve_checkpoint(checkpoint_dir_or_repo, variant)
    config = read_checkpoint_config(config_path, variant)
    base = base_transformer(base_model or config.base_model, config_path.parent)
    base_cfg = base.read_json(CONFIG_NAME)
    report(0.05, "building model")
    if lenient:
        model = WorldStereoTransformer.from_checkpoint_config(config, base_cfg)
    else:
        with init_empty_weights(include_buffers=False):  # parameters on meta: each is allocated once, when read
            model = WorldStereoTransformer.from_checkpoint_config(config, base_cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_weights(shapes, WeightFolder(config_path.parent, weights_name=weights_path.name), base)
    problem = plan.mismatch()
    if problem and not lenient:
        raise CheckpointMismatchError(problem)
    if problem:
        import warnings

        warnings.warn(problem + " (loaded leniently)")
    (announce or log.info)(f"{config.variant or config_path.parent.name}: {plan.split()}.")
    device, dtype = torch.device(device), dtype or plan.checkpoint_dtype()
    _fill(model, plan, device, dtype, span(report, 0.1, 0.95), reuse=reuse)
    # Whatever was not in the files (lenient) and the non-persistent rotary tables follow the loaded weights.
    place_model(model, device, dtype)
    report(1.0, "model loaded")
    return model.eval()
