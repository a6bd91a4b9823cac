"""One comparison of two scene folders, file by file, for every test that interrupts a run (resume, revert, cancel,
kill): the finished folder must equal the folder an uninterrupted run of the same command writes.

Every file counts — clips, the 3D caches, the memory bank, the manifest and its snapshots, the cameras, the dataset,
the zip — and each is compared by what it holds: JSON decoded (only the timing fields left out: a clip's
``seconds`` and the scene's ``created``), PLY point clouds as their vertex arrays, safetensors as tensors, zips
member by member under the same rules, videos by their bytes or else their decoded frames, anything else by bytes.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

TIMING_KEYS = frozenset({"seconds", "timeline", "created"})  # wall-clock values: the only things two runs may differ in


def without_timings(value):
    """``value`` (decoded JSON) with every ``TIMING_KEYS`` entry removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def _ply_vertices(raw: bytes) -> np.ndarray:
    from plyfile import PlyData

    return PlyData.read(io.BytesIO(raw))["vertex"].data


def _video_frames(raw: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(raw, extension=".mp4")


def same_content(name: str, a: bytes, b: bytes) -> bool:
    """Whether two versions of the file ``name`` hold the same thing (module doc)."""
    if a == b:
        return True
    suffix = Path(name).suffix.lower()
    if suffix == ".json":
        return without_timings(json.loads(a)) == without_timings(json.loads(b))
    if suffix == ".zip":
        with zipfile.ZipFile(io.BytesIO(a)) as za, zipfile.ZipFile(io.BytesIO(b)) as zb:
            if sorted(za.namelist()) != sorted(zb.namelist()):
                return False
            return all(same_content(n, za.read(n), zb.read(n)) for n in za.namelist())
    if suffix == ".ply":
        va, vb = _ply_vertices(a), _ply_vertices(b)
        return va.dtype == vb.dtype and va.shape == vb.shape and bool((va == vb).all())
    if suffix == ".safetensors":
        from safetensors.torch import load

        ta, tb = load(a), load(b)
        return ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)
    if suffix == ".mp4":
        fa, fb = _video_frames(a), _video_frames(b)
        return fa.shape == fb.shape and bool((fa == fb).all())
    return False


def scene_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def scene_differences(finished, uninterrupted) -> list[str]:
    """What differs between two scene folders (paths, or `scene_files` taken earlier): files only in one of them
    and files whose content differs."""
    a = finished if isinstance(finished, dict) else scene_files(finished)
    b = uninterrupted if isinstance(uninterrupted, dict) else scene_files(uninterrupted)
    problems = [f"only in the finished scene: {n}" for n in sorted(set(a) - set(b))]
    problems += [f"only in the uninterrupted scene: {n}" for n in sorted(set(b) - set(a))]
    problems += [f"differs: {n}" for n in sorted(set(a) & set(b)) if not same_content(n, a[n], b[n])]
    return problems


def assert_same_scene(finished, uninterrupted) -> None:
    """The interrupted-then-finished scene equals the uninterrupted one, every file but its timings."""
    problems = scene_differences(finished, uninterrupted)
    assert not problems, "the scene differs from an uninterrupted run of the same command:\n" + "\n".join(problems)
