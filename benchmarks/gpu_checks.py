"""All GPU checks of bgsynth in one call, sized for a short lease on one CUDA device.

Runs, each step with its own time limit, and writes every step's output to ``$OUT`` (or ``--out``):

1. the CUDA variants of the kernel, variant, pipeline (torchvision nvJPEG decode), model and bench tests;
2. Triton kernels vs their torch reference on CUDA (part of 1) and composites/s + achieved bandwidth;
3. ``bgsynth bench`` on CUDA (the same code as the command, :func:`bgsynth.bench.run_bench`): decode, synthesis,
   the model alone and end to end for ResNet-50 (random init) at 224 px in bf16, the bottleneck, and the
   composite kernel's bandwidth as a share of the device's peak (``bench/bench.json``);
4. the evaluator and the challenge on CUDA with bf16 autocast and channels_last (ResNet-50, random init, 224 px);
5. decode and augmentation throughput on the GPU.

When ``import bgsynth`` does not find this checkout (nothing installed), the steps run with a ``PYTHONPATH`` shim
that maps ``engine/`` to ``bgsynth`` and ``kernels/`` to ``bgsynth.kernels``, as ``setup.py`` installs them.

DALI's GPU path is not exercised when the ``nvidia-dali`` wheel is absent on the device (it is ~200 MB, larger than
what a short-lease machine can be sent); the script says so in its summary instead of claiming it.

Usage on a machine that lacks kornia / pycocotools: put their wheels in ``wheels/`` (``pip download --no-deps
kornia kornia-rs pycocotools -d wheels``) and run::

    pip install --no-deps wheels/*.whl && python benchmarks/gpu_checks.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

STEPS = [
    ("tests-cuda", [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda or gpu",
                    "tests/test_kernels.py", "tests/test_variants.py", "tests/test_pipeline.py",
                    "tests/test_models.py", "tests/test_evaluate.py", "tests/test_bench.py"], 240),
    ("bench-variants", [sys.executable, "benchmarks/bench_variants.py", "--normalize", "--no-tiling"], 90),
    ("bgsynth-bench-cuda", [sys.executable, "-m", "bgsynth.cli.bench", "builtin", "--device", "cuda",
                            "--model", "resnet50", "--resize", "256", "--crop", "224", "--batch-sizes", "256,64",
                            "--dtype", "bf16", "--images", "512", "--repeats", "3", "--no-progress",
                            "--out", "{out}/bench", "--overwrite"], 180),
    ("bench-decode", [sys.executable, "benchmarks/bench_decode.py"], 120),
    ("bench-eval-cuda", [sys.executable, "benchmarks/bench_eval.py", "--device", "cuda", "--resize", "256",
                         "--crop", "224", "--val-per-class", "50"], 150),
    ("bench-challenge-cuda", [sys.executable, "benchmarks/bench_challenge.py", "--device", "cuda"], 150),
    ("bench-augment-cuda", [sys.executable, "benchmarks/bench_augment.py", "--device", "cuda"], 120),
]


def _import_shim(out: pathlib.Path) -> pathlib.Path | None:
    """A folder whose ``bgsynth`` links to this checkout's ``engine/`` (and ``bgsynth/kernels`` to ``kernels/``), or
    ``None`` when ``import bgsynth`` already finds this checkout."""
    probe = subprocess.run([sys.executable, "-c", "import bgsynth, sys; sys.stdout.write(bgsynth.__file__)"],
                           cwd=out, capture_output=True, text=True)
    if probe.returncode == 0 and pathlib.Path(probe.stdout).resolve().parent == (ROOT / "engine").resolve():
        return None
    shim = pathlib.Path(tempfile.mkdtemp(prefix="bgsynth-shim-"))  # outside $OUT: links do not come back
    pkg = shim / "bgsynth"
    pkg.mkdir(parents=True, exist_ok=True)
    for child in (ROOT / "engine").iterdir():
        link = pkg / child.name
        if child.name != "__pycache__" and not link.exists():
            link.symlink_to(child)
    if not (pkg / "kernels").exists():
        (pkg / "kernels").symlink_to(ROOT / "kernels")
    return shim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-checks"))
    ap.add_argument("--only", nargs="*", default=None, help="run only these step names")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    shim = _import_shim(out)
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    summary = {"cuda": torch.cuda.is_available(),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "torch": torch.__version__, "steps": {}}
    try:
        import nvidia.dali  # noqa: F401

        summary["dali"] = "installed: DALI GPU decode exercised by tests-cuda and bench-decode"
    except ImportError:
        summary["dali"] = "NOT installed here: the DALI GPU path was not exercised"
    for name, cmd, limit in STEPS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        cmd = [c.replace("{out}", str(out.resolve())) for c in cmd]
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n[timed out after {limit}s]"
        (out / f"{name}.log").write_text(text if isinstance(text, str) else text.decode(errors="replace"))
        summary["steps"][name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:24s} rc={rc:<4d} {summary['steps'][name]['seconds']:7.1f}s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(s["rc"] == 0 for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
