"""Build the :class:`~engine.pipeline.batch.BackgroundPool` of a split: every image's Only-BG-T, decoded once."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..geometry import CropGeometry
from ..index import DatasetIndex
from .batch import BackgroundPool

__all__ = ["build_background_pool"]


def _default_tile_fn() -> Callable:
    try:
        from kernels import tile_fill
    except ImportError as e:
        raise ConfigError(
            "build_background_pool: kernels.tile_fill is not available; pass tile_fn=... or install the kernels "
            f"package ({e})"
        ) from e
    return tile_fill


def build_background_pool(
    index: DatasetIndex | str,
    geometry: CropGeometry | None = None,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    split: str | Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    tile_fn: Callable | None = None,
    num_threads: int | None = None,
    progress: bool = False,
) -> BackgroundPool:
    """Decode a split once and keep the Only-BG-T image of every image that has one, resident on ``device``.

    Only-BG-T (PAPER.md): the pixels inside the union box are replaced by a tiling of the widest margin strip
    (``batch.strips``), computed in the crop geometry by ``tile_fn`` (default :func:`kernels.tile_fill`). Images
    whose box leaves no margin in the crop (``has_bgt`` False) and undecodable images are left out.

    Args:
        index: the dataset index (or its path).
        geometry: crop geometry (default ``CropGeometry()``: 256 -> 224).
        backend: decode backend (see :func:`engine.pipeline.create_loader`).
        device: where the pool lives.
        split: keep only these splits (e.g. ``"val"``).
        per_class: at most this many images per class, chosen with ``seed`` (:meth:`DatasetIndex.select`).
        seed: seed of the per-class choice.
        batch_size: decode batch size.
        tile_fn: ``tile_fn(images, boxes, strips) -> uint8 images`` (Only-BG-T of a batch).
        num_threads: decoder threads.
        progress: show a tqdm bar.

    Returns:
        A :class:`BackgroundPool` sorted by image id.

    Raises:
        PoolTooLargeError: the pool would not fit the device (checked before anything is decoded).

    Shape:
        - pool.images: ``uint8 [N, 3, C, C]``; pool.labels, pool.image_ids: ``int64 [N]``
    """
    from . import create_loader  # the package's factory (avoids a circular import at module load)

    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        index = DatasetIndex.load(index)
    geometry = CropGeometry() if geometry is None else geometry
    dev = torch.device(device)
    sub = index.select(split=split, per_class=per_class, seed=seed) if (split is not None or per_class is not None) else index
    n = len(sub)
    c = geometry.crop
    BackgroundPool.check_fits(n, c, dev)
    tile = _default_tile_fn() if tile_fn is None else tile_fn

    loader = create_loader(sub, backend=backend, geometry=geometry, batch_size=batch_size, device=dev,
                           num_threads=num_threads)
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
            keep = batch.has_bgt.nonzero().squeeze(1)
            k = int(keep.numel())
            if k == 0:
                continue
            sel = batch.slice(keep)
            out = tile(sel.images, sel.boxes, sel.strips)
            if out.dtype != torch.uint8 or tuple(out.shape) != tuple(sel.images.shape):
                raise ConfigError(
                    f"build_background_pool: tile_fn must return uint8 {tuple(sel.images.shape)}, "
                    f"got {out.dtype} {tuple(out.shape)}"
                )
            images[count : count + k] = out
            labels[count : count + k] = sel.labels
            ids[count : count + k] = sel.image_ids
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
    return BackgroundPool(images=images, labels=labels, image_ids=ids)
