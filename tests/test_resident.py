"""One resident generative pipeline per process: switching variants swaps the transformer only."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from conftest import SafetensorsReads, tiny_clip_inputs
from engine import generators
from engine.models.tiny import write_tiny_weights
from engine.pipeline import ClipPipeline
from engine.settings import SceneSettings

F, H, W = 3, 64, 64
DMD, FULL, CAMERA = "worldstereo-memory-dmd", "worldstereo-memory", "worldstereo-camera"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The hub's layout at a tiny size: one folder per variant and the base model they share beside them."""
    return write_tiny_weights(tmp_path_factory.mktemp("weights"), variants=(DMD, FULL, CAMERA))


@pytest.fixture
def resident():
    slot = generators.resident_for("cpu")
    slot.release()
    yield slot
    slot.release()


def _count_calls(monkeypatch, owner, name, counts):
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        key = f"{getattr(owner, '__name__', owner)}.{name}".split(".")[-2:]
        counts[".".join(key)] = counts.get(".".join(key), 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def _conditions(pipe):
    from engine.conditioning import conditions_from_render

    args, refs = tiny_clip_inputs(F, H, W, seed=2)
    return conditions_from_render(args["image"], args["cameras"], args["render"], args["render_mask"], refs,
                                  memory=pipe.config.has_memory)


def test_switching_variants_loads_shared_networks_once(weights, resident, monkeypatch):
    import diffusers
    import transformers

    import engine.pipeline as pipeline_module

    counts: dict = {}
    for owner, name in ((diffusers.AutoencoderKLWan, "from_pretrained"), (transformers.UMT5EncoderModel, "from_pretrained"),
                        (transformers.CLIPVisionModel, "from_pretrained"), (pipeline_module, "load_components"),
                        (pipeline_module, "_load_transformer")):
        _count_calls(monkeypatch, owner, name, counts)
    settings = {v: SceneSettings(engine=v, weights=str(weights), device="cpu", steps=2) for v in (DMD, FULL)}
    fast = generators.clip_generator(settings[DMD], announce=lambda _: None)
    cond = _conditions(resident.pipeline)
    first = fast.generate(conditions=cond, prompt="a red door", seed=1)
    dmd_transformer = weakref.ref(resident.pipeline.transformer)
    quality = generators.clip_generator(settings[FULL], announce=lambda _: None)  # the Fast/Quality switch
    gc.collect()
    assert dmd_transformer() is None  # released, not kept beside the new one
    slow = quality.generate(conditions=cond, prompt="a red door", seed=1)
    again = fast.generate(conditions=cond, prompt="a red door", seed=1)  # a generator made before the switch
    # the encoders and the VAE once; the transformer at each switch (only one is ever in memory)
    assert counts == {"AutoencoderKLWan.from_pretrained": 1, "UMT5EncoderModel.from_pretrained": 1,
                      "CLIPVisionModel.from_pretrained": 1, "pipeline.load_components": 1, "pipeline._load_transformer": 3}
    assert resident.pipeline.config.variant == DMD
    assert torch.equal(first, again)
    # each equals a freshly loaded pipeline of its variant
    monkeypatch.undo()
    for variant, frames in ((DMD, first), (FULL, slow)):
        fresh = ClipPipeline.from_pretrained(weights / variant, device="cpu", dtype=torch.float32)
        torch.testing.assert_close(fresh.generate(cond, prompt="a red door", seed=1, steps=2).frames, frames,
                                   atol=1e-6, rtol=0)
    assert not torch.allclose(first, slow, atol=1e-3)  # two variants, two clips


def test_another_base_model_or_device_option_replaces_the_pipeline(weights, resident, tiny_packages):
    dmd = generators.PipelineSpec("worldstereo-memory-dmd", str(weights / DMD), "cpu", "none", "eager", None,
                                  torch.float32)
    pipe = resident.acquire(dmd, announce=lambda _: None)
    assert resident.acquire(dmd) is pipe
    elsewhere = generators.PipelineSpec(FULL, str(tiny_packages[FULL]), "cpu", "none", "eager", None, torch.float32)
    other = resident.acquire(elsewhere, announce=lambda _: None)  # its own base model folder: a new pipeline
    assert other is not pipe and other.components is not pipe.components
    offloaded = resident.acquire(generators.PipelineSpec(FULL, str(tiny_packages[FULL]), "cpu", "model", "eager",
                                                         None, torch.float32), announce=lambda _: None)
    assert offloaded is not other and offloaded.offload == "model"
    with pytest.raises(ValueError, match="builds on"):
        offloaded.switch_variant(weights / DMD)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_switching_between_partial_variants_reads_only_what_differs(weights, monkeypatch):
    """Memory -> camera: both are their base model with a file over it. The tensors both take from the same base
    shard stay where they are; only the camera file's tensors, and those the memory file held that the camera
    model takes from the base, are read. The result equals a fresh load."""
    from safetensors import safe_open

    def held(variant):
        with safe_open(str(weights / variant / "model.safetensors"), "pt") as fh:
            return set(fh.keys())

    pipe = ClipPipeline.from_pretrained(weights / FULL, device="cpu", dtype=torch.float32)
    old = pipe.transformer
    reads = SafetensorsReads(monkeypatch)
    pipe.switch_variant(weights / CAMERA)
    camera_keys = set(pipe.transformer.state_dict())
    want = held(CAMERA) | ((held(FULL) & camera_keys) - held(CAMERA))
    assert sorted(reads.keys) == sorted(want)
    assert len(want) < len(camera_keys)  # something was taken over, not read
    assert all(p.device.type == "meta" for p in old.parameters())  # the old transformer holds nothing any more
    monkeypatch.undo()
    fresh = ClipPipeline.from_pretrained(weights / CAMERA, device="cpu", dtype=torch.float32).transformer
    assert _same_state(pipe.transformer, fresh)
    reads = SafetensorsReads(monkeypatch)
    pipe.switch_variant(weights / FULL)  # and back
    assert sorted(reads.keys) == sorted(held(FULL) | ((held(CAMERA) & set(old.state_dict())) - held(FULL)))


def test_switching_from_a_complete_file_releases_the_old_transformer_before_reading(weights, monkeypatch):
    """DMD (a whole model of its own) -> memory: nothing can be taken over, and the DMD transformer is emptied
    before the first tensor of the memory variant is read, so the two are never held together."""
    pipe = ClipPipeline.from_pretrained(weights / DMD, device="cpu", dtype=torch.float32)
    old = weakref.ref(pipe.transformer)
    seen = []
    reads = SafetensorsReads(monkeypatch, before_first=lambda: seen.append(
        old() is None or all(p.device.type == "meta" for p in old().parameters())))
    pipe.switch_variant(weights / FULL)
    assert seen == [True]
    assert sorted(reads.keys) == sorted(pipe.transformer.state_dict())  # every tensor read, each once
    monkeypatch.undo()
    assert _same_state(pipe.transformer, ClipPipeline.from_pretrained(weights / FULL, device="cpu",
                                                                      dtype=torch.float32).transformer)


def test_offloaded_switch_reads_the_new_transformer_whole(weights, monkeypatch):
    """Under model offload the old transformer is released first and the new one read whole (nothing resident
    to take over); the clip equals a fresh pipeline's."""
    pipe = ClipPipeline.from_pretrained(weights / FULL, device="cpu", dtype=torch.float32, offload="model")
    reads = SafetensorsReads(monkeypatch)
    pipe.switch_variant(weights / CAMERA)
    assert sorted(reads.keys) == sorted(pipe.transformer.state_dict())
    monkeypatch.undo()
    fresh = ClipPipeline.from_pretrained(weights / CAMERA, device="cpu", dtype=torch.float32)
    cond = _conditions(fresh)
    torch.testing.assert_close(pipe.generate(cond, prompt="a door", seed=2, steps=2).frames,
                               fresh.generate(cond, prompt="a door", seed=2, steps=2).frames, atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_a_switch_on_the_gpu_never_holds_two_transformers(weights):
    pipe = ClipPipeline.from_pretrained(weights / DMD, device="cuda", dtype=torch.float32)
    size = sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values())
    torch.cuda.synchronize()
    others = torch.cuda.memory_allocated() - size
    torch.cuda.reset_peak_memory_stats()
    pipe.switch_variant(weights / FULL)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - others < 1.6 * size  # two transformers would be 2x
    assert all(p.device.type == "cuda" for p in pipe.transformer.parameters())
