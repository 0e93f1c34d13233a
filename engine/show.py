"""``bgsynth show``: decode a few images of an index, synthesize their variants and draw them as a contact sheet.

A short pipeline over the floors below: choose the images (:func:`_choose_ids`), decode them in one batch
(:func:`bgsynth.pipeline.create_loader`), make the Mixed-* pool when needed (:func:`bgsynth.pool.build_background_pool`,
the Only-BG-T images of the split), synthesize (:func:`bgsynth.variants.synthesize`) and draw
(:mod:`bgsynth.report.sheets`). The run's settings (geometry, device, backends, tiling, seed) are a
:class:`~bgsynth.config.RunConfig`, the sheet's own a :class:`ShowConfig`.

>>> from bgsynth.index import DatasetIndex
>>> show_index(DatasetIndex.load("index.json"), "sheet.png", n=9, per_class=True)    # doctest: +SKIP
(PosixPath('sheet.png'), 9)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from .classes import NUM_IN9
from .config import RunConfig, check_positive_int, resolve_options
from .errors import ConfigError
from .index import DatasetIndex
from .pipeline import create_loader
from .pool import build_background_pool
from .report.sheets import decoded_sheet, variant_sheet
from .types import Batch
from .variants import MIXED_VARIANTS, resolve_variants, synthesize

__all__ = ["ShowConfig", "show_index"]


@dataclasses.dataclass(frozen=True)
class ShowConfig:
    """What a contact sheet shows.

    Attributes:
        n: number of images (rows): the first ``n`` by id, or with ``per_class`` about ``n / 9`` of each class.
        per_class: spread the images over the classes (seeded choice, the run's seed).
        variants: ``'all'`` or a selection (stored resolved, in the order given); Mixed-* draw their backgrounds
            from the Only-BG-T images of ``split``.
        split: split to draw from (``None``: every image).
        tile: side of each tile in pixels (``None``: the crop size, at most 128).
        decoded: draw the decoded crops with mask and box instead of the variants.
    """

    n: int = 8
    per_class: bool = False
    variants: tuple[str, ...] | str = "all"
    split: str | None = "val"
    tile: int | None = None
    decoded: bool = False

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"show: expected at least one image, got n={self.n}")
        if self.tile is not None:
            check_positive_int(self.tile, "tile", "ShowConfig")
        object.__setattr__(self, "variants", tuple(resolve_variants(self.variants)))


def show_index(index: DatasetIndex, out_path: str | os.PathLike, run: RunConfig | None = None,
               config: ShowConfig | None = None, **options: Any) -> tuple[pathlib.Path, int]:
    """Decode a few images of an index and draw their variants (or, ``decoded=True``, the decoded crops).

    Args:
        index: the loaded :class:`~bgsynth.index.DatasetIndex`.
        out_path: PNG to write.
        run: the resolved run configuration (default: from ``options``; the CPU, 256 -> 224, paper tiling).
        config: the sheet's :class:`ShowConfig` (default: from ``options``).
        **options: run options (``seed``, ``resize``, ``crop``, ``geometry``, ``backend``, ``kernel_backend``,
            ``device``, ``tiling``, ...) and :class:`ShowConfig` fields (``n``, ``per_class``, ``variants``,
            ``split``, ``tile``, ``decoded``).

    Returns:
        ``(path written, number of images drawn)``.
    """
    if not isinstance(index, DatasetIndex):
        raise ConfigError(f"show: expected a DatasetIndex, got {type(index).__name__}; load an index file once "
                          f"with bgsynth.index.DatasetIndex.load(path)")
    run, config = resolve_options("show", run, config, ShowConfig, options, batch_kind="decode", device="cpu",
                                  amp=None)
    pool_index = index.select(split=config.split) if config.split is not None else index
    batch = _decode(index, _choose_ids(index, pool_index, run, config), run)
    if config.decoded:
        return decoded_sheet(batch, out_path, tile=config.tile), len(batch)
    pool = None
    if any(v in MIXED_VARIANTS for v in config.variants):
        pool = build_background_pool(pool_index, geometry=run.geometry, backend=run.backend, device=run.device,
                                     batch_size=run.batch_size, num_threads=run.num_threads, tiling=run.tiling,
                                     kernel_backend=run.kernel_backend)
    outs = synthesize(batch, list(config.variants), pool=pool, seed=run.seed, backend=run.kernel_backend)
    return variant_sheet(batch, outs, out_path, tile=config.tile), len(batch)


def _choose_ids(index: DatasetIndex, pool_index: DatasetIndex, run: RunConfig, config: ShowConfig) -> list[int]:
    """The images of the sheet: the first ``n`` of the split by id, or ``n`` spread over the classes."""
    if config.per_class:
        ids = pool_index.select(per_class=-(-config.n // NUM_IN9), seed=run.seed).ids[: config.n]
    else:
        ids = pool_index.ids[: config.n]
    if not ids:
        raise ConfigError(f"show: no images in split {config.split!r} of {index.path or 'the index'}")
    return ids


def _decode(index: DatasetIndex, ids: list[int], run: RunConfig) -> Batch:
    """The chosen images, decoded in one batch (undecodable images drop out)."""
    loader = create_loader(index, backend=run.backend, geometry=run.geometry, batch_size=len(ids), device=run.device,
                           ids=ids, prefetch=0, num_threads=run.num_threads, tiling=run.tiling)
    try:
        batches = list(loader)
    finally:
        loader.close()
    if not batches:
        raise ConfigError(f"show: none of the {len(ids)} images could be decoded: {loader.rejects[:3]}")
    return Batch.cat(batches)
