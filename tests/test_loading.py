"""Checkpoint loading as the release does it: the base model's sharded transformer with model.safetensors over it.

The reference for every comparison is independent of the loader: the composite state dict made of safetensors'
own `load_file` of the checkpoint and diffusers' own `WanTransformer3DModel.from_pretrained` of the sharded base.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.loading import (
    CheckpointMismatchError,
    WeightsNotFoundError,
    build_transformer,
    load_transformer,
    save_checkpoint,
    tiny_transformer_config,
)
from engine.models.tiny import write_tiny_weights
from engine.models.transformer import WorldStereoTransformer
from conftest import SafetensorsReads, released_in_hub_cache
from tiny_model import forward_inputs

CAMERA, MEMORY, DMD = "worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The hub's layout at a tiny size: one folder per variant, the base model they share beside them, its
    transformer written by diffusers' save_pretrained in several shards."""
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def composite(root, variant) -> dict:
    """The release's model, built without the loader: the base's tensors, the file's over them."""
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(str(root / "base_model"), subfolder="transformer").state_dict()
    return {**base, **load_file(str(root / variant / "model.safetensors"))}


def _inputs(seed=0, refs=0):
    return forward_inputs(1, 3, 2, 2, list(range(refs)) if refs else None, seed=seed)


def _copy(released, tmp_path, variant, edit=None):
    """A copy of one variant (with the shared base beside it) whose file ``edit`` changes."""
    root = tmp_path / "weights"
    (root / variant).mkdir(parents=True)
    shutil.copytree(released / "base_model", root / "base_model")
    shutil.copy(released / variant / "config.json", root / variant / "config.json")
    state = load_file(str(released / variant / "model.safetensors"))
    if edit is not None:
        edit(state)
    save_file(state, str(root / variant / "model.safetensors"))
    return root


# ---------------------------------------------------------------------------------------------- the composite
def test_the_base_is_sharded_by_diffusers(released):
    folder = released / "base_model" / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards


@pytest.mark.parametrize("variant", [CAMERA, MEMORY])
def test_partial_checkpoint_loads_the_composite(released, variant):
    held = load_file(str(released / variant / "model.safetensors"))
    want = composite(released, variant)
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(str(released / "base_model"), subfolder="transformer").state_dict()
    # the file holds branch, memory modules and part of the backbone only; the base holds other values there
    assert any(k.startswith("controlnet.") for k in held) and "blocks.0.attn2.to_q.weight" not in held
    overlap = [k for k in held if k in base]
    assert overlap and all(k.split(".")[2] in ("attn1", "ffn") for k in overlap)
    # a fine-tune: the base's values differ there (norm scales both start at one)
    assert sum(not torch.equal(held[k], base[k]) for k in overlap) > 0.6 * len(overlap)

    loaded = load_transformer(released, variant=variant)
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # a base tensor the file also holds did not survive
    reference = WorldStereoTransformer.from_checkpoint_config(loaded.ws_config, json.loads(
        (released / "base_model" / "transformer" / "config.json").read_text()))
    reference.load_state_dict(want)
    kw = _inputs(seed=3, refs=2 if variant == MEMORY else 0)
    if variant == CAMERA:
        kw = {k: v for k, v in kw.items() if k not in ("reference_latent", "ref_index", "camera_qt", "camera_qt_ref")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw), reference.eval()(**kw), rtol=0, atol=1e-6)


def test_no_base_tensor_the_file_holds_survives(released, tmp_path):
    """Every backbone tensor of the file given a value the base has nowhere: the loaded model has the file's."""
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel.from_pretrained(str(released / "base_model"), subfolder="transformer").state_dict()
    root = _copy(released, tmp_path, MEMORY, lambda sd: sd.update({k: base[k] + 1.0 for k in sd if k in base}))
    held = load_file(str(root / MEMORY / "model.safetensors"))
    got = load_transformer(root, variant=MEMORY).state_dict()
    overlap = [k for k in held if k in base]
    assert len(overlap) > 20
    for k in overlap:
        assert torch.equal(got[k], held[k]) and not torch.equal(got[k], base[k]), k
    for k in set(base) - set(held):
        assert torch.equal(got[k], base[k]), k


def test_the_split_is_announced_once(released):
    lines = []
    load_transformer(released, variant=CAMERA, announce=lines.append)
    held = load_file(str(released / CAMERA / "model.safetensors"))
    total = len(composite(released, CAMERA))
    assert len(lines) == 1
    line = lines[0]
    assert f"{len(held)} tensors" in line and f"{total - len(held)} tensors" in line and "none missing" in line
    assert "from the base model's transformer/" in line


def test_a_complete_file_reads_no_base_shard(released, tmp_path, monkeypatch):
    """The DMD file is the whole model: its base's shards are never opened — here they are not even valid."""
    root = _copy(released, tmp_path, DMD)
    for shard in (root / "base_model" / "transformer").glob("*.safetensors"):
        shard.write_bytes(b"not a safetensors file")
    opens = SafetensorsReads(monkeypatch)
    lines = []
    loaded = load_transformer(root, variant=DMD, announce=lines.append)
    assert {p.split("/")[-1] for p in opens.files} == {"model.safetensors"}
    want = load_file(str(root / DMD / "model.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert "none from the base model" in lines[0]
    # a partial file over the same broken base is refused in one sentence
    _copy(released, tmp_path / "camera", CAMERA)
    camera = tmp_path / "camera" / "weights"
    for shard in (camera / "base_model" / "transformer").glob("*.safetensors"):
        shard.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsNotFoundError, match="cannot be read as a safetensors file"):
        load_transformer(camera, variant=CAMERA)


def test_one_file_is_mapped_at_a_time_and_each_tensor_read_once(released, monkeypatch):
    opens = SafetensorsReads(monkeypatch)
    loaded = load_transformer(released, variant=MEMORY)
    assert sorted(opens.keys) == sorted(loaded.state_dict())  # every tensor once: none read twice
    assert opens.most_open == 1  # never two files mapped together (headers and reads alike)
    shards = {p.name for p in (released / "base_model" / "transformer").glob("*.safetensors")}
    assert {p.split("/")[-1] for p in opens.files} == shards | {"model.safetensors"}


# ---------------------------------------------------------------------------------------------- refusals
def _refused(root, variant, monkeypatch) -> str:
    opens = SafetensorsReads(monkeypatch)
    with pytest.raises(CheckpointMismatchError) as info:
        load_transformer(root, variant=variant)
    assert opens.keys == []  # refused from the headers, before any tensor is read
    msg = str(info.value)
    assert msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg
    return msg


def test_keys_neither_source_holds_are_refused(released, tmp_path, monkeypatch):
    gone = [k for k in load_file(str(released / CAMERA / "model.safetensors")) if k.startswith("controlnet.")][:6]
    root = _copy(released, tmp_path, CAMERA, lambda sd: [sd.pop(k) for k in gone])
    msg = _refused(root, CAMERA, monkeypatch)
    listed = msg.split("6 key(s) that neither the checkpoint nor the base model holds (", 1)[1].split(")")[0]
    named, more = listed.split(" and ")
    assert set(named.split(", ")) < set(gone) and len(named.split(", ")) == 4 and more == "2 more"


def test_checkpoint_keys_the_model_lacks_are_refused(released, tmp_path, monkeypatch):
    root = _copy(released, tmp_path, CAMERA, lambda sd: sd.__setitem__("controlnet.stray.weight", torch.zeros(3)))
    msg = _refused(root, CAMERA, monkeypatch)
    assert "1 checkpoint key(s) the model does not have (controlnet.stray.weight)" in msg


def test_other_shapes_are_refused_in_the_file_and_in_the_base(released, tmp_path, monkeypatch):
    root = _copy(released, tmp_path, CAMERA, lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(7)))
    msg = _refused(root, CAMERA, monkeypatch)
    assert "1 key(s) of another shape (proj_out.bias [7] in model.safetensors, [64] in the model)" in msg
    # a base whose config says another feed-forward width than its shards hold
    root = _copy(released, tmp_path / "b", CAMERA)
    config = root / "base_model" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "ffn_dim": 48}))
    msg = _refused(root, CAMERA, monkeypatch)
    assert "key(s) of another shape (blocks.0.ffn.net.0.proj.weight [64, 32] in the base model, [48, 32] in the model" \
        in msg


def test_missing_key_is_accepted_leniently_with_a_warning(released, tmp_path):
    root = _copy(released, tmp_path, MEMORY, lambda sd: sd.pop("ref_index_embedding.weight"))
    with pytest.warns(UserWarning, match="neither the checkpoint nor the base model holds"):
        model = load_transformer(root, variant=MEMORY, lenient=True)
    assert model.ref_index_embedding.weight.shape == (21, 32) and model.ref_index_embedding.weight.device.type == "cpu"
    want = composite(released, MEMORY)
    assert torch.equal(model.state_dict()["blocks.1.attn1.to_q.weight"], want["blocks.1.attn1.to_q.weight"])


# ---------------------------------------------------------------------------------------------- dtypes
def test_half_precision_keeps_float32_modules_and_rounds_the_composite(released):
    loaded = load_transformer(released, variant=MEMORY, dtype=torch.bfloat16)
    params = dict(loaded.named_parameters())
    assert params["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert params["scale_shift_table"].dtype == torch.float32
    assert params["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    want = composite(released, MEMORY)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k].to(v.dtype)), k


def test_default_dtype_is_the_checkpoints(released, tmp_path):
    """A bf16 file over a float32 base (as released) loads in bf16."""
    root = _copy(released, tmp_path, CAMERA, lambda sd: sd.update({k: v.bfloat16() for k, v in sd.items()}))
    loaded = load_transformer(root, variant=CAMERA)
    assert dict(loaded.named_parameters())["blocks.0.attn2.to_q.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- finding the files
@pytest.mark.parametrize("name", ["Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"])
def test_base_model_named_by_hub_id_is_found_beside_the_variants(released, tmp_path, name):
    """config.json names the base by its hub id; `--weights DIR` holds it as DIR/<name> (`hf download --local-dir`)."""
    root = _copy(released, tmp_path, CAMERA)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "base_model").rename(root / name)
    config = root / CAMERA / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "base_model": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"}))
    loaded = load_transformer(root, variant=CAMERA)
    want = composite(released, CAMERA)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_hub_ids_resolve_through_the_cache_offline(released, tmp_path, monkeypatch):
    """After `hf download hanshanxue/WorldStereo --include 'worldstereo-camera/*'` and `hf download <base>`: the
    checkpoint and its base (a hub id in config.json) come from the standard cache layout with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    released_in_hub_cache(released, CAMERA, tmp_path / "hub", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_transformer("hanshanxue/WorldStereo", variant=CAMERA)
    want = composite(released, CAMERA)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("where", ["nobody-here/no-such-repo", "/nonexistent/worldstereo/weights"])
def test_missing_checkpoint_offline_is_one_quick_sentence(where):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        load_transformer(where, variant=MEMORY)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg
    assert ("hf download" in msg) or ("does not exist" in msg)


def test_missing_weights_file_says_what_is_missing(tmp_path, released):
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text((released / MEMORY / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        load_transformer(folder)


def test_partial_file_without_base_weights_says_so(released, tmp_path):
    root = _copy(released, tmp_path, CAMERA)
    for p in (root / "base_model" / "transformer").glob("diffusion_pytorch_model*"):
        p.unlink()
    with pytest.raises(WeightsNotFoundError, match="holds no safetensors weights") as info:
        load_transformer(root, variant=CAMERA)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- complete files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A complete tiny checkpoint written by save_checkpoint (no base weights at all)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg, base = tiny_transformer_config(MEMORY)
    model = build_transformer(cfg, base, seed=21)
    save_checkpoint(model, cfg, root / MEMORY, base_transformer_config=base)
    return root, model


def test_complete_round_trip_is_exact_and_computes_the_same(saved):
    root, model = saved
    loaded = load_transformer(root / MEMORY, progress=lambda f, m: None)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    kw = _inputs(seed=2, refs=2)
    with torch.no_grad():  # rotary tables are rebuilt, not stored: the same function
        torch.testing.assert_close(loaded(**kw), model(**kw), rtol=0, atol=1e-5)


def test_progress_reports_in_order(saved):
    root, _ = saved
    seen = []
    loaded = load_transformer(root / MEMORY, progress=lambda f, m: seen.append(f))
    assert loaded.ws_config.variant == MEMORY
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_bfloat16_load_runs_and_tracks_float32(saved):
    """Half precision with float32 norms/time embedding: same function as the float32 model up to bf16 rounding."""
    root, model = saved
    half = load_transformer(root / MEMORY, dtype=torch.bfloat16)
    kw = _inputs(seed=2, refs=2)
    kw_half = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
               for k, v in kw.items()}
    with torch.no_grad():
        want, got = model(**kw), half(**kw_half)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.gpu
def test_partial_load_onto_the_gpu_is_the_rounded_composite(released):
    loaded = load_transformer(released, variant=MEMORY, device="cuda", dtype=torch.bfloat16)
    want = composite(released, MEMORY)
    for k, v in loaded.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), want[k].to(v.dtype)), k
