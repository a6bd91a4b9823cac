"""Writing results into a job folder: videos, point clouds, cameras, a 3DGS-ready dataset, a zip.

Every writer goes through ``engine.atomicio.atomic_path`` (temporary file beside the target, then
``os.replace``): a crash or an exception mid-write leaves the previous file intact and no temporary file
behind. Files are written so that common tools open them unchanged:

- MP4: H.264, yuv420p (plays in browsers); odd sizes are padded by one replicated row/column to even.
- ``scene.ply``: plain binary point cloud, float32 x,y,z + uint8 red,green,blue (open3d, trimesh, MeshLab).
- ``scene.glb``: glTF binary with one POINTS primitive and COLOR_0, for gradio's ``gr.Model3D``
  (which sends every ``.ply`` to its Gaussian-splat renderer).
- ``scene_splats.ply``: the 3D Gaussian splatting layout (degree-0 SH colour, opacity logit, log scales,
  identity rotation) for splat viewers.
- ``camera.json``: the official WorldStereo format; ``transforms.json``: nerfstudio.
"""
from __future__ import annotations

import fnmatch
import json
import os
import struct
import subprocess
import zipfile
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from engine.atomicio import atomic_path, atomic_write_json
from engine.geometry.cameras import Cameras
from engine.images import to_uint8
from engine.plyio import write_vertices

PathLike = Union[str, Path]
ArrayLike = Union[torch.Tensor, np.ndarray]

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonic constant, 1 / (2 sqrt(pi))
SPLAT_OPACITY = 0.99
# OpenCV (x right, y down, z forward) to the glTF / OpenGL / nerfstudio camera axes (x right, y up, z back).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0])
OPENGL_TO_OPENCV = OPENCV_TO_OPENGL  # the flip is its own inverse
# A z-up world (the panorama bank's) into glTF's y-up frame: (x, y, z) -> (x, z, -y).
ZUP_TO_OPENGL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
# x264 on one thread: the same bytes on every machine (x264 splits its work, and records the split in the stream, by
# the cores it finds), and the encoder leaves the other cores to the scene loop; as fast as the default on 2 cores
# (0.16 against 0.18 s for 21 frames at 240x384). The "veryfast" preset would halve the time again but costs 0.3-0.5
# dB of PSNR at the same crf (on a preview clip), and on small clips more than the 4:2:0 chroma subsampling alone.
X264_OPTIONS = ("-threads", "1")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: archives are byte-identical run to run


class OutputError(ValueError):
    """Data that cannot be written as asked; the message is one sentence."""


# ---- helpers -------------------------------------------------------------------------------------

def _numpy(x: ArrayLike, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _check_frames(frames: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        frames = torch.as_tensor(np.asarray(frames))
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise OutputError(f"{what} needs frames shaped [F,3,H,W] with F > 0; got {tuple(frames.shape)}.")
    if frames.is_floating_point() and frames.numel():
        lo, hi = torch.aminmax(frames)  # NaN propagates into both: one pass, no [F,3,H,W] mask allocated
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise OutputError(f"{what} got frames with NaN or infinite values.")
    return frames


def _pad_even(frames: torch.Tensor) -> torch.Tensor:
    h, w = frames.shape[-2:]
    ph, pw = h % 2, w % 2
    if ph or pw:
        # yuv420p stores colour at half resolution, so H.264 needs even sides; replicate the edge.
        frames = F.pad(frames.float(), (0, pw, 0, ph), mode="replicate")
    return frames


def _points_colors(points: ArrayLike, colors: Optional[ArrayLike], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N,3]`` float points and ``[N,3]`` uint8 colours (float colours are in [0,1]); non-finite points dropped."""
    p = _numpy(points, np.float64)
    if p.ndim < 1 or p.shape[-1] != 3:
        raise OutputError(f"{what} needs points shaped [N,3]; got {p.shape}.")
    p = p.reshape(-1, 3)
    if colors is None:
        c = np.full((p.shape[0], 3), 255, np.uint8)
    else:
        c = _numpy(colors)
        c = c.reshape(-1, c.shape[-1]) if c.ndim >= 2 else c
        if c.ndim != 2 or c.shape[1] < 3 or c.shape[0] != p.shape[0]:
            raise OutputError(f"{what} needs one RGB colour per point ({p.shape[0]}); got colours shaped {c.shape}.")
        c = c[:, :3]
        if c.dtype != np.uint8:
            c = np.clip(np.round(c.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    keep = np.isfinite(p).all(axis=1)
    return p[keep], c[keep], keep


# ---- videos --------------------------------------------------------------------------------------

def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_video(path: PathLike, frames: torch.Tensor, fps: float = 16, crf: int = 17) -> Path:
    """Frames ``[F,3,H,W]`` in [0,1] to an H.264 yuv420p MP4 (``crf`` 17: visually lossless).

    The frames go to ffmpeg (imageio's build) in one pipe write, with the command imageio's FFMPEG writer runs for
    ``X264_OPTIONS``, so the file is the one imageio writes, without its per-frame generator and its 10 ms polls for
    the process's end.
    """
    frames = _pad_even(_check_frames(frames, "write_video"))
    data = to_uint8(frames) if frames.is_floating_point() else frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    _, h, w, _ = data.shape
    path = Path(path)
    with atomic_path(path, suffix=".mp4") as tmp:
        cmd = [_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24",
               "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an", "-vcodec", "libx264",
               "-pix_fmt", "yuv420p", "-v", "error", "-crf", str(int(crf)), *X264_OPTIONS, "-movflags", "+faststart", str(tmp)]
        done = subprocess.run(cmd, input=np.ascontiguousarray(data).tobytes(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise OutputError(f"ffmpeg could not write {path.name} ({why[-1][:200] if why else f'exit {done.returncode}'}).")
    return path


def write_mask_video(path: PathLike, masks: torch.Tensor, fps: float = 16) -> Path:
    """Bool masks ``[F,H,W]`` as a black/white MP4 (white = True), like the official ``render_mask.mp4``."""
    masks = torch.as_tensor(masks)
    if masks.dim() != 3:
        raise OutputError(f"write_mask_video needs masks shaped [F,H,W]; got {tuple(masks.shape)}.")
    frames = masks.bool()[:, None].expand(-1, 3, -1, -1).to(torch.uint8) * 255  # 8-bit: no float frames to round
    return write_video(path, frames, fps=fps)


def depth_to_rgb8(depth: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """``depth_to_colors`` as 8-bit colours ``[F,H,W,3]`` (what the video is made of)."""
    import cv2

    d = _numpy(depth, np.float64)
    ok = _numpy(valid).astype(bool) & np.isfinite(d) & (d > 0)
    if d.ndim != 3 or ok.shape != d.shape:
        raise OutputError(f"depth_to_colors needs depth and valid shaped [F,H,W]; got {d.shape} and {ok.shape}.")
    inv = np.zeros_like(d)
    np.divide(1.0, d, out=inv, where=ok)
    if ok.any():
        lo, hi = np.percentile(inv[ok], [2.0, 98.0])
    else:
        lo, hi = 0.0, 1.0
    t = np.clip((inv - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    index = np.rint(t * 255).astype(np.uint8)
    f, h, w = index.shape
    # One colour-map call for every frame (a per-pixel lookup), BGR to RGB, invalid pixels black.
    rgb = cv2.applyColorMap(index.reshape(f * h, w), cv2.COLORMAP_TURBO).reshape(f, h, w, 3)[..., ::-1]
    rgb = np.ascontiguousarray(rgb)
    rgb[~ok] = 0
    return rgb


def depth_to_colors(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Depth maps ``[F,H,W]`` as colour frames ``[F,3,H,W]`` in [0,1]: inverse depth on the turbo colour map
    (near = red, far = blue), one range for all frames (the 2nd to 98th percentile of the valid inverse
    depths, so the colours do not flicker from frame to frame); invalid pixels black."""
    return torch.from_numpy(depth_to_rgb8(depth, valid).astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def write_depth_video(path: PathLike, depth: torch.Tensor, valid: torch.Tensor, fps: float = 16) -> Path:
    """A depth video (``depth_to_colors``) as an MP4, from the 8-bit colours directly."""
    return write_video(path, torch.from_numpy(depth_to_rgb8(depth, valid)).permute(0, 3, 1, 2), fps=fps)


def read_video(path: PathLike) -> torch.Tensor:
    """An MP4 (or any ffmpeg-readable video) as float ``[F,3,H,W]`` in [0,1]."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise OutputError(f"Video {path.name} does not exist.")
    try:
        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            frames = [np.asarray(f)[..., :3] for f in reader]
        finally:
            reader.close()
    except Exception as e:
        raise OutputError(f"Video {path.name} cannot be read ({e.__class__.__name__}).") from None
    if not frames:
        raise OutputError(f"Video {path.name} has no frames.")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255.0)


# ---- point clouds --------------------------------------------------------------------------------

def write_point_cloud_ply(path: PathLike, points: ArrayLike, colors: Optional[ArrayLike] = None) -> Path:
    """Plain binary PLY: float32 x,y,z and uint8 red,green,blue per point (non-finite points dropped)."""
    p, c, _ = _points_colors(points, colors, "write_point_cloud_ply")
    p = p.astype(np.float32)
    return write_vertices(path, {"x": p[:, 0], "y": p[:, 1], "z": p[:, 2],
                                 "red": c[:, 0], "green": c[:, 1], "blue": c[:, 2]})


GLB_GENERATOR = "WorldStereo Studio (engine/outputs.py)"


def write_point_cloud_glb(
    path: PathLike, points: ArrayLike, colors: Optional[ArrayLike] = None, axes: Optional[np.ndarray] = OPENCV_TO_OPENGL
) -> Path:
    """A glTF binary with one POINTS primitive (POSITION + COLOR_0) for ``gr.Model3D``.

    ``axes`` rotates the points into glTF's y-up frame; the default assumes an OpenCV-style world (y down,
    z forward, as a perspective scene anchored at its first camera is). Pass None to keep coordinates.

    Written here in the layout trimesh's GLB exporter gives a ``PointCloud`` (one node, one mesh, one default
    material; float32 VEC3 positions then normalised uint8 RGBA colours in one buffer), without importing trimesh
    (a quarter of a second) for a JSON header and two arrays.
    """
    p, c, _ = _points_colors(points, colors, "write_point_cloud_glb")
    n = p.shape[0]
    if n == 0:
        raise OutputError("write_point_cloud_glb got no finite points; there is nothing to show.")
    if axes is not None:
        p = p @ np.asarray(axes, dtype=np.float64).T
    pos = np.ascontiguousarray(p, dtype=np.float32)
    rgba = np.empty((n, 4), np.uint8)
    rgba[:, :3], rgba[:, 3] = c, 255
    gltf = {
        "scene": 0, "scenes": [{"nodes": [0]}], "asset": {"version": "2.0", "generator": GLB_GENERATOR},
        "accessors": [
            {"componentType": 5126, "type": "VEC3", "byteOffset": 0, "bufferView": 0, "count": n,
             "max": pos.max(axis=0).tolist(), "min": pos.min(axis=0).tolist()},
            {"componentType": 5121, "count": n, "normalized": True, "type": "VEC4", "byteOffset": 0, "bufferView": 1,
             "max": rgba.max(axis=0).tolist(), "min": rgba.min(axis=0).tolist()}],
        "meshes": [{"name": "geometry_0", "primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "mode": 0,
                                                          "material": 0}]}],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0,
                                                "roughnessFactor": 0}}],
        "nodes": [{"name": "geometry_0", "mesh": 0}],
        "buffers": [{"byteLength": pos.nbytes + rgba.nbytes}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": pos.nbytes},
                        {"buffer": 0, "byteOffset": pos.nbytes, "byteLength": rgba.nbytes}],
    }
    header = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 4)  # chunks are 4-byte aligned: JSON padded with spaces
    body = pos.tobytes() + rgba.tobytes()  # 12 n + 4 n bytes: aligned already
    with atomic_path(Path(path), suffix=".glb") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(header) + 8 + len(body)))
            fh.write(struct.pack("<I4s", len(header), b"JSON") + header)
            fh.write(struct.pack("<I4s", len(body), b"BIN\x00"))
            fh.write(body)
    return Path(path)


def write_splat_ply(path: PathLike, points: ArrayLike, colors: Optional[ArrayLike], scale: Union[float, ArrayLike],
                    opacity: Union[float, ArrayLike] = SPLAT_OPACITY) -> Path:
    """Points as isotropic Gaussians in the 3D Gaussian splatting PLY layout (binary little-endian float32).

    Per point: ``x y z``; normals ``nx ny nz`` 0; ``f_dc_0..2 = (rgb - 0.5) / SH_C0`` (so a viewer's
    ``0.5 + SH_C0 * f_dc`` gives back the colour); ``opacity = logit(opacity)``; ``scale_0..2 = log(scale)``
    (world units, e.g. the local point spacing); ``rot_0..3`` the identity quaternion ``(w, x, y, z) =
    (1, 0, 0, 0)``. ``scale`` and ``opacity`` are one value or one per point.
    """
    p, c8, keep = _points_colors(points, colors, "write_splat_ply")
    n = p.shape[0]

    def per_point(value, what: str) -> np.ndarray:
        v = _numpy(value, np.float64).reshape(-1)
        if v.size == 1:
            return np.full(n, v[0])
        if v.size == keep.size:
            return v[keep]
        raise OutputError(f"write_splat_ply needs one {what} or one per point ({keep.size}); got {v.size}.")

    s, a = per_point(scale, "scale"), per_point(opacity, "opacity")
    if n and not (np.isfinite(s).all() and (s > 0).all()):
        raise OutputError("write_splat_ply needs positive finite scales.")
    if n and not ((a > 0).all() and (a < 1).all()):
        raise OutputError("write_splat_ply needs opacities strictly between 0 and 1.")
    f_dc = (c8.astype(np.float64) / 255.0 - 0.5) / SH_C0
    log_s = np.log(s) if n else s
    zeros, ones = np.zeros(n), np.ones(n)
    columns = {"x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "nx": zeros, "ny": zeros, "nz": zeros,
               "f_dc_0": f_dc[:, 0], "f_dc_1": f_dc[:, 1], "f_dc_2": f_dc[:, 2], "opacity": np.log(a / (1.0 - a)),
               "scale_0": log_s, "scale_1": log_s, "scale_2": log_s, "rot_0": ones, "rot_1": zeros, "rot_2": zeros,
               "rot_3": zeros}
    return write_vertices(path, {name: np.asarray(col, np.float32) for name, col in columns.items()})


# ---- cameras -------------------------------------------------------------------------------------

def write_cameras_json(path: PathLike, cameras: Cameras) -> Path:
    """The official WorldStereo ``camera.json`` (extrinsic w2c, intrinsic, width, height, motion_list)."""
    return atomic_write_json(path, cameras.to_json_dict())


def opencv_c2w_to_nerfstudio(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenCV camera axes -> nerfstudio/OpenGL camera axes (flip camera y and z)."""
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[..., :3, :3] = out[..., :3, :3] @ OPENCV_TO_OPENGL
    return out


DatasetImage = Union[torch.Tensor, Path]  # one image [3,H,W] in [0,1], or a lossless PNG file of one


def _png_size(path: Path) -> tuple[int, int]:
    """``(h, w)`` of a PNG file from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise OutputError(f"Dataset image {path.name} is not a PNG file.")
            return im.height, im.width
    except OSError:
        raise OutputError(f"Dataset image {path.name} cannot be read as a PNG file.") from None


def _write_if_changed(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, unless the file already holds exactly these bytes."""
    try:
        if target.stat().st_size == len(data) and target.read_bytes() == data:
            return
    except OSError:
        pass
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_transforms_json(
    folder: PathLike, images: Union[torch.Tensor, Sequence[DatasetImage]], cameras: Cameras, image_dir: str = "images"
) -> Path:
    """A nerfstudio dataset: ``images/frame_00001.png`` ... and ``transforms.json`` (camera_model OPENCV).

    ``images``: ``[N,3,H,W]`` in [0,1], or one entry per image, each ``[3,H,W]`` or the path of a PNG file that
    already holds the image losslessly (a clip's ``frames/NNNN.png``): that file is copied byte for byte rather than
    decoded and encoded again. An image file that already holds the same bytes is left as it is.

    Nerfstudio, like COLMAP and this project, puts pixel centres at ``+0.5``, so ``fl_x, fl_y, cx, cy`` are
    the intrinsics unchanged. Images are written first and ``transforms.json`` last, so a present
    ``transforms.json`` always describes complete images.
    """
    from engine.images import encode_png

    folder = Path(folder)
    if isinstance(images, torch.Tensor):
        images = list(_check_frames(images, "write_transforms_json"))
    items = [Path(x) if isinstance(x, (str, Path)) else x for x in images]
    if not items:
        raise OutputError("write_transforms_json needs at least one image.")
    sizes = {tuple(_png_size(x)) if isinstance(x, Path) else tuple(_check_frames(x[None], "write_transforms_json")
                                                                     .shape[-2:]) for x in items}
    if len(sizes) != 1:
        raise OutputError(f"write_transforms_json got images of different sizes {sorted(sizes)}; give one size.")
    (h, w), n = sizes.pop(), len(items)
    if len(cameras) != n:
        raise OutputError(f"write_transforms_json got {n} images but {len(cameras)} cameras; give one camera per image.")
    if (cameras.width, cameras.height) != (w, h):
        cameras = cameras.resized(w, h)
    c2w = opencv_c2w_to_nerfstudio(cameras.c2w.detach().cpu().double().numpy())
    K = cameras.K.detach().cpu().double().numpy()

    def intr(k: np.ndarray) -> dict:
        return {"fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2]), "w": w, "h": h}

    frames = []
    for i, item in enumerate(items):
        rel = f"{image_dir}/frame_{i + 1:05d}.png"
        _write_if_changed(folder / rel, item.read_bytes() if isinstance(item, Path) else encode_png(to_uint8(item)))
        frames.append({"file_path": rel, "transform_matrix": c2w[i].tolist(), **intr(K[i])})
    data = {"camera_model": "OPENCV", **intr(K[0]), "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    return atomic_write_json(folder / "transforms.json", data)


# ---- zip ----------------------------------------------------------------------------

def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns)


# The scene zip is written here rather than by zipfile, which can neither take an entry's compressed bytes over
# from the archive being replaced nor compress entries in parallel: an export over an exported scene went from 0.62 to
# 0.21 s (bench/RESULTS.md). zipfile still writes the archives that need ZIP64, and reads every archive back in tests.
ZIP_STORED_SUFFIXES = (".mp4", ".png", ".jpg", ".jpeg", ".webp", ".glb", ".zip")  # already compressed
ZIP_LEVEL = 1  # zlib level of the deflated entries (PLY, JSON): 2.6x faster than zlib's default 6, zip 3 % larger
_ZIP_FLAGS = 0x6  # general purpose bits 1-2 of a deflated entry: "super fast" (APPNOTE 4.4.4), this writer's mark
_ZIP_MADE_BY = (3 << 8) | 20  # Unix, zip 2.0
_ZIP_MAX = 0xFFFFFFFF  # beyond this (a size or an offset) an archive needs ZIP64: written by zipfile instead


def _dos_date_time(date_time=ZIP_DATE) -> tuple[int, int]:
    y, mo, d, h, mi, sec = date_time
    return ((y - 1980) << 9) | (mo << 5) | d, (h << 11) | (mi << 5) | (sec // 2)


def _deflate(data: bytes) -> bytes:
    """Raw deflate (the zip entry's data) at ``ZIP_LEVEL``."""
    c = zlib.compressobj(ZIP_LEVEL, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _reusable_entries(zip_path: Path) -> dict:
    """The deflated entries of an archive this writer made (``_ZIP_FLAGS``): name -> (crc, size, raw data reader).
    Empty when there is no such file or it cannot be read (it is then simply not reused)."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile):
        return {}
    entries = {}
    with zf:
        for info in zf.infolist():
            if info.compress_type == zipfile.ZIP_DEFLATED and info.flag_bits == _ZIP_FLAGS:
                entries[info.filename] = (info.CRC, info.file_size, info.header_offset, info.compress_size)
    return entries


def _read_raw(zip_path: Path, header_offset: int, compress_size: int) -> bytes:
    with open(zip_path, "rb") as fh:
        fh.seek(header_offset)
        head = fh.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile("no local header")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        fh.seek(header_offset + 30 + name_len + extra_len)
        return fh.read(compress_size)


def _entry_data(zip_path: Path, old: dict, rel: str, data: bytes, crc: int) -> bytes:
    """The deflated data of ``data``: the previous archive's entry when it holds exactly these bytes (checked by
    inflating it, not by its checksum alone), else compressed now."""
    found = old.get(rel)
    if found is not None and found[:2] == (crc, len(data)):
        try:
            raw = _read_raw(zip_path, found[2], found[3])
            if zlib.decompress(raw, -15) == data:
                return raw
        except (OSError, zlib.error, zipfile.BadZipFile):
            pass
    return _deflate(data)


def _write_zip(tmp: Path, zip_path: Path, files: list) -> None:
    """``files`` ``[(rel, path)]`` as a zip at ``tmp``, every field fixed (``ZIP_DATE``, sorted input, mode 0644,
    no extra fields), so the same files give the same bytes. Deflated entries are compressed by a thread pool (zlib
    lets other threads run) or taken over from the archive being replaced (``_entry_data``); stored ones are copied."""
    from concurrent.futures import ThreadPoolExecutor

    old = _reusable_entries(zip_path) if zip_path.is_file() else {}
    date, time_ = _dos_date_time()
    deflated = [(rel, f) for rel, f in files if f.suffix.lower() not in ZIP_STORED_SUFFIXES]

    def prepare(item):
        rel, f = item
        data = f.read_bytes()
        crc = zlib.crc32(data)
        return crc, len(data), _entry_data(zip_path, old, rel, data, crc)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        ready = dict(zip((rel for rel, _ in deflated), pool.map(prepare, deflated)))
    central, offset = [], 0
    with open(tmp, "wb") as out:
        for rel, f in files:
            name = rel.encode("utf-8")
            flags = 0x800 if not rel.isascii() else 0  # bit 11: the name is UTF-8
            if rel in ready:
                crc, size, data = ready.pop(rel)
                method, flags = zipfile.ZIP_DEFLATED, flags | _ZIP_FLAGS
            else:
                data = f.read_bytes()
                crc, size, method = zlib.crc32(data), len(data), zipfile.ZIP_STORED
            if max(size, len(data), offset) > _ZIP_MAX:
                raise OverflowError("ZIP64 needed")
            out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, time_, date, crc, len(data), size,
                                  len(name), 0) + name)
            out.write(data)
            central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", _ZIP_MADE_BY, 20, flags, method, time_,
                                       date, crc, len(data), size, len(name), 0, 0, 0, 0, 0o644 << 16, offset) + name)
            offset += 30 + len(name) + len(data)
        directory = b"".join(central)
        if offset + len(directory) > _ZIP_MAX or len(central) > 0xFFFF:
            raise OverflowError("ZIP64 needed")
        out.write(directory)
        out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central), len(directory), offset, 0))


def _write_zip_zip64(tmp: Path, files: list) -> None:
    """The same archive through ``zipfile`` (ZIP64 where needed), for archives beyond 4 GB."""
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for rel, f in files:
            info = zipfile.ZipInfo(rel, date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            stored = f.suffix.lower() in ZIP_STORED_SUFFIXES
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with open(f, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)


def zip_folder(folder: PathLike, zip_path: PathLike, exclude: Iterable[str] = (), only: Iterable[str] = ()) -> Path:
    """Zip every file under ``folder`` (sorted, fixed timestamps: identical inputs give identical bytes).

    PLY, JSON and other uncompressed files are deflated (``ZIP_LEVEL``), files already compressed are stored
    (``ZIP_STORED_SUFFIXES``). When ``zip_path`` already holds an archive of this writer, its entries for files that
    have not changed are reused as they are (``_entry_data``): the result is byte for byte the archive written
    from scratch.

    ``exclude`` holds glob patterns matched against the relative path and the file name; when ``only`` is
    given, just the files matching one of its patterns are kept (e.g. a dataset alone). Hidden files
    (``.name``, which includes in-progress temporary files) and the zip itself are always left out.
    """
    folder, zip_path = Path(folder), Path(zip_path)
    if not folder.is_dir():
        raise OutputError(f"Cannot zip {folder}: it is not a folder.")
    patterns, wanted = list(exclude), list(only)
    target = zip_path.resolve()
    files = []
    for f in sorted(folder.rglob("*"), key=lambda q: q.relative_to(folder).as_posix()):
        rel = f.relative_to(folder).as_posix()
        if not f.is_file() or f.resolve() == target or any(part.startswith(".") for part in rel.split("/")):
            continue
        if not _excluded(rel, patterns) and (not wanted or _excluded(rel, wanted)):
            files.append((rel, f))
    with atomic_path(zip_path, suffix=".zip") as tmp:
        try:
            _write_zip(tmp, zip_path, files)
        except OverflowError:
            _write_zip_zip64(tmp, files)
    return zip_path
