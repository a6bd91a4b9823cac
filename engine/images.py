"""Image input and output at the edge of the engine, and fitting images to the model's aspect buckets.

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
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from engine.atomicio import atomic_path
from engine.geometry.cameras import Cameras

PathLike = Union[str, Path]
ImageSource = Union[PathLike, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 50_000_000
MIN_SIDE = 64
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
        arr = np.asarray(im, dtype=np.float64)
        if mode != "F":
            # 16-bit greyscale (PNG opens it as I or I;16); dividing by 65535 keeps the full precision.
            arr = arr / 65535.0
        gray = np.clip(arr, 0.0, 1.0).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=-1)

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

    rgb = np.asarray(im, dtype=np.float32) / 255.0
    if alpha is not None:
        bg = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
        rgb = rgb * alpha + bg * (1.0 - alpha)
    return rgb


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> torch.Tensor:
    """Read an image (path, encoded bytes, PIL image or numpy array) as float32 ``[3,H,W]`` sRGB in [0,1].

    Raises ``ImageInputError`` (one sentence) for a missing, unreadable, truncated, too large or too small image.
    """
    what = _describe(source)
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source, what)
        _check_size(rgb.shape[1], rgb.shape[0], what, max_pixels, min_side)
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    with warnings.catch_warnings():
        # PIL warns (rather than refuses) between MAX_IMAGE_PIXELS and twice that; make it a refusal too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = _open(source, what)
        try:
            _check_size(im.width, im.height, what, max_pixels, min_side)
            if getattr(im, "is_animated", False):
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_srgb_float(im)
        except ImageInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageInputError(f"{what} is too large to decode safely; use an image under {max_pixels // 1_000_000} megapixels.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageInputError(f"{what} is damaged or truncated and cannot be decoded ({e.__class__.__name__}); re-export it.") from None
        finally:
            if not isinstance(source, Image.Image):
                im.close()
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


# ---- writing -------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``[...,3,H,W]`` in [0,1] -> uint8 numpy ``[...,H,W,3]`` (rounded, clipped)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"to_pil needs one image [3,H,W]; got shape {tuple(image.shape)}.")
    return Image.fromarray(to_uint8(image))


def save_image(path: PathLike, image: torch.Tensor) -> Path:
    """Write ``[3,H,W]`` in [0,1] atomically; the format follows the extension (PNG when there is none)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        # Fast PNG compression: these files are written during generation, where seconds matter more than bytes.
        to_pil(image).save(tmp, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    return path


# ---- aspect buckets ------------------------------------------------------------------------------

def default_buckets(area: int = 480 * 768, multiple: int = 16, min_side: int = 480, max_side: int = 768) -> list[tuple[int, int]]:
    """``(height, width)`` sizes of about ``area`` pixels from ``max_side x min_side`` (portrait) to
    ``min_side x max_side`` (landscape), both sides multiples of ``multiple`` (VAE x8 times patch x2).

    This mirrors the official ``scale_map`` range (480x768 ... 768x480); a checkpoint's own ``scale_map``
    can be passed to ``fit_to_bucket`` instead.
    """
    out = []
    for h in range(min_side, max_side + 1, multiple):
        w = int(round(area / h / multiple)) * multiple
        w = min(max(w, min_side), max_side)
        if (h, w) not in out:
            out.append((h, w))
    return out


def scaled_buckets(buckets: Sequence[tuple[int, int]], factor: float, multiple: int = 16) -> list[tuple[int, int]]:
    """The same aspect buckets at ``factor`` times the size (e.g. 0.5 for previews), rounded to ``multiple``."""
    out = []
    for h, w in buckets:
        sh = max(multiple, int(round(h * factor / multiple)) * multiple)
        sw = max(multiple, int(round(w * factor / multiple)) * multiple)
        if (sh, sw) not in out:
            out.append((sh, sw))
    return out


def _bucket_list(buckets) -> list[tuple[int, int]]:
    if buckets is None:
        return default_buckets()
    if isinstance(buckets, dict):  # official scale_map style: {ratio: [h, w], ...}
        buckets = list(buckets.values())
    out = [(int(h), int(w)) for h, w in buckets]
    if not out:
        raise ValueError("fit_to_bucket needs at least one (height, width) bucket.")
    return out


def nearest_bucket(height: int, width: int, buckets=None) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width/height`` (compared in log space, so 2:1 and 1:2
    are equally far from 1:1)."""
    target = math.log(width / height)
    return min(_bucket_list(buckets), key=lambda hw: abs(math.log(hw[1] / hw[0]) - target))


def fit_to_bucket(image: torch.Tensor, cameras_or_K, buckets=None):
    """Resize (to cover) and centre-crop ``image`` (``[3,H,W]`` or ``[F,3,H,W]``) to its nearest aspect bucket.

    ``cameras_or_K`` is a ``Cameras`` batch for this image size, a ``[3,3]``/``[N,3,3]`` intrinsics tensor, or
    None; it is returned adjusted for the same resize and crop (same type as given).
    """
    h, w = image.shape[-2:]
    bh, bw = nearest_bucket(h, w, buckets)
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, int(round(h * scale))), max(bw, int(round(w * scale)))
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    if (rh, rw) != (h, w):
        batch = F.interpolate(batch.float(), size=(rh, rw), mode="bilinear", align_corners=False, antialias=rh < h or rw < w)
        batch = batch.clamp(0, 1)
    top, left = (rh - bh) // 2, (rw - bw) // 2
    batch = batch[..., top : top + bh, left : left + bw]
    out_image = batch if image.dim() == 4 else batch[0]

    if cameras_or_K is None:
        return out_image, None
    if isinstance(cameras_or_K, Cameras):
        cams = cameras_or_K
        if (cams.width, cams.height) != (w, h):
            raise ValueError(f"Cameras are for {cams.width}x{cams.height} but the image is {w}x{h}.")
        return out_image, cams.resized(rw, rh).cropped(left, top, bw, bh)
    k = torch.as_tensor(cameras_or_K)
    single = k.dim() == 2
    k3 = k.unsqueeze(0) if single else k
    eye = torch.eye(4, dtype=torch.float64).expand(k3.shape[0], 4, 4)
    cams = Cameras(eye, k3.double(), w, h).resized(rw, rh).cropped(left, top, bw, bh)
    k_out = cams.K.to(k.dtype) if k.is_floating_point() else cams.K
    return out_image, (k_out[0] if single else k_out)
