"""Packaging of bgsynth.

The design fixes the repository's top level (``engine/``, ``kernels/``, ``benchmarks/``, ``tests/``); the import
name users type is ``bgsynth``. The folders are mapped onto it: ``engine/`` is installed as the package
``bgsynth`` and ``kernels/`` as its subpackage ``bgsynth.kernels`` (nothing is installed under the names
``engine`` or ``kernels``, which other projects use). The package list is explicit; ``tests/test_packaging.py``
checks that it names every folder with an ``__init__.py`` and that a built wheel imports as ``bgsynth`` only.
"""

import pathlib

from setuptools import setup

here = pathlib.Path(__file__).parent
version = {}
exec((here / "engine" / "__init__.py").read_text(), version)

PACKAGE_DIR = {"bgsynth": "engine", "bgsynth.kernels": "kernels"}
PACKAGES = [
    "bgsynth",
    "bgsynth.cli",
    "bgsynth.data",
    "bgsynth.pipeline",
    "bgsynth.report",
    "bgsynth.sources",
    "bgsynth.kernels",
]

setup(
    name="bgsynth",
    version=version["__version__"],
    description="GPU-accelerated, batched variant synthesis for background-reliance research (ImageNet-9)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    package_data={"bgsynth": ["data/*.json"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "kornia>=0.7",
        "nvidia-dali-cuda130; platform_system == 'Linux'",
        "numpy>=1.24",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "pillow>=10",
        "timm>=1.0",
        "matplotlib>=3.7",
        "tqdm>=4.65",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "scikit-image>=0.22"]},
    entry_points={"console_scripts": ["bgsynth = bgsynth.cli:main"]},
)
