"""A person's own depth map of the input photo: which files are one, and reading them.

Formats: a ``.npy`` array of z-depth in METRES, or a 16-bit greyscale PNG of z-depth in MILLIMETRES; 0 = no data in
either. The one rule for what is a depth map (``is_user_depth_file``): a path whose name ends in ``.npy`` or ``.png``,
or a file whose first bytes are a NumPy or PNG signature. The name says what the person meant, so a damaged or
missing ``.npy`` is refused as a depth map instead of being tried as a depth model; the content catches a renamed
file. Any other depth setting names a depth model (``engine.depth``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

SUFFIXES = (".npy", ".png")
NPY_SIGNATURE = b"\x93NUMPY"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DEPTH_UNIT = 0.001  # 16-bit PNG depth values are millimetres


class DepthInputError(ValueError):
    """A user depth file that cannot be used; the message is one sentence saying what to do."""


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(len(PNG_SIGNATURE))


def is_user_depth_file(spec) -> bool:
    """Whether a depth setting names a person's depth map rather than a depth model (the module's rule)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        return False
    path = Path(spec)
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        return path.is_file() and _head(path).startswith((NPY_SIGNATURE, PNG_SIGNATURE))
    except OSError:  # a name the file system cannot hold, a file that cannot be read: not a depth map here
        return False


def read_user_depth(path: PathLike) -> torch.Tensor:
    """The depth map in ``path`` as ``[H,W]`` float32 metres (0 = no data); ``DepthInputError`` for a file that is
    missing, not a depth map, or holds values that are not depths."""
    path = Path(path)
    arr = np.squeeze(_read_array(path))
    name = path.name
    if arr.ndim != 2:
        raise DepthInputError(f"Depth file '{name}' must be one HxW map; got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise DepthInputError(f"Depth file '{name}' contains NaN or infinite values; use 0 for pixels without depth.")
    if (arr < 0).any():
        raise DepthInputError(f"Depth file '{name}' contains negative depths; depth must be metres in front of the camera.")
    if not (arr > 0).any():
        raise DepthInputError(f"Depth file '{name}' has no positive depth values.")
    return torch.from_numpy(arr.astype(np.float32))


def _read_array(path: Path) -> np.ndarray:
    """The file's values in metres, read by content (a ``.png`` holding a NumPy array reads as one)."""
    name = path.name
    if not path.is_file():
        raise DepthInputError(f"Depth file '{name}' does not exist; check the path.")
    head = _head(path)
    if head.startswith(NPY_SIGNATURE):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DepthInputError(f"Depth file '{name}' is not a readable .npy array ({e.__class__.__name__}).") from None
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DepthInputError(f"Depth file '{name}' holds {arr.dtype} values; save float depth in metres.")
        return arr.astype(np.float64)
    if head.startswith(PNG_SIGNATURE):
        from PIL import Image

        try:
            with Image.open(path) as im:
                mode = im.mode
                if not (mode.startswith("I;16") or mode == "I"):
                    raise DepthInputError(
                        f"Depth PNG '{name}' is {mode} (8-bit or colour); depth PNGs must be 16-bit greyscale in millimetres."
                    )
                arr = np.asarray(im, dtype=np.float64)
        except DepthInputError:
            raise
        except Exception as e:
            raise DepthInputError(f"Depth PNG '{name}' cannot be decoded ({e.__class__.__name__}); re-export it.") from None
        return arr * PNG_DEPTH_UNIT
    raise DepthInputError(f"Depth file '{name}' is neither a .npy array nor a 16-bit PNG.")
