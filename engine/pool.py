"""Build the :class:`~bgsynth.types.BackgroundPool` of a split: every image's Only-BG-T, decoded once.

The pool is what every Mixed-* composite, the Backgrounds Challenge and the background-swap augmentation draw
their backgrounds from. It is made here and only here: the decode loader turns the index into batches, the
variants layer makes each batch's Only-BG-T (:func:`bgsynth.variants.background_pool_from_batch`, under the
batch's tiling), and the rows are kept resident on the device, sorted by image id.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from .distributed import DistContext, current
from .errors import ConfigError
from .geometry import CropGeometry
from .index import DatasetIndex
from .pipeline import create_loader
from .types import BackgroundPool
from .variants import background_pool_from_batch

__all__ = ["build_background_pool", "build_background_pool_sharded", "gather_background_pool"]


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


def gather_background_pool(pool, ctx: DistContext | None = None):
    """The union of every rank's :class:`~bgsynth.types.BackgroundPool`, sorted by image id, on every
    rank (on the device of this rank's part).

    Each JPEG is then decoded by one rank only, and every rank holds the pool a single process would have built
    from the whole split (the same images, labels and ids, in the same order).

    Raises:
        ConfigError: the parts overlap (an id on two ranks) or disagree in crop size.
    """
    ctx = current() if ctx is None else ctx
    if ctx.enabled:
        sizes = ctx.all_gather_object(tuple(pool.images.shape[1:]))
        if len(set(sizes)) != 1:
            raise ConfigError(f"gather_background_pool: expected the same image shape on every rank, got {sizes}")
        images = torch.cat(ctx.all_gather_tensors(pool.images))
        labels = torch.cat(ctx.all_gather_tensors(pool.labels.to(torch.int64)))
        ids = torch.cat(ctx.all_gather_tensors(pool.image_ids.to(torch.int64)))
    else:
        images, labels, ids = pool.images, pool.labels.to(torch.int64), pool.image_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    ids = ids[order]
    if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise ConfigError("gather_background_pool: an image id occurs in more than one rank's pool (overlapping shards)")
    return BackgroundPool(images[order].contiguous(), labels[order], ids)


def build_background_pool_sharded(
    index,
    ctx: DistContext | None = None,
    split: str | Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """:func:`build_background_pool` with the decoding split over the ranks.

    Each rank decodes ``shard_ids`` of the selected images and the parts are gathered
    (:func:`gather_background_pool`): the result equals a single-process ``build_background_pool`` with the
    same arguments, on every rank. Without a process group it *is* that call.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or its path.
        ctx: the distributed context (default :func:`current`).
        split, per_class, seed: the selection, as for ``build_background_pool``.
        **kwargs: ``geometry``, ``backend``, ``device``, ``batch_size``, ``tile_fn``, ``num_threads``,
            ``progress`` (shown on rank 0 only).
    """
    from .index import DatasetIndex
    from .pool import build_background_pool
    ctx = current() if ctx is None else ctx
    if not ctx.enabled:
        return build_background_pool(index, split=split, per_class=per_class, seed=seed, **kwargs)
    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        index = DatasetIndex.load(index)
    sub = index.select(split=split, per_class=per_class, seed=seed) if (split is not None or per_class is not None) else index
    geometry = kwargs.get("geometry")
    crop = 224 if geometry is None else geometry.crop
    device = torch.device(kwargs.get("device", "cpu"))
    BackgroundPool.check_fits(len(sub), crop, device)  # the gathered pool, not only this rank's part
    kwargs["progress"] = bool(kwargs.get("progress", False)) and ctx.is_main
    mine = ctx.shard(sub.ids)
    if mine:
        with warnings.catch_warnings():
            # an empty part is not a problem (another rank may hold the backgrounds); the union is checked below
            warnings.filterwarnings("ignore", message="build_background_pool: none of")
            part = build_background_pool(sub.select(ids=mine), **kwargs)
    else:
        part = BackgroundPool(torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=device),
                              torch.empty(0, dtype=torch.int64, device=device),
                              torch.empty(0, dtype=torch.int64, device=device))
    pool = gather_background_pool(part, ctx)
    if len(pool) == 0:
        warnings.warn(
            f"build_background_pool_sharded: none of the {len(sub)} images has an Only-BG-T (or all were "
            f"rejected); the pool is empty",
            stacklevel=2,
        )
    return pool
