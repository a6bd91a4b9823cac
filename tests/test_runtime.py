"""Runtime backends: ONNX Runtime chain against eager (velocity and a whole clip), fallbacks, torch.compile."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import tiny_clip_inputs
from engine.pipeline import ClipPipeline
from engine.runtime import BACKENDS, BackendUnavailable, make_backend, spec
from engine.runtime.chain import GraphChain, GraphInputError
from engine.runtime.onnxruntime_backend import OnnxRuntimeBackend
from export.api import export_onnx
from export.graphs import ExportShape

RTOL = 1e-4  # the export's parity tolerance, now over the whole chained forward
F, H, W = 3, 64, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_packages):
    # The package's zero-initialised layers hold random values (engine.models.tiny.wake_zero_init): every path counts.
    return ClipPipeline.from_pretrained(tiny_packages["worldstereo-memory-dmd"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def graphs(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    export_onnx(pipe.transformer, out, ExportShape(frames=F, height=4, width=4, refs=2, image_tokens=17),
                engine="tiny-random", log=lambda s: None)
    return out


def kwargs_for(model, b=1, f=F, h=4, w=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(hidden_states=torch.randn(b, 36, f, h, w, generator=g), timestep=torch.tensor(437.0),
                encoder_hidden_states=torch.randn(b, 512, cfg.text_dim, generator=g),
                encoder_hidden_states_image=torch.randn(b, 17, cfg.image_dim, generator=g),
                render_latent=torch.randn(b, 16, f, h, w, generator=g),
                render_mask=(torch.rand(b, 1, f, 8 * h, 8 * w, generator=g) > 0.3).float(),
                camera_embedding=torch.randn(b, 6, f, 8 * h, 8 * w, generator=g),
                extrinsics=torch.eye(4).repeat(b, f, 1, 1), intrinsics=torch.eye(3).repeat(b, f, 1, 1),
                camera_qt=torch.randn(b, f, 7, generator=g),
                reference_latent=torch.randn(b, 16, r, h, w, generator=g), ref_index=torch.arange(r)[None],
                camera_qt_ref=torch.randn(b, r, 7, generator=g), return_dict=False)


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("case", ["refs", "no_refs", "cfg_batch", "backbone_only", "mask_tokens"])
def test_onnxruntime_velocity_equals_eager(pipe, graphs, case):
    model = pipe.transformer
    backend = make_backend("onnxruntime", model, graphs_dir=graphs, fallback=False)
    assert sorted(backend.chain.graphs) == sorted([spec.CAMERA_MASK, spec.CAMERA_BRANCH, spec.MEMORY_FRONTEND,
                                                   spec.BACKBONE])  # one backbone, with or without references
    # sizes other than the traced ones: the dynamic axes are exercised
    kw = kwargs_for(model, b=2 if case == "cfg_batch" else 1, f=4, h=6, w=4, r=3, seed=sum(map(ord, case)))
    if case in ("no_refs", "backbone_only"):
        for k in ("reference_latent", "ref_index", "camera_qt_ref"):
            kw.pop(k)
    if case == "backbone_only":
        for k in ("render_latent", "render_mask", "camera_embedding"):
            kw.pop(k)
    if case == "mask_tokens":  # computed once per clip by the caller: the camera-mask graph is skipped
        with torch.no_grad():
            kw["mask_tokens"] = model.encode_mask_and_rays(kw.pop("render_mask"), kw.pop("camera_embedding"), 4)
        ran = []
        backend.chain.runner.run = _recording(backend.chain.runner.run, ran)
    with torch.no_grad():
        ref = model(**kw)
        got = backend(**kw)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert rel(ref, got) <= RTOL
    if case == "mask_tokens":
        assert ran == [spec.CAMERA_BRANCH, spec.MEMORY_FRONTEND, spec.BACKBONE]


def _recording(run, ran):
    def wrapped(graph, feeds):
        ran.append(graph)
        return run(graph, feeds)
    return wrapped


def test_onnxruntime_clip_equals_eager_clip(pipe, graphs):
    """The pipeline, unchanged, runs the whole 4-step DMD clip through the ONNX graphs (backend in place of the
    transformer) and gets the eager clip back."""
    args, refs = tiny_clip_inputs(F, H, W)
    args.update(prompt="a stone house", references=refs, seed=4)
    eager = pipe(**args)
    model = pipe.transformer
    try:
        pipe.transformer = make_backend("onnxruntime", model, graphs_dir=graphs, fallback=False)
        onnx = pipe(**args)
    finally:
        pipe.transformer = model
    assert rel(eager.latents, onnx.latents) <= RTOL
    assert (eager.frames - onnx.frames).abs().max() <= 1e-3
    # and the memory reached the graphs: without references the clip differs
    args["references"] = None
    assert rel(eager.latents, pipe(**args).latents) > 1e-2


def test_make_backend_falls_back_to_eager_with_a_reason(pipe, caplog, tmp_path):
    model = pipe.transformer
    with caplog.at_level(logging.WARNING, logger="engine.runtime"):
        b = make_backend("onnxruntime", model)
    assert b.name == "eager" and "python -m export" in b.fallback_reason and "\n" not in b.fallback_reason
    assert b.fallback_reason in caplog.text
    b = make_backend("onnxruntime", model, graphs_dir=tmp_path)  # empty folder: no manifest
    assert b.name == "eager" and "manifest.json" in b.fallback_reason
    b = make_backend("tensorrt", model, graphs_dir=tmp_path)
    assert b.name == "eager" and b.fallback_reason.startswith("tensorrt backend unavailable")
    kw = kwargs_for(model)
    with torch.no_grad():
        assert torch.equal(b(**kw), model(**kw))  # the fallback is the model itself
    with pytest.raises(BackendUnavailable):
        make_backend("onnxruntime", model, fallback=False)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("vulkan", model)
    assert BACKENDS == ("eager", "compile", "onnxruntime", "tensorrt")


def test_backend_answers_model_attributes_and_rejects_missing_inputs(pipe, graphs):
    backend = OnnxRuntimeBackend(graphs, model=pipe.transformer)
    assert backend.ws_config is pipe.transformer.ws_config and backend.memory_branch is None
    kw = kwargs_for(pipe.transformer)
    kw.pop("camera_qt")  # the exported backbone takes the camera codes
    with pytest.raises(GraphInputError, match="camera_qt"):
        backend(**kw)
    kw = kwargs_for(pipe.transformer)
    kw["render_mask"] = kw["render_mask"].repeat_interleave(4, dim=2)[:, :, 3:]  # (F-1)*4+1 video frames
    with pytest.raises(GraphInputError, match="one render_mask frame per keyframe"):
        backend(**kw)


class _FakeRunner:
    """Records what each graph is fed and answers with zeros of the declared outputs."""

    def __init__(self, manifest):
        self.manifest, self.fed = manifest, {}

    def run(self, graph, feeds):
        self.fed[graph] = feeds
        entry = next(g for g in self.manifest["graphs"] if g["name"] == graph)
        return {n: torch.zeros(1) for n in entry["outputs"]}


def test_chain_feeds_zero_reference_tokens_and_refuses_what_the_variant_cannot_take(pipe, graphs):
    from engine.runtime.chain import read_manifest

    manifest = read_manifest(graphs)
    runner = _FakeRunner(manifest)
    chain = GraphChain(manifest, runner)
    kw = kwargs_for(pipe.transformer, b=2)
    for k in ("reference_latent", "ref_index", "camera_qt_ref", "render_latent", "render_mask", "camera_embedding"):
        kw.pop(k)
    chain(**kw)
    fed = runner.fed[spec.BACKBONE]
    assert fed[spec.REF_TOKENS].shape == (2, 0, manifest["model"]["inner_dim"])
    assert fed[spec.REF_ROTARY_COS].shape == (2, 0, 1, manifest["model"]["head_dim"])
    assert set(runner.fed) == {spec.BACKBONE}
    with pytest.raises(GraphInputError, match="unknown forward argument"):
        chain(**kw, render_masks=None)
    camera = dict(manifest, model=dict(manifest["model"], has_memory=False, variant="worldstereo-camera"))
    with pytest.raises(GraphInputError, match="not trained with references"):
        GraphChain(camera, _FakeRunner(camera))(**kwargs_for(pipe.transformer))


@pytest.mark.slow  # inductor generates and compiles C++ kernels: about half a minute on two cores, cache cold
def test_compile_backend_with_inductor_gives_the_eager_scene(tiny_packages, tmp_path, monkeypatch):
    """A tiny-random scene run with ``backend="compile"`` (torch.compile with inductor, the CLI's `--backend compile`)
    writes the clip the eager run writes, to a level of the 8-bit frames."""
    import numpy as np
    from PIL import Image
    from torch._dynamo.utils import counters

    from conftest import PlaneTestDepth
    from engine import generators
    from engine.models.tiny import tiny_package_key
    from engine.scene import Scene
    from engine.settings import SceneSettings

    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))  # the session's package, under the engine's name
    (tmp_path / "cache").mkdir()
    variant = "worldstereo-memory-dmd"
    (tmp_path / "cache" / f"tiny-random-{variant}-{tiny_package_key(variant)}").symlink_to(tiny_packages[variant])
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((96, 144, 3)) * 255).astype(np.uint8)).save(photo)
    slot = generators.resident_for("cpu")
    frames = {}
    try:
        for backend in ("eager", "compile"):
            settings = SceneSettings(engine="tiny-random", frames=3, backend=backend, seed=2)
            scene = Scene.create(tmp_path / backend, photo, settings=settings, depth_source=PlaneTestDepth(),
                                 announce=lambda _: None)
            counters["inductor"].clear()
            scene.generate("up")
            if backend == "eager":
                assert slot.pipeline.backend is None and not counters["inductor"]
            else:  # the transformer ran through torch.compile, its graph lowered by inductor
                assert slot.pipeline.backend.name == "compile" and sum(counters["inductor"].values()) > 0
            frames[backend] = scene.folder.clip_frames(scene.clips[0])
    finally:
        slot.release()
    diff = (frames["compile"] - frames["eager"]).abs()
    assert frames["eager"].shape == (3, 3, 80, 128)
    assert float(diff.max()) <= 1 / 255 + 1e-6 and float(diff.mean()) < 0.05 / 255