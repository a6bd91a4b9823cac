"""Where a scene's work runs: the 3D cache and its renders live on the engine's device, next to the networks."""
from __future__ import annotations

import pytest
import torch

from conftest import PlaneTestDepth
from engine.images import save_image
from engine.scene import Scene
from engine.settings import SceneError, SceneSettings


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    save_image(path, torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_scene_without_cuda_is_refused_before_anything_is_written(photo, tmp_path):
    job = tmp_path / "job"
    with pytest.raises(SceneError, match="not available here"):
        Scene.create(job, photo, settings=SceneSettings(device="cuda"), depth_source=PlaneTestDepth())
    assert not job.exists()


@pytest.mark.gpu
def test_cache_and_renders_live_on_the_gpu(photo, tmp_path, monkeypatch):
    import engine.geometry.cache as cache_module

    devices = []
    real = cache_module.render_points
    monkeypatch.setattr(cache_module, "render_points", lambda pts, *a, **kw: devices.append(pts.device.type)
                        or real(pts, *a, **kw))
    settings = SceneSettings(engine="preview", device="cuda", frames=3)
    scene = Scene.create(tmp_path / "job", photo, settings=settings, depth_source=PlaneTestDepth(),
                         announce=lambda _: None)
    assert scene.cache.device.type == "cuda"
    scene.generate("left")
    assert devices == ["cuda"] and scene.cache.device.type == "cuda"
    reopened = Scene.open(tmp_path / "job", depth_source=PlaneTestDepth(), announce=lambda _: None)
    assert reopened.cache.device.type == "cuda" and len(reopened.cache) == len(scene.cache)
