"""Packaging: the folders engine/ and kernels/ install as ``bgsynth`` and ``bgsynth.kernels``, and nothing else.

A wheel is built from the checkout (no network: ``--no-build-isolation``), unpacked into a folder outside the
repository and imported from there in a fresh interpreter: ``bgsynth`` works with its data file and console
entry point, while ``engine`` and ``kernels`` (names other projects use) do not exist.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def _setup_constants() -> tuple[dict, list]:
    tree = ast.parse((REPO / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PACKAGE_DIR", "PACKAGES"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["PACKAGE_DIR"], found["PACKAGES"]


def test_package_list_names_every_package_folder():
    package_dir, packages = _setup_constants()
    on_disk = {
        ".".join((name, *init.parent.relative_to(REPO / folder).parts))
        for name, folder in package_dir.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert on_disk == set(packages), f"setup.py PACKAGES {sorted(packages)} vs folders {sorted(on_disk)}"


def test_wheel_installs_bgsynth_only(tmp_path):
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = out.glob("bgsynth-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    tops = {n.split("/")[0] for n in names}
    assert "bgsynth" in tops and not tops & {"engine", "kernels"}, sorted(tops)
    assert "bgsynth/data/in9_classes.json" in names and "bgsynth/kernels/tile.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "bgsynth = bgsynth.cli:main" in z.read(entry).decode()
    code = (
        "import importlib.util, pathlib, sys\n"
        "import bgsynth, bgsynth.kernels, bgsynth.cli, bgsynth.classes\n"
        f"site = pathlib.Path({str(tmp_path / 'site')!r})\n"
        "assert pathlib.Path(bgsynth.__file__).parent == site / 'bgsynth', bgsynth.__file__\n"
        "assert pathlib.Path(bgsynth.kernels.__file__).parent == site / 'bgsynth' / 'kernels'\n"
        "assert len(bgsynth.classes.IN9_CLASSES) == 9\n"
        "assert importlib.util.find_spec('engine') is None and importlib.util.find_spec('kernels') is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
