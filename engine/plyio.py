"""PLY point files, read and written with plyfile: the one place that knows the format.

Only the ``vertex`` element is used (point clouds, the 3D cache, Gaussian splats). Files are written binary
little-endian, atomically (``engine.atomicio``), with each column's numpy dtype as its property type, so the
caller decides the layout (``float`` x/y/z and ``uchar`` colours for plain clouds, all ``float`` for splats).
Any vertex PLY reads back: ascii or binary, either byte order, extra elements ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from engine.atomicio import atomic_path

PathLike = Union[str, Path]


class PlyError(ValueError):
    """A PLY file that cannot be read or columns that cannot be written; the message is one sentence."""


def write_vertices(path: PathLike, columns: Mapping[str, np.ndarray], comments: Sequence[str] = ()) -> Path:
    """Write ``columns`` (property name -> 1-D array, in file order, one value per point) as the ``vertex``
    element of a binary little-endian PLY at ``path``."""
    from plyfile import PlyData, PlyElement

    arrays = {name: np.asarray(col) for name, col in columns.items()}
    lengths = {a.shape for a in arrays.values()}
    if not arrays or len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise PlyError(f"PLY columns must be 1-D arrays of one length; got shapes {sorted(lengths)}.")
    rows = np.empty(len(next(iter(arrays.values()))), dtype=[(name, a.dtype.newbyteorder("<")) for name, a in arrays.items()])
    for name, col in arrays.items():
        rows[name] = col
    path = Path(path)
    with atomic_path(path, suffix=".ply") as tmp:
        PlyData([PlyElement.describe(rows, "vertex")], text=False, byte_order="<",
                comments=list(comments)).write(str(tmp))
    return path


def read_vertices(path: PathLike) -> dict[str, np.ndarray]:
    """The ``vertex`` properties of a PLY file as ``{name: 1-D array}`` (native byte order, file order).

    Raises ``PlyError`` for a missing, damaged or truncated file, one without a vertex element, or vertex
    properties that are lists (faces and other elements are ignored)."""
    from plyfile import PlyData, PlyParseError

    path = Path(path)
    if not path.is_file():
        raise PlyError(f"Point cloud file {path.name} does not exist.")
    try:
        # Mapped copy-on-write: plyfile's unmapped binary path decodes one value at a time (seconds for a 3D cache
        # of a million points, against milliseconds mapped); the columns are copied out below, so nothing stays mapped.
        data = PlyData.read(str(path), mmap="c")
    except (PlyParseError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise PlyError(f"Point cloud file {path.name} is not a readable PLY file ({_first_line(e)}).") from None
    if "vertex" not in data:
        raise PlyError(f"Point cloud file {path.name} has no vertex element.")
    rows = data["vertex"].data
    if any(rows.dtype[name].kind == "O" for name in rows.dtype.names):
        raise PlyError(f"Point cloud file {path.name} has list-valued vertex properties; give plain numbers per point.")
    return {name: np.array(rows[name], dtype=rows.dtype[name].newbyteorder("=")) for name in rows.dtype.names}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else e.__class__.__name__
