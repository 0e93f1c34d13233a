import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = {}
exec((here / "engine" / "__init__.py").read_text(), version)

setup(
    name="bgsynth",
    version=version["__version__"],
    description="GPU-accelerated, batched variant synthesis for background-reliance research (ImageNet-9)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    package_data={"engine": ["data/*.json"]},
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
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100"]},
    entry_points={"console_scripts": ["bgsynth = engine.cli:main"]},
)
