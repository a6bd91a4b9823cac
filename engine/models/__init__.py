"""WorldStereo networks: config, transformer (backbone + branches), official-checkpoint loading.
"""
from __future__ import annotations

from .config import ConfigError, ControlNetConfig, MemoryBranchConfig, WorldStereoConfig
from engine.hub import HUB_REPO

from .loading import (
    VARIANTS,
    CheckpointMismatchError,
    WeightsNotFoundError,
    build_transformer,
    load_transformer,
    place_model,
    resolve_checkpoint,
    save_checkpoint,
    tiny_transformer_config,
)
from .transformer import InputError, WorldStereoTransformer

__all__ = [
    "ConfigError", "ControlNetConfig", "MemoryBranchConfig", "WorldStereoConfig", "HUB_REPO", "VARIANTS",
    "CheckpointMismatchError", "WeightsNotFoundError", "build_transformer", "load_transformer", "place_model",
    "resolve_checkpoint", "save_checkpoint", "tiny_transformer_config", "InputError", "WorldStereoTransformer",
]
