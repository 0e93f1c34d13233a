"""Shared pytest fixtures.

Triton's interpreter must be switched on before any ``@triton.jit`` decorator runs, so it is set here, before a
test module imports ``kernels``, whenever no CUDA device is present: Triton kernels then run on CPU tensors and
are compared with their torch references.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny built-in dataset shared by the whole session: small geometry, few images per class.
TINY = dict(seed=0, train_per_class=8, val_per_class=6)


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory):
    """Folder of a tiny built-in dataset built once per test session (path of its index JSON)."""
    from bgsynth.sources.synthetic import build_builtin_dataset

    root = tmp_path_factory.mktemp("builtin")
    return build_builtin_dataset(root=root, progress=False, **TINY)


@pytest.fixture(scope="session")
def tiny_index(builtin_root):
    """The tiny built-in dataset's :class:`~bgsynth.index.DatasetIndex` (train and val splits, true masks)."""
    from bgsynth.index import DatasetIndex

    return DatasetIndex.load(builtin_root)


@pytest.fixture(scope="session")
def tiny_geometry():
    """A small crop geometry that keeps CPU tests fast."""
    from bgsynth.geometry import CropGeometry

    return CropGeometry(resize=72, crop=64)


def cpu_and_cuda():
    """Devices to parametrise over: CPU always, CUDA when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def photo_index(tmp_path_factory):
    """Path of the real-photograph fixture's index JSON (tests/photos.py), built once per test session."""
    from photos import build_photo_index

    return build_photo_index(tmp_path_factory.mktemp("photos"))
