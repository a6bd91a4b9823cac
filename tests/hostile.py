"""A corpus of hostile and odd inputs, generated (never downloaded) into a folder.

``write_corpus(folder)`` writes every file and returns one ``Hostile`` record per file saying which CLI flag it
goes to and whether the engine must refuse it (one sentence, exit code 2, nothing written) or accept it (and
what the accepted image must look like). The engine-side tests (tests/test_bad_inputs.py) and the server-side
tests reuse the same corpus, so both prove the same list.

Everything here is built from first principles (zlib + struct for the PNG bomb and the ICC profile), so
the corpus does not depend on the decoders it is meant to test.
"""
from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

W, H = 192, 128  # accepted images: landscape 3:2, larger than the engine's 64-pixel minimum side

# Colours of the four quadrants of an upright test image (top-left, top-right, bottom-left, bottom-right).
QUADRANTS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0))


@dataclass(frozen=True)
class Hostile:
    name: str  # file name inside the corpus folder
    role: str  # "image" | "panorama" | "camera_json" (which CLI flag / upload field it goes to)
    expect: str  # "refuse" | "accept"
    what: str  # one line for people
    # For accepted images: the upright sRGB colours [0,1] expected in each quadrant (TL, TR, BL, BR).
    quadrants: Optional[tuple] = field(default=None, compare=False)
    path: Optional[Path] = field(default=None, compare=False)
    # For refused camera files: words the refusal must hold, and the surfaces that read the file's part it breaks
    # ("cli": generate/render/conditions/--render-dir, "plan": the demo's plan view, "editor": the editor's load).
    needle: str = field(default="", compare=False)
    surfaces: tuple = field(default=("cli", "plan", "editor"), compare=False)


# ---- building blocks -----------------------------------------------------------------------------

def quadrant_image(w: int = W, h: int = H, colours=QUADRANTS) -> np.ndarray:
    """uint8 ``[h,w,3]`` with four flat quadrants (so orientation and colour can both be checked)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    c = [np.round(np.asarray(q) * 255).astype(np.uint8) for q in colours]
    img[: h // 2, : w // 2], img[: h // 2, w // 2 :] = c[0], c[1]
    img[h // 2 :, : w // 2], img[h // 2 :, w // 2 :] = c[2], c[3]
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, bit_depth: int = 1) -> bytes:
    """A valid greyscale PNG of ``width x height`` black pixels (``bit_depth`` 1, 8 or 16): its IDAT is a few hundred
    KB at most while decoding it needs ``width*height*bit_depth/8`` bytes or more. Rows are fed to zlib one at a
    time, so writing the bomb never holds the decoded image either."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # greyscale
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte 0 + packed pixels
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def _s15f16(x: float) -> bytes:
    return struct.pack(">i", int(round(x * 65536)))


def swapped_primaries_icc() -> bytes:
    """A minimal ICC v2 RGB display profile whose red and green colorants are sRGB's green and red.

    Pixels tagged with it and converted to sRGB must come out with red and green exchanged — an effect
    large enough to prove a colour-managed conversion happened (pure 0/1 values are unaffected by the
    gamma-2.2 curves' small difference from the sRGB curve).
    """
    d50 = (0.9642, 1.0, 0.8249)
    srgb_r, srgb_g, srgb_b = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)

    def xyz(v):
        return b"XYZ " + b"\0" * 4 + b"".join(_s15f16(c) for c in v)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(2.2 * 256))) + b"\0\0"
    text = b"swapped primaries\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz(d50)), (b"rXYZ", xyz(srgb_g)), (b"gXYZ", xyz(srgb_r)), (b"bXYZ", xyz(srgb_b)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + b"RGB " + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 4
              + b"".join(_s15f16(c) for c in d50) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _camera(n: int, focal: float = 150.0, w: int = W, h: int = H) -> dict:
    """An official camera.json dict: ``n`` cameras sliding sideways, looking forward."""
    ext = []
    for i in range(n):
        m = np.eye(4)
        m[0, 3] = -0.02 * i
        ext.append(m.tolist())
    k = [[focal, 0.0, w / 2], [0.0, focal, h / 2], [0.0, 0.0, 1.0]]
    return {"extrinsic": ext, "intrinsic": [k] * n, "width": w, "height": h}


# ---- the corpus ----------------------------------------------------------------------------------

def write_corpus(folder) -> list[Hostile]:
    """Write every hostile input into ``folder`` (created); returns the records with ``path`` filled in."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []

    def add(name: str, data: bytes, role: str, expect: str, what: str, quadrants=None):
        (folder / name).write_bytes(data)
        out.append(Hostile(name, role, expect, what, quadrants, folder / name))

    def encode(im: "Image.Image", fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    upright = quadrant_image()
    png = encode(Image.fromarray(upright), "PNG")
    jpeg = encode(Image.fromarray(upright), "JPEG", quality=95)

    # -- refused images
    add("truncated.png", png[: len(png) // 2], "image", "refuse", "PNG cut in half")
    add("truncated.jpg", jpeg[: len(jpeg) // 2], "image", "refuse", "JPEG cut in half")
    add("zero_bytes.png", b"", "image", "refuse", "empty file")
    add("text_named.png", b"this is a text file, not a picture\n", "image", "refuse", "text file named .png")
    add("bomb_30000x30000.png", png_bomb(30000, 30000), "image", "refuse", "decompression bomb: 900 megapixels in a small PNG")
    add("over_limit_8000x8000.png", png_bomb(8000, 8000), "image", "refuse", "64 megapixels: under PIL's bomb guard, over the engine's limit")
    add("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "image", "refuse", "1x1 image")
    add("strip_10000x40.png", encode(Image.new("RGB", (10000, 40), (10, 200, 10)), "PNG"), "image", "refuse", "10000x40 strip")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="192" height="128"><rect width="192" height="128" fill="red"/></svg>\n'
    add("vector.svg", svg, "image", "refuse", "SVG vector image")
    add("vector_named.png", svg, "image", "refuse", "SVG named .png")
    add("video.mp4", _video_bytes(folder), "image", "refuse", "an MP4 video")
    add("not_a_panorama.png", encode(Image.fromarray(quadrant_image(300, 100)), "PNG"), "panorama", "refuse",
        "3:1 image given as an equirectangular panorama")

    # -- accepted but odd images: what the engine must make of them
    q = QUADRANTS
    sixteen = np.zeros((H, W, 3), dtype=np.uint16)
    sixteen[...] = (upright.astype(np.uint32) * 257).astype(np.uint16)
    add("sixteen_bit.png", _cv2_png(sixteen), "image", "accept", "16-bit RGB PNG", q)
    grey = Image.fromarray(upright).convert("L")
    grey_q = tuple((v, v, v) for v in (np.asarray(grey)[[0, 0, -1, -1], [0, -1, 0, -1]] / 255.0).tolist())
    add("greyscale.png", encode(grey, "PNG"), "image", "accept", "8-bit greyscale PNG", grey_q)
    grey16 = (np.asarray(grey).astype(np.uint32) * 257).astype(np.uint16)
    add("greyscale_16bit.png", encode(Image.fromarray(grey16), "PNG"), "image", "accept", "16-bit greyscale PNG", grey_q)
    cmyk_quads = ((0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 0.0, 0.0))  # C, M, Y (K only bottom-right)
    cmyk = np.zeros((H, W, 4), dtype=np.uint8)
    for (r0, c0), cmy in zip(((0, 0), (0, 1), (1, 0), (1, 1)), cmyk_quads):
        cmyk[r0 * H // 2 : (r0 + 1) * H // 2, c0 * W // 2 : (c0 + 1) * W // 2, :3] = np.round(np.asarray(cmy) * 255)
    cmyk[H // 2 :, W // 2 :] = (0, 0, 0, 255)  # black through K only
    # Without a profile, ink subtracts from white: RGB = (1 - C)(1 - K) and so on.
    add("cmyk.jpg", encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95), "image", "accept", "CMYK JPEG",
        ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)))
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = upright
    rgba[..., 3] = 255
    rgba[:, W // 2 :, 3] = 0  # right half fully transparent over black colour values
    rgba[:, W // 2 :, :3] = 0
    add("rgba_alpha.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), "image", "accept",
        "RGBA PNG, right half transparent", (q[0], (1.0, 1.0, 1.0), q[2], (1.0, 1.0, 1.0)))
    # Stored rotated 90 degrees anticlockwise with EXIF orientation 6 ("rotate 90 clockwise to display").
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif_rotated.jpg", encode(stored, "JPEG", quality=95, exif=exif.tobytes()), "image", "accept",
        "JPEG stored sideways with EXIF orientation 6", q)
    frames = [Image.fromarray(upright), Image.fromarray(upright[::-1, ::-1].copy())]
    add("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "image", "accept", "two-frame animated GIF (first frame used)", q)
    add("icc_swapped_primaries.png", encode(Image.fromarray(upright), "PNG", icc_profile=swapped_primaries_icc()),
        "image", "accept", "PNG with an ICC profile that swaps red and green (converted to sRGB)",
        ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), q[2], q[3]))
    add("icc_broken.png", encode(Image.fromarray(upright), "PNG", icc_profile=b"not a profile" * 10), "image", "accept",
        "PNG with a garbage ICC profile (pixels used as sRGB)", q)

    # -- camera.json files (given with a good image through --camera-json)
    def cam(name: str, data, what: str, expect: str = "refuse", raw: Optional[bytes] = None):
        add(name, raw if raw is not None else json.dumps(data).encode("utf-8"), "camera_json", expect, what)

    good = _camera(5)
    nan = _camera(5)
    nan["extrinsic"][2][0][3] = math.nan
    cam("camera_nan.json", None, "NaN in an extrinsic", raw=json.dumps(nan).encode())  # json writes NaN literally
    inf = json.dumps(_camera(5)).encode().replace(b"150.0", b"1e999", 1)  # parses to infinity
    cam("camera_inf.json", None, "infinite focal length", raw=inf)
    scaled = _camera(5)
    scaled["extrinsic"][1] = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    cam("camera_scaled.json", scaled, "non-rigid extrinsic (scaled rotation)")
    mirror = _camera(5)
    mirror["extrinsic"][1] = np.diag([-1.0, 1.0, 1.0, 1.0]).tolist()
    cam("camera_mirror.json", mirror, "reflection instead of a rotation")
    counts = _camera(5)
    counts["intrinsic"] = counts["intrinsic"][:3]
    cam("camera_count_mismatch.json", counts, "5 extrinsics, 3 intrinsics")
    cam("camera_empty.json", {"extrinsic": [], "intrinsic": []}, "no frames")
    cam("camera_one_frame.json", _camera(1), "a single frame (a clip needs at least two)")
    cam("camera_too_many.json", _camera(500), "500 frames, far more than a clip holds")
    zero_f = _camera(5, focal=0.0)
    cam("camera_zero_focal.json", zero_f, "zero focal length")
    neg_w = dict(good, width=-192)
    cam("camera_negative_width.json", neg_w, "negative width")
    cam("camera_strings.json", {"extrinsic": [["a"] * 4] * 4, "intrinsic": [[1, 2, 3]]}, "strings instead of numbers")
    cam("camera_array.json", [1, 2, 3], "a JSON list instead of an object")
    cam("camera_not_json.json", None, "not JSON at all", raw=b"extrinsic: [[1, 0, 0, 0]]\n")
    cam("camera_latin1.json", None, "non-UTF-8 bytes in the file",
        raw=json.dumps(dict(good, note="caf\u00e9"), ensure_ascii=False).encode("latin-1"))
    cam("camera_motion_list.json", dict(good, motion_list=[1, 2]), "motion_list of numbers")
    return out


def hostile_camera_files(folder) -> list[Hostile]:
    """Camera files built to break a reader: every one must be refused in one sentence by every surface that reads
    camera files, in bounded time and memory (tests/test_hostile_cameras.py). ``needle``: what the refusal says."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Hostile] = []

    def add(name: str, data, what: str, needle: str, surfaces=("cli", "plan", "editor")):
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        (folder / name).write_bytes(raw)
        out.append(Hostile(name, "camera_json", "refuse", what, path=folder / name, needle=needle, surfaces=surfaces))

    def edited(**changes) -> dict:
        """``_camera(5)`` with extrinsic/intrinsic entries replaced: ``e=(cam, row, col, value)``, ``k=(...)``."""
        data = _camera(5)
        for key, (i, r, c, v) in changes.items():
            data["extrinsic" if key == "e" else "intrinsic"][i][r][c] = v
        data["intrinsic"] = [list(map(list, k)) for k in data["intrinsic"]]
        return data

    def with_k(k) -> dict:
        return dict(_camera(5), intrinsic=[k] * 5)

    add("huge_size.json", dict(_camera(5), width=10**9, height=10**9), "ordinary intrinsics, width and height 1e9",
        "outside what the engine renders")
    add("huge_width.json", dict(_camera(5), width=10**6), "a million pixels wide (128 megapixels)",
        "outside what the engine renders")
    add("focal_overflow.json", with_k([[1e308, 0, W / 2], [0, 1e308, H / 2], [0, 0, 1]]),
        "focal length 1e308 (overflows float32)", "float32 range")
    add("focal_near_f32_max.json", with_k([[3e38, 0, W / 2], [0, 3e38, H / 2], [0, 0, 1]]),
        "focal length 3e38 (just inside float32)", "field of view")
    add("translation_overflow.json", edited(e=(2, 0, 3, 1e300)), "translation 1e300", "float32 range")
    add("translation_near_f32_max.json", edited(e=(2, 0, 3, 3e38)), "translation 3e38", "from the origin")
    add("centre_too_far.json", edited(e=(4, 2, 3, 2e4)), "a camera 20000 units from the origin", "from the origin")
    deep = 100_000
    add("deep_nesting.json", b"[" * deep + b"]" * deep, "100,000-deep nested lists", "nests")
    add("deep_object.json", b'{"a":' * deep + b"1" + b"}" * deep, "100,000-deep nested objects", "nests")
    add("int_5001_digits.json", json.dumps(_camera(5)).replace("150.0", "1" * 5001, 1).encode(),
        "a 5001-digit integer focal length", "digits")
    add("float_long_mantissa.json", json.dumps(_camera(5)).replace("150.0", "0." + "3" * 5000, 1).encode(),
        "a float with 5000 digits", "digits")
    add("exponent_overflow.json", json.dumps(_camera(5)).replace("150.0", "1e999999", 1).encode(),
        "an exponent that overflows to infinity", "infinite")
    for literal in ("NaN", "Infinity", "-Infinity"):
        add(f"literal_{literal.strip('-').lower()}{'_neg' if literal[0] == '-' else ''}.json",
            json.dumps(_camera(5)).replace("150.0", literal, 1).encode(), f"the literal {literal}", literal)
    many = b'{"extrinsic": [' + b",".join([b"[[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]"] * 500_000) + b"]}"
    add("cameras_500000.json", many, "500,000 cameras (38 MB)", "larger than")
    add("cameras_1001.json", _camera(1001), "1001 cameras, under the size limit", "at most 1000")
    add("huge_file.json", json.dumps(_camera(5)).encode() + b" " * (5 * 1024 * 1024), "5 MB of padding",
        "larger than")
    add("shape_3x3_extrinsic.json", dict(_camera(5), extrinsic=[np.eye(3).tolist()] * 5), "3x3 extrinsics", "4x4")
    add("shape_ragged.json", dict(_camera(5), extrinsic=[[[1, 0], [0]]] * 5), "ragged matrices", "numeric")
    add("shape_scalar.json", dict(_camera(5), intrinsic=7), "a number instead of the intrinsics", "3x3")
    add("shape_objects.json", dict(_camera(5), extrinsic=[{"a": 1}] * 5), "objects instead of matrices", "numeric")
    add("k_zero.json", with_k([[0, 0, 0], [0, 0, 0], [0, 0, 1]]), "non-invertible intrinsics (all zero)", "focal")
    add("k_singular_fy.json", with_k([[150.0, 0, W / 2], [0, 0, H / 2], [0, 0, 1]]),
        "non-invertible intrinsics (fy = 0)", "focal")
    add("k_last_row.json", with_k([[150.0, 0, W / 2], [0, 150.0, H / 2], [0, 0, 0]]),
        "non-invertible intrinsics (last row 0)", "last row")
    add("k_skew.json", with_k([[150.0, 400.0, W / 2], [0, 150.0, H / 2], [0, 0, 1]]), "large skew", "skew")
    add("fov_too_wide.json", with_k([[1.0, 0, W / 2], [0, 1.0, H / 2], [0, 0, 1]]), "179-degree field of view",
        "field of view")
    add("fov_too_narrow.json", with_k([[1e5, 0, W / 2], [0, 1e5, H / 2], [0, 0, 1]]), "0.1-degree field of view",
        "field of view")
    add("principal_point_outside.json", with_k([[150.0, 0, 10 * W], [0, 150.0, H / 2], [0, 0, 1]]),
        "principal point ten image widths to the right", "principal point")
    add("principal_point_negative.json", with_k([[150.0, 0, W / 2], [0, 150.0, -5.0], [0, 0, 1]]),
        "principal point above the image", "principal point")
    keys = _camera(3)
    keys["extrinsic"][1][0][3] = 1e300
    add("keyframe_translation_1e300.json", dict(_camera(5), keyframes={"extrinsic": keys["extrinsic"],
                                                                       "intrinsic": keys["intrinsic"]}),
        "a saved path whose keyframe sits at 1e300", "float32 range", surfaces=("editor",))
    return out


def _cv2_png(rgb16: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))
    assert ok
    return buf.tobytes()


def _video_bytes(folder: Path) -> bytes:
    import imageio.v3 as iio

    frames = np.stack([quadrant_image()] * 4)
    tmp = folder / ".video-build.mp4"
    iio.imwrite(tmp, frames, fps=4, codec="libx264")
    data = tmp.read_bytes()
    tmp.unlink()
    return data


# ---- prompts -------------------------------------------------------------------------------------

def hostile_prompts() -> dict[str, str]:
    """Prompt strings the engine must refuse with one sentence (as Python receives them from argv or a form)."""
    return {
        "100k_characters": "a quiet room " * 7700,  # ~100k characters
        "non_utf8_bytes": b"a caf\xe9 at night".decode("utf-8", "surrogateescape"),  # how argv delivers bad bytes
        "nul_byte": "a room\x00with a NUL",
        "escape_sequence": "a room \x1b[2J cleared",
    }


def hostile_prompt_bytes() -> dict[str, bytes]:
    """The same prompts as raw argv bytes, for a subprocess (argv is bytes on POSIX)."""
    return {k: v.encode("utf-8", "surrogateescape") for k, v in hostile_prompts().items()}


# ---- what a refusal looks like ------------------------------------------------------------------------------

ONE_SENTENCE = re.compile(r"error: \S.{4,400}[.]")


def assert_one_sentence(err: str, context: str) -> str:
    """The CLI's stderr ends in one ``error: ...`` sentence and holds no traceback; returns that line."""
    assert "Traceback" not in err, f"{context}: traceback on stderr:\n{err}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert ONE_SENTENCE.fullmatch(last), f"{context}: last stderr line is not one 'error: ...' sentence: {last!r}"
    # One sentence: no full stop followed by another capitalised sentence inside the message.
    assert not re.search(r"[.!?]\s+[A-Z][a-z]", last[len("error: "):-1]), f"{context}: more than one sentence: {last!r}"
    return last


# ---- a child process that runs CLI commands one after another --------------------------------------------

def limit_address_space(gib: float) -> None:
    """Cap this process's address space (``RLIMIT_AS``): an allocation beyond it fails instead of growing."""
    import resource

    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def own_peak_rss_mib() -> float:
    """This process's own peak resident memory. ``VmHWM`` belongs to the process's address space since its exec;
    ``ru_maxrss`` on Linux keeps the parent's high-water mark across fork and exec (a pytest worker that grew to
    2 GB would be reported as the child's peak), so it is only the fallback where /proc is missing."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cli_cases(spec_path: Path, result_path: Path) -> None:
    """Run ``python -m engine`` argument lists in this process (``spec_path``: ``[{"name", "argv"}]``) and write
    each one's exit code, stderr, seconds and the process's peak resident memory so far to ``result_path``.
    Importing torch once, not once per command, keeps a corpus of ~100 commands to seconds."""
    import contextlib
    import time
    import traceback

    from engine.cli import main

    results = []
    for case in json.loads(Path(spec_path).read_text()):
        err, out = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(case["argv"])
            except SystemExit as e:
                rc = e.code
            except BaseException:  # noqa: BLE001 — a crash is a result here, recorded with its traceback
                rc = "crash"
                err.write(traceback.format_exc())
        results.append({"name": case["name"], "rc": rc, "stderr": err.getvalue(), "seconds": time.perf_counter() - t0,
                        "peak_rss_mib": own_peak_rss_mib()})
    Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--cli"]:  # python tests/hostile.py --cli SPEC RESULT GIB
        limit_address_space(float(sys.argv[4]))
        run_cli_cases(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for item in write_corpus(dest):
        print(f"{item.expect:7s} {item.role:12s} {item.name:32s} {item.what}")
