"""Build the :class:`~bgsynth.types.BackgroundPool` of a split: every image's Only-BG-T, decoded once.

The pool is what every Mixed-* composite, the Backgrounds Challenge and the background-swap augmentation draw
their backgrounds from. It is made here and only here: the decode loader turns the index into batches, the
variants layer makes each batch's Only-BG-T (:func:`bgsynth.variants.background_pool_from_batch`, under the
batch's tiling), and the rows are kept resident on the device, sorted by image id.

Every pool knows the size of its label space (``BackgroundPool.num_classes``: the index's
``label_space.num_classes``), so Mixed-Next's ``(y + 1) mod N`` is right for any label space, not only IN-9's 9.
The pool keeps the memory layout of the decoded crops (channels_last from the CPU decoders), so the CPU
compositing kernel gathers its rows without a layout change.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from .classes import NUM_IN9
from .distributed import DistContext, current
from .errors import ConfigError
from .geometry import CropGeometry
from .index import DatasetIndex
from .pipeline import create_loader
from .types import BackgroundPool, Batch
from .variants import background_pool_from_batch

__all__ = ["build_background_pool", "build_background_pool_sharded", "gather_background_pool", "pool_from_batches",
           "empty_pool"]


# The one pool builder, called positionally (index, geometry, backend, ...) by consumers, tests and benchmarks.
# size: a stable public signature: the selection (split, per_class, seed) and the run's decode settings, one for one
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
        A :class:`BackgroundPool` sorted by image id, with ``num_classes`` the index's
        ``label_space.num_classes``.

    Raises:
        PoolTooLargeError: the pool would not fit the device (checked before anything is decoded).

    Shape:
        - pool.images: ``uint8 [N, 3, C, C]``; pool.labels, pool.image_ids: ``int64 [N]``
    """
    sub = _selection(index, split, per_class, seed)
    geometry = CropGeometry() if geometry is None else geometry
    dev = torch.device(device)
    BackgroundPool.check_fits(len(sub), geometry.crop, dev)
    loader = create_loader(sub, backend=backend, geometry=geometry, batch_size=batch_size, device=dev,
                           num_threads=num_threads, tiling=tiling)
    try:
        pool = _fill(loader, len(sub), geometry.crop, progress, kernel_backend, sub.label_space.num_classes)
    finally:
        loader.close()
    return _warn_if_empty(pool, "build_background_pool", len(sub))


def _selection(index, split, per_class, seed) -> DatasetIndex:
    """The images a pool is made of (an index path is loaded here)."""
    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        index = DatasetIndex.load(index)
    if split is None and per_class is None:
        return index
    return index.select(split=split, per_class=per_class, seed=seed)


def _fill(loader, n: int, crop: int, progress: bool, kernel_backend: str, num_classes: int) -> BackgroundPool:
    """Every batch's Only-BG-T rows, in one preallocated buffer (a list of parts + torch.cat would hold the pool
    twice at its peak), laid out like the first batch's rows."""
    images = None
    labels = torch.empty(n, dtype=torch.int64, device=loader.device)
    ids = torch.empty(n, dtype=torch.int64, device=loader.device)
    count = 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm  # tqdm only for a visible bar

        batches = tqdm(loader, desc="background pool", unit="batch")
    for batch in batches:
        part = background_pool_from_batch(batch, backend=kernel_backend)
        if images is None:
            images = torch.empty((n, 3, crop, crop), dtype=torch.uint8, device=loader.device,
                                 memory_format=_memory_format(part.images))
        k = len(part)
        images[count : count + k] = part.images
        labels[count : count + k] = part.labels
        ids[count : count + k] = part.image_ids
        count += k
    if images is None:
        images = torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=loader.device)
    if count < n:  # leading rows are contiguous views; copy only when much of the buffer would be wasted
        images, labels, ids = images[:count], labels[:count], ids[:count]
        if count < 0.9 * n:
            images, labels, ids = images.clone(), labels.clone(), ids.clone()
    # the loader yields batches in sorted id order and each part is sorted, so the pool is sorted by id
    return BackgroundPool(images=images, labels=labels, image_ids=ids, num_classes=num_classes)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    """channels_last when ``images`` are laid out NHWC in memory (the CPU decoders' crops), else contiguous."""
    nhwc = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def empty_pool(crop: int, device: torch.device | str, num_classes: int = NUM_IN9) -> BackgroundPool:
    """A pool without backgrounds (``uint8 [0, 3, crop, crop]``): a rank without images still joins the gather.

    ``num_classes``: the size of the label space (the index's ``label_space.num_classes``).
    """
    z = torch.empty(0, dtype=torch.int64, device=device)
    return BackgroundPool(torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=device), z, z.clone(),
                          num_classes)


def pool_from_batches(batches: Sequence[Batch], crop: int, device: torch.device | str,
                      backend: str = "auto", num_classes: int = NUM_IN9) -> BackgroundPool:
    """The pool of batches already decoded (e.g. kept by an evaluation pass, so that each JPEG is decoded once):
    each batch's Only-BG-T rows (:func:`bgsynth.variants.background_pool_from_batch`), sorted by image id.

    Args:
        batches: decoded batches of distinct images (with ``bgt`` under ``tiling="paper"``).
        crop: crop size of an empty pool (no batch, or no Only-BG-T at all).
        device: device of an empty pool (otherwise the batches').
        backend: kernel backend of the crop-space tiling (``tiling="crop"``).
        num_classes: the size of the label space the labels belong to (pass the index's
            ``label_space.num_classes``; IN-9's 9 by default).
    """
    parts = [background_pool_from_batch(b, backend=backend) for b in batches]
    if not parts:
        return empty_pool(crop, device, num_classes)
    ids = torch.cat([p.image_ids for p in parts])
    order = torch.argsort(ids)
    images = torch.cat([p.images for p in parts])[order]
    return BackgroundPool(images.contiguous(memory_format=_memory_format(parts[0].images)),
                          torch.cat([p.labels for p in parts])[order], ids[order], num_classes)


def gather_background_pool(pool, ctx: DistContext | None = None):
    """The union of every rank's :class:`~bgsynth.types.BackgroundPool`, sorted by image id, on every
    rank (on the device of this rank's part).

    Each JPEG is then decoded by one rank only, and every rank holds the pool a single process would have built
    from the whole split (the same images, labels and ids, in the same order, and the parts' ``num_classes``).

    Raises:
        ConfigError: the parts overlap (an id on two ranks) or disagree in crop size or label space size.
    """
    ctx = current() if ctx is None else ctx
    if ctx.enabled:
        parts = ctx.all_gather_object((tuple(pool.images.shape[1:]), pool.num_classes))
        sizes = [p[0] for p in parts]
        if len(set(sizes)) != 1:
            raise ConfigError(f"gather_background_pool: expected the same image shape on every rank, got {sizes}")
        if len({p[1] for p in parts}) != 1:
            raise ConfigError(f"gather_background_pool: expected one label space size (num_classes) on every rank, "
                              f"got {[p[1] for p in parts]}")
        images = torch.cat(ctx.all_gather_tensors(pool.images))
        labels = torch.cat(ctx.all_gather_tensors(pool.labels.to(torch.int64)))
        ids = torch.cat(ctx.all_gather_tensors(pool.image_ids.to(torch.int64)))
    else:
        images, labels, ids = pool.images, pool.labels.to(torch.int64), pool.image_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    ids = ids[order]
    if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise ConfigError("gather_background_pool: an image id occurs in more than one rank's pool (overlapping shards)")
    return BackgroundPool(images[order].contiguous(memory_format=_memory_format(pool.images)), labels[order], ids,
                          pool.num_classes)


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
        **kwargs: ``geometry``, ``backend``, ``device``, ``batch_size``, ``tiling``, ``kernel_backend``, ``num_threads``,
            ``progress`` (shown on rank 0 only).
    """
    ctx = current() if ctx is None else ctx
    if not ctx.enabled:
        return build_background_pool(index, split=split, per_class=per_class, seed=seed, **kwargs)
    sub = _selection(index, split, per_class, seed)
    geometry = kwargs.get("geometry")
    crop = (CropGeometry() if geometry is None else geometry).crop
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
        part = empty_pool(crop, device, sub.label_space.num_classes)
    pool = gather_background_pool(part, ctx)
    return _warn_if_empty(pool, "build_background_pool_sharded", len(sub))


def _warn_if_empty(pool: BackgroundPool, who: str, n: int) -> BackgroundPool:
    if len(pool) == 0:
        warnings.warn(f"{who}: none of the {n} images has an Only-BG-T (or all were rejected); the pool is empty",
                      stacklevel=3)
    return pool
