"""ONNX export of the tiny WorldStereo transformer: export mode, graphs, ORT parity, manifest, TensorRT refusal."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from engine.models.loading import build_transformer, tiny_transformer_config
from engine.runtime import spec
from export.__main__ import main as export_main
from export.export_mode import DecomposedRMSNorm, PlainAttnProcessor, export_mode
from export.graphs import ExportShape, MemoryFrontendGraph, graphs_for
from export.onnx_export import PARITY_RTOL, ParityError, check_parity, export_graph, ort_session
from export.tensorrt_build import TensorRTUnavailable, axis_ranges, build_engines, input_profile
from engine.runtime.tensorrt_backend import tensorrt_unavailable_reason

CASES = [("worldstereo-memory-dmd", "stitched"), ("worldstereo-memory", "branch"), ("worldstereo-camera", "stitched")]


pytestmark = pytest.mark.usefixtures("one_thread")


def randomized_tiny(variant: str, memory_mode: str, seed: int = 0):
    """A tiny model whose zero-initialised parts (branch projections, adaLN, camera code MLP) are random too,
    so every branch changes the output and a wrong graph cannot hide behind zeros."""
    cfg, base = tiny_transformer_config(variant, memory_mode=memory_mode)
    model = build_transformer(cfg, base, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def forward_inputs(model, b=1, f=3, h=4, w=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    kw = dict(hidden_states=torch.randn(b, 36, f, h, w, generator=g), timestep=torch.rand(b, generator=g) * 1000,
              encoder_hidden_states=torch.randn(b, 512, cfg.text_dim, generator=g),
              encoder_hidden_states_image=torch.randn(b, 17, cfg.image_dim, generator=g),
              render_latent=torch.randn(b, 16, f, h, w, generator=g),
              render_mask=(torch.rand(b, 1, f, 8 * h, 8 * w, generator=g) > 0.3).float(),
              camera_embedding=torch.randn(b, 6, f, 8 * h, 8 * w, generator=g),
              camera_qt=torch.randn(b, f, 7, generator=g))
    if model.ws_config.has_memory:
        kw.update(reference_latent=torch.randn(b, 16, r, h, w, generator=g),
                  ref_index=torch.randperm(f - 1, generator=g)[:r].unsqueeze(0).expand(b, r),
                  camera_qt_ref=torch.randn(b, r, 7, generator=g))
        if model.memory_branch is not None:
            kw.update(pointmap_latent=torch.randn(b, 16, f, h, w, generator=g),
                      ref_pointmap_latent=torch.randn(b, 16, r, h, w, generator=g))
    return kw


@pytest.mark.parametrize("variant,memory_mode", CASES)
def test_export_mode_computes_the_same_function(variant, memory_mode):
    model = randomized_tiny(variant, memory_mode)
    kw = forward_inputs(model)
    with torch.no_grad():
        ref = model(**kw)
        with export_mode(model):
            assert not any(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
            assert any(isinstance(m, DecomposedRMSNorm) for m in model.modules())
            assert isinstance(model.blocks[0].attn1.processor, PlainAttnProcessor)
            got = model(**kw)
        after = model(**kw)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(after, ref)  # everything was put back
    assert not any(isinstance(m, DecomposedRMSNorm) for m in model.modules())


@pytest.mark.parametrize("variant,memory_mode", CASES)
def test_graph_chain_equals_forward(variant, memory_mode):
    """The exported pieces, chained in PyTorch, reproduce the model's forward (so the graphs cannot drift)."""
    model = randomized_tiny(variant, memory_mode)
    kw = forward_inputs(model, b=2)
    graphs = {g.name: g for g in graphs_for(model)}
    with torch.no_grad():
        ref = model(**kw)
        cam = graphs[spec.CAMERA_BRANCH](kw["hidden_states"], kw["timestep"], kw["render_latent"], kw["render_mask"],
                                         kw["camera_embedding"])
        residuals, refs = list(cam), None
        if spec.MEMORY_BRANCH in graphs:
            mem = graphs[spec.MEMORY_BRANCH](kw["hidden_states"], kw["timestep"], kw["reference_latent"],
                                             kw["ref_index"], kw["pointmap_latent"], kw["ref_pointmap_latent"])
            residuals = [a + b for a, b in zip(residuals, mem)]
        if spec.MEMORY_FRONTEND in graphs:
            refs = graphs[spec.MEMORY_FRONTEND](kw["reference_latent"], kw["ref_index"], kw["camera_qt_ref"])
        backbone = graphs[spec.BACKBONE_MEMORY if refs is not None else spec.BACKBONE]
        args = [kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"], kw["encoder_hidden_states_image"]]
        if model.camera_embedding is not None:
            args.append(kw["camera_qt"])
        got = backbone(*args, *residuals, *(refs or ()))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # and the memory matters, so the comparison above covers it
    if model.ws_config.has_memory:
        with torch.no_grad():
            no_mem = model(**{k: v for k, v in kw.items() if "ref" not in k and "pointmap" not in k})
        assert (no_mem - ref).abs().max() > 1e-3


def test_cli_exports_every_graph_of_the_tiny_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "onnx"
    assert export_main(["--engine", "tiny-random", "--format", "onnx", "--out", str(out), "--frames", "3"]) == 0
    manifest = json.loads((out / spec.MANIFEST_NAME).read_text())
    names = [g["name"] for g in manifest["graphs"]]
    assert names == [spec.CAMERA_BRANCH, spec.MEMORY_FRONTEND, spec.BACKBONE, spec.BACKBONE_MEMORY]
    package = tmp_path / "cache" / "tiny-random-worldstereo-memory-dmd"
    assert manifest["source"]["sha256"] == hashlib.sha256((package / "model.safetensors").read_bytes()).hexdigest()
    versions = manifest["exporter"]["versions"]
    import onnx
    import onnxruntime
    import onnxscript

    assert (versions["torch"], versions["onnx"], versions["onnxruntime"], versions["onnxscript"]) == \
           (torch.__version__, onnx.__version__, onnxruntime.__version__, onnxscript.__version__)
    assert manifest["parity"]["tolerance"] == PARITY_RTOL
    for g in manifest["graphs"]:
        onnx.checker.check_model(str(out / g["file"]))
        assert max(g["parity"]["max_relative_error"].values()) <= PARITY_RTOL
        assert g["static_axes_note"] is None  # ORT accepted a second size on every dynamic axis
        sess = ort_session(out / g["file"])
        assert [i.name for i in sess.get_inputs()] == list(g["inputs"])
        assert [o.name for o in sess.get_outputs()] == list(g["outputs"])
    backbone = next(g for g in manifest["graphs"] if g["name"] == spec.BACKBONE)
    assert backbone["inputs"][spec.HIDDEN_STATES]["dynamic"] == {"0": "batch", "2": "frames", "3": "latent_height",
                                                                  "4": "latent_width"}
    assert backbone["outputs"][spec.VELOCITY]["shape"] == [1, 16, 3, 8, 8]


def test_parity_check_fails_loudly_when_the_graph_differs(tmp_path):
    model = randomized_tiny("worldstereo-memory-dmd", "stitched")
    graph = MemoryFrontendGraph(model)
    shape = ExportShape(frames=3, height=4, width=6, refs=2, image_tokens=17)
    entry = export_graph(graph, tmp_path, shape, log=lambda s: None)
    assert entry.parity["max_relative_error"][spec.REF_TOKENS] <= PARITY_RTOL
    inputs = graph.sample_inputs(shape, torch.Generator().manual_seed(5))
    check_parity(graph, tmp_path / entry.file, inputs)  # still agrees on fresh inputs
    with torch.no_grad():
        model.patch_embedding.bias.add_(0.01)  # the PyTorch side changes, the written graph does not
    with pytest.raises(ParityError, match="relative error"):
        check_parity(graph, tmp_path / entry.file, inputs)


def test_tensorrt_profiles_cover_both_aspect_buckets_and_cfg_batch():
    r = axis_ranges({"batch": 1, "frames": 21, "height": 60, "width": 96, "refs": 8}, (1, 2, 2))
    assert r["batch"] == (1, 1, 2)
    assert r["latent_height"] == (60, 60, 96) and r["latent_width"] == (60, 96, 96)
    assert r["tokens"][1] == 21 * 30 * 48 == 30240  # the 480x768 clip's token count
    assert r["ref_tokens"][1] == 8 * 30 * 48
    entry = {"inputs": {"x": {"shape": [1, 36, 3, 4, 6], "dynamic": {"0": "batch", "3": "latent_height"}},
                        "t": {"shape": [1, 512, 32], "dynamic": {}}}}
    prof = input_profile(entry, r)
    assert prof["x"] == ([1, 36, 3, 60, 6], [1, 36, 3, 60, 6], [2, 36, 3, 96, 6])
    assert prof["t"] == ([1, 512, 32],) * 3


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present here")
def test_tensorrt_refuses_in_one_sentence_without_gpu_or_package(tmp_path, capsys):
    rc = export_main(["--engine", "tiny-random", "--format", "tensorrt", "--out", str(tmp_path / "trt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: Cannot build TensorRT engines:") and err.count("\n") == 0 and err.endswith(".")
    assert not (tmp_path / "trt").exists()  # refused before exporting anything
    with pytest.raises(TensorRTUnavailable):
        build_engines(tmp_path, tmp_path / "engines")


def test_external_weight_files_above_the_protobuf_limit(tmp_path, monkeypatch):
    import export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1024)  # pretend the tiny graph is over 2 GB
    model = randomized_tiny("worldstereo-memory-dmd", "stitched")
    entry = export_graph(MemoryFrontendGraph(model), tmp_path, ExportShape(refs=2, image_tokens=17),
                         log=lambda s: None)
    import onnx

    data = tmp_path / entry.external_data
    proto = onnx.load(str(tmp_path / entry.file), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {data.name}
    assert data.stat().st_size >= sum(4 * int(np.prod(t.dims)) for t in external)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.file, entry.external_data])
    assert np.isfinite(max(entry.parity["max_relative_error"].values()))
