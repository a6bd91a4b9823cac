"""The codebase's own rules, run by CI: no import circle among the project's modules (function-level imports
included) and no function body repeated across modules; each check is shown to catch what it is for."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("check", ["check_imports", "check_duplicates"])
def test_the_repository_passes(check):
    run = subprocess.run([sys.executable, str(REPO / ".ci" / f"{check}.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_preview_path_does_not_import_the_networks():
    """A preview scene (CLI, photo bucket from the checkpoint config) runs without diffusers or transformers, which
    take seconds to import: ``engine.models`` imports nothing of its own, so its config module comes alone."""
    code = ("import sys; import engine.cli, engine.scene, engine.models.config;"
            "from engine.scene_start import photo_size; from engine.settings import SceneSettings;"
            "photo_size(720, 1080, SceneSettings(engine='preview'));"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_import_check_finds_circles_behind_function_level_and_relative_imports(tmp_path):
    check = _load("check_imports")
    root = _tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/loop.py": "from engine import start\n",
        "engine/start.py": "def size():\n    from engine.loop import bucket\n    return bucket\n",
        "engine/sub/__init__.py": "from .a import x\n",
        "engine/sub/a.py": "from . import b\nx = 1\n",
        "engine/sub/b.py": "def f():\n    from .a import x\n    return x\n",
        "engine/clean.py": "import engine.sub.b\nfrom engine.geometry_absent import y\n",
        "app.py": "from engine import clean\n",
    })
    assert check.cycles(check.import_graph(root)) == [["engine.loop", "engine.start"], ["engine.sub.a", "engine.sub.b"]]
    assert check.main([str(root)]) == 1
    # The package a module lives in does not count as imported by it (its __init__ importing it is no circle).
    assert "engine.sub" in check.import_graph(root)["engine.clean"]
    assert "engine.sub" not in check.import_graph(root)["engine.sub.b"]
    (root / "engine/start.py").write_text("def size():\n    return 1\n")
    (root / "engine/sub/b.py").write_text("def f():\n    return 2\n")
    assert check.main([str(root)]) == 0


def test_import_check_keeps_the_rooms_apart(tmp_path):
    check = _load("check_imports")
    root = _tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/geometry/__init__.py": "",
        "engine/geometry/cache.py": "from engine import atomicio\n",
        "engine/atomicio.py": "",
        "engine/models/__init__.py": "",
        "engine/scene.py": "from engine.geometry import cache\n",
        "demo/__init__.py": "",
        "demo/ui.py": "from engine import scene\n",
    })
    assert check.main([str(root)]) == 0
    (root / "engine/geometry/cache.py").write_text("def f():\n    from engine.models import x\n")
    (root / "engine/scene.py").write_text("import demo.ui\n")
    assert check.forbidden_imports(check.import_graph(root)) == [
        ("engine.geometry.cache", "engine.models"), ("engine.scene", "demo"), ("engine.scene", "demo.ui")]
    assert check.main([str(root)]) == 1


def test_import_check_keeps_the_viewers_names_out_of_the_engine(tmp_path):
    """The engine writes the scene's files; what the page's views make of them (demo/viewer.py) it does not name."""
    viewer = "from engine.scene import SPLATS\nMAX_SPLATS: int = 10\n\ndef write_views(scene):\n    return scene\n" \
             "\nclass View:\n    pass\n"
    root = _tree(tmp_path, {"engine/__init__.py": "", "demo/__init__.py": "", "demo/viewer.py": viewer,
                            "engine/scene.py": "SPLATS = 3\n\ndef write_cloud(points):\n    return points\n"})
    check = _load("check_imports")
    assert check.main([str(root)]) == 0  # the viewer may use the engine's names
    (root / "engine/scene.py").write_text("def write_cloud(points, max_splats=None):\n"
                                          "    return points.write_views(View, MAX_SPLATS)\n")
    assert check.viewer_names_in_engine(root) == [("engine.scene", "MAX_SPLATS"), ("engine.scene", "View"),
                                                  ("engine.scene", "write_views")]
    assert check.main([str(root)]) == 1


def test_duplicate_check_finds_a_body_repeated_across_modules_unless_each_copy_says_why(tmp_path):
    check = _load("check_duplicates")
    body = "    total = 0\n" + "".join(f"    total += {i} * x\n" for i in range(4)) + "    return total\n"
    root = _tree(tmp_path, {
        "engine/a.py": f'def weigh(x):\n    """One."""\n{body}',
        "demo/b.py": f"class K:\n    def weigh(self, x):\n        # layout differs\n{body.replace('    ', '        ')}",
        "engine/short.py": "def f(x):\n    return x\n",
        "demo/short.py": "def f(x):\n    return x\n",
    })
    assert [[(f, n) for f, n, _ in g] for g in check.repeated_bodies(root)] == [[("demo/b.py", "weigh"), ("engine/a.py", "weigh")]]
    assert check.main([str(root)]) == 1
    (root / "engine/a.py").write_text(f"# repeated on purpose: the demo must not import the engine here\ndef weigh(x):\n{body}")
    assert check.main([str(root)]) == 1  # one copy saying why is not enough: the reader of the other is not told
    text = (root / "demo/b.py").read_text().replace("# layout differs", "# repeated on purpose: see engine/a.py")
    (root / "demo/b.py").write_text(text)
    assert check.main([str(root)]) == 0
