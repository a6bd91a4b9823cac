"""One resident generative pipeline per process: switching variants swaps the transformer only."""
from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch

from conftest import tiny_clip_inputs
from engine import scene_init
from engine.models.tiny import write_tiny_package
from engine.pipeline import ClipPipeline
from engine.settings import SceneSettings

F, H, W = 3, 64, 64
DMD, FULL = "worldstereo-memory-dmd", "worldstereo-memory"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The hub's layout at a tiny size: one folder per variant and the base model they share beside them."""
    root = tmp_path_factory.mktemp("weights")
    write_tiny_package(root / DMD, DMD, seed=0)
    (root / DMD / "base_model").rename(root / "base_model")
    other = write_tiny_package(tmp_path_factory.mktemp("other") / FULL, FULL, seed=1)
    (root / FULL).mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(other / name, root / FULL / name)
    return root


@pytest.fixture
def resident():
    slot = scene_init.resident_for("cpu")
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
    fast = scene_init.clip_generator(settings[DMD], announce=lambda _: None)
    cond = _conditions(resident.pipeline)
    first = fast.generate(conditions=cond, prompt="a red door", seed=1)
    dmd_transformer = weakref.ref(resident.pipeline.transformer)
    quality = scene_init.clip_generator(settings[FULL], announce=lambda _: None)  # the Fast/Quality switch
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
    dmd = scene_init.PipelineSpec("worldstereo-memory-dmd", str(weights / DMD), "cpu", "none", "eager", None,
                                  torch.float32)
    pipe = resident.acquire(dmd, announce=lambda _: None)
    assert resident.acquire(dmd) is pipe
    elsewhere = scene_init.PipelineSpec(FULL, str(tiny_packages[FULL]), "cpu", "none", "eager", None, torch.float32)
    other = resident.acquire(elsewhere, announce=lambda _: None)  # its own base model folder: a new pipeline
    assert other is not pipe and other.components is not pipe.components
    offloaded = resident.acquire(scene_init.PipelineSpec(FULL, str(tiny_packages[FULL]), "cpu", "model", "eager",
                                                         None, torch.float32), announce=lambda _: None)
    assert offloaded is not other and offloaded.offload == "model"
    with pytest.raises(ValueError, match="builds on"):
        offloaded.switch_variant(weights / DMD)
