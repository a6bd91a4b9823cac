"""Image input and output at the edge of the engine (the model's aspect buckets live in ``engine.conditioning``).

Inside the engine an image is a float tensor ``[3,H,W]`` in ``[0,1]``, sRGB. ``load_image`` is the one door
through which a user's file gets in, so every way a file can be wrong is caught here with one sentence:
missing, not an image, truncated, too large (checked from the header, before decoding), too small.

Decisions (documented because a person can see them):
- The format is detected from the file's content, never its extension (the shared ``image.png`` examples
  are really JPEG and WebP).
- Transparent pixels are flattened onto WHITE (``ALPHA_BACKGROUND``), the colour most viewers show behind
  a transparent photo.
- An embedded ICC profile is converted to sRGB; without one the pixels are taken to be sRGB already.
- 16-bit greyscale keeps its precision (scaled by 1/65535); CMYK, greyscale and palette images become RGB.
- Animated images (GIF, APNG, animated WebP) use their first frame.
- EXIF orientation is applied, so the tensor is upright as the photo is shown everywhere else.

Memory: ``check_image`` (what a server runs on every upload) decodes within ``CHECK_BYTES``: the pixel limit is
checked from the header, a JPEG is decoded at 1/8 of its size (``Image.draft``) and every other format in the
decoder's own mode, never converted to floats. ``load_image`` (a scene's input, run one job at a time) makes one
float32 ``[3,H,W]`` allocation from the decoded image, about 20 bytes per pixel at its peak.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from engine.atomicio import atomic_path

PathLike = Union[str, Path]
ImageSource = Union[PathLike, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 50_000_000
MIN_SIDE = 64
CHECK_BYTES = 4 * MAX_PIXELS  # a check's decode: PIL keeps at most 4 bytes a pixel for the modes it decodes into
ALPHA_BACKGROUND = (1.0, 1.0, 1.0)  # white


class ImageInputError(ValueError):
    """An input image that cannot be used; the message is one sentence saying what to do."""


# ---- reading -------------------------------------------------------------------------------------

def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return f"Image file '{Path(source).name}'"
    return "The input"


def _open(source: ImageSource, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageInputError(f"{what} does not exist; check the path.")
        if not path.is_file():
            raise ImageInputError(f"{what} is a folder, not an image file; choose a single image.")
        fp = path
    try:
        # Image.open reads only the header, so the size check below happens before any decoding.
        return Image.open(fp)
    except UnidentifiedImageError:
        raise ImageInputError(f"{what} is not an image in a format that can be read (use PNG, JPEG or WebP).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"{what} is too large to decode safely; use an image under {MAX_PIXELS // 1_000_000} megapixels.") from None
    except OSError as e:
        raise ImageInputError(f"{what} cannot be read ({e.__class__.__name__}); check that it is a complete image file.") from None


def _array_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """numpy ``HxW``, ``HxWx{1,3,4}`` (or channels-first) in uint8, uint16 or float [0,1] -> float32 ``[H,W,3]``."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageInputError(f"{what} array must be HxW, HxWx3 or HxWx4; got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        x = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageInputError(f"{what} array contains NaN or infinite values.")
        x = np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageInputError(f"{what} array has dtype {arr.dtype}; use uint8, uint16 or float in [0, 1].")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        a = x[..., 3:]
        x = x[..., :3] * a + np.asarray(ALPHA_BACKGROUND, dtype=np.float32) * (1.0 - a)
    return x


def _check_size(width: int, height: int, what: str, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise ImageInputError(
            f"{what} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
            f"{max_pixels / 1e6:.0f}-megapixel limit; downscale it first."
        )
    if min(width, height) < min_side:
        raise ImageInputError(f"{what} is {width}x{height}; each side must be at least {min_side} pixels.")


def _to_srgb_float(im: Image.Image) -> np.ndarray:
    """Decoded PIL image -> float32 ``[H,W,3]`` sRGB in [0,1], alpha flattened on ``ALPHA_BACKGROUND``."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = np.array(im, dtype=np.float32)  # 16-bit values are exact in float32
        if mode != "F":
            # 16-bit greyscale (PNG opens it as I or I;16): one IEEE division by 65535, as exact as in float64.
            gray /= 65535.0
        np.clip(gray, 0.0, 1.0, out=gray)
        return np.broadcast_to(gray[..., None], gray.shape + (3,))  # three equal channels, one copy in memory

    alpha = None
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba, dtype=np.float32)[..., 3:] / 255.0
        # The colour part keeps the original mode's ICC meaning: greyscale alpha images stay greyscale.
        im = rgba.convert("RGB") if mode not in ("LA", "La") else im.convert("L")

    if im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")  # convert() keeps im.info, so an ICC profile survives for the step below
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            # A broken profile is common in the wild; the pixels are then used as if they were sRGB.
            im = im.convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")

    if alpha is None:
        return np.asarray(im)  # uint8; _to_tensor scales it while it makes the float copy
    rgb = np.asarray(im, dtype=np.float32) / 255.0
    bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
    return rgb * alpha + bg * (1.0 - alpha)


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``[H,W,3]`` uint8, or float32 in [0,1] (possibly a broadcast view) -> contiguous float32 ``[3,H,W]``: the one
    full-size float allocation of a load (uint8 is divided by 255 in float32, as numpy would)."""
    out = torch.empty((3,) + rgb.shape[:2], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # it is only read from
        out.copy_(torch.from_numpy(rgb).permute(2, 0, 1))
    return out.div_(255.0) if rgb.dtype == np.uint8 else out


@contextlib.contextmanager
def _decoding(source: ImageSource, what: str, max_pixels: int, min_side: int) -> Iterator[Image.Image]:
    """The opened image (header read, size checked, first frame of an animation) for the body to decode; every way
    the decoding can fail in the body becomes one ``ImageInputError`` sentence, and the file is closed after."""
    with warnings.catch_warnings():
        # PIL warns (rather than refuses) between MAX_IMAGE_PIXELS and twice that; make it a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open(source, what)
        try:
            _check_size(im.width, im.height, what, max_pixels, min_side)
            if getattr(im, "is_animated", False):
                im.seek(0)
            yield im
        except ImageInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageInputError(f"{what} is too large to decode safely; use an image under {max_pixels // 1_000_000} megapixels.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageInputError(f"{what} is damaged or truncated and cannot be decoded ({e.__class__.__name__}); re-export it.") from None
        finally:
            if not isinstance(source, Image.Image):
                im.close()


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> torch.Tensor:
    """Read an image (path, encoded bytes, PIL image or numpy array) as float32 ``[3,H,W]`` sRGB in [0,1].

    Raises ``ImageInputError`` (one sentence) for a missing, unreadable, truncated, too large or too small image.
    """
    what = _describe(source)
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, what)
        _check_size(rgb.shape[1], rgb.shape[0], what, max_pixels, min_side)
        return _to_tensor(rgb)
    with _decoding(source, what, max_pixels, min_side) as im:
        im.load()
        rgb = _to_srgb_float(ImageOps.exif_transpose(im))
    return _to_tensor(rgb)


def check_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """``(width, height)`` of an image as it will be shown (EXIF orientation applied), after checking that it decodes,
    within ``CHECK_BYTES`` (module notes); raises ``ImageInputError`` for everything ``load_image`` refuses."""
    what = _describe(source)
    if isinstance(source, np.ndarray):
        return tuple(load_image(source, max_pixels, min_side).shape[-1:-3:-1])
    with _decoding(source, what, max_pixels, min_side) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # stored turned by 90 degrees
            width, height = height, width
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))  # DCT scaling: 1/64 the pixels
        if im.width * im.height * 4 > CHECK_BYTES:
            raise ImageInputError(f"{what} is too large to check; use an image under {max_pixels // 1_000_000} "
                                  "megapixels.")
        im.load()  # every byte is decoded (a truncated file fails here), in the decoder's own mode
    return width, height


# ---- writing -------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``[...,3,H,W]`` in [0,1] -> uint8 numpy ``[...,H,W,3]`` (rounded, clipped)."""
    # In numpy (one thread): torch's threaded element-wise kernels cost milliseconds per frame on a busy machine with
    # few cores, numpy's the memory traffic. Same float32 arithmetic, ties rounded to even as torch.round does.
    x = images.detach().cpu()
    x = np.moveaxis((x if x.dtype == torch.float32 else x.float()).numpy(), -3, -1)
    y = np.clip(x, 0.0, 1.0)  # the one float copy
    np.multiply(y, 255.0, out=y)
    np.rint(y, out=y)
    with np.errstate(invalid="ignore"):  # NaN (callers refuse it first) casts to 0
        return y.astype(np.uint8, order="C")  # contiguous channels-last: what encoders and pipes take


def to_pil(image: torch.Tensor) -> Image.Image:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil needs one image [3,H,W]; got shape {tuple(image.shape)}.")
    return Image.fromarray(to_uint8(image))


def encode_png(pixels: np.ndarray) -> bytes:
    """8-bit RGB ``[H,W,3]`` as PNG bytes (8 bits per channel, lossless, the same bytes for the same pixels).

    Encoded by OpenCV's libpng at zlib level 1 with the Paeth filter on every row and Huffman-only coding: frames
    written while a scene runs cost about half of Pillow's level 1 (3.2 against 5.9 ms at 240x384, 12 against 20 ms
    at 480x768) and come out smaller, and OpenCV lets other Python threads run while it encodes (Pillow does not).
    """
    import cv2

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"encode_png needs uint8 pixels [H,W,3]; got {pixels.dtype} {pixels.shape}.")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]),  # OpenCV takes BGR
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                            cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH])
    if not ok:
        raise OSError("OpenCV could not encode the image as PNG.")
    return buf.tobytes()


def save_image(path: PathLike, image: torch.Tensor) -> Path:
    """Write ``[3,H,W]`` in [0,1] atomically; the format follows the extension (PNG when there is none; PNGs through
    ``encode_png``)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image needs one image [3,H,W]; got shape {tuple(image.shape)}.")
    with atomic_path(path) as tmp:
        if fmt == "PNG":
            tmp.write_bytes(encode_png(to_uint8(image)))
        else:
            to_pil(image).save(tmp, format=fmt)
    return path
