"""Shared test set-up: offline hub, small thread count, the shared examples, GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; weights are built tiny and saved locally

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WORLDSTEREO_SHARED", REPO.parent / "shared")).resolve()
EXAMPLES = SHARED / "examples"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of several test processes on the same cores (pytest -n): one thread each, and one OpenMP thread for the
    # processes the tests start. OpenMP threads spin while they wait for each other, so two teams sharing cores
    # slow every op many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# The longest files, longest first (measured on two cores): those that start processes of their own (the demo
# server and chromium, the mutation check's pytest runs, torchrun ranks), then the longest in-process ones. With
# pytest-xdist (`pytest -n 2`, the README's command) they start first and the short files fill the other core
# meanwhile and at the end. Without xdist only the order changes.
LONGEST_FIRST = ("test_browser.py", "test_mutants.py", "test_parallel.py", "test_server.py", "test_hostile_server.py",
                 "test_scene.py", "test_bench.py", "test_faults.py", "test_conditioning.py", "test_export.py")


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own choice; optional: -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """With `-n N`: a test file is one unit of work, handed to a worker whole, so its module fixtures (a demo
    server with chromium, a generated scene) are built once instead of once per worker; units go out in the
    collection order below rather than by their number of tests."""
    if config.getvalue("dist") != "load":  # another --dist was asked for explicitly
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def pytest_configure(config):
    """With WORLDSTEREO_MUTANT set (``.ci/mutants.py`` does it), plant that mutant for the whole run."""
    name = os.environ.get("WORLDSTEREO_MUTANT")
    if name:
        import importlib.util

        spec = importlib.util.spec_from_file_location("mutants", REPO / ".ci" / "mutants.py")
        mutants = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mutants)
        mutants.plant(name, pytest.MonkeyPatch())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests stay in their files' order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def examples() -> Path:
    """The shared example inputs (read in place, never copied into the repo)."""
    if not EXAMPLES.is_dir():
        pytest.fail(f"shared examples not found at {EXAMPLES}; set WORLDSTEREO_SHARED to the shared folder")
    return EXAMPLES


@pytest.fixture
def artifacts() -> Path:
    """A folder for files a test keeps for people to look at (screenshots)."""
    out = REPO / "tests" / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core box: a second OpenMP thread only spins (ops ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_VARIANTS = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory) -> dict:
    """One tiny-random checkpoint package per variant, written once per test session (official layout)."""
    from engine.models.tiny import write_tiny_package

    root = tmp_path_factory.mktemp("tiny_packages")
    return {v: write_tiny_package(root / v, v, seed=0) for v in TINY_VARIANTS}


class PlaneTestDepth:
    """Scene depth source without a network: a fronto-parallel plane 2 m away, 60-degree field of view
    (the engine's own plane fallback behind the scene's depth door)."""

    def __new__(cls):
        from engine.depth import PlaneDepth
        from engine.depth import DepthSource

        return DepthSource(PlaneDepth(depth=2.0, fov_x=60.0), "test plane")


@pytest.fixture(scope="module")
def noise_photo(tmp_path_factory) -> Path:
    """A 192x128 photo of uniform noise: every part textured, nothing for a model to know."""
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "photo.png"
    rng = np.random.default_rng(7)
    Image.fromarray((rng.random((128, 192, 3)) * 255).astype(np.uint8)).save(path)
    return path


def tiny_clip_inputs(frames: int, height: int, width: int, seed: int = 0):
    """Random inputs of one clip (a sideways camera track, random render and mask) and two references:
    ``(pipeline keyword arguments, References)``."""
    from engine.geometry.cameras import Cameras, intrinsics_from_fov
    from engine.pipeline import References

    g = torch.Generator().manual_seed(seed)
    w2c = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    w2c[:, 0, 3] = -0.2 * torch.arange(frames)
    cams = Cameras(w2c, intrinsics_from_fov(width, height, 60.0, n=frames), width, height)
    ref_w2c = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    ref_w2c[:, 2, 3] = torch.tensor([0.3, -0.3])
    refs = References(images=torch.rand(2, 3, height, width, generator=g),
                      cameras=Cameras(ref_w2c, cams.K[:2], width, height), ref_index=torch.tensor([0, 1]))
    args = dict(image=torch.rand(3, height, width, generator=g), cameras=cams,
                render=torch.rand(frames, 3, height, width, generator=g),
                render_mask=torch.rand(frames, height, width, generator=g) > 0.3)
    return args, refs


def read_vertex_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """A binary little-endian vertex PLY read by hand (header, then one structured array): a reader independent
    of the plyfile library the engine writes with."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"], header[:2]
    types = {"float": "<f4", "uchar": "u1", "int": "<i4"}
    fields = [(ln.split()[2], types[ln.split()[1]]) for ln in header if ln.startswith("property")]
    n = int(next(ln for ln in header if ln.startswith("element vertex")).split()[-1])
    return [f for f, _ in fields], np.frombuffer(raw, dtype=np.dtype(fields), count=n, offset=end)


class SafetensorsReads:
    """Patches ``safetensors.safe_open`` to record what is read: every file mapped (``files``), every tensor handed
    out (``keys``), the most files mapped at once (``most_open``); ``before_first`` runs before the first tensor."""

    def __init__(self, monkeypatch, before_first=None):
        import safetensors

        self.files, self.keys = [], []
        self.open_now = self.most_open = 0
        real, record = safetensors.safe_open, self

        class Recording:
            def __init__(self, path, *args, **kwargs):
                record.files.append(str(path))
                self.fh = real(path, *args, **kwargs)

            def __enter__(self):
                self.fh.__enter__()
                record.open_now += 1
                record.most_open = max(record.most_open, record.open_now)
                return self

            def __exit__(self, *exc):
                record.open_now -= 1
                return self.fh.__exit__(*exc)

            def get_tensor(self, key):
                if not record.keys and before_first is not None:
                    before_first()
                record.keys.append(key)
                return self.fh.get_tensor(key)

            def __getattr__(self, name):
                return getattr(self.fh, name)

        monkeypatch.setattr(safetensors, "safe_open", Recording)


def hub_snapshot(cache: Path, repo: str, files) -> None:
    """Put ``files`` (``(source path, name in the repo)``) into the standard Hugging Face cache layout under
    ``cache``, as `hf download` leaves them (refs/main -> snapshots/<commit>/...)."""
    import shutil

    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    for src, name in files:
        (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / "snapshots" / commit / name)


def released_in_hub_cache(weights: Path, variant: str, cache: Path, base_repo: str) -> None:
    """``variant`` of a ``--weights`` folder (``write_tiny_weights``) and its base model put into the Hugging Face
    cache as `hf download` leaves them, its config.json naming the base by the hub id ``base_repo``."""
    import json

    base = weights / "base_model"
    hub_snapshot(cache, base_repo, [(p, p.relative_to(base).as_posix()) for p in base.rglob("*") if p.is_file()])
    config = cache.parent / f"{variant}-config.json"  # outside the cache, which holds repositories only
    config.write_text(json.dumps({**json.loads((weights / variant / "config.json").read_text()),
                                  "base_model": base_repo}))
    hub_snapshot(cache, "hanshanxue/WorldStereo", [(config, f"{variant}/config.json"),
                                                   (weights / variant / "model.safetensors",
                                                    f"{variant}/model.safetensors")])
