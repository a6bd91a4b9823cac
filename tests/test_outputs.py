"""Result writers: each file is read back by an independent reader (imageio/ffmpeg, open3d, trimesh, a
hand-written glTF and PLY parser, nerfstudio's axis convention) and checked against what was written."""
from __future__ import annotations

import json
import struct
import zipfile

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from conftest import read_vertex_ply
from engine.geometry.cameras import Cameras, intrinsics_matrix
from engine.outputs import (
    SH_C0,
    SPLAT_OPACITY,
    OutputError,
    read_video,
    write_cameras_json,
    write_mask_video,
    write_point_cloud_glb,
    write_point_cloud_ply,
    write_splat_ply,
    write_transforms_json,
    write_video,
    zip_folder,
)


def _smooth_frames(n: int, h: int, w: int) -> torch.Tensor:
    """Smooth colour ramps that move per frame: H.264 at high quality reproduces them closely."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    frames = []
    for i in range(n):
        t = i / max(n - 1, 1)
        frames.append(torch.stack([x * 0.8 + 0.1 * t, y * 0.7 + 0.2, (x + y) * 0.4 + 0.1 * (1 - t)]))
    return torch.stack(frames).clamp(0, 1)


def _imageio_frames(path) -> tuple[np.ndarray, dict]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        return np.stack([np.asarray(f) for f in reader]), meta
    finally:
        reader.close()


# ---- videos --------------------------------------------------------------------------------------

def test_video_roundtrip(tmp_path):
    frames = _smooth_frames(5, 32, 48)
    path = write_video(tmp_path / "clip.mp4", frames, fps=16)
    data, meta = _imageio_frames(path)
    assert data.shape == (5, 32, 48, 3)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == pytest.approx(16)
    ref = frames.permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(data.astype(np.float64) - ref).mean() < 2.0
    back = read_video(path)
    assert back.shape == frames.shape
    assert (back - frames).abs().mean() < 2 / 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_video_odd_size_padded_to_even(tmp_path):
    frames = _smooth_frames(2, 31, 45)
    data, _ = _imageio_frames(write_video(tmp_path / "odd.mp4", frames))
    assert data.shape == (2, 32, 46, 3)
    ref = frames.permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(data[:, :31, :45].astype(np.float64) - ref).mean() < 2.0
    # The padding replicates the last row / column: with content that varies only along the other axis,
    # the padded row (column) must look like any real one.
    x_only = _smooth_frames(2, 31, 45)[:, :, :1, :].expand(-1, -1, 31, -1).contiguous()
    d, _ = _imageio_frames(write_video(tmp_path / "x.mp4", x_only))
    assert np.abs(d[:, 31, :45].astype(float) - x_only[:, :, 30].permute(0, 2, 1).numpy() * 255).mean() < 2.0
    y_only = _smooth_frames(2, 31, 45)[..., :1].expand(-1, -1, -1, 45).contiguous()
    d, _ = _imageio_frames(write_video(tmp_path / "y.mp4", y_only))
    assert np.abs(d[:, :31, 45].astype(float) - y_only[..., 44].permute(0, 2, 1).numpy() * 255).mean() < 2.0


def test_mask_video_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 32, 48, dtype=torch.bool)
    for i in range(4):
        r = torch.randint(0, 20, (2,), generator=g)
        masks[i, r[0] : r[0] + 12, r[1] : r[1] + 20] = True
    data, _ = _imageio_frames(write_mask_video(tmp_path / "mask.mp4", masks))
    assert data.shape == (4, 32, 48, 3)
    decoded = data.mean(axis=-1) > 127
    assert (decoded == masks.numpy()).mean() > 0.99



def test_mask_and_depth_videos_are_their_float_frames_video(tmp_path):
    """The mask and depth videos, written from 8-bit frames, are byte for byte the videos of the float frames they
    stand for (white/black masks; ``depth_to_colors``)."""
    from engine.outputs import depth_to_colors, write_depth_video

    g = torch.Generator().manual_seed(8)
    masks = torch.rand(3, 30, 46, generator=g) > 0.5
    depth = torch.rand(3, 30, 46, generator=g) * 4 + 0.5
    valid = torch.rand(3, 30, 46, generator=g) > 0.2
    a = write_mask_video(tmp_path / "m8.mp4", masks).read_bytes()
    assert a == write_video(tmp_path / "mf.mp4", masks.float()[:, None].expand(-1, 3, -1, -1)).read_bytes()
    b = write_depth_video(tmp_path / "d8.mp4", depth, valid).read_bytes()
    assert b == write_video(tmp_path / "df.mp4", depth_to_colors(depth, valid)).read_bytes()
    odd = write_mask_video(tmp_path / "odd8.mp4", masks[:, :29, :45]).read_bytes()  # padded to even
    assert odd == write_video(tmp_path / "oddf.mp4", masks[:, :29, :45].float()[:, None].expand(-1, 3, -1, -1)).read_bytes()

def test_bad_frames_refused(tmp_path):
    with pytest.raises(OutputError, match=r"\[F,3,H,W\]"):
        write_video(tmp_path / "x.mp4", torch.rand(3, 32, 32))
    with pytest.raises(OutputError, match="NaN"):
        write_video(tmp_path / "x.mp4", torch.full((1, 3, 8, 8), float("nan")))
    for bad in (float("inf"), -float("inf"), float("nan")):  # one bad value among finite ones
        frames = torch.rand(2, 3, 8, 8)
        frames[1, 2, 7, 3] = bad
        with pytest.raises(OutputError, match="infinite"):
            write_video(tmp_path / "x.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def test_video_bytes_are_imageios(tmp_path):
    """The pipe to ffmpeg writes the file imageio's FFMPEG writer writes with the same settings, frame by frame."""
    frames = _smooth_frames(7, 30, 46)
    ours = write_video(tmp_path / "ours.mp4", frames, fps=16, crf=17)
    writer = imageio.get_writer(tmp_path / "imageio.mp4", format="FFMPEG", mode="I", fps=16, codec="libx264",
                                pixelformat="yuv420p", quality=None, macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-crf", "17", "-threads", "1", "-movflags", "+faststart"])
    for frame in (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        writer.append_data(frame)
    writer.close()
    assert ours.read_bytes() == (tmp_path / "imageio.mp4").read_bytes()


# ---- point clouds --------------------------------------------------------------------------------

def _cloud(n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, 3)) * [1.0, 2.0, 3.0] + [0, 0, 5]
    cols = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    return pts, cols


def test_ply_opens_in_open3d_and_trimesh(tmp_path):
    import open3d as o3d
    import trimesh

    pts, cols = _cloud()
    pts_with_bad = np.concatenate([pts, [[np.nan, 0, 0], [0, np.inf, 0]]])
    cols_with_bad = np.concatenate([cols, [[1, 2, 3], [4, 5, 6]]]).astype(np.uint8)
    path = write_point_cloud_ply(tmp_path / "scene.ply", torch.from_numpy(pts_with_bad), cols_with_bad)

    pcd = o3d.io.read_point_cloud(str(path))
    assert len(pcd.points) == len(pts)  # non-finite points dropped
    np.testing.assert_allclose(np.asarray(pcd.points), pts, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pcd.colors) * 255, cols, atol=1e-6)

    cloud = trimesh.load(path)
    np.testing.assert_allclose(np.asarray(cloud.vertices), pts, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], cols)

    # Float colours in [0,1] are scaled to bytes.
    path2 = write_point_cloud_ply(tmp_path / "f.ply", pts, cols / 255.0)
    np.testing.assert_allclose(np.asarray(o3d.io.read_point_cloud(str(path2)).colors) * 255, cols, atol=1e-6)


def _parse_glb(path):
    data = path.read_bytes()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack("<I4s", data[12:20])
    assert json_type == b"JSON"
    gltf = json.loads(data[20 : 20 + json_len])
    off = 20 + json_len
    bin_len, bin_type = struct.unpack("<I4s", data[off : off + 8])
    assert bin_type == b"BIN\x00"
    return gltf, data[off + 8 : off + 8 + bin_len]


def _accessor(gltf, binary, index, dtype, width):
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(binary, dtype=dtype, count=acc["count"] * width, offset=start)
    return arr.reshape(acc["count"], width)


def test_glb_is_points_with_colours(tmp_path):
    pts, cols = _cloud(300, seed=1)
    path = write_point_cloud_glb(tmp_path / "scene.glb", pts, cols)
    gltf, binary = _parse_glb(path)
    (prim,) = [p for m in gltf["meshes"] for p in m["primitives"]]
    assert prim["mode"] == 0  # POINTS
    assert "COLOR_0" in prim["attributes"] and "POSITION" in prim["attributes"]
    pos = _accessor(gltf, binary, prim["attributes"]["POSITION"], np.float32, 3)
    # OpenCV (y down, z forward) to glTF (y up, z back): (x, -y, -z).
    np.testing.assert_allclose(pos, pts * [1, -1, -1], rtol=1e-6, atol=1e-6)
    col_acc = gltf["accessors"][prim["attributes"]["COLOR_0"]]
    assert col_acc["componentType"] == 5121 and col_acc["normalized"]  # uint8 normalised
    width = 4 if col_acc["type"] == "VEC4" else 3
    colours = _accessor(gltf, binary, prim["attributes"]["COLOR_0"], np.uint8, width)
    np.testing.assert_array_equal(colours[:, :3], cols)



@pytest.mark.parametrize("n, axes", [(1, None), (300, "opencv"), (1001, "zup")])
def test_glb_is_the_one_trimesh_exports_and_trimesh_reads_it(tmp_path, n, axes):
    """The GLB equals trimesh's export of the same ``PointCloud`` (JSON header but the generator's name, binary chunk
    byte for byte), and trimesh loads it back as the points and colours."""
    import trimesh

    from engine.outputs import OPENCV_TO_OPENGL, ZUP_TO_OPENGL

    pts, cols = _cloud(n, seed=n)
    rot = {"opencv": OPENCV_TO_OPENGL, "zup": ZUP_TO_OPENGL, None: None}[axes]
    ours = write_point_cloud_glb(tmp_path / "ours.glb", pts, cols, axes=rot)
    moved = pts if rot is None else pts @ rot.T
    rgba = np.concatenate([cols, np.full((n, 1), 255, np.uint8)], axis=1)
    (tmp_path / "trimesh.glb").write_bytes(trimesh.PointCloud(moved.astype(np.float32), colors=rgba)
                                           .export(file_type="glb"))
    gltf, binary = _parse_glb(ours)
    theirs, their_binary = _parse_glb(tmp_path / "trimesh.glb")
    assert gltf.pop("asset") == {"version": "2.0", "generator": "WorldStereo Studio (engine/outputs.py)"}
    theirs.pop("asset")
    assert gltf == theirs and binary == their_binary
    loaded = trimesh.load(ours, force="scene")
    (cloud,) = loaded.geometry.values()
    np.testing.assert_allclose(cloud.vertices, moved, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], cols)

def test_splat_ply_layout(tmp_path):
    pts, cols = _cloud(200, seed=2)
    scales = np.linspace(0.01, 0.05, 200)
    path = write_splat_ply(tmp_path / "splat.ply", pts, cols, scales)
    _, v = read_vertex_ply(path)
    names = list(v.dtype.names)
    for key in ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]:
        assert key in names
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), pts, rtol=1e-6, atol=1e-6)
    rgb = 0.5 + 0.28209479 * np.stack([v["f_dc_0"], v["f_dc_1"], v["f_dc_2"]], 1)
    np.testing.assert_allclose(rgb * 255, cols, atol=1e-3)
    assert SH_C0 == pytest.approx(0.28209479)
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"])), SPLAT_OPACITY, rtol=1e-5)
    assert SPLAT_OPACITY > 0.95
    for k in ("scale_0", "scale_1", "scale_2"):
        np.testing.assert_allclose(np.exp(v[k]), scales, rtol=1e-5)
    np.testing.assert_array_equal(v["rot_0"], 1.0)
    for k in ("rot_1", "rot_2", "rot_3", "nx", "ny", "nz"):
        np.testing.assert_array_equal(v[k], 0.0)
    # A single scale applies to every point.
    _, v1 = read_vertex_ply(write_splat_ply(tmp_path / "s1.ply", pts, cols, 0.02))
    np.testing.assert_allclose(np.exp(v1["scale_2"]), 0.02, rtol=1e-5)


# ---- cameras -------------------------------------------------------------------------------------

def _random_cameras(n: int, w: int, h: int, seed: int = 0) -> Cameras:
    rng = np.random.default_rng(seed)
    rot = Rotation.random(n, random_state=seed).as_matrix()
    w2c = np.tile(np.eye(4), (n, 1, 1))
    w2c[:, :3, :3] = rot
    w2c[:, :3, 3] = rng.normal(size=(n, 3))
    f = rng.uniform(30, 60, size=n)
    K = torch.cat([intrinsics_matrix(f[i], f[i] * 1.01, w / 2 + 0.3 * i, h / 2 - 0.2 * i) for i in range(n)])
    return Cameras(torch.from_numpy(w2c), K, w, h, motion_list=[f"move-{i}" for i in range(n)])


def test_cameras_json_official_format(tmp_path):
    cams = _random_cameras(3, 64, 48)
    path = write_cameras_json(tmp_path / "camera.json", cams)
    raw = json.loads(path.read_text())
    assert set(raw) >= {"extrinsic", "intrinsic", "motion_list"}
    back = Cameras.from_json(path)
    torch.testing.assert_close(back.w2c, cams.w2c, atol=1e-12, rtol=0)
    torch.testing.assert_close(back.K, cams.K, atol=1e-12, rtol=0)
    assert back.motion_list == cams.motion_list and (back.width, back.height) == (64, 48)


def test_transforms_json_nerfstudio(tmp_path):
    n, h, w = 3, 24, 32
    cams = _random_cameras(n, w, h, seed=3)
    images = _smooth_frames(n, h, w)
    path = write_transforms_json(tmp_path / "dataset", images, cams)
    data = json.loads(path.read_text())
    assert data["camera_model"] == "OPENCV" and (data["w"], data["h"]) == (w, h)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    for i, frame in enumerate(data["frames"]):
        assert frame["file_path"] == f"images/frame_{i + 1:05d}.png"
        c2w_gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
        # nerfstudio cameras look down their -z axis: it must be the OpenCV optical axis (+z row of R).
        np.testing.assert_allclose(-c2w_gl[:3, 2], cams.w2c[i, 2, :3].numpy(), atol=1e-12)
        w2c = np.linalg.inv(c2w_gl @ flip)
        np.testing.assert_allclose(w2c, cams.w2c[i].numpy(), atol=1e-9, rtol=0)
        K = cams.K[i].numpy()
        assert (frame["fl_x"], frame["fl_y"], frame["cx"], frame["cy"]) == (K[0, 0], K[1, 1], K[0, 2], K[1, 2])
        assert (frame["w"], frame["h"]) == (w, h)
        png = np.asarray(Image.open(tmp_path / "dataset" / frame["file_path"]))
        expected = np.round(images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(png, expected)
    with pytest.raises(OutputError, match="one camera per image"):
        write_transforms_json(tmp_path / "bad", images[:2], cams)



def test_transforms_json_copies_png_files_and_leaves_equal_ones(tmp_path):
    """Images given as PNG files are copied byte for byte (not re-encoded); the dataset equals, file for file in
    pixels, the one written from the decoded tensors; a second write with the same images rewrites no image file."""
    n, h, w = 4, 24, 32
    cams = _random_cameras(n, w, h, seed=5)
    frames = _smooth_frames(n, h, w)
    sources = []
    for i in range(1, n):  # the first image as a tensor, the others as files written by another encoder (Pillow)
        sources.append(tmp_path / f"src{i}.png")
        Image.fromarray((frames[i] * 255).round().byte().permute(1, 2, 0).numpy()).save(sources[-1], compress_level=9)
    path = write_transforms_json(tmp_path / "mixed", [frames[0], *sources], cams)
    from_tensors = write_transforms_json(tmp_path / "tensors", frames, cams)
    assert json.loads(path.read_text()) == json.loads(from_tensors.read_text())
    for i in range(n):
        rel = f"images/frame_{i + 1:05d}.png"
        if i:
            assert (tmp_path / "mixed" / rel).read_bytes() == sources[i - 1].read_bytes()
        a, b = Image.open(tmp_path / "mixed" / rel), Image.open(tmp_path / "tensors" / rel)
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mixed" / "images").iterdir()}
    inodes = {p.name: p.stat().st_ino for p in (tmp_path / "mixed" / "images").iterdir()}
    write_transforms_json(tmp_path / "mixed", [frames[0], *sources], cams)
    assert {p.name: p.stat().st_ino for p in (tmp_path / "mixed" / "images").iterdir()} == inodes
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "mixed" / "images").iterdir()} == stamps
    with pytest.raises(OutputError, match="different sizes"):
        write_transforms_json(tmp_path / "bad", [frames[0], *sources[:1], torch.rand(3, h + 2, w)], cams[:3])

# ---- zip, atomicity --------------------------------------------------------------------

def test_zip_contains_exactly_the_files_and_is_deterministic(tmp_path):
    job = tmp_path / "job"
    (job / "images").mkdir(parents=True)
    (job / "images" / "a.png").write_bytes(b"png-a")
    (job / "images" / "b.png").write_bytes(b"png-b")
    (job / "manifest.json").write_text(json.dumps({"engine": "preview"}))
    (job / "cache.pt").write_bytes(b"big cache")
    (job / ".scene.ply.tmp123.ply").write_bytes(b"half-written")
    (job / "z.txt").write_text("z" * 1000)
    z1 = zip_folder(job, job / "result.zip", exclude=["*.pt"])
    with zipfile.ZipFile(z1) as zf:
        assert zf.namelist() == ["images/a.png", "images/b.png", "manifest.json", "z.txt"]
        assert zf.read("z.txt") == b"z" * 1000
        assert json.loads(zf.read("manifest.json")) == {"engine": "preview"}
    first = z1.read_bytes()
    import os
    import time

    (job / "result.zip").unlink()
    os.utime(job / "z.txt", (time.time() + 100, time.time() + 100))
    z2 = zip_folder(job, tmp_path / "again.zip", exclude=["*.pt"])
    assert z2.read_bytes() == first
    # `only` keeps just the matching files (a dataset without the rest of the job).
    z3 = zip_folder(job, tmp_path / "images.zip", only=["images/*"])
    with zipfile.ZipFile(z3) as zf:
        assert zf.namelist() == ["images/a.png", "images/b.png"]



def test_zip_rebuilt_over_its_previous_archive_equals_one_built_from_scratch(tmp_path, monkeypatch):
    """An archive written over the previous one (its unchanged deflated entries reused) is byte for byte the archive
    written from scratch, after files changed (same size too), appeared and went; Python's zipfile reads every entry
    back as the file's bytes; only the changed and new files are compressed again."""
    import engine.outputs as outputs_module

    rng = np.random.default_rng(3)
    job = tmp_path / "job"
    (job / "clips" / "00_up").mkdir(parents=True)
    (job / "scene.ply").write_bytes(rng.normal(size=20000).astype(np.float32).tobytes())
    (job / "scene_splats.ply").write_bytes(np.repeat(rng.normal(size=3000), 7).astype(np.float32).tobytes())
    (job / "manifest.json").write_text(json.dumps({"clips": ["00_up"]}))
    (job / "clips" / "00_up" / "clip.mp4").write_bytes(rng.bytes(5000))
    (job / "clips" / "00_up" / "caméra.json").write_text("{}")  # a UTF-8 name
    z = zip_folder(job, job / "scene.zip")
    first = z.read_bytes()

    (job / "manifest.json").write_text(json.dumps({"clips": ["00_up", "01_on"]}))
    splats = bytearray((job / "scene_splats.ply").read_bytes())
    splats[100] ^= 0xFF  # same size, other bytes
    (job / "scene_splats.ply").write_bytes(bytes(splats))
    (job / "clips" / "01_on").mkdir()
    (job / "clips" / "01_on" / "cameras.json").write_text("[1, 2]")
    (job / "clips" / "00_up" / "caméra.json").unlink()
    compressed = []
    real = outputs_module._deflate
    monkeypatch.setattr(outputs_module, "_deflate", lambda data: compressed.append(len(data)) or real(data))
    again = zip_folder(job, job / "scene.zip").read_bytes()
    monkeypatch.undo()
    scratch = zip_folder(job, tmp_path / "scratch.zip", exclude=["scene.zip"]).read_bytes()  # the same files
    assert again == scratch and again != first
    sizes = {p.name: p.stat().st_size for p in job.rglob("*") if p.is_file() and p.name != "scene.zip"}
    assert sorted(compressed) == sorted([sizes["manifest.json"], sizes["scene_splats.ply"], sizes["cameras.json"]])
    with zipfile.ZipFile(job / "scene.zip") as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert names == sorted(names) and set(names) == {p.relative_to(job).as_posix() for p in job.rglob("*")
                                                          if p.is_file() and p.name != "scene.zip"}
        for info in zf.infolist():
            assert zf.read(info) == (job / info.filename).read_bytes() and info.date_time == (1980, 1, 1, 0, 0, 0)
            stored = info.filename.endswith(".mp4")
            assert info.compress_type == (zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    import shutil
    import subprocess

    if shutil.which("unzip"):  # Info-ZIP, a second reader: every entry's data and checksum
        done = subprocess.run(["unzip", "-tq", str(job / "scene.zip")], capture_output=True, text=True)
        assert done.returncode == 0 and "No errors" in done.stdout, done.stdout + done.stderr
    # An archive another writer made (Python's zipfile, deflate level 9) is read but none of its entries reused.
    with zipfile.ZipFile(job / "scene.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for p in sorted(job.rglob("*")):
            if p.is_file() and p.name != "scene.zip":
                zf.write(p, p.relative_to(job).as_posix())
    assert zip_folder(job, job / "scene.zip").read_bytes() == scratch

def test_failed_write_keeps_earlier_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = write_video(tmp_path / "clip.mp4", _smooth_frames(2, 16, 16))
    before = target.read_bytes()

    class Boom(RuntimeError):
        pass

    # ffmpeg failing part-way (it reads some frames, writes part of the file, then exits with an error).
    failing = tmp_path.parent / f"{tmp_path.name}-failing-ffmpeg.sh"
    failing.write_text('#!/bin/sh\nhead -c 100 > /dev/null\nfor a; do out="$a"; done\n'
                       'printf partial > "$out"\necho "disk full" >&2\nexit 1\n')
    failing.chmod(0o755)
    import engine.outputs as outputs_module

    monkeypatch.setattr(outputs_module, "_ffmpeg_exe", lambda: str(failing))
    with pytest.raises(OutputError, match="disk full"):
        write_video(target, _smooth_frames(3, 16, 16))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    monkeypatch.undo()

    # Same for the zip writer, failing part-way through the files.
    job = tmp_path / "job"
    job.mkdir()
    for name in "abc":
        (job / f"{name}.txt").write_text(name)
    z = zip_folder(job, tmp_path / "out.zip")
    zbefore = z.read_bytes()
    import engine.outputs as outputs_module

    real_deflate = outputs_module._deflate
    seen = {"n": 0}

    def failing_deflate(data):
        seen["n"] += 1
        if seen["n"] == 2:
            raise Boom("interrupted")
        return real_deflate(data)

    for name in "abc":  # changed: nothing of the archive being replaced can be reused
        (job / f"{name}.txt").write_text(name * 2)
    monkeypatch.setattr(outputs_module, "_deflate", failing_deflate)
    with pytest.raises(Boom):
        zip_folder(job, z)
    monkeypatch.undo()
    assert z.read_bytes() == zbefore
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "job", "out.zip"]
