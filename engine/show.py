"""``bgsynth show``: decode a few images of an index, synthesize their variants and draw them as a contact sheet.

A short pipeline over the floors below: claim the output file for this run (:class:`bgsynth.runs.OutputFolder`,
``single_file=True``: a sheet of other settings already there is refused unless ``overwrite``), choose the images
(:func:`_choose_ids`), decode them in one batch
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

from .config import RunConfig, check_positive_int, resolve_options
from .errors import ConfigError
from .index import DatasetIndex, require_index
from .pipeline import auto_backend, create_loader
from .pool import build_background_pool
from .runs import Fingerprint, OutputFolder, index_digest
from .report.sheets import decoded_sheet, variant_sheet
from .types import Batch
from .variants import MIXED_VARIANTS, resolve_variants, synthesize

__all__ = ["ShowConfig", "show_index"]


@dataclasses.dataclass(frozen=True)
class ShowConfig:
    """What a contact sheet shows.

    Attributes:
        n: number of images (rows): the first ``n`` by id, or with ``per_class`` about ``n / N`` of each of the
            label space's ``N`` classes.
        per_class: spread the images over the classes (seeded choice, the run's seed).
        variants: ``'all'`` or a selection (stored resolved, in the order given); Mixed-* draw their backgrounds
            from the Only-BG-T images of ``split``.
        split: split to draw from (``None``: every image).
        tile: side of each tile in pixels (``None``: the crop size, at most 128).
        decoded: draw the decoded crops with mask and box instead of the variants.
        overwrite: replace a sheet made with other settings (or a file of no recorded run) at the output path.
    """

    n: int = 8
    per_class: bool = False
    variants: tuple[str, ...] | str = "all"
    split: str | None = "val"
    tile: int | None = None
    decoded: bool = False
    overwrite: bool = False

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
        out_path: PNG to write (claimed for this run before any work; its record is
            ``<name>.bgsynth-run.json`` beside it).
        run: the resolved run configuration (default: from ``options``; the CPU, 256 -> 224, paper tiling).
        config: the sheet's :class:`ShowConfig` (default: from ``options``).
        **options: run options (``seed``, ``resize``, ``crop``, ``geometry``, ``backend``, ``kernel_backend``,
            ``device``, ``tiling``, ...) and :class:`ShowConfig` fields (``n``, ``per_class``, ``variants``,
            ``split``, ``tile``, ``decoded``, ``overwrite``).

    Returns:
        ``(path written, number of images drawn)``.

    Raises:
        ConfigError: ``out_path`` is a folder, or a sheet of other settings is there (the message names them).
        EmptyInputError: no image in the split.
    """
    require_index(index, "show")
    run, config = resolve_options("show", run, config, ShowConfig, options, batch_kind="decode", device="cpu",
                                  amp=None)
    pool_index = index.select(split=config.split) if config.split is not None else index
    index.require_images(pool_index, "show", config.split)
    claim = OutputFolder(out_path, _fingerprint(pool_index, run, config), overwrite=config.overwrite,
                         single_file=True).claim()
    names = index.label_space.classes
    batch = _decode(index, _choose_ids(index, pool_index, run, config), run)
    if config.decoded:
        path = decoded_sheet(batch, claim.path, tile=config.tile, classes=names)
    else:
        pool = None
        if any(v in MIXED_VARIANTS for v in config.variants):
            pool = build_background_pool(pool_index, geometry=run.geometry, backend=run.backend, device=run.device,
                                         batch_size=run.batch_size, num_threads=run.num_threads, tiling=run.tiling,
                                         kernel_backend=run.kernel_backend)
            pool = dataclasses.replace(pool, num_classes=index.label_space.num_classes)
        outs = synthesize(batch, list(config.variants), pool=pool, seed=run.seed, backend=run.kernel_backend)
        path = variant_sheet(batch, outs, claim.path, tile=config.tile, classes=names)
    claim.commit([path])
    return path, len(batch)


def _fingerprint(pool_index: DatasetIndex, run: RunConfig, config: ShowConfig) -> Fingerprint:
    """What decides the sheet: its own settings, the run's geometry, seed, tiling and decoder, the images."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "overwrite"}
    settings.update(seed=run.seed, resize=run.geometry.resize, crop=run.geometry.crop, tiling=run.tiling,
                    backend=auto_backend(run.device) if run.backend == "auto" else run.backend,
                    device=run.device.type, label_space=pool_index.label_space.name)
    return Fingerprint("show", settings, index=index_digest(pool_index))


def _choose_ids(index: DatasetIndex, pool_index: DatasetIndex, run: RunConfig, config: ShowConfig) -> list[int]:
    """The images of the sheet: the first ``n`` of the split by id, or ``n`` spread over the classes."""
    if config.per_class:
        n_cls = index.label_space.num_classes
        return pool_index.select(per_class=-(-config.n // n_cls), seed=run.seed).ids[: config.n]
    return pool_index.ids[: config.n]


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
