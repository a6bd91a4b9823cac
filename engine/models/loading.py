"""Official-checkpoint IO: build, save and load WorldStereo transformers.

A checkpoint folder holds `config.json` + `model.safetensors` (the full transformer state dict); the backbone's
architecture comes from `<base_model>/transformer/config.json`. Folders come from a local path or the Hugging Face
cache (`hanshanxue/WorldStereo`, one subfolder per variant). Loading never waits long on the network: offline mode
or a failed request falls back to the local cache, and anything missing is reported in one sentence that says how
to get it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from engine.atomicio import atomic_path, atomic_write_text
from engine.constants import KEYFRAMES
from engine.hub import HUB_REPO, local_files_only, looks_like_repo_id
from engine.progress import Progress, ensure

from .config import VARIANTS, ConfigError, ControlNetConfig, WorldStereoConfig
from .transformer import WorldStereoTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ETAG_TIMEOUT_S = 5.0
MAX_LISTED_KEYS = 8

PathLike = Union[str, os.PathLike]


class WeightsNotFoundError(ValueError):
    """A checkpoint (or its base model) that is not here; the message says how to get it."""


class CheckpointMismatchError(ValueError):
    """model.safetensors whose keys or shapes differ from the model its config describes."""


# ---------------------------------------------------------------------------------------------------- tiny configs
# The numbers of reference/official_state_dict_tiny.json (the official code built at a tiny size), except
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
    memory = variant != "worldstereo-camera"
    cn["ref_embedding"] = cn["main_camera_embedding"] = memory
    if memory_mode == "branch":
        cn["ref_embedding"] = False  # the paper's branch positions references by pairing, not by an index table
    extra: dict[str, Any] = {}
    if variant == "worldstereo-memory-dmd":
        # Sampler settings of the DMD variant; the shift value is a plausible stand-in (the tiny model is random).
        extra = {"gen_shift": 5.0, "dmd_steps": 4, "dmd_start_steps": 250, "dmd_end_steps": 1000}
    cfg = WorldStereoConfig(
        base_model=base_model, controlnet_cfg=ControlNetConfig.from_dict(cn), negative_prompt="",
        nframe=5, memory_mode=memory_mode, variant=variant,
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
    cn["ref_embedding"] = cn["main_camera_embedding"] = variant != "worldstereo-camera"
    cfg.controlnet_cfg = ControlNetConfig.from_dict(cn)
    cfg.nframe = KEYFRAMES
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
                    base_transformer_config: Optional[dict[str, Any]] = None) -> Path:
    """Write `config.json` + `model.safetensors` (official layout) into ``folder``; returns the folder.

    ``base_transformer_config`` is not part of a checkpoint (it lives in `<base_model>/transformer/`); when given it
    is also written to `folder/<base_model>/transformer/config.json` if base_model is a relative path, which is
    what a self-contained tiny package needs.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config.to_json(folder / CONFIG_NAME)
    if base_transformer_config is not None and not Path(config.base_model).is_absolute():
        target = folder / config.base_model / "transformer" / CONFIG_NAME
        atomic_write_text(target, json.dumps(base_transformer_config, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------- locating files
def _offline() -> bool:
    return local_files_only()


def _hub_file(repo: str, filename: str, how_to_get: str) -> Path:
    """A file of a hub repository from the cache, or downloaded with a short timeout unless offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    attempts = [True] if _offline() else [False, True]
    last: Optional[Exception] = None
    for local_only in attempts:
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=local_only, etag_timeout=ETAG_TIMEOUT_S))
        except HFValidationError as e:
            raise WeightsNotFoundError(f"{repo!r} is neither an existing folder nor a valid Hugging Face repo id; "
                                       f"pass the checkpoint folder or a repo id like {HUB_REPO}.") from e
        except Exception as e:  # network errors, missing entries, gated repos: all end in the same advice
            last = e
    where = "the Hugging Face cache (the hub is switched off or unreachable)" if _offline() else "the Hugging Face hub or its local cache"
    raise WeightsNotFoundError(f"{repo}/{filename} is not available from {where}; {how_to_get}.") from last


def _download_hint(repo: str, variant: Optional[str]) -> str:
    include = f" --include '{variant}/*'" if variant else ""
    return f"download it with `hf download {repo}{include}` (when online) or pass --weights DIR with a local copy"


def resolve_checkpoint(checkpoint_dir_or_repo: PathLike, variant: Optional[str] = None) -> tuple[Path, Path]:
    """(config.json, model.safetensors) paths of a checkpoint, from a folder or a hub repo (variant subfolder)."""
    src = str(checkpoint_dir_or_repo)
    path = Path(src).expanduser()
    if path.is_dir():
        for cand in ([path / variant] if variant else []) + [path]:
            if (cand / CONFIG_NAME).is_file():
                weights = cand / WEIGHTS_NAME
                if not weights.is_file():
                    raise WeightsNotFoundError(f"{cand} has config.json but no {WEIGHTS_NAME}; copy the checkpoint's "
                                               f"weights there or {_download_hint(HUB_REPO, variant)}.")
                return cand / CONFIG_NAME, weights
        raise WeightsNotFoundError(f"{path} holds no {CONFIG_NAME}{f' (nor {variant}/{CONFIG_NAME})' if variant else ''}; "
                                   f"point to a WorldStereo checkpoint folder or {_download_hint(HUB_REPO, variant)}.")
    if not looks_like_repo_id(src):
        raise WeightsNotFoundError(f"checkpoint folder {src} does not exist; pass an existing folder or a hub repo id "
                                   f"like {HUB_REPO}.")
    prefix = f"{variant}/" if variant else ""
    hint = _download_hint(src, variant)
    return _hub_file(src, prefix + CONFIG_NAME, hint), _hub_file(src, prefix + WEIGHTS_NAME, hint)


def resolve_base_transformer_config(base_model: str, checkpoint_folder: Optional[Path] = None) -> dict[str, Any]:
    """`<base_model>/transformer/config.json` from a folder (absolute, or relative to the checkpoint) or the hub."""
    rel = Path("transformer") / CONFIG_NAME
    candidates = [Path(base_model).expanduser()]
    if checkpoint_folder is not None and not Path(base_model).is_absolute():
        candidates = [checkpoint_folder / base_model, checkpoint_folder.parent / base_model] + candidates
    for cand in candidates:
        if (cand / rel).is_file():
            return json.loads((cand / rel).read_text())
    if not looks_like_repo_id(base_model):
        raise WeightsNotFoundError(f"base model folder {base_model} (named in config.json) has no transformer/config.json; "
                                   "pass base_model= with the Wan2.1 I2V diffusers folder.")
    hint = f"download it with `hf download {base_model}` (when online) or pass base_model= with a local copy"
    return json.loads(_hub_file(base_model, rel.as_posix(), hint).read_text())


# ---------------------------------------------------------------------------------------------------- loading
def _mismatch_message(missing: list[str], unexpected: list[str], wrong_shape: list[str], source: Path) -> str:
    def listed(keys: list[str]) -> str:
        more = f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
        return ", ".join(keys[:MAX_LISTED_KEYS]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) [{listed(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) [{listed(unexpected)}]")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} key(s) with a different shape [{listed(wrong_shape)}]")
    return (f"{source} does not match the model its config.json describes: {'; '.join(parts)}; "
            "use the config.json shipped with these weights, or pass lenient=True to load what matches.")


def _target_dtype(name: str, dtype: Optional[torch.dtype], keep_fp32: list[str]) -> Optional[torch.dtype]:
    # Like diffusers' from_pretrained: time embedding, modulation tables and norms stay float32 at half precision.
    if dtype in (torch.float16, torch.bfloat16) and any(m in name.split(".") for m in keep_fp32):
        return torch.float32
    return dtype


def load_transformer(checkpoint_dir_or_repo: PathLike, variant: Optional[str] = None, base_model: Optional[str] = None,
                     device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                     lenient: bool = False, progress: Optional[Progress] = None) -> WorldStereoTransformer:
    """Load a WorldStereo transformer from a checkpoint folder or a hub repo (``variant`` = its subfolder).

    Strict by default: any missing, unexpected or reshaped key raises `CheckpointMismatchError` listing them.
    With ``lenient=True`` matching keys are loaded and the rest keep their fresh initialisation (the model is then
    built with real weights first, so it needs memory for two copies of the mismatched tensors only).
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open

    report = ensure(progress)
    report(0.0, "locating checkpoint")
    config_path, weights_path = resolve_checkpoint(checkpoint_dir_or_repo, variant)
    # Camera or memory is decided by the variant, as the official loader does from the hub subfolder it reads.
    folder_variant = config_path.parent.name if config_path.parent.name in VARIANTS else None
    config = WorldStereoConfig.from_json(config_path, variant=variant or folder_variant)
    base_cfg = resolve_base_transformer_config(base_model or config.base_model, config_path.parent)
    report(0.05, "building model")

    if lenient:
        model = WorldStereoTransformer.from_checkpoint_config(config, base_cfg)
    else:
        with init_empty_weights(include_buffers=False):  # parameters on meta: no second copy of a 14B model
            model = WorldStereoTransformer.from_checkpoint_config(config, base_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    state: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape = [], []
    with safe_open(str(weights_path), framework="pt", device="cpu") as fh:
        keys = list(fh.keys())
        for i, key in enumerate(keys):
            if key not in expected:
                unexpected.append(key)
                continue
            shape = tuple(fh.get_slice(key).get_shape())
            if shape != expected[key]:
                wrong_shape.append(f"{key} {list(shape)} vs {list(expected[key])}")
                continue
            tensor = fh.get_tensor(key)
            target = _target_dtype(key, dtype, keep_fp32) if tensor.is_floating_point() else None
            state[key] = tensor.to(device=device, dtype=target)
            if i % 64 == 0:
                report(0.1 + 0.85 * i / max(len(keys), 1), f"loading weights {i}/{len(keys)}")
    missing = sorted(set(expected) - set(state) - {k.split(" ")[0] for k in wrong_shape})
    if (missing or unexpected or wrong_shape) and not lenient:
        raise CheckpointMismatchError(_mismatch_message(missing, sorted(unexpected), wrong_shape, weights_path))
    if missing or unexpected or wrong_shape:
        import warnings

        warnings.warn(_mismatch_message(missing, sorted(unexpected), wrong_shape, weights_path) + " (loaded leniently)")
    model.load_state_dict(state, strict=not lenient, assign=True)
    # Whatever was not in the file (lenient) and the non-persistent rotary tables follow the loaded weights.
    place_model(model, device, dtype)
    report(1.0, "model loaded")
    return model.eval()
