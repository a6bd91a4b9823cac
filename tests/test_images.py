"""Image input at the edge: every way a file can be wrong, and colour handling (buckets: test_conditioning)."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from engine.images import ALPHA_BACKGROUND, ImageInputError, load_image, save_image, to_uint8


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ---- examples: the shared 'image.png' files are JPEG and WebP --------------------------------------

def test_examples_decoded_by_content(examples):
    for scene, fmt in (("photorealistic-indoor-dining_spaces-030", b"\xff\xd8"), ("stylized-outdoor-aquatic_landscape-069", b"RIFF")):
        path = examples / "perspective" / scene / "image.png"
        assert path.read_bytes()[: len(fmt)] == fmt  # really not PNG
        img = load_image(path)
        # A second decoder (OpenCV, also sniffing content) is the independent reference.
        ref = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
        assert img.dtype == torch.float32 and img.shape == (3, *ref.shape[:2])
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        assert np.abs(img.permute(1, 2, 0).numpy() - ref).mean() < 2 / 255


# ---- refusals ------------------------------------------------------------------------------------

def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg


def test_refuses_too_many_pixels_before_decoding(tmp_path):
    # A PNG header that claims 10000x10000 with no pixel data: refusing it must not need decoding.
    ihdr = struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", __import__("zlib").crc32(t + d))
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(ImageInputError, match="megapixel") as e:
        load_image(path)
    _one_sentence(str(e.value))
    # The limit is a parameter: a small real image above a small limit is refused the same way.
    small = tmp_path / "small.png"
    Image.fromarray(_pattern(100, 100)).save(small)
    with pytest.raises(ImageInputError, match="megapixel"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10000).shape == (3, 100, 100)


def test_refuses_tiny_missing_nonimage_truncated(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.fromarray(_pattern(40, 200)).save(tiny)
    with pytest.raises(ImageInputError, match="at least 64") as e:
        load_image(tiny)
    _one_sentence(str(e.value))

    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageInputError, match="not an image") as e:
        load_image(text)
    _one_sentence(str(e.value))

    full = tmp_path / "full.jpg"
    Image.fromarray(_pattern(200, 300)).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(ImageInputError, match="truncated") as e:
        load_image(cut)
    _one_sentence(str(e.value))

    with pytest.raises(ImageInputError):
        load_image(tmp_path)  # a folder


# ---- orientation, alpha, modes -------------------------------------------------------------------

def test_exif_orientation_applied(tmp_path):
    arr = _pattern(80, 120, seed=1)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    im.save(path, exif=exif.tobytes())
    img = load_image(path)
    expected = np.rot90(arr, k=-1)  # numpy's rotation is the independent reference
    assert img.shape == (3, 120, 80)
    np.testing.assert_array_equal(to_uint8(img), expected)


def test_alpha_flattened_on_white():
    assert ALPHA_BACKGROUND == (1.0, 1.0, 1.0)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :32, 3] = 0
    rgba[:, 32:, 3] = 255
    rgba[:8, 32:, 3] = 102  # 40 % opaque
    img = load_image(_png_bytes(Image.fromarray(rgba, "RGBA")))
    px = img.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(px[20, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(px[20, 40], [200 / 255, 0, 0], atol=1e-6)
    a = 102 / 255
    np.testing.assert_allclose(px[0, 40], [a * 200 / 255 + (1 - a), 1 - a, 1 - a], atol=1e-6)


def test_grayscale_16bit_keeps_precision():
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 13 + 7).astype(np.uint16)
    img = load_image(_png_bytes(Image.fromarray(values)))
    assert img.shape == (3, 64, 64)
    np.testing.assert_allclose(img[0].numpy(), values / 65535.0, atol=1e-7)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_cmyk_and_palette_and_grayscale(tmp_path):
    cmyk = np.zeros((64, 64, 4), np.uint8)
    cmyk[:, :32, 0] = 255  # pure cyan
    cmyk[:, 32:, 3] = 255  # pure black
    path = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, "CMYK").save(path)
    px = load_image(path).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(px[10, 10], [0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(px[10, 50], [0, 0, 0], atol=1e-6)

    gray = np.tile(np.arange(64, dtype=np.uint8)[None] * 4, (64, 1))
    img = load_image(_png_bytes(Image.fromarray(gray, "L")))
    np.testing.assert_allclose(img.numpy(), np.broadcast_to(gray / 255.0, (3, 64, 64)), atol=1e-6)

    arr = _pattern(64, 80, seed=2) // 64 * 64  # few colours: a palette holds them exactly
    pal = Image.fromarray(arr).quantize(colors=64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    np.testing.assert_array_equal(to_uint8(load_image(_png_bytes(pal))), np.asarray(pal.convert("RGB")))


def test_animated_uses_first_frame():
    frames = [Image.fromarray(np.full((64, 64, 3), c, np.uint8)) for c in (30, 220, 120)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    np.testing.assert_allclose(img.numpy(), 30 / 255, atol=1e-6)


def _swapped_primaries_icc() -> bytes:
    """A hand-made ICC v2 RGB matrix/TRC profile whose red and green primaries are sRGB's green and red
    (linear TRC): a pure 'red' pixel in it is sRGB pure green. Built byte by byte, so the expected result
    does not come from the code under test."""
    s15 = lambda v: struct.pack(">i", int(round(v * 65536)))
    xyz = lambda v: b"XYZ " + b"\0" * 4 + b"".join(s15(c) for c in v)
    d50 = (0.9642, 1.0, 0.8249)
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 0)  # identity (gamma 1)
    desc_text = b"swapped\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(desc_text)) + desc_text + b"\0" * 4 + b"\0" * 4 + b"\0" * 2 + b"\0" + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz(d50)), (b"rXYZ", xyz(green)), (b"gXYZ", xyz(red)), (b"bXYZ", xyz(blue)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve), (b"cprt", b"text" + b"\0" * 4 + b"none\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        while (offset + len(data)) % 4:
            data += b"\0"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"none" + bytes([2, 0x10, 0, 0]) + b"mntr" + b"RGB " + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 8 + b"\0" * 4
              + s15(d50[0]) + s15(d50[1]) + s15(d50[2]) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28)
    assert len(header) == 128
    return header + body


def test_embedded_icc_profile_converted_to_srgb():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32, 0] = 255  # "red" in the swapped profile
    arr[:, 32:] = 255  # white stays white
    img = load_image(_png_bytes(Image.fromarray(arr), icc_profile=_swapped_primaries_icc()))
    px = img.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(px[5, 5], [0, 1, 0], atol=3 / 255)
    np.testing.assert_allclose(px[5, 50], [1, 1, 1], atol=3 / 255)


def test_numpy_and_pil_inputs_and_save_roundtrip(tmp_path):
    arr = _pattern(70, 90, seed=3)
    a = load_image(arr)
    b = load_image(Image.fromarray(arr))
    assert torch.equal(a, b)
    np.testing.assert_array_equal(to_uint8(a), arr)
    out = save_image(tmp_path / "x.png", a)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_to_uint8_is_torchs_clamp_scale_round(dtype):
    """``to_uint8`` (numpy) gives what torch's clamp, scale by 255 and round-half-to-even give, channels last and
    contiguous, for one image and for batches."""
    g = torch.Generator().manual_seed(9)
    for shape in [(3, 5, 7), (4, 3, 9, 11), (2, 2, 3, 6, 6)]:
        x = (torch.rand(*shape, generator=g) * 1.4 - 0.2).to(dtype)
        x.view(-1)[:3] = torch.tensor([0.5, 1.5, 2.5]) / 255  # near ties
        expected = x.float().clamp(0, 1).mul(255).round().to(torch.uint8).movedim(-3, -1).numpy()
        got = to_uint8(x)
        assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"] and np.array_equal(got, expected)

def test_png_frames_are_lossless_8bit_rgb_and_deterministic(tmp_path):
    """``save_image``'s PNGs, read by Pillow and by the PNG header itself: 8-bit RGB, no interlace, the pixels exactly
    ``to_uint8`` of the frame (rounded, clipped), the same bytes when written again; other formats still by Pillow."""
    import struct
    import zlib

    g = torch.Generator().manual_seed(4)
    frame = torch.rand(3, 61, 83, generator=g) * 1.2 - 0.1  # values outside [0,1] are clipped
    frame[:, :20] = torch.linspace(0, 1, 83)  # smooth rows besides noise
    expected = np.clip(np.round(frame.permute(1, 2, 0).numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
    first = save_image(tmp_path / "a.png", frame).read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), expected)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first[12:16] == b"IHDR"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", first[16:29])
    assert (width, height, depth, colour, interlace) == (83, 61, 8, 2, 0)
    assert zlib.crc32(first[12:29]) == struct.unpack(">I", first[29:33])[0]
    assert save_image(tmp_path / "b.png", frame).read_bytes() == first
    save_image(tmp_path / "c.jpg", frame)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.format == "JPEG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.jpg"]

def test_check_image_decides_as_load_image_does_and_reports_the_upright_size(tmp_path):
    """The upload check refuses exactly what the loader refuses (the hostile corpus: truncated, bombs, too small, not
    images) and reports the size the loader's tensor has (EXIF rotation included), without converting to floats."""
    from hostile import write_corpus

    from engine.images import check_image

    images = [h for h in write_corpus(tmp_path / "corpus") if h.role == "image"]
    assert len(images) >= 20
    for h in images:
        try:
            expected = tuple(load_image(h.path).shape[-1:-3:-1])
        except ImageInputError as e:
            with pytest.raises(ImageInputError) as refused:
                check_image(h.path)
            assert str(refused.value).split(" is ")[0] == str(e).split(" is ")[0], h.name  # the same file named
            continue
        assert check_image(h.path) == expected, h.name
    assert check_image(tmp_path / "corpus" / "exif_rotated.jpg") == (192, 128)  # stored 128x192, shown upright
