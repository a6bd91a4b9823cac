"""WorldStereoTransformer at the tiny official configuration: key contract, forward, branch behaviour."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

from engine.models.branches import token_positions
from engine.models.config import WorldStereoConfig
from engine.models.loading import build_transformer, tiny_transformer_config
from engine.models.transformer import WorldStereoTransformer, backbone_init_kwargs
from engine.runtime import spec
from tiny_model import forward_inputs, wake_zero_layers

OFFICIAL = "reference/official_state_dict_tiny.json"
B, F, H, W = 1, 3, 16, 16  # latent size; pixel size is 8x
F_PIX = (F - 1) * 4 + 1  # video frames of a config with mask_downsample 4 (the tiny config has 1: F frames)


@pytest.fixture(scope="module")
def official(examples):
    return json.loads((examples.parent / OFFICIAL).read_text())


def _inputs(seed=0, refs=0):
    return forward_inputs(B, F, H, W, list(range(refs)) if refs else None, seed=seed, pointmaps=True)


@pytest.fixture(scope="module")
def memory_model():
    cfg, base = tiny_transformer_config("worldstereo-memory")
    return build_transformer(cfg, base, seed=0)


@pytest.mark.parametrize("variant", ["worldstereo-camera", "worldstereo-memory"])
def test_state_dict_matches_official_keys_and_shapes(official, variant):
    cfg, base = tiny_transformer_config(variant)
    assert {k: base[k] for k in official["base_transformer_config"]} == official["base_transformer_config"]
    expected_cn = dict(official["controlnet_cfg"])
    if variant == "worldstereo-camera":  # the camera checkpoint has neither memory embedding
        expected_cn.update(ref_embedding=False, main_camera_embedding=False)
    # the tiny config differs from the official tiny build in mask_downsample alone: 1, the released configs' value
    assert cfg.controlnet_cfg.to_dict() == {**expected_cn, "mask_downsample": 1}
    cfg.controlnet_cfg.mask_downsample = expected_cn["mask_downsample"]
    model = build_transformer(cfg, base)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = official["state_dict"][variant]
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want} == want


def test_dmd_variant_has_memory_layout(official):
    cfg, base = tiny_transformer_config("worldstereo-memory-dmd")
    cfg.controlnet_cfg.mask_downsample = official["controlnet_cfg"]["mask_downsample"]  # the official tiny build's
    got = {k: list(v.shape) for k, v in build_transformer(cfg, base).state_dict().items()}
    assert got == official["state_dict"]["worldstereo-memory"]
    assert cfg.dmd_steps == 4


def test_rope_reproduces_diffusers_grid_and_reads_any_position(memory_model):
    x = torch.zeros(1, 36, F, H, W)
    c = memory_model.config
    cos, sin = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)(x)  # diffusers' own
    cos2, sin2 = memory_model.rope(x)
    cos3, sin3 = memory_model.rope.at(*token_positions(torch.arange(F), H // 2, W // 2))
    assert torch.equal(cos, cos2) and torch.equal(sin, sin2) and torch.equal(cos, cos3) and torch.equal(sin, sin3)
    # the right half of a 2W canvas at frame 2 is that canvas's rotary, as the official references take it
    wide, _ = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len)(torch.zeros(1, 36, F, H, 2 * W))
    wide = wide.view(F, H // 2, W, -1)[2, :, W // 2:].reshape(1, -1, 1, wide.shape[-1])
    right, _ = memory_model.rope.at(*token_positions(torch.tensor([2]), H // 2, W // 2, w_offset=W // 2))
    assert torch.equal(right, wide)


@pytest.mark.parametrize("refs", [0, 2])
def test_forward_shape(memory_model, refs):
    with torch.no_grad():
        out = memory_model(**_inputs(refs=refs))
    assert out.shape == (B, 16, F, H, W)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["worldstereo-camera", "worldstereo-memory"])
def test_zero_init_branches_leave_backbone_output(variant):
    cfg, base = tiny_transformer_config(variant)
    model = build_transformer(cfg, base, seed=3)
    plain = WanTransformer3DModel(**backbone_init_kwargs(base)).eval()
    plain.load_state_dict(model.backbone_state_dict(), strict=True)
    kw = _inputs(seed=4)
    with torch.no_grad():
        ours = model(**kw)
        ref = plain(hidden_states=kw["hidden_states"], timestep=kw["timestep"],
                    encoder_hidden_states=kw["encoder_hidden_states"],
                    encoder_hidden_states_image=kw["encoder_hidden_states_image"], return_dict=False)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # ... and the same model without any branch input is the backbone too
    with torch.no_grad():
        bare = model(hidden_states=kw["hidden_states"], timestep=kw["timestep"],
                     encoder_hidden_states=kw["encoder_hidden_states"],
                     encoder_hidden_states_image=kw["encoder_hidden_states_image"])
    torch.testing.assert_close(bare, ref, rtol=0, atol=1e-5)


def test_branches_act_once_zero_layers_are_perturbed():
    cfg, base = tiny_transformer_config("worldstereo-memory")
    model = wake_zero_layers(build_transformer(cfg, base, seed=5), seed=1, scale=0.2)
    kw = _inputs(seed=6, refs=2)
    with torch.no_grad():
        out = model(**kw)
        other_ref = model(**{**kw, "reference_latent": kw["reference_latent"].flip(-1)})
        other_render = model(**{**kw, "render_latent": torch.zeros_like(kw["render_latent"])})
        other_qt = model(**{**kw, "camera_qt_ref": kw["camera_qt_ref"] + 1})
        no_refs = model(**{k: v for k, v in kw.items() if k not in ("reference_latent", "ref_index", "camera_qt_ref")})
    for changed in (other_ref, other_render, other_qt, no_refs):
        assert (changed - out).abs().max() > 1e-4


def test_stitched_references_bound_by_position_not_order():
    """Reordering the references together with their ref_index is the same set of tokens at the same rotary
    positions, so the output must not change; moving a reference to another frame must change it."""
    cfg, base = tiny_transformer_config("worldstereo-memory")
    model = wake_zero_layers(build_transformer(cfg, base, seed=7), seed=1, scale=0.2)
    kw = _inputs(seed=8, refs=2)
    perm = torch.tensor([1, 0])
    swapped = {**kw, "reference_latent": kw["reference_latent"][:, :, perm], "ref_index": kw["ref_index"][perm],
               "camera_qt_ref": kw["camera_qt_ref"][:, perm]}
    moved = {**kw, "ref_index": torch.tensor([1, 1])}
    with torch.no_grad():
        out, out_swapped, out_moved = model(**kw), model(**swapped), model(**moved)
    torch.testing.assert_close(out_swapped, out, rtol=0, atol=2e-5)
    assert (out_moved - out).abs().max() > 1e-4


def test_branch_mode_attention_stays_inside_each_pair():
    cfg, base = tiny_transformer_config("worldstereo-memory", memory_mode="branch")
    model = wake_zero_layers(build_transformer(cfg, base, seed=9), seed=1, scale=0.2)
    kw = _inputs(seed=10, refs=2)  # reference r serves latent frame r+1
    with torch.no_grad():
        temb = model.condition_embedder(kw["timestep"], kw["encoder_hidden_states"])[0]

        def residuals(ref):
            return model.memory_branch_residuals(hidden_states=kw["hidden_states"], reference_latent=ref,
                                                 ref_index=torch.arange(2).unsqueeze(0), temb=temb,
                                                 pointmap_latent=kw["pointmap_latent"],
                                                 ref_pointmap_latent=kw["ref_pointmap_latent"])

        base_res = residuals(kw["reference_latent"])
        ref2 = kw["reference_latent"].clone()
        ref2[:, :, 1] += torch.randn(ref2[:, :, 1].shape, generator=torch.Generator().manual_seed(0))
        new_res = residuals(ref2)
        out, out2 = model(**kw), model(**{**kw, "reference_latent": ref2})
    per = (H // 2) * (W // 2)
    for a, b in zip(base_res, new_res):
        a, b = a.view(B, F, per, -1), b.view(B, F, per, -1)
        assert not a[:, 0].any()  # the input frame has no reference
        assert torch.equal(a[:, :2], b[:, :2])  # frames 0 and 1 untouched by reference 1
        assert (a[:, 2] - b[:, 2]).abs().max() > 1e-4  # frame 2, the one it serves, changes
    assert (out2 - out).abs().max() > 1e-4


def test_mask_embedding_front_padding_is_causal_in_time():
    """The temporal conv (before GroupNorm couples frames) must give latent frame 0 only pixel frame 0, and pixel
    frames 1..4 to latent frame 1: what zero-padding 3 frames at the front with kernel = stride = 4 means."""
    cfg, base = tiny_transformer_config("worldstereo-camera")
    cfg.controlnet_cfg.mask_downsample = 4  # the release's default; its released configs say 1
    emb = build_transformer(cfg, base, seed=11).controlnet.controlnet_mask_embedding
    seen = []
    hook = emb.mask_proj[0].register_forward_hook(lambda m, i, o: seen.append(o))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 7, F_PIX, 16, 16, generator=g)
    y = x.clone()
    y[:, :, 1] += 1.0
    with torch.no_grad():
        emb(x), emb(y)
    hook.remove()
    a, b = seen
    assert a.shape[2] == F
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-4
    assert torch.equal(a[:, :, 2], b[:, :, 2])


def test_attention_processors_reach_the_branches(memory_model):
    names = list(memory_model.attn_processors)
    assert any(n.startswith("controlnet.controlnet_blocks.0.self_attn") for n in names)
    assert any(n.startswith("blocks.0.attn1") for n in names)


def test_bad_mask_frames_are_a_clear_error(memory_model):
    kw = _inputs()
    kw["render_mask"] = kw["render_mask"][:, :, :2]
    kw["camera_embedding"] = kw["camera_embedding"][:, :, :2]
    with pytest.raises(ValueError, match="2 frames; with 3 latent frames and mask_downsample 1 they need 3"):
        memory_model(**kw)


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    d = {"base_model": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "latent_cond_mode": "full_vae",
         "negative_prompt": "blurry", "freeze_backbone": True, "nframe": 21,
         "scale_map": {"0.625": [480, 768]}, "gen_shift": 3.0, "dmd_steps": 4, "dmd_start_steps": 250,
         "dmd_end_steps": 1000, "some_future_key": [1, 2],
         "controlnet_cfg": {"dim": 1024, "ffn_dim": 4096, "num_heads": 8, "time_embed_dim": 5120, "num_layers": 4,
                            "conv_out_dim": 5120, "add_channels": 7, "mid_channels": 64, "mask_downsample": 4,
                            "interp": False, "update_ref": True, "ref_embedding": True,
                            "main_camera_embedding": True, "camera_embedding_dim": 7, "new_branch_key": "x"}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = WorldStereoConfig.from_json(tmp_path / "config.json")
    assert cfg.controlnet_cfg.update_ref is True and cfg.memory_mode == "stitched"
    back = json.loads(cfg.to_json())
    assert back.pop("memory_mode") == "stitched"
    assert back == d


def test_forward_and_constructor_signatures_are_the_declared_ones():
    forward = list(inspect.signature(WorldStereoTransformer.forward).parameters)[1:]
    assert tuple(forward) == spec.FORWARD_INPUTS
    init = list(inspect.signature(WorldStereoTransformer.__init__).parameters)[1:]
    wan = list(inspect.signature(WanTransformer3DModel.__init__).parameters)[1:]
    assert init == wan + ["worldstereo"]  # the diffusers config: the backbone's arguments plus the checkpoint config


@pytest.mark.parametrize("variant", ["worldstereo-camera", "worldstereo-memory"])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, variant):
    cfg, base = tiny_transformer_config(variant)
    model = wake_zero_layers(build_transformer(cfg, base, seed=12), seed=1, scale=0.2)
    model.save_pretrained(tmp_path)
    loaded = WorldStereoTransformer.from_pretrained(tmp_path).eval()
    assert loaded.ws_config.to_dict() == model.ws_config.to_dict()
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    kw = _inputs(seed=13, refs=2 if variant != "worldstereo-camera" else 0)
    with torch.no_grad():  # bit-identical weights; summation order may differ with memory alignment
        torch.testing.assert_close(loaded(**kw), model(**kw), rtol=0, atol=1e-5)


def test_a_constructor_without_the_checkpoint_config_is_refused_in_one_sentence():
    with pytest.raises(ValueError, match="checkpoint config"):
        WorldStereoTransformer(num_layers=1, num_attention_heads=2, attention_head_dim=16)


def test_mask_tokens_computed_once_give_the_same_output(memory_model):
    kw = _inputs(seed=14, refs=2)
    calls = []
    hook = memory_model.controlnet.controlnet_mask_embedding.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        each_step = [memory_model(**kw) for _ in range(3)]
        n_each = len(calls)
        tokens = memory_model.encode_mask_and_rays(kw["render_mask"], kw["camera_embedding"], F)
        cached_kw = {k: v for k, v in kw.items() if k not in ("render_mask", "camera_embedding")}
        cached = [memory_model(**cached_kw, mask_tokens=tokens) for _ in range(3)]
    hook.remove()
    assert n_each == 3 and len(calls) == 4  # one evaluation for the clip instead of one per step
    for a, b in zip(each_step, cached):
        assert torch.equal(a, b)
    # a batch-1 token set serves the doubled CFG batch
    kw2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (B,) and k != "ref_index" else v)
           for k, v in cached_kw.items()}
    with torch.no_grad():
        doubled = memory_model(**kw2, mask_tokens=tokens)
    torch.testing.assert_close(doubled[:1], cached[0], rtol=0, atol=1e-6)


def test_interp_pads_three_frames_on_both_ends():
    cfg, base = tiny_transformer_config("worldstereo-camera")
    cfg.controlnet_cfg.interp, cfg.controlnet_cfg.mask_downsample = True, 4
    model = build_transformer(cfg, base, seed=15)
    emb = model.controlnet.controlnet_mask_embedding
    assert emb.time_padding == (3, 3) and emb.video_frames(F) == 4 * F - 6
    g = torch.Generator().manual_seed(2)
    tokens = model.encode_mask_and_rays(torch.rand(1, 1, 4 * F - 6, 8 * H, 8 * W, generator=g),
                                        torch.randn(1, 6, 4 * F - 6, 8 * H, 8 * W, generator=g), F)
    assert tokens.shape == (1, F * (H // 2) * (W // 2), 32)
    with pytest.raises(ValueError, match="frames"):
        model.encode_mask_and_rays(torch.rand(1, 1, F_PIX, 8 * H, 8 * W), torch.randn(1, 6, F_PIX, 8 * H, 8 * W), F)
