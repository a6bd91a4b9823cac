"""The released layout through the command line: `generate --weights DIR --device cpu` with each full engine on
tiny packages (partial camera and memory files over a sharded base beside them, a complete DMD file), and
`inspect`, which reads headers only."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SafetensorsReads, released_in_hub_cache
from engine.cli import main as cli_main
from engine.engines import cpu_warning, resolve_engine
from engine.models.tiny import write_tiny_weights

PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
CAMERA, MEMORY, DMD = "worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize("engine, steps", [(CAMERA, 40), (MEMORY, 40), (DMD, 4)])
def test_generate_runs_each_full_engine_on_the_cpu_from_a_weights_folder(examples, weights, tmp_path, capsys,
                                                                          engine, steps):
    out = tmp_path / "scene"
    rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", engine, "--weights", str(weights),
                   "--device", "cpu", "--frames", "3", "--trajectories", "up", "--depth", "plane", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    lines = captured.out.splitlines()
    assert lines.count(cpu_warning(engine)) == 1  # the one-line warning, once
    split = [line for line in lines if line.startswith(f"{engine}: ") and "from model.safetensors" in line]
    held = load_file(str(weights / engine / "model.safetensors"))
    assert len(split) == 1 and f"{len(held)} tensors" in split[0]
    assert ("none from the base model" in split[0]) == (engine == DMD)
    assert f"denoising step {steps}/{steps}" in captured.err  # the variant's own sampler: 40-step UniPC or 4-step DMD
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["engine"] == engine and manifest["settings"]["device"] == "cpu"
    frames = sorted((out / manifest["clips"][0]["folder"] / "frames").glob("*.png"))
    assert len(frames) == 3


def test_full_engines_need_the_cpu_asked_for_by_name(weights):
    notes = []
    if not torch.cuda.is_available():  # without CUDA and without --device cpu: preview, with the reason
        assert resolve_engine(MEMORY, weights, announce=notes.append) == "preview"
        assert "needs a CUDA GPU" in notes[0]
    notes.clear()
    assert resolve_engine(MEMORY, weights, announce=notes.append, device="cpu") == MEMORY
    assert notes == [cpu_warning(MEMORY)]


def test_inspect_prints_the_split_from_headers_only(weights, capsys, monkeypatch):
    reads = SafetensorsReads(monkeypatch)  # headers may be read, tensors may not
    assert cli_main(["inspect", str(weights)]) == 0
    out = capsys.readouterr().out
    assert reads.keys == []
    for variant in (CAMERA, MEMORY, DMD):
        held = load_file(str(weights / variant / "model.safetensors"))
        block = out.split(f"{variant}: ", 1)[1].split("\n  GPU memory")[0]
        assert f"{len(held)} tensors ({sum(v.numel() for v in held.values()) / 1e3:.1f} k parameters) from " \
               "model.safetensors" in block
        assert ("none from the base model" in block) == (variant == DMD)
        assert "none missing" in block and "still to download: none" in block
    camera = out.split(f"{CAMERA}: ", 1)[1]
    assert "of 4 file(s)" in camera and "GPU memory for the weights" in camera and "host memory while loading" in camera


def test_inspect_of_a_hub_repository_reads_the_cache_offline(weights, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    released_in_hub_cache(weights, CAMERA, tmp_path / "hub", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli_main(["inspect", "hanshanxue/WorldStereo", "--variant", CAMERA]) == 0
    out = capsys.readouterr().out
    assert "base model: Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" in out and "still to download: none" in out
    assert "from the base model's transformer/ (4 of 4 file(s))" in out
    # a variant that is not in the cache, offline: one sentence, exit code 2
    assert cli_main(["inspect", "hanshanxue/WorldStereo", "--variant", MEMORY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "hf download hanshanxue/WorldStereo" in err
