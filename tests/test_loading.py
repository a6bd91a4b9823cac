"""Checkpoint IO: save -> load round trip, strict key checking, clear errors without network."""
from __future__ import annotations

import json
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

VARIANT = "worldstereo-memory"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint laid out like the hub repo: <root>/<variant>/{config.json, model.safetensors}."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg, base = tiny_transformer_config(VARIANT)
    model = build_transformer(cfg, base, seed=21)
    save_checkpoint(model, cfg, root / VARIANT, base_transformer_config=base)
    return root, model, cfg


def _copy_with(tmp_path, saved, edit):
    root, _, _ = saved
    folder = tmp_path / VARIANT
    folder.mkdir()
    (folder / "config.json").write_text((root / VARIANT / "config.json").read_text())
    base_dir = folder / "base_model" / "transformer"
    base_dir.mkdir(parents=True)
    (base_dir / "config.json").write_text((root / VARIANT / "base_model" / "transformer" / "config.json").read_text())
    state = load_file(str(root / VARIANT / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_saved_folder_has_official_layout(saved):
    root, _, cfg = saved
    folder = root / VARIANT
    assert (folder / "model.safetensors").is_file()
    written = json.loads((folder / "config.json").read_text())
    assert written["base_model"] == cfg.base_model
    assert written["controlnet_cfg"]["camera_embedding_dim"] == 7


def test_round_trip_is_exact(saved):
    root, model, _ = saved
    loaded = load_transformer(root, variant=VARIANT)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # rotary tables are rebuilt, not stored: the loaded model must compute the same function
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 36, 2, 16, 16, generator=g), timestep=torch.tensor([300.0]),
              encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    with torch.no_grad():
        # (weights are bit-identical; summation order may differ with memory alignment)
        torch.testing.assert_close(loaded(**kw), model(**kw), rtol=0, atol=1e-5)


def test_variant_folder_itself_loads_and_progress_reports(saved):
    root, model, _ = saved
    seen = []
    loaded = load_transformer(root / VARIANT, progress=lambda f, m: seen.append(f))
    assert loaded.ws_config.variant == VARIANT
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_half_precision_keeps_float32_modules(saved):
    root, _, _ = saved
    loaded = load_transformer(root, variant=VARIANT, dtype=torch.bfloat16)
    params = dict(loaded.named_parameters())
    assert params["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert params["scale_shift_table"].dtype == torch.float32
    assert params["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32


def test_extra_key_is_refused_then_accepted_leniently(tmp_path, saved):
    folder = _copy_with(tmp_path, saved, lambda sd: sd.__setitem__("controlnet.stray.weight", torch.zeros(3)))
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected key\(s\) \[controlnet.stray.weight\]"):
        load_transformer(folder)
    with pytest.warns(UserWarning, match="unexpected"):
        model = load_transformer(folder, lenient=True)
    _, ref, _ = saved
    assert torch.equal(model.state_dict()["blocks.0.attn1.to_q.weight"], ref.state_dict()["blocks.0.attn1.to_q.weight"])


def test_missing_key_is_refused_then_accepted_leniently(tmp_path, saved):
    folder = _copy_with(tmp_path, saved, lambda sd: sd.pop("ref_index_embedding.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\) \[ref_index_embedding.weight\]"):
        load_transformer(folder)
    with pytest.warns(UserWarning, match="missing"):
        model = load_transformer(folder, lenient=True)
    assert model.ref_index_embedding.weight.shape == (21, 32)
    assert model.ref_index_embedding.weight.device.type == "cpu"


def test_wrong_shape_is_refused(tmp_path, saved):
    folder = _copy_with(tmp_path, saved, lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(7)))
    with pytest.raises(CheckpointMismatchError, match="different shape"):
        load_transformer(folder)


@pytest.mark.parametrize("where", ["nobody-here/no-such-repo", "/nonexistent/worldstereo/weights"])
def test_missing_checkpoint_offline_is_one_quick_sentence(where):
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        load_transformer(where, variant=VARIANT)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg
    assert ("hf download" in msg) or ("does not exist" in msg)


def test_missing_weights_file_says_what_is_missing(tmp_path, saved):
    root, _, _ = saved
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "config.json").write_text((root / VARIANT / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        load_transformer(folder)


def test_repo_id_resolves_through_the_hub_cache_offline(tmp_path, saved, monkeypatch):
    """The standard cache layout (models--owner--name/refs/main -> snapshots/<commit>/<variant>/...) is found with
    HF_HUB_OFFLINE=1, as after `hf download hanshanxue/WorldStereo --include 'worldstereo-memory/*'`."""
    from huggingface_hub import constants

    root, model, _ = saved
    commit = "0" * 40
    repo_dir = tmp_path / "hub" / "models--hanshanxue--WorldStereo"
    snap = repo_dir / "snapshots" / commit / VARIANT
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((root / VARIANT / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # base_model is relative ("base_model"): give it beside the variant folder in the snapshot
    base = snap.parent / "base_model" / "transformer"
    base.mkdir(parents=True)
    (base / "config.json").write_text((root / VARIANT / "base_model" / "transformer" / "config.json").read_text())
    loaded = load_transformer("hanshanxue/WorldStereo", variant=VARIANT)
    assert torch.equal(loaded.state_dict()["controlnet.proj_out.0.weight"], model.state_dict()["controlnet.proj_out.0.weight"])


def test_bfloat16_load_runs_and_tracks_float32(saved):
    """Half precision with float32 norms/time embedding: same function as the float32 model up to bf16 rounding."""
    from tests.test_model import _inputs

    root, model, _ = saved
    half = load_transformer(root, variant=VARIANT, dtype=torch.bfloat16)
    kw = _inputs(seed=2, refs=2)
    kw_half = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v)
               for k, v in kw.items()}
    with torch.no_grad():
        want, got = model(**kw), half(**kw_half)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
