"""Start-up: a command imports only what it uses (issue: `bgsynth --help` under 0.5 s, no timm for `eval`).

Wall times are measured by benchmarks/bench_startup.py, not asserted here; these tests check the cause: which
heavy modules a fresh interpreter has loaded after building the CLI, after `--help`, and after parsing a command.
"""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "timm", "matplotlib", "nvidia.dali", "triton", "cv2", "kornia", "pycocotools")


def _loaded_after(code: str) -> set[str]:
    probe = (
        "import sys\n"
        f"{code}\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    return {m for m in (lines[-1] if lines else "").split(",") if m}


def test_building_the_cli_imports_no_heavy_module():
    assert _loaded_after("import bgsynth.cli; bgsynth.cli.build_parser()") == set()


def test_help_and_argument_errors_import_no_heavy_module():
    code = (
        "import bgsynth.cli\n"
        "for argv in (['--help'], ['eval', '--help'], ['export', 'x', '--out', 'y', '--threads', '-1']):\n"
        "    try:\n"
        "        bgsynth.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    assert _loaded_after(code) == set()


def test_the_eval_api_does_not_import_timm_or_matplotlib():
    loaded = _loaded_after("import bgsynth.evaluate, bgsynth.challenge, bgsynth.export")
    assert "torch" in loaded  # the API itself needs torch; the point is what it does not pull in
    assert not loaded & {"timm", "matplotlib", "nvidia.dali", "triton"}


def test_ingest_imports_neither_timm_nor_torch():
    # the ImageNet-1k class list ships with the package: an ingest used to import timm (and torch) for it
    code = (
        "import bgsynth.cli, bgsynth.sources.imagenet\n"
        "from bgsynth.classes import in1k_wnids, wnid_to_in9\n"
        "assert len(in1k_wnids()) == 1000 and wnid_to_in9('n01440764') == 8\n"
    )
    assert not _loaded_after(code) & {"timm", "torch", "matplotlib", "nvidia.dali", "triton"}
