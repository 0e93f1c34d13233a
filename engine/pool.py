"""Build the :class:`~bgsynth.types.BackgroundPool` of a split: every image's Only-BG-T, decoded once.

The pool is what every Mixed-* composite, the Backgrounds Challenge and the background-swap augmentation draw
their backgrounds from. It is made here and only here: the decode loader turns the index into batches, the
variants layer makes each batch's Only-BG-T (:func:`bgsynth.variants.background_pool_from_batch`, under the
batch's tiling), and the rows are kept resident on the device, sorted by image id.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .geometry import CropGeometry
from .index import DatasetIndex
from .pipeline import create_loader
from .types import BackgroundPool
from .variants import background_pool_from_batch

__all__ = ["build_background_pool"]


def build_background_pool(
    index: DatasetIndex | str,
    geometry: CropGeometry | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    split: str | Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_threads: int | None = None,
    progress: bool = False,
    tiling: str = "paper",
    kernel_backend: str = "auto",
) -> BackgroundPool:
    """Decode a split once and keep the Only-BG-T image of every image that has one, resident on ``device``.

    Only-BG-T (PAPER.md): the pixels inside the union box are replaced by a tiling of the margin strip the paper's
    rule picks. With ``tiling="paper"`` (default) the rule runs on the stored image at full resolution and the
    tiled image is resized and cropped like the Original (the authors' construction); with ``"crop"`` it runs
    inside the crop (the faster approximation). Images without an Only-BG-T (``has_bgt`` False: the box leaves
    no margin) and undecodable images are left out.

    Args:
        index: the dataset index (or its path).
        geometry: crop geometry (default ``CropGeometry()``: 256 -> 224).
        backend: decode backend (see :func:`bgsynth.pipeline.create_loader`).
        device: where the pool lives.
        split: keep only these splits (e.g. ``"val"``).
        per_class: at most this many images per class, chosen with ``seed`` (:meth:`DatasetIndex.select`).
        seed: seed of the per-class choice.
        batch_size: decode batch size.
        num_threads: decoder threads.
        progress: show a tqdm bar.
        tiling: ``"paper"`` or ``"crop"`` (see above).
        kernel_backend: backend of the crop-space tiling kernel (:func:`bgsynth.kernels.tile_fill`).

    Returns:
        A :class:`BackgroundPool` sorted by image id.

    Raises:
        PoolTooLargeError: the pool would not fit the device (checked before anything is decoded).

    Shape:
        - pool.images: ``uint8 [N, 3, C, C]``; pool.labels, pool.image_ids: ``int64 [N]``
    """
    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        index = DatasetIndex.load(index)
    geometry = CropGeometry() if geometry is None else geometry
    dev = torch.device(device)
    sub = index.select(split=split, per_class=per_class, seed=seed) if (split is not None or per_class is not None) else index
    n = len(sub)
    c = geometry.crop
    BackgroundPool.check_fits(n, c, dev)

    loader = create_loader(sub, backend=backend, geometry=geometry, batch_size=batch_size, device=dev,
                           num_threads=num_threads, tiling=tiling)
    # one preallocated buffer (a list of parts + torch.cat would hold the pool twice at its peak)
    images = torch.empty((n, 3, c, c), dtype=torch.uint8, device=loader.device)
    labels = torch.empty(n, dtype=torch.int64, device=loader.device)
    ids = torch.empty(n, dtype=torch.int64, device=loader.device)
    count = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="background pool", unit="batch")
    try:
        for batch in batches:
            part = background_pool_from_batch(batch, backend=kernel_backend)
            k = len(part)
            images[count : count + k] = part.images
            labels[count : count + k] = part.labels
            ids[count : count + k] = part.image_ids
            count += k
    finally:
        loader.close()
    if count == 0:
        warnings.warn(
            f"build_background_pool: none of the {n} images has an Only-BG-T (or all were rejected); the pool is empty",
            stacklevel=2,
        )
    if count < n:  # leading rows are contiguous views; copy only when much of the buffer would be wasted
        images, labels, ids = images[:count], labels[:count], ids[:count]
        if count < 0.9 * n:
            images, labels, ids = images.clone(), labels.clone(), ids.clone()
    # the loader yields batches in sorted id order and each part is sorted, so the pool is sorted by id
    return BackgroundPool(images=images, labels=labels, image_ids=ids)
