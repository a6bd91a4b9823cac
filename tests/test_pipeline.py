"""One clip end to end on tiny-random packages: what the transformer receives, and the encoders against
independent diffusers calls."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_clip_inputs
from engine.models.tiny import write_tiny_package
from engine.pipeline import ClipInputError, ClipPipeline, References
from engine.sampling import SamplingCancelled

VARIANTS = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")
F, H, W = 3, 64, 64
UNIPC_TEST_STEPS = 5  # the 40-step default is exercised by the sampler tests; a few steps keep this fast


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tiny_packages):
    return {v: ClipPipeline.from_pretrained(tiny_packages[v], device="cpu") for v in VARIANTS}


@pytest.fixture(scope="module")
def inputs():
    return tiny_clip_inputs(F, H, W)


def run(pipe, inputs, **kw):
    args, _ = inputs
    steps = None if pipe.is_distilled else UNIPC_TEST_STEPS
    return pipe(**args, prompt="a stone house", steps=steps, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_refs", [False, True])
def test_clip_runs_end_to_end(pipes, inputs, variant, with_refs):
    out = run(pipes[variant], inputs, references=inputs[1] if with_refs else None, seed=3)
    assert out.frames.shape == (F, 3, H, W) and out.frames.dtype == torch.float32
    assert torch.isfinite(out.frames).all() and out.frames.min() >= 0 and out.frames.max() <= 1
    assert out.latents.shape == (1, 16, F, H // 8, W // 8)
    # the frames are the VAE decoding of the returned latents
    assert torch.allclose(pipes[variant].components.decode_latents(out.latents), out.frames, atol=1e-5)


def test_fixed_seed_is_deterministic_and_seeds_differ(pipes, inputs):
    pipe = pipes["worldstereo-memory-dmd"]
    a = run(pipe, inputs, references=inputs[1], seed=7)
    b = run(pipe, inputs, references=inputs[1], seed=7)
    c = run(pipe, inputs, references=inputs[1], seed=8)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.latents, c.latents, atol=1e-3)


@pytest.mark.parametrize("variant", ["worldstereo-memory-dmd", "worldstereo-memory"])
def test_a_clip_from_given_latents_is_the_clip_of_the_generator_that_drew_them(pipes, inputs, variant):
    """``latents=`` as diffusers takes them: the noise drawn here, independently, with a generator, given to the
    pipeline, makes the clip that the same generator (or its seed) makes; other noise makes another clip, and noise
    of the wrong shape is refused."""
    pipe = pipes[variant]
    shape = (1, 16, F, H // 8, W // 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(21))
    given = run(pipe, inputs, references=inputs[1], latents=noise.clone())
    drawn = run(pipe, inputs, references=inputs[1], generator=torch.Generator().manual_seed(21))
    seeded = run(pipe, inputs, references=inputs[1], seed=21)
    assert torch.equal(given.frames, drawn.frames) and torch.equal(given.latents, drawn.latents)
    assert torch.equal(given.frames, seeded.frames)
    other_noise = torch.randn(shape, generator=torch.Generator().manual_seed(22))
    other = run(pipe, inputs, references=inputs[1], latents=other_noise)
    assert not torch.allclose(other.latents, given.latents, atol=1e-3)
    wrong = r"^latents must be \[1, 16, 3, 8, 8\] for this clip; got \[1, 16, 2, 8, 8\]\.$"
    with pytest.raises(ClipInputError, match=wrong):
        run(pipe, inputs, latents=noise[:, :, :2])


@pytest.mark.parametrize("part", ["controlnet.proj_out.1.weight",
                                  "controlnet.controlnet_mask_embedding.mask_zero_proj.weight",
                                  "camera_embedding.4.weight"])
def test_the_clip_changes_when_a_control_branch_weight_changes(pipes, inputs, part):
    """The tiny package's control paths are awake: changing one of their (in the release zero-initialised) output
    weights changes the clip itself, so a stale or wrong camera branch or camera-code network cannot go unseen."""
    pipe = pipes["worldstereo-memory-dmd"]
    before = run(pipe, inputs, references=inputs[1], seed=4)
    weight = pipe.transformer.get_parameter(part)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-1.0)
        after = run(pipe, inputs, references=inputs[1], seed=4)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert (after.latents - before.latents).abs().max() > 1e-2
    assert (after.frames - before.frames).abs().max() > 1 / 255  # visible in the 8-bit frames


def test_references_reach_the_memory_model_only(pipes, inputs):
    mem = pipes["worldstereo-memory-dmd"]
    assert not torch.allclose(run(mem, inputs, seed=1).latents, run(mem, inputs, references=inputs[1], seed=1).latents)
    cam = pipes["worldstereo-camera"]  # trained without memory: references are ignored
    assert torch.equal(run(cam, inputs, seed=1).latents, run(cam, inputs, references=inputs[1], seed=1).latents)


def _record_calls(pipe):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((kwargs["hidden_states"].shape, kwargs["timestep"].clone(),
                                                kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    return calls, handle


def test_dmd_runs_four_unguided_steps(pipes, inputs):
    pipe = pipes["worldstereo-memory-dmd"]
    calls, handle = _record_calls(pipe)
    try:
        run(pipe, inputs, guidance=5.0)
    finally:
        handle.remove()
    cfg = pipe.config
    assert len(calls) == cfg.dmd_steps == 4
    assert all(c[0][0] == 1 and c[0][1] == 36 for c in calls)
    s = cfg.gen_shift
    u = [(cfg.dmd_start_steps + (1000 - cfg.dmd_start_steps) * k / 3) / 1000 for k in (3, 2, 1, 0)]
    assert [float(c[1][0]) for c in calls] == pytest.approx([1000 * s * x / (1 + (s - 1) * x) for x in u], rel=1e-5)


def test_guided_variant_batches_cond_and_uncond(pipes, inputs):
    pipe = pipes["worldstereo-memory"]
    calls, handle = _record_calls(pipe)
    try:
        run(pipe, inputs, negative_prompt="blurry")
    finally:
        handle.remove()
    assert len(calls) == UNIPC_TEST_STEPS
    assert all(c[0][0] == 2 for c in calls)
    text = calls[0][2]
    comps = pipe.components
    assert torch.equal(text[0], comps.encode_prompt("a stone house")[0])
    assert torch.equal(text[1], comps.encode_prompt("blurry")[0])
    # guidance 1 is plain conditional sampling: one sample per forward
    calls, handle = _record_calls(pipe)
    try:
        run(pipe, inputs, guidance=1.0)
    finally:
        handle.remove()
    assert all(c[0][0] == 1 for c in calls)


def test_progress_and_cancel(pipes, inputs):
    pipe = pipes["worldstereo-memory-dmd"]
    seen = []
    run(pipe, inputs, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("denoising step" in m for _, m in seen) == 4
    with pytest.raises(SamplingCancelled):
        run(pipe, inputs, cancel=lambda: True)


@pytest.mark.parametrize("variant", ["worldstereo-memory-dmd", "worldstereo-camera"])
def test_mask_tokens_are_made_once_per_clip(tiny_packages, inputs, variant, monkeypatch):
    pipe = ClipPipeline.from_pretrained(tiny_packages[variant], device="cpu")  # the package's branches are awake
    calls = []
    pipe.transformer.controlnet.controlnet_mask_embedding.register_forward_hook(lambda *_: calls.append(1))
    steps = 4 if pipe.is_distilled else UNIPC_TEST_STEPS
    once = run(pipe, inputs, references=inputs[1], seed=5)
    assert len(calls) == 1
    # the model's own path: render mask and Plücker rays at every step, the tokens made inside each forward
    prepare = pipe.prepare_conditions

    def every_step(cond):
        out = prepare(cond)
        out.pop("mask_tokens")
        return {**out, "render_mask": cond.render_mask, "camera_embedding": cond.camera_embedding}

    monkeypatch.setattr(pipe, "prepare_conditions", every_step)
    monkeypatch.setattr(pipe, "mask_tokens", lambda cond: None)
    calls.clear()
    each = run(pipe, inputs, references=inputs[1], seed=5)
    assert len(calls) == steps
    torch.testing.assert_close(once.latents, each.latents, atol=1e-5, rtol=0)  # batch-2 convs round differently
    # and the tokens matter: without them the clip differs
    zeros = torch.zeros(1, F * (H // 16) * (W // 16), pipe.config.controlnet_cfg.conv_out_dim)
    monkeypatch.setattr(pipe, "prepare_conditions", lambda cond: {**prepare(cond), "mask_tokens": zeros})
    other = run(pipe, inputs, references=inputs[1], seed=5)
    assert (other.latents - once.latents).abs().max() > 1e-3


def test_bad_inputs_get_one_sentence_errors(pipes, inputs):
    pipe = pipes["worldstereo-memory-dmd"]
    args, refs = inputs
    with pytest.raises(ClipInputError, match="multiple of 16"):
        pipe(args["image"][:, :40], args["cameras"], args["render"][:, :, :40], args["render_mask"][:, :40])
    with pytest.raises(ClipInputError, match="cameras"):
        pipe(args["image"], args["cameras"][0:2], args["render"], args["render_mask"])
    bad = References(refs.images, refs.cameras, torch.tensor([0, 5]))
    with pytest.raises(ClipInputError, match="ref_index"):
        pipe(**args, references=bad)


def _seen_kwargs(pipe, **call):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(**call)
    finally:
        handle.remove()
    return seen[0]


def _independent_vae(package):
    """The tiny base model's VAE loaded on its own, and diffusers' latent normalisation."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(package / "base_model"), subfolder="vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return lambda video: (vae.encode(video).latent_dist.mode() - mean) / std


@pytest.mark.parametrize("mode", ["full_vae", "first_frame_only"])
def test_transformer_receives_the_official_conditions(pipes, tiny_packages, inputs, mode, monkeypatch):
    from engine import conditioning as C

    pipe = pipes["worldstereo-memory-dmd"]
    monkeypatch.setattr(pipe.config, "latent_cond_mode", mode)
    args, refs = inputs
    mask_inputs = []
    encode = pipe.transformer.encode_mask_and_rays
    monkeypatch.setattr(pipe.transformer, "encode_mask_and_rays",
                        lambda mask, rays, num_frames: mask_inputs.extend([mask, rays]) or encode(mask, rays, num_frames))
    kw = _seen_kwargs(pipe, **args, references=refs)
    hidden = kw["hidden_states"]
    assert hidden.shape == (1, 36, F, H // 8, W // 8)
    mask = hidden[:, 16:20]
    assert (mask[:, :, 0] == 1).all() and (mask[:, :, 1:] == 0).all()
    encode = _independent_vae(tiny_packages["worldstereo-memory-dmd"])
    image = C.signed(C.pil_to_tensor(C.to_pil(args["image"])))[None, :, None]  # [1,3,1,H,W] in [-1,1]
    with torch.no_grad():
        if mode == "full_vae":  # [image, 4(F-1) zero frames] through the causal VAE as ONE video
            expected = encode(torch.cat([image, torch.zeros(1, 3, 4 * (F - 1), H, W)], dim=2))
        else:  # the image's latent, then one zero frame's latent repeated
            expected = torch.cat([encode(image), encode(torch.zeros_like(image)).expand(-1, -1, F - 1, -1, -1)], 2)
        render = C.signed(args["render"]).transpose(0, 1)[None]
        render = torch.where(args["render_mask"][None, None], render, torch.zeros(()))
        render[:, :, 0] = image[:, :, 0]  # frame 0: the input image; holes 0
        render_latent = torch.cat([encode(render[:, :, i:i + 1]) for i in range(F)], dim=2)  # each keyframe alone
        ref_latent = torch.cat([encode(C.signed(refs.images[i])[None, :, None]) for i in range(len(refs))], dim=2)
    assert expected.shape == (1, 16, F, H // 8, W // 8)
    assert torch.allclose(hidden[:, 20:], expected, atol=1e-5)
    assert torch.allclose(kw["render_latent"], render_latent, atol=1e-5)
    assert torch.allclose(kw["reference_latent"], ref_latent, atol=1e-5)  # each reference frame alone
    # the official mask (1 in holes, the input frame known) and Plücker rays reach the mask embedding, once a clip
    expected_mask = (~args["render_mask"]).float()
    expected_mask[0] = 0
    mask_in, rays_in = mask_inputs
    assert torch.equal(mask_in[0, 0], expected_mask)
    cams = args["cameras"]
    assert torch.allclose(kw["extrinsics"][0], cams.w2c.float()) and torch.allclose(kw["intrinsics"][0], cams.K.float())
    assert torch.allclose(rays_in, C.camera_embedding(cams.K, cams.w2c, H, W), atol=1e-6)
    assert "render_mask" not in kw and "camera_embedding" not in kw and kw["mask_tokens"].shape[:2] == (1, F * 16)
    qt, qt_ref = C.camera_qt(cams.w2c, refs.cameras.w2c)
    assert torch.allclose(kw["camera_qt"], qt, atol=1e-6) and torch.allclose(kw["camera_qt_ref"], qt_ref, atol=1e-6)
    assert torch.equal(kw["ref_index"][0], refs.ref_index)


def test_clip_reads_the_uint8_image_without_rescaling(pipes, tiny_packages, inputs):
    from transformers import CLIPImageProcessor

    from engine import conditioning as C

    pipe = pipes["worldstereo-memory-dmd"]
    args, _ = inputs
    seen = []
    handle = pipe.components.image_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["pixel_values"]),
                                                                     with_kwargs=True)
    try:
        pipe(**args)
    finally:
        handle.remove()
    processor = CLIPImageProcessor.from_pretrained(str(tiny_packages["worldstereo-memory-dmd"] / "base_model"),
                                                   subfolder="image_processor", do_rescale=False)
    expected = processor(images=C.to_pil(args["image"]), return_tensors="pt").pixel_values
    assert torch.equal(seen[0], expected)
    assert float(expected.max()) > 10  # 0..255 values reach the normalisation, as released


def test_unipc_shift_comes_from_the_base_scheduler_config(tiny_packages, tmp_path):
    import shutil

    from diffusers import UniPCMultistepScheduler

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_packages["worldstereo-memory"], pkg)
    cfg_file = pkg / "base_model" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["flow_shift"] = 7.0
    cfg_file.write_text(json.dumps(cfg))
    sampler = ClipPipeline.from_pretrained(pkg, device="cpu").make_sampler(40)
    reference = UniPCMultistepScheduler.from_pretrained(str(pkg / "base_model"), subfolder="scheduler")
    reference.set_timesteps(40)
    assert sampler.scheduler.config.flow_shift == 7.0
    assert torch.equal(sampler.timesteps, reference.timesteps.float())


def test_pointmaps_share_one_colour_box():
    from engine.conditioning import colour_coded_pointmaps

    a = torch.tensor([[0.0, 1.0], [2.0, 4.0], [-1.0, 3.0]]).view(1, 3, 1, 2)
    b = torch.tensor([[4.0, float("nan")], [0.0, 1.0], [3.0, 3.0]]).view(1, 3, 1, 2)
    ca, cb = colour_coded_pointmaps(a, b)
    # per axis over both maps: x in [0,4], y in [0,4], z in [-1,3]; VAE range [-1,1]
    assert torch.allclose(ca.view(3, 2), torch.tensor([[0.0, 0.25], [0.5, 1.0], [0.0, 1.0]]) * 2 - 1)
    assert torch.allclose(cb.view(3, 2), torch.tensor([[1.0, 0.0], [0.0, 0.25], [1.0, 1.0]]) * 2 - 1)
    assert colour_coded_pointmaps(None, None) == [None, None]


def test_branch_memory_gets_pointmap_latents(tmp_path, inputs):
    pkg = write_tiny_package(tmp_path / "branch", "worldstereo-memory-dmd", memory_mode="branch")
    pipe = ClipPipeline.from_pretrained(pkg, device="cpu")
    args, refs = inputs
    g = torch.Generator().manual_seed(9)
    refs = References(refs.images, refs.cameras, refs.ref_index, pointmaps=torch.randn(2, 3, H, W, generator=g))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(**args, references=refs, pointmaps=torch.randn(F, 3, H, W, generator=g))
    finally:
        handle.remove()
    kw = seen[0]
    assert kw["pointmap_latent"].shape == (1, 16, F, H // 8, W // 8)
    assert kw["ref_pointmap_latent"].shape == (1, 16, 2, H // 8, W // 8)
    assert kw["reference_latent"].shape == (1, 16, 2, H // 8, W // 8)


# ---------------------------------------------------------------------------- encoders vs diffusers' Wan I2V
@pytest.fixture(scope="module")
def wan_pipe(tiny_packages):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(str(tiny_packages["worldstereo-memory"] / "base_model"))


def test_prompt_encoding_matches_diffusers(pipes, wan_pipe):
    comps = pipes["worldstereo-memory"].components
    texts = ["a stone house near the lake", "red", "  a caf\u00c3\u00a9 &amp;amp; a\n\tlake "]  # mojibake, entities
    ours = comps.encode_prompt(texts)
    theirs = wan_pipe._get_t5_prompt_embeds(texts, max_sequence_length=512, device="cpu", dtype=torch.float32)
    assert torch.allclose(ours, theirs, atol=1e-6)
    n = len(comps.tokenizer("red").input_ids)
    assert (ours[1, n:] == 0).all() and (ours[1, :n].abs().sum(-1) > 0).all()  # zero exactly past the prompt


def test_keyframe_latents_match_diffusers_first_frame_condition(pipes, wan_pipe):
    comps = pipes["worldstereo-memory"].components
    g = torch.Generator().manual_seed(6)
    frames = torch.rand(3, 3, 32, 48, generator=g)
    ours = comps.encode_keyframes((frames * 2 - 1).transpose(0, 1)[None])
    assert ours.shape == (1, 16, 3, 4, 6)
    for i in range(3):
        # diffusers' I2V condition of a one-frame video is exactly one keyframe's normalised latent
        _, cond = wan_pipe.prepare_latents(frames[i:i + 1] * 2 - 1, 1, 16, 32, 48, 1, torch.float32, "cpu",
                                           generator=torch.Generator().manual_seed(0))
        assert torch.allclose(ours[:, :, i], cond[:, 4:, 0], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "text-encoder", "model", "group"])
def test_cuda_bf16_clip(tiny_packages, inputs, offload):
    from engine.offload import STREAMED_LAYERS

    pipe = ClipPipeline.from_pretrained(tiny_packages["worldstereo-memory"], device="cuda", offload=offload)
    assert pipe.dtype == torch.bfloat16  # the CUDA default
    a = run(pipe, inputs, references=inputs[1], seed=4)
    b = run(pipe, inputs, references=inputs[1], seed=4)
    assert a.frames.shape == (F, 3, H, W) and torch.isfinite(a.frames).all()
    assert torch.equal(a.frames, b.frames)
    if offload != "none":  # the same clip as with every network resident
        plain = run(ClipPipeline.from_pretrained(tiny_packages["worldstereo-memory"], device="cuda"), inputs,
                    references=inputs[1], seed=4)
        torch.testing.assert_close(a.latents, plain.latents, atol=2e-2, rtol=0)
    comps = pipe.components
    if offload == "model":  # every network back in CPU memory after the clip
        for m in (pipe.transformer, comps.vae, comps.text_encoder, comps.image_encoder):
            assert next(m.parameters()).device.type == "cpu"
    if offload == "group":  # streamed layers wait in CPU memory; the rest (and the VAE) stays on the GPU
        assert next(comps.vae.parameters()).device.type == "cuda"
        for m in (pipe.transformer, comps.text_encoder, comps.image_encoder):
            for layer in m.modules():
                if isinstance(layer, STREAMED_LAYERS):
                    assert layer.weight.device.type == "cpu"
    if offload == "text-encoder":
        assert next(comps.text_encoder.parameters()).device.type == "cpu"
        assert next(pipe.transformer.parameters()).device.type == "cuda"


def test_prompt_cache_is_reused_and_bounded(pipes):
    from engine.models.components import PROMPT_CACHE_SIZE

    comps = pipes["worldstereo-camera"].components
    calls = []
    handle = comps.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        first = comps.encode_prompt(["a tall tower"])
        again = comps.encode_prompt(["a tall tower"])
        assert len(calls) == 1 and torch.equal(first, again)
        for i in range(PROMPT_CACHE_SIZE + 3):
            comps.encode_prompt([f"house {i}"])
        assert len(comps._prompt_cache) <= PROMPT_CACHE_SIZE
    finally:
        handle.remove()


def test_condition_latents_are_reused_for_the_same_view(pipes):
    comps = pipes["worldstereo-memory-dmd"].components
    calls = []
    handle = comps.vae.encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(11)) * 2 - 1
        first = comps.condition_latents(image, 3)
        n = len(calls)
        assert n > 0 and torch.equal(comps.condition_latents(image, 3), first) and len(calls) == n
        assert not torch.equal(comps.condition_latents(-image, 3), first) and len(calls) > n
    finally:
        handle.remove()
