"""Atomic writes of files and folders: a reader (or a crash) never sees half of one.

Everything the engine persists goes through this module:

- ``atomic_path`` (files): write to a temporary file ``.<name>.<random><suffix>`` in the same folder, fsync,
  then ``os.replace`` it over the target (atomic on POSIX within one file system).
- ``atomic_folder`` (folders): fill a temporary folder ``.<name>.tmp-<random>`` beside the target, then rename
  it into place; a folder it replaces is first renamed to ``.<name>.old-<random>`` and removed afterwards.

What a killed process can leave behind is therefore always a hidden entry named as above; ``remove_debris``
clears them from a folder (a job folder does so when it is reopened).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
_TMP, _OLD = ".tmp-", ".old-"


@contextlib.contextmanager
def atomic_path(target: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is removed.

    ``suffix`` keeps the extension for writers that pick a format from it (imageio, open3d, trimesh).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``, on error it is removed.

    ``replace=True``: an existing ``target`` is replaced as a whole (nothing of it stays). ``replace=False``: an
    existing ``target`` wins and the new folder is dropped (concurrent writers of the same content, e.g. a cache).
    Files inside are the caller's to make durable (write the one that says "complete" with ``atomic_path``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}", dir=target.parent))
    try:
        yield tmp
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD}", dir=target.parent))
            os.replace(target, old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:  # another writer finished first (replace=False): its folder stays
                if replace or not target.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when it did not take the target's place


def remove_debris(folder: PathLike) -> None:
    """Remove what interrupted atomic writes left in ``folder`` (not in its subfolders): temporary files and
    temporary or replaced folders, all hidden entries named as this module names them."""
    folder = Path(folder)
    for leftover in folder.glob(".*") if folder.is_dir() else ():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
        elif leftover.is_dir() and (_TMP in leftover.name or _OLD in leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_bytes(target: PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: PathLike, obj, indent: int = 2) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=indent) + "\n")


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (manifests record their inputs by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
