"""The WorldStereo checkpoint configuration (`config.json` of one checkpoint variant).

Mirrors the official file: `base_model`, `controlnet_cfg`, sampling defaults. Two keys are ours:
`memory_mode` ('stitched': the released 2.0 form, references stitched into the backbone's attention;
'branch': the paper's second ControlNet branch over target|reference pairs) and `variant`. Keys this code does
not know are kept in `extra` and written back unchanged, so a round trip never loses information.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from engine.constants import KEYFRAMES

MEMORY_MODES = ("stitched", "branch")
VARIANTS = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")


def variant_has_memory(variant: str) -> bool:
    """Whether a checkpoint variant was trained with references (the camera-only variant was not): decided by the
    variant's name, as the official loader decides it from its model type."""
    return "memory" in variant


def variant_is_distilled(variant: str) -> bool:
    """Whether a checkpoint variant samples with the few-step DMD student (its name says so)."""
    return variant.endswith("-dmd")


class ConfigError(ValueError):
    """A config.json that cannot describe a WorldStereo model; the message says what to fix."""


@dataclass
class ControlNetConfig:
    """`controlnet_cfg`: the camera / GGM branch. Sizes are required (no official default is known); the
    other defaults are the ones the release states."""

    dim: int
    ffn_dim: int
    num_heads: int
    time_embed_dim: int
    num_layers: int
    conv_out_dim: int
    add_channels: int = 1
    mid_channels: int = 64
    mask_downsample: int = 4
    interp: bool = False  # the mask embedding also pads 3 frames behind (clips whose last frame is known too)
    # Stitched memory: true carries each block's reference output to the next block; false (the released setting)
    # feeds every block the original reference tokens again.
    update_ref: bool = False
    ref_embedding: bool = False  # builds `ref_index_embedding`, which the official forward never reads
    main_camera_embedding: bool = False
    camera_embedding_dim: int = 7
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlNetConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("dim", "ffn_dim", "num_heads", "time_embed_dim", "num_layers", "conv_out_dim")
                   if k not in d]
        if missing:
            raise ConfigError(f"controlnet_cfg lacks {', '.join(missing)}; use the config.json shipped with the checkpoint.")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.extra = {k: v for k, v in d.items() if k not in known}
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    def validate(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"controlnet_cfg.dim ({self.dim}) must be a multiple of num_heads ({self.num_heads}).")
        if self.mid_channels % 8:
            raise ConfigError(f"controlnet_cfg.mid_channels ({self.mid_channels}) must be a multiple of 8.")
        if self.mask_downsample < 1:
            raise ConfigError("controlnet_cfg.mask_downsample must be at least 1.")


@dataclass
class MemoryBranchConfig:
    """The paper's SSM ControlNet (memory_mode='branch'); not part of any released checkpoint, so ours."""

    dim: int = 1024
    ffn_dim: int = 8192
    num_heads: int = 16
    num_layers: int = 20
    pointmap_channels: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryBranchConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class WorldStereoConfig:
    base_model: str
    controlnet_cfg: ControlNetConfig
    latent_cond_mode: str = "full_vae"
    negative_prompt: str = ""
    freeze_backbone: Optional[bool] = None
    nframe: int = KEYFRAMES
    scale_map: Optional[dict[str, Any]] = None
    gen_shift: Optional[float] = None
    dmd_steps: Optional[int] = None
    dmd_start_steps: Optional[int] = None
    dmd_end_steps: Optional[int] = None
    memory_mode: str = "stitched"
    memory_cfg: Optional[MemoryBranchConfig] = None
    variant: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.controlnet_cfg, dict):
            self.controlnet_cfg = ControlNetConfig.from_dict(self.controlnet_cfg)
        if isinstance(self.memory_cfg, dict):
            self.memory_cfg = MemoryBranchConfig.from_dict(self.memory_cfg)
        if self.memory_mode not in MEMORY_MODES:
            raise ConfigError(f"memory_mode must be one of {MEMORY_MODES}, not {self.memory_mode!r}.")
        if self.memory_mode == "branch" and self.memory_cfg is None:
            c = self.controlnet_cfg
            # Without explicit numbers the paper's branch borrows the camera branch's width.
            self.memory_cfg = MemoryBranchConfig(dim=c.dim, ffn_dim=c.ffn_dim, num_heads=c.num_heads)

    # Keys written only when set, so a config read from an official file is written back in its own shape.
    _OPTIONAL = ("freeze_backbone", "scale_map", "gen_shift", "dmd_steps", "dmd_start_steps", "dmd_end_steps",
                 "memory_cfg", "variant")

    @classmethod
    def from_dict(cls, d: dict[str, Any], variant: Optional[str] = None) -> "WorldStereoConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object.")
        if "controlnet_cfg" not in d:
            raise ConfigError("config.json has no 'controlnet_cfg'; it is not a WorldStereo checkpoint config.")
        if "base_model" not in d:
            raise ConfigError("config.json has no 'base_model'; it must name the Wan2.1 I2V diffusers repository or folder.")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("variant") is None:
            # the official loader takes the variant from the hub subfolder it reads (its "model_type")
            named = variant if variant is not None else d.get("model_type")
            if named is not None:
                kwargs["variant"] = named
        cfg = cls(**kwargs)
        cfg.extra = {k: v for k, v in d.items() if k not in known}
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, Path], variant: Optional[str] = None) -> "WorldStereoConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path} as JSON ({e}); re-download the checkpoint's config.json.") from e
        return cls.from_dict(d, variant=variant)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name in self._OPTIONAL and v is None:
                continue
            if isinstance(v, ControlNetConfig):
                v = v.to_dict()
            elif isinstance(v, MemoryBranchConfig):
                v = asdict(v)
            out[f.name] = v
        out.update(self.extra)
        return out

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from engine.atomicio import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @property
    def has_memory(self) -> bool:
        """Whether this variant was trained with references (the camera-only variant was not).

        Decided by the variant, as the official loader does from its model type: a `worldstereo-camera` config may
        carry `ref_embedding` / `main_camera_embedding` and still has no memory. Only a config with no variant
        falls back to those flags.
        """
        if self.variant is not None:
            return variant_has_memory(self.variant)
        c = self.controlnet_cfg
        return self.memory_mode == "branch" or c.ref_embedding or c.main_camera_embedding
