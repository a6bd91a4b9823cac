"""GPU memory options on tiny-random packages: every option gives the clip of `none`, and no weight is used while
its option says it is not on the GPU.

On a CPU, "offloaded" and "onloaded" are the same memory, so a weight used at the wrong moment would go unnoticed.
``OffloadWitness`` makes it visible: when an offload hook (accelerate's model offload, diffusers' group
offloading) moves weights off the GPU, their values are replaced by NaN (integers by an out-of-range index) until
the hook brings them back, exactly the moments a CUDA run would find them on the wrong device.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_clip_inputs
from engine.offload import OFFLOAD_CHOICES, STREAMED_LAYERS, OffloadError, Placement, check_offload
from engine.pipeline import ClipPipeline

F, H, W = 3, 64, 64
pytestmark = pytest.mark.usefixtures("one_thread")


class OffloadWitness:
    def __init__(self):
        self.away: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def offload(self, tensors) -> None:
        for t in tensors:
            if id(t) not in self.away:
                real = t.data
                poison = torch.full_like(real, math.nan) if real.is_floating_point() else \
                    torch.full_like(real, torch.iinfo(real.dtype).max if real.dtype != torch.bool else 0)
                self.away[id(t)] = (t, real)
                t.data = poison

    def onload(self, tensors) -> None:
        for t in tensors:
            if id(t) in self.away:
                t.data = self.away.pop(id(t))[1]

    def away_count(self, module: torch.nn.Module) -> int:
        return sum(id(t) in self.away for t in list(module.parameters()) + list(module.buffers()))


def _group_tensors(group):
    return ([p for m in group.modules for p in m.parameters()] + [b for m in group.modules for b in m.buffers()]
            + list(group.parameters) + list(group.buffers))


def _module_tensors(module):
    return list(module.parameters()) + list(module.buffers())


@pytest.fixture
def witness(monkeypatch):
    from accelerate.hooks import CpuOffload
    from diffusers.hooks.group_offloading import ModuleGroup

    w = OffloadWitness()
    real_onload, real_offload = ModuleGroup.onload_, ModuleGroup.offload_
    real_init, real_pre = CpuOffload.init_hook, CpuOffload.pre_forward

    def onload_(self):
        w.onload(_group_tensors(self))
        return real_onload(self)

    def offload_(self):
        real_offload(self)
        w.offload(_group_tensors(self))

    def init_hook(self, module):
        out = real_init(self, module)
        w.offload(_module_tensors(module))
        return out

    def pre_forward(self, module, *args, **kwargs):
        w.onload(_module_tensors(module))
        return real_pre(self, module, *args, **kwargs)

    monkeypatch.setattr(ModuleGroup, "onload_", onload_)
    monkeypatch.setattr(ModuleGroup, "offload_", offload_)
    monkeypatch.setattr(CpuOffload, "init_hook", init_hook)
    monkeypatch.setattr(CpuOffload, "pre_forward", pre_forward)
    return w


@pytest.fixture(scope="module")
def inputs():
    return tiny_clip_inputs(F, H, W, seed=5)


def _clip(pipe, inputs, steps=None, with_refs=True):
    args, refs = inputs
    return pipe(**args, references=refs if with_refs else None, prompt="a quiet street", seed=3, steps=steps)


@pytest.fixture(scope="module")
def plain(tiny_packages, inputs):
    """The `none` clips everything is compared with: the DMD memory variant, the 40-step camera variant."""
    dmd = ClipPipeline.from_pretrained(tiny_packages["worldstereo-memory-dmd"], device="cpu")
    cam = ClipPipeline.from_pretrained(tiny_packages["worldstereo-camera"], device="cpu")
    return {"dmd": _clip(dmd, inputs), "cam": _clip(cam, inputs, steps=2, with_refs=False)}


def test_offload_choices_are_one_list():
    from engine.cli import build_parser
    from engine.settings import SceneError, SceneSettings

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                  if "--offload" in a.option_strings)
    assert tuple(action.choices) == OFFLOAD_CHOICES
    for mode in OFFLOAD_CHOICES:
        SceneSettings(offload=mode).validate()
        assert check_offload(mode) == mode
    with pytest.raises(SceneError, match="choose one of: none, text-encoder, model, group"):
        SceneSettings(offload="cpu").validate()
    with pytest.raises(OffloadError):
        Placement("sequential")


@pytest.mark.parametrize("mode", ["text-encoder", "model", "group"])
def test_every_option_gives_the_same_clip_with_weights_only_used_on_the_gpu(tiny_packages, inputs, plain, witness,
                                                                            mode):
    dmd = ClipPipeline.from_pretrained(tiny_packages["worldstereo-memory-dmd"], device="cpu", offload=mode)
    cam = ClipPipeline.from_pretrained(tiny_packages["worldstereo-camera"], device="cpu", offload=mode)
    # stitched references (the memory runs block submodules itself), mask tokens, UniPC with guidance (batch 2)
    a, b = _clip(dmd, inputs), _clip(cam, inputs, steps=2, with_refs=False)
    torch.testing.assert_close(a.latents, plain["dmd"].latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.latents, plain["cam"].latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.frames, plain["dmd"].frames, atol=1e-6, rtol=0)
    comps = dmd.components
    if mode == "model":  # between clips every network waits in CPU memory
        for m in (dmd.transformer, comps.vae, comps.text_encoder, comps.image_encoder):
            assert witness.away_count(m) == len(_module_tensors(m))
    if mode == "group":  # every streamed layer's weights are away; the rest (norms, tables) and the VAE stay
        assert witness.away_count(comps.vae) == 0
        for m in (dmd.transformer, comps.text_encoder, comps.image_encoder):
            streamed = [t for layer in m.modules() if isinstance(layer, STREAMED_LAYERS) for t in _module_tensors(layer)]
            assert witness.away_count(m) == len({id(t) for t in streamed}) > 0
            resident = sum(t.numel() for t in _module_tensors(m)) - sum(t.numel() for t in {id(t): t for t in streamed}.values())
            assert resident < 0.05 * sum(t.numel() for t in _module_tensors(m))
    if mode == "text-encoder":
        assert next(comps.text_encoder.parameters()).device.type == "cpu"
        assert comps.placement.resident("transformer") and not comps.placement.resident("text_encoder")


def test_group_offload_keeps_tensors_outside_streamed_layers_resident():
    from engine.offload import group_offload

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model.register_buffer("table", torch.arange(3.0))
    norm_weight = model[1].weight
    group_offload(model, "cpu")
    assert model[1].weight is norm_weight and "weight" in model[1]._parameters and "table" in model._buffers
    assert not hasattr(model[1], "_diffusers_hook") and hasattr(model[0], "_diffusers_hook")
    assert model(torch.ones(1, 4)).shape == (1, 2)
