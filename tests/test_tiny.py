"""The tiny-random package: official layout, loadable by the real loaders, faithful round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.models.loading import build_transformer, load_transformer, tiny_transformer_config
from engine.models.tiny import VOCAB_FILE, tiny_tokenizer, wake_seed, wake_zero_init, write_tiny_package

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dict_tiny.json"
VARIANTS = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packages(tiny_packages):
    return tiny_packages


def test_layout_is_the_official_one(packages):
    pkg = packages["worldstereo-memory-dmd"]
    cfg = json.loads((pkg / "config.json").read_text())
    assert cfg["base_model"] == "base_model" and "controlnet_cfg" in cfg
    assert (pkg / "model.safetensors").is_file()
    index = json.loads((pkg / "base_model" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    for sub, cls in (("transformer", "WanTransformer3DModel"), ("vae", "AutoencoderKLWan"),
                     ("text_encoder", "UMT5EncoderModel"), ("image_encoder", "CLIPVisionModel"),
                     ("image_processor", "CLIPImageProcessor")):
        assert index[sub][1] == cls
        assert (pkg / "base_model" / sub).is_dir()
    assert (pkg / "base_model" / "tokenizer" / "tokenizer_config.json").is_file()


def test_diffusers_loads_the_base_model_as_a_wan_i2v_pipeline(packages):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(packages["worldstereo-memory"] / "base_model"))
    _, base_cfg = tiny_transformer_config("worldstereo-memory")
    assert pipe.transformer.config.image_dim == base_cfg["image_dim"]
    assert pipe.text_encoder.config.d_model == base_cfg["text_dim"]
    assert pipe.image_encoder.config.hidden_size == base_cfg["image_dim"]
    assert pipe.vae.config.z_dim == 16
    assert pipe.tokenizer.pad_token_id == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_the_checkpoint_loader(packages, variant):
    """The loader's model is the package's model: the file's tensors where it holds them, the base model's
    (read by diffusers' own loader from its shards) elsewhere; a fresh build of the same seed agrees on the file."""
    from diffusers import WanTransformer3DModel

    pkg = packages[variant]
    loaded = load_transformer(pkg, device="cpu", dtype=torch.float32).state_dict()
    held = load_file(str(pkg / "model.safetensors"))
    base = WanTransformer3DModel.from_pretrained(str(pkg / "base_model"), subfolder="transformer").state_dict()
    cfg, base_cfg = tiny_transformer_config(variant)
    model = build_transformer(cfg, base_cfg, seed=0)
    assert wake_zero_init(model, torch.Generator().manual_seed(wake_seed(variant, 0))) > 0  # as the package's
    fresh = model.state_dict()
    assert loaded.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(loaded[k], held[k] if k in held else base[k]), k
    for k in held:
        assert torch.equal(held[k], fresh[k]), k  # the file is the seeded model's
    assert len(list((pkg / "base_model" / "transformer").glob("*.safetensors"))) >= 3  # diffusers' shards


@pytest.mark.parametrize("variant", ["worldstereo-camera", "worldstereo-memory"])
def test_package_weights_have_the_official_keys_and_shapes(packages, variant):
    """The loaded model has exactly the official state dict; the file holds the released kind of subset: every key
    the base model lacks and, of the backbone, every block's self-attention (and feed-forward for memory)."""
    official = {k: list(v) for k, v in json.loads(REFERENCE.read_text())["state_dict"][variant].items()}
    # The official tiny build has mask_downsample 4, the released configs (and the package) 1: the mask
    # embedding's first conv has a temporal kernel of 1 instead of 4, every other key and shape is the same.
    first_conv = "controlnet.controlnet_mask_embedding.mask_proj.0.weight"
    assert official[first_conv][2] == 4
    official[first_conv][2] = 1
    loaded = load_transformer(packages[variant], device="cpu").state_dict()
    assert {k: list(v.shape) for k, v in loaded.items()} == official
    written = load_file(str(packages[variant] / "model.safetensors"))
    parts = {"worldstereo-camera": ("attn1",), "worldstereo-memory": ("attn1", "ffn")}[variant]
    backbone = {k for k in official if k.startswith(("blocks.", "patch_embedding", "condition_embedder", "proj_out",
                                                     "scale_shift_table", "norm_out"))}
    want = {k for k in official if k not in backbone or k.split(".")[2:3] and k.split(".")[2] in parts}
    assert set(written) == want
    assert {k: list(v.shape) for k, v in written.items()} == {k: official[k] for k in want}


def test_the_package_has_no_zero_initialised_layer_left(packages):
    """What the release initialises to zero (camera branch outputs, mask embedding's last conv, camera-code network's
    last Linear) is random in the package, so both control branches reach every tiny clip."""
    written = load_file(str(packages["worldstereo-memory-dmd"] / "model.safetensors"))
    for name in ("controlnet.proj_out.0.weight", "controlnet.proj_out.1.bias",
                 "controlnet.controlnet_mask_embedding.mask_zero_proj.weight", "camera_embedding.4.weight"):
        assert written[name].abs().min() > 0 or written[name].std() > 0.01, name
    assert not [k for k, v in written.items() if v.is_floating_point() and not v.any()]
    # each variant's own: a switch that kept one variant's camera branch would change the clip
    other = load_file(str(packages["worldstereo-memory"] / "model.safetensors"))
    assert not torch.equal(other["controlnet.proj_out.0.weight"], written["controlnet.proj_out.0.weight"])


def test_seed_controls_the_weights(tmp_path, packages):
    # (seed 0 reproducing itself is the round-trip test above)
    other = load_file(str(write_tiny_package(tmp_path / "b", "worldstereo-camera", seed=1) / "model.safetensors"))
    first = load_file(str(packages["worldstereo-camera"] / "model.safetensors"))
    assert first.keys() == other.keys()
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_tokenizer_is_package_local_and_t5_shaped(packages):
    from transformers import AutoTokenizer

    assert VOCAB_FILE.stat().st_size < 100_000
    saved = AutoTokenizer.from_pretrained(str(packages["worldstereo-memory"] / "base_model" / "tokenizer"))
    built = tiny_tokenizer()
    text = "a wooden bridge over the river at sunset"
    ids = saved(text).input_ids
    assert ids == built(text).input_ids
    assert ids[-1] == saved.eos_token_id == 1 and saved.pad_token_id == 0 and saved.unk_token_id == 2
    assert saved.decode(ids, skip_special_tokens=True) == text
    padded = saved([text], padding="max_length", max_length=512, truncation=True)
    assert len(padded.input_ids[0]) == 512 and sum(padded.attention_mask[0]) == len(ids)


def test_cache_is_keyed_on_the_checkpoint_layout(tmp_path, monkeypatch):
    import engine.models.loading as loading
    import engine.models.tiny as tiny

    key = tiny.tiny_package_key("worldstereo-memory-dmd")
    assert key == tiny.tiny_package_key("worldstereo-memory-dmd")  # stable
    assert key != tiny.tiny_package_key("worldstereo-camera")
    monkeypatch.setitem(loading._TINY_CONTROLNET, "num_layers", 3)  # another layout: another key
    assert tiny.tiny_package_key("worldstereo-memory-dmd") != key
    monkeypatch.undo()
    monkeypatch.setattr(tiny, "TINY_PACKAGE_FORMAT", tiny.TINY_PACKAGE_FORMAT + 1)
    assert tiny.tiny_package_key("worldstereo-memory-dmd") != key
    monkeypatch.undo()
    # a package left by an older model (no key in its name) is never reused
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path))
    stale = tmp_path / "tiny-random-worldstereo-memory-dmd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"stale")
    folder = tiny.cached_tiny_package("worldstereo-memory-dmd")
    assert folder.name == f"tiny-random-worldstereo-memory-dmd-{key}"
    assert load_transformer(folder).ws_config.variant == "worldstereo-memory-dmd"
    assert tiny.cached_tiny_package("worldstereo-memory-dmd") == folder  # and then reused
