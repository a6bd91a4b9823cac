"""The scene loop from the second clip on, as the release runs it: the shared corridor scene folder run through
``generate --official-scene`` against the release's own answer (../shared/reference/golden/corridor_retrieval.json),
the frames each clip gives the memory bank, more than eight references narrowed inside the loop (a tiny random
DINOv2 in the Hugging Face cache, and without it), per-trajectory prompts, and ``conditions --scene``."""
from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import SHARED, PlaneTestDepth, hub_snapshot
from engine import conditioning as C
from engine import scene_start
from engine import settings as settings_mod
from engine.cli import main as cli_main
from engine.geometry.cameras import Cameras
from engine.geometry.memory import sample_align_nframe
from engine.images import load_image
from engine.scene import GenerationCancelled, Scene, TrajectoryRequest
from engine.settings import SceneSettings
from scenefolder import assert_same_scene

CORRIDOR = "panorama/indoor-corridor"
PHOTO = "perspective/photorealistic-indoor-dining_spaces-030/image.png"
GOLDEN = SHARED / "reference/golden/corridor_retrieval.json"


def record_generations(monkeypatch, engine: str) -> list:
    """``(conditions, prompt)`` of every clip the engine generates."""
    from engine import generators
    from engine.pipeline import ClipPipeline

    seen = []
    if engine == "preview":
        real = generators.PreviewGenerator.generate
        monkeypatch.setattr(generators.PreviewGenerator, "generate",
                            lambda self, **kw: seen.append((kw["conditions"], kw.get("prompt"))) or real(self, **kw))
    else:
        real = ClipPipeline.generate
        monkeypatch.setattr(ClipPipeline, "generate",
                            lambda self, conditions, **kw: seen.append((conditions, kw.get("prompt")))
                            or real(self, conditions, **kw))
    return seen


def small_official_runs(monkeypatch) -> None:
    """The corridor at small frames, 64x96 for both engines (tiny-random below its package's 80x128: its VAE on 21
    frames is most of the run), since the loop is what is checked, not the pixels; its 21-frame trajectories stay,
    as the release's answer needs them."""
    monkeypatch.setattr(scene_start, "OFFICIAL_PANORAMA_SIZE", (128, 256))
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 1 / 8)
    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "tiny-random", 1 / 8)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("engine, entry", [("preview", "--official-scene"), ("tiny-random", "--render-dir")])
def test_corridor_runs_as_the_release_runs_it(examples, tmp_path, monkeypatch, capsys, engine, entry):
    """The corridor folder run as the release runs it (``--render-dir`` given the scene root means the same): its
    bank, its trajectories in the release's order, each with its own caption and render, and per trajectory exactly
    the release's per-target bank indices, ref_index, references and kept frames, read from the written scene."""
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    small_official_runs(monkeypatch)
    seen = record_generations(monkeypatch, engine)
    golden = json.loads(GOLDEN.read_text())
    root, out = examples / CORRIDOR, tmp_path / "corridor"
    t0 = time.perf_counter()
    rc = cli_main(["generate", entry, str(root), "--engine", engine, "--depth", "sphere", "--out", str(out)])
    seconds = time.perf_counter() - t0
    assert rc == 0, capsys.readouterr().err
    print(f"corridor as the release runs it, {engine}: {seconds:.1f} s")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "official" and manifest["official_scene"] == str(root.resolve())
    assert [c["trajectory"] for c in manifest["clips"]] == [t["trajectory"] for t in golden["trajectories"]]
    bank_size = len(json.loads((out / "state/bank-start/index.json").read_text())["frames"])
    start_labels = {f["label"] for f in json.loads((out / "state/bank-start/index.json").read_text())["frames"]}
    assert start_labels == {"indoor-corridor/pano_bank"}
    for k, (clip, expected) in enumerate(zip(manifest["clips"], golden["trajectories"])):
        folder = out / clip["folder"]
        refs = json.loads((folder / "references.json").read_text())
        assert bank_size == expected["bank_size_before"]
        assert refs["per_target"] == expected["per_target"], clip["name"]
        assert refs["ref_index"] == expected["ref_index"], clip["name"]
        assert refs["references"] == expected["references"], clip["name"]
        index = json.loads((folder / "memory/index.json").read_text())
        kept = [f["frame_id"] - 1000 * (k + 1) for f in index["frames"]]
        assert kept == expected["kept_frames"] == sample_align_nframe(21, 8)
        assert {f["label"] for f in index["frames"]} == {expected["trajectory"]}
        for frame, number in zip(index["frames"], kept):  # lossless: the generated frame itself
            assert np.array_equal(png(folder / "memory" / frame["image"]), png(folder / f"frames/{number:04d}.png"))
        bank_size += len(kept)
        # What the clip was generated from: its own caption, its own official render, the retrieved references.
        cond, prompt = seen[k]
        traj = root / expected["trajectory"]
        assert prompt == json.loads((traj / "traj_caption.json").read_text())["prompt"]
        h, w = manifest["size"]
        pil = C.stretch_to_bucket(load_image(traj.parent / "start_frame.png"), (h, w))
        video, mask = C.read_official_render(traj, pil, 21)
        assert torch.equal(cond.render_mask, mask) and torch.equal(cond.render_video, video)
        if engine == "tiny-random":  # a memory variant: the references reach the transformer
            assert cond.ref_index.tolist() == expected["ref_index"]
            assert cond.num_references == len(expected["references"])


def test_an_official_scene_resumes_and_reverts_as_any_scene(examples, tmp_path, monkeypatch):
    """Stopped after two trajectories and reopened, the scene runs the third with the bank's labels kept (the shortcut
    rules' input), so its references are still the release's; removing the last clip and generating again gives the
    same folder."""
    small_official_runs(monkeypatch)
    golden = json.loads(GOLDEN.read_text())["trajectories"][2]
    out = tmp_path / "job"
    scene = Scene.create_official(out, examples / CORRIDOR, settings=SceneSettings(engine="preview", seed=3),
                                  depth_source=PlaneTestDepth(), announce=lambda m: None)
    with pytest.raises(GenerationCancelled):
        scene.run(cancel=lambda: len(scene.manifest["clips"]) >= 2)  # the third stops at its first step
    again = Scene.open(out, depth_source=PlaneTestDepth(), announce=lambda m: None)
    assert [r.name for r in again.unfinished()] == ["view0/traj1"]
    assert again.unfinished()[0].prompt == json.loads((examples / CORRIDOR / "view0/traj1/traj_caption.json")
                                                      .read_text())["prompt"]
    assert again.bank.labels == ["indoor-corridor/pano_bank"] * 27 + ["view0/traj2"] * 8 + ["view0/traj0"] * 8
    again.run(again.unfinished())
    refs = json.loads((out / again.clips[2]["folder"] / "references.json").read_text())
    assert (refs["per_target"], refs["ref_index"], refs["references"]) == (golden["per_target"], golden["ref_index"],
                                                                            golden["references"])
    shutil.copytree(out, tmp_path / "before")
    assert cli_main(["revert", str(out)]) == 0
    Scene.open(out, depth_source=PlaneTestDepth(), announce=lambda m: None).run()
    assert_same_scene(out, tmp_path / "before")


def test_official_scene_refusals(examples, tmp_path, capsys):
    bad = tmp_path / "scene"
    shutil.copytree(examples / CORRIDOR / "pano_bank", bad / "pano_bank")
    rc = cli_main(["generate", "--official-scene", str(bad), "--engine", "preview", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no trajectory folder" in capsys.readouterr().err
    (bad / "reconstruct_0/traj1").mkdir(parents=True)
    shutil.copy(examples / CORRIDOR / "view0/traj0/camera.json", bad / "reconstruct_0/traj1/camera.json")
    rc = cli_main(["generate", "--official-scene", str(bad), "--engine", "preview", "--out", str(tmp_path / "o")])
    said = capsys.readouterr().err.rstrip().splitlines()[-1]  # after the preparing bar: one sentence
    assert rc == 2 and said.startswith("error: reconstruct_0/traj1") and said.count(". ") == 0
    rc = cli_main(["generate", "--official-scene", str(bad), "--image", str(examples / PHOTO), "--out",
                   str(tmp_path / "o")])
    assert rc == 2 and "exactly one input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- more than eight references, inside the loop ---------------------------------------------------------------

def fan_scene(tmp_path, monkeypatch):
    """A photo scene whose bank holds, besides the photo, one frame at each of 20 cameras turning by 18 degrees, and a
    trajectory through those cameras: every target takes its own frame, 20 distinct, so the selector must choose."""
    from test_retrieval_release import camera, cat

    monkeypatch.setitem(settings_mod.ENGINE_SCALE, "preview", 0.1)
    save = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 384, 3), dtype=np.uint8)).save(save)
    scene = Scene.create(tmp_path / "job", save, settings=SceneSettings(engine="preview", frames=21),
                         depth_source=PlaneTestDepth(), announce=lambda m: None)
    h, w = scene.manifest["size"]
    fan = cat(*[camera(yaw=18.0 * i, center=(0.05 * math.sin(i), 0.0, 0.03 * i), width=w, height=h)
                for i in range(1, 21)])
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(20, 3, h, w, generator=g) ** torch.linspace(0.5, 3, 20)[:, None, None, None] * 255).round()
    scene.bank.add(images / 255, fan, torch.full((20, h, w), 2.0), frame_ids=list(range(1, 21)), source="fan")
    path = TrajectoryRequest(name="fan", cameras=Cameras.cat([scene.start_camera, fan]))
    return scene, path, fan, images / 255


def expected_selection(scene, path, features):
    from test_retrieval_release import expected_after_selection, ref_quality

    bank = scene.bank.cameras
    pixels = (scene.bank.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    quality = np.array([ref_quality(p.astype(np.float64)) for p in pixels])
    return expected_after_selection(scene.plan(path), bank, features, quality)


def test_the_loop_narrows_more_than_eight_references_with_dinov2_from_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import BitImageProcessor

    import engine.frame_features as ff
    from test_retrieval_release import tiny_dinov2

    model = tiny_dinov2()
    model.save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(**ff.DINOV2_PROCESSOR).save_pretrained(tmp_path / "dinov2")
    hub_snapshot(tmp_path / "hub", ff.DINOV2_REPO, [(p, p.name) for p in (tmp_path / "dinov2").iterdir()])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(ff, "_LOADED", {})
    scene, path, _, _ = fan_scene(tmp_path, monkeypatch)
    lines = []
    scene.announce = lines.append
    # The release's features, each frame alone through the processor and the model (the bank's 8-bit frames).
    processor = BitImageProcessor(**ff.DINOV2_PROCESSOR)
    pixels = (scene.bank.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        feats = np.concatenate([model(pixel_values=processor(images=Image.fromarray(p), return_tensors="pt")
                                      ["pixel_values"]).pooler_output.numpy() for p in pixels])
    kept, per_target = expected_selection(scene, path, feats)
    record = scene.generate(path)
    refs = json.loads((scene.job_dir / record.folder / "references.json").read_text())
    assert lines == []  # the weights were found: no fallback line
    assert refs["selected"] == kept and len(set(kept)) == 8 and refs["per_target"] == per_target
    assert len(refs["references"]) == record.references <= 8
    assert expected_selection(scene, path, None)[0] != kept  # the image features decided


def test_the_loop_narrows_more_than_eight_references_by_pose_without_dinov2(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import engine.frame_features as ff

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(ff, "_LOADED", {})
    scene, path, _, _ = fan_scene(tmp_path, monkeypatch)
    lines = []
    scene.announce = lines.append
    kept, per_target = expected_selection(scene, path, None)
    record = scene.generate(path)
    refs = json.loads((scene.job_dir / record.folder / "references.json").read_text())
    assert len(lines) == 1 and "pose" in lines[0] and "\n" not in lines[0]
    assert refs["selected"] == kept and refs["per_target"] == per_target
    assert len(refs["references"]) == record.references <= 8


# ---- per-trajectory prompts -------------------------------------------------------------------------------------

def test_each_trajectory_is_generated_with_its_own_prompt(examples, tmp_path, monkeypatch, capsys):
    seen = record_generations(monkeypatch, "tiny-random")
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "job"
    rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "tiny-random", "--frames", "3",
                   "--trajectories", "left,right", "--prompt", "the scene", "--trajectory-prompt",
                   "left=a = sign on the left", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [p for _, p in seen] == ["a = sign on the left", "the scene"]
    # The resume record keeps each request's prompt.
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest["run"]["requests"]] == ["a = sign on the left", None]
    capsys.readouterr()
    for bad, says in ((["--trajectory-prompt", "up=x"], "does not generate"),
                      (["--trajectory-prompt", "left"], "NAME=TEXT"),
                      (["--trajectory-prompt", "left=a", "--trajectory-prompt", "left=b"], "two prompts")):
        rc = cli_main(["generate", "--image", str(examples / PHOTO), "--engine", "tiny-random", "--frames", "3",
                       "--trajectories", "left", *bad, "--out", str(tmp_path / "other")])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "other").exists()


# ---- the next clip's conditioning of a scene ---------------------------------------------------------------------

def test_conditions_of_a_scenes_next_clip_are_what_it_is_then_generated_with(examples, tmp_path, monkeypatch, capsys):
    """``conditions --scene`` on a one-clip scene writes the second clip's ref_ids (memory-bank indices), ref_index and
    camera codes; generating that clip afterwards gives it exactly those, as its references.json records."""
    monkeypatch.setenv("WORLDSTEREO_CACHE", str(tmp_path / "cache"))
    seen = record_generations(monkeypatch, "tiny-random")
    out = tmp_path / "job"
    args = ["--engine", "tiny-random", "--frames", "5", "--out", str(out)]
    assert cli_main(["generate", "--image", str(examples / PHOTO), "--trajectories", "up", *args]) == 0
    written = tmp_path / "next.safetensors"
    rc = cli_main(["conditions", "--scene", str(out), "--trajectory", "orbit", "--engine", "tiny-random", "--out",
                   str(written)])
    assert rc == 0, capsys.readouterr().err
    assert "ref_ids" in capsys.readouterr().out
    tensors = load_file(str(written))
    assert cli_main(["generate", "--image", str(examples / PHOTO), "--trajectories", "up,orbit", *args]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    refs = json.loads((out / manifest["clips"][1]["folder"] / "references.json").read_text())
    assert tensors["ref_ids"].tolist() == refs["references"] and tensors["ref_index"].tolist() == refs["ref_index"]
    assert len(refs["references"]) >= 2  # the input view and frames of the first clip: a real second clip
    cond, _ = seen[-1]
    for key in ("camera_qt_ref", "camera_qt", "render_mask", "render_video", "extrinsics"):
        assert torch.equal(tensors[key], cond.tensors()[key]), key
    capsys.readouterr()
    for bad in (["--scene", str(out), "--trajectory", "orbit", "--image", str(examples / PHOTO)],
                ["--scene", str(out)], ["--scene", str(tmp_path), "--trajectory", "up"],
                ["--scene", str(out), "--trajectory", "nosuch"]):
        rc = cli_main(["conditions", *bad, "--engine", "tiny-random", "--out", str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
