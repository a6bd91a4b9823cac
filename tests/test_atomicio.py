"""Atomic files and folders: the target is either the old or the new content, never half of either, and what
an interrupted write leaves is exactly what ``remove_debris`` clears."""
from __future__ import annotations

import pytest

from engine.atomicio import atomic_folder, atomic_path, remove_debris


class Boom(RuntimeError):
    pass


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bank"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".bank.tmp-") and not any(tmp.iterdir())
        (tmp / "a.txt").write_text("first")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("first b")
        assert not target.exists()  # nothing at the target until the block ends
    assert _tree(target) == {"a.txt": b"first", "sub/b.txt": b"first b"}
    with atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("second")
    assert _tree(target) == {"c.txt": b"second"}  # nothing of the old folder stays
    with pytest.raises(Boom):
        with atomic_folder(target) as tmp:
            (tmp / "d.txt").write_text("half")
            raise Boom
    assert _tree(target) == {"c.txt": b"second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temporary or old folder left


def test_folder_without_replace_keeps_what_another_writer_put_there(tmp_path):
    target = tmp_path / "package"
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "model.bin").write_text("ours")
        target.mkdir()
        (target / "model.bin").write_text("theirs, finished first")
    assert _tree(target) == {"model.bin": b"theirs, finished first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package"]


def test_remove_debris_clears_exactly_the_leftovers_of_interrupted_writes(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "clips").mkdir()
    (tmp_path / ".hidden-by-user").mkdir()  # a hidden folder not named as a write's is not debris
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "manifest.json") as tmp:
            tmp.write_text("half")
            raise Boom
    debris = [tmp_path / ".manifest.json.k1ll3d.json", tmp_path / ".bank.tmp-1234abcd" / "x.png",
              tmp_path / ".bank.old-5678efgh" / "bank" / "y.png"]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a killed process")
    remove_debris(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-by-user", "clips", "manifest.json"]
    remove_debris(tmp_path / "missing")  # a folder that does not exist has no debris
