"""Tiny-random WorldStereo checkpoint packages in the released layout.

``write_tiny_package`` writes what a real download looks like, only tiny and random::

    folder/config.json            WorldStereo config; base_model = "base_model" (relative to the package)
    folder/model.safetensors      the transformer's tensors the released file of the variant holds: the whole model
                                  for DMD; for the camera and memory variants the branches, the modules the base
                                  lacks and part of the backbone (``RELEASED_BACKBONE_PARTS``), the rest coming from
                                  the base model when loading, as for the released files
    folder/base_model/            a diffusers WanImageToVideoPipeline folder: model_index.json, transformer/ (in
                                  several shards with their index, written by diffusers' own save_pretrained), vae/,
                                  text_encoder/, tokenizer/, image_encoder/, image_processor/, scheduler/

so the tiny engines go through exactly the loading code a real checkpoint does. The base model depends on the seed
alone, so every variant of one seed shares it (``write_tiny_weights``: the hub's layout, one folder per variant and
the base beside them). The tokenizer is a T5 (Unigram) tokenizer over the package-local vocabulary in
``tiny_vocab/unigram.json``. The layers the release initialises to zero (`wake_zero_init`) hold random values, so
both control branches move every tiny clip.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from engine.atomicio import atomic_folder
from engine.constants import TEXT_TOKENS

from .config import VARIANTS
from .loading import build_transformer, save_checkpoint, tiny_transformer_config
from .transformer import backbone_init_kwargs

VOCAB_FILE = Path(__file__).resolve().parent / "tiny_vocab" / "unigram.json"
BASE_MODEL_DIR = "base_model"
TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH = 8
TINY_IMAGE_TOKENS = (TINY_CLIP_IMAGE_SIZE // TINY_CLIP_PATCH) ** 2 + 1  # 17: patches + the class token
# The backbone parts the released camera and memory files hold besides the branches (../shared/reference/
# CONVENTIONS.md, "Loading the released checkpoints": every block's self-attention, and for memory its feed-forward
# too, as their sizes say); None: the whole model (the DMD file).
RELEASED_BACKBONE_PARTS = {"worldstereo-camera": ("attn1",), "worldstereo-memory": ("attn1", "ffn"),
                           "worldstereo-memory-dmd": None}
BASE_SHARD_SIZE = "100KB"  # the tiny base transformer (about 320 kB in float32) goes into four shards
BASE_FLOW_SHIFT = 3.0  # the base model's UniPC flow shift, as in the Wan2.1 I2V 480P scheduler config


def tiny_tokenizer():
    """A T5 tokenizer (pad 0, eos 1, unk 2, like UMT5's) over the committed tiny vocabulary."""
    from transformers import T5Tokenizer

    vocab = [(str(p), float(s)) for p, s in json.loads(VOCAB_FILE.read_text(encoding="utf-8"))["vocab"]]
    # padded to the count the backbone splits its context at, like the real tokenizer
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_TOKENS)


def _tiny_text_encoder(text_dim: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=text_dim // 2, d_ff=2 * text_dim, num_layers=1,
                     num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()


def _tiny_image_encoder(image_dim: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH,
                           projection_dim=image_dim, hidden_act="gelu")
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
                                   crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE})
    return CLIPVisionModel(cfg).eval(), processor


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    # four levels keep the real x8 spatial factor; 8 base channels keep it fast on a CPU
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wake_zero_init(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> int:
    """Give every all-zero floating parameter of ``model`` values ``scale`` x N(0, 1) drawn from ``generator``.

    The release zero-initialises the outputs of its control paths (the camera branch's ``proj_out`` and the mask
    embedding's last conv, the camera-code network's last Linear, ...), so a trained checkpoint is needed before
    they add anything. Woken, they move every tiny-random clip, and a test that compares clips sees both branches
    (a wrong or stale camera branch changes the clip). Returns how many parameters were woken."""
    woken = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
                woken += 1
    return woken


def wake_seed(variant: str, seed: int = 0) -> int:
    """The seed of the generator `write_tiny_package` wakes ``variant``'s zero-initialised layers with."""
    return 1000 * seed + VARIANTS.index(variant)


def checkpoint_keys(model, variant: str) -> list[str]:
    """The state-dict keys a package's model.safetensors holds: every key for DMD; for the camera and memory
    variants every key the base model lacks (branches, memory modules) and ``RELEASED_BACKBONE_PARTS`` of every
    backbone block."""
    keys = list(model.state_dict())
    parts = RELEASED_BACKBONE_PARTS.get(variant)
    if parts is None:
        return keys
    backbone = set(model.backbone_state_dict())
    return [k for k in keys if k not in backbone or any(p in k.split(".") for p in parts)]


def tiny_base_model(base_cfg: dict, seed: int = 0):
    """The tiny base model (a diffusers ``WanImageToVideoPipeline``): random, a function of ``seed`` alone."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        backbone = WanTransformer3DModel(**backbone_init_kwargs(base_cfg)).eval()
        tokenizer = tiny_tokenizer()
        text_encoder = _tiny_text_encoder(base_cfg["text_dim"], len(tokenizer))
        image_encoder, image_processor = _tiny_image_encoder(base_cfg["image_dim"])
        vae = _tiny_vae()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                        flow_shift=BASE_FLOW_SHIFT)
    return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=image_processor, image_encoder=image_encoder, transformer=backbone)


def save_tiny_base_model(pipe, folder: Union[str, Path]) -> Path:
    """Write the base model as diffusers does, its transformer in several shards with their index json (as the
    real base's 14 float32 shards)."""
    import shutil

    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size=BASE_SHARD_SIZE)
    return folder


def write_tiny_package(folder: Union[str, Path], variant: str = "worldstereo-memory-dmd", seed: int = 0,
                       memory_mode: str = "stitched", with_base: bool = True) -> Path:
    """Write a tiny random checkpoint package for ``variant`` into ``folder`` (created); returns the folder.

    The model is a fine-tune of the base: its file holds ``checkpoint_keys`` (the base holds other values there),
    and it equals the base everywhere else, so what the loader makes of file and base is exactly this model.
    ``with_base=False`` leaves the base model out (``write_tiny_weights`` puts one beside the variants).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, base_cfg = tiny_transformer_config(variant, base_model=BASE_MODEL_DIR, memory_mode=memory_mode)
    model = build_transformer(config, base_cfg, seed=seed)
    # a generator of the variant's own: the variants' camera branches differ, as the released files' do
    wake_zero_init(model, torch.Generator().manual_seed(wake_seed(variant, seed)))
    base = tiny_base_model(base_cfg, seed)
    keys = checkpoint_keys(model, variant)
    held = set(keys)
    model.load_state_dict({k: v for k, v in base.transformer.state_dict().items() if k not in held}, strict=False)
    if with_base:
        save_tiny_base_model(base, folder / BASE_MODEL_DIR)
    save_checkpoint(model, config, folder, keys=keys)
    return folder


def write_tiny_weights(root: Union[str, Path], seed: int = 0, variants=VARIANTS) -> Path:
    """The hub's layout at a tiny size, for ``--weights DIR``: ``root/<variant>/`` for each of ``variants`` and the
    base model they share beside them (``root/base_model``, found through each config.json's ``base_model``)."""
    root = Path(root)
    for i, variant in enumerate(variants):
        write_tiny_package(root / variant, variant, seed=seed, with_base=i == 0)
    (root / variants[0] / BASE_MODEL_DIR).rename(root / BASE_MODEL_DIR)
    return root


# Bump when write_tiny_package or the models' initialisation change what is written in a way the config and the
# state-dict layout do not show.
TINY_PACKAGE_FORMAT = 4


def tiny_package_key(variant: str, memory_mode: str = "stitched") -> str:
    """A short hash of what a cached tiny package depends on: its config, its backbone config, the transformer's
    state-dict keys and shapes (the checkpoint layout, read off a weightless model) and ``TINY_PACKAGE_FORMAT``.
    A package written by a model with another layout or config schema is never reused."""
    import hashlib

    from accelerate import init_empty_weights

    from .transformer import WorldStereoTransformer

    config, base_cfg = tiny_transformer_config(variant, base_model=BASE_MODEL_DIR, memory_mode=memory_mode)
    with init_empty_weights():
        model = WorldStereoTransformer.from_checkpoint_config(config, base_cfg)
    layout = sorted((k, list(v.shape)) for k, v in model.state_dict().items())
    blob = json.dumps([TINY_PACKAGE_FORMAT, config.to_dict(), base_cfg, layout], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_tiny_package(variant: str = "worldstereo-memory-dmd", memory_mode: str = "stitched") -> Path:
    """The tiny-random package for ``variant``, written once into the engine's cache (``WORLDSTEREO_CACHE``,
    default ``~/.cache/worldstereo-studio``) and reused; the `tiny-random` engine and `python -m export` share it.

    The folder name carries `tiny_package_key`, so a package written by an older model is not picked up. Written
    through ``atomic_folder``: concurrent first runs never see half a package, and the first one to finish wins (the
    packages are the same). A folder of that name without its weights (not one this function wrote) is replaced.
    """
    import os

    root = Path(os.environ.get("WORLDSTEREO_CACHE", Path.home() / ".cache" / "worldstereo-studio"))
    mode = "" if memory_mode == "stitched" else f"-{memory_mode}"
    folder = root / f"tiny-random-{variant}{mode}-{tiny_package_key(variant, memory_mode)}"
    if (folder / "model.safetensors").is_file():
        return folder
    with atomic_folder(folder, replace=folder.exists()) as tmp:
        write_tiny_package(tmp, variant=variant, seed=0, memory_mode=memory_mode)
    return folder
