"""The PLY module against independent readers and writers (a hand-written header parser, Open3D, trimesh) and
the PLY specification's ascii form."""
from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import trimesh

from conftest import read_vertex_ply
from engine.plyio import PlyError, read_vertices, write_vertices


def _columns(n: int = 300, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    return {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2],
            "confidence": rng.uniform(size=n).astype(np.float32),
            "source": rng.integers(-(2**31), 2**31, size=n, dtype=np.int64).astype(np.int32)}


def test_written_columns_read_back_by_hand_open3d_and_trimesh(tmp_path):
    cols = _columns()
    path = write_vertices(tmp_path / "cloud.ply", cols, comments=["a test cloud"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud.ply"]  # no temporary file left behind
    assert b"comment a test cloud\n" in path.read_bytes()[:200]
    names, rows = read_vertex_ply(path)  # property types and order as given, binary little-endian
    assert names == list(cols)
    for name, col in cols.items():
        assert rows.dtype[name] == col.dtype.newbyteorder("<") and np.array_equal(rows[name], col)
    pc = o3d.io.read_point_cloud(str(path))
    xyz = np.stack([cols["x"], cols["y"], cols["z"]], 1)
    np.testing.assert_array_equal(np.asarray(pc.points), xyz.astype(np.float64))
    rgb = np.stack([cols["red"], cols["green"], cols["blue"]], 1)
    np.testing.assert_array_equal(np.asarray(trimesh.load(path).colors)[:, :3], rgb)
    back = read_vertices(path)
    assert list(back) == list(cols) and all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in cols.items())


def test_reads_open3d_binary_and_ascii_files_and_the_spec_ascii_form(tmp_path):
    rng = np.random.default_rng(1)
    xyz, rgb = rng.uniform(size=(40, 3)), rng.uniform(size=(40, 3))
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pc.colors = o3d.utility.Vector3dVector(rgb)
    for ascii_ in (False, True):
        path = tmp_path / f"o3d-{ascii_}.ply"
        assert o3d.io.write_point_cloud(str(path), pc, write_ascii=ascii_)
        back = read_vertices(path)
        np.testing.assert_allclose(np.stack([back[a] for a in "xyz"], 1), xyz, atol=1e-6)
        np.testing.assert_allclose(np.stack([back[c] for c in ("red", "green", "blue")], 1) / 255, rgb, atol=0.5 / 255 + 1e-9)
    # Big-endian, with a face element after the vertices (ignored), as the PLY specification allows.
    path = tmp_path / "spec.ply"
    header = ("ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty double x\nproperty short s\n"
              "element face 1\nproperty list uchar int vertex_indices\nend_header\n").encode()
    body = np.array([(1.5, -2), (-0.25, 7)], dtype=[("x", ">f8"), ("s", ">i2")]).tobytes()
    path.write_bytes(header + body + bytes([3]) + np.array([0, 1, 1], ">i4").tobytes())
    back = read_vertices(path)
    assert back["x"].tolist() == [1.5, -0.25] and back["s"].tolist() == [-2, 7] and back["x"].dtype == np.float64
    empty = read_vertices(write_vertices(tmp_path / "empty.ply", {"x": np.zeros(0, np.float32)}))
    assert empty["x"].shape == (0,)


def test_bad_files_and_columns_are_one_sentence(tmp_path):
    with pytest.raises(PlyError, match="does not exist"):
        read_vertices(tmp_path / "missing.ply")
    (tmp_path / "text.ply").write_text("not a point cloud\n")
    with pytest.raises(PlyError, match="not a readable PLY"):
        read_vertices(tmp_path / "text.ply")
    whole = write_vertices(tmp_path / "whole.ply", _columns(50)).read_bytes()
    (tmp_path / "cut.ply").write_bytes(whole[: len(whole) - 10])
    with pytest.raises(PlyError, match="not a readable PLY"):
        read_vertices(tmp_path / "cut.ply")
    (tmp_path / "faces.ply").write_bytes(b"ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int v\n"
                                         b"end_header\n3 0 1 2\n")
    with pytest.raises(PlyError, match="no vertex element"):
        read_vertices(tmp_path / "faces.ply")
    (tmp_path / "listed.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty list uchar int v\n"
                                          b"end_header\n2 4 5\n")
    with pytest.raises(PlyError, match="list-valued"):
        read_vertices(tmp_path / "listed.ply")
    with pytest.raises(PlyError, match="one length"):
        write_vertices(tmp_path / "bad.ply", {"x": np.zeros(3, np.float32), "y": np.zeros(2, np.float32)})
    assert not (tmp_path / "bad.ply").exists()
