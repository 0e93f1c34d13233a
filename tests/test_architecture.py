"""The architecture's rules hold for every module of the package (docs/architecture.md, tests/architecture.py).

Each check prints the offending imports, so a failure says what to move: a module on no floor, an import of a
higher floor, an import cycle, or an import of a bgsynth module inside a function.
"""

from __future__ import annotations

import architecture as arch


def test_every_module_is_on_a_floor():
    assert arch.violations()["unplaced"] == []


def test_no_module_imports_a_higher_floor():
    assert arch.violations()["upward"] == []


def test_no_import_cycles():
    assert arch.violations()["cycles"] == []


def test_imports_of_bgsynth_modules_are_at_module_level():
    assert arch.violations()["lazy"] == []


def test_no_function_is_over_80_lines_or_8_parameters_without_a_reason():
    big = [f"{name}: {lines} lines, {params} parameters" for lines, params, name, reason in arch.functions()
           if (lines > 80 or params > 8) and not reason]
    assert big == []


def test_the_checker_sees_violations():
    """The walker is not vacuous: an upward import, a cycle and a lazy import in a synthetic tree are found."""
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        files = {
            "bgsynth/__init__.py": "",
            "bgsynth/variants.py": "from .evaluate import x\n",
            "bgsynth/evaluate.py": "from .variants import y\ndef f():\n    from . import pool\n",
            "bgsynth/pool.py": "",
            "bgsynth/stray.py": "",
        }
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        mods = {"bgsynth": root / "bgsynth/__init__.py"} | {
            f"bgsynth.{p.stem}": p for p in (root / "bgsynth").glob("*.py") if p.stem != "__init__"}
        v = arch.violations(mods)
    assert v["unplaced"] == ["bgsynth.stray is on no floor"]
    assert any("bgsynth.variants" in u and "bgsynth.evaluate" in u for u in v["upward"])
    assert v["cycles"] == ["bgsynth.evaluate -> bgsynth.variants"]
    assert any("bgsynth.evaluate" in u and "bgsynth.pool" in u for u in v["lazy"])
