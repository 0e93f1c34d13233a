"""The stateful side of composed datasets: background pools from a second source, and the online iterator.

* :func:`scene_index` / :func:`load_backgrounds`: a background pool from a **second source**, either a plain folder
  of scene images with one subfolder per background class (Places-style, no masks needed: the index is made in
  memory from the folder, each image probed by its header, bad files recorded as rejects) or another dataset index.
  Scene images are decoded by the engine's loaders (:func:`bgsynth.pipeline.create_loader`) in the model's crop
  geometry exactly like a foreground's Original (shorter side resized, centre crop), so a composite is
  ``where(M, foreground crop, background crop)`` as for Mixed-*; an index with object boxes gives its images'
  Only-BG-T (:func:`bgsynth.pool.build_background_pool`). The pool is resident on the device, labelled by the
  source's background classes.
* :class:`ComposeIterator`: the composition rule of :mod:`bgsynth.compose` as an online training iterator. It is
  a :class:`~bgsynth.trainloader.TrainIterator` (decode once, cache, per-epoch order, sharding, the same
  :class:`~bgsynth.augment.BackgroundSwap` compositing on the device) whose backgrounds are chosen by the rule, with
  the correlation a parameter that may change every epoch; no composed image is ever written.

>>> # bg = load_backgrounds("places/train", geometry=CropGeometry(72, 64), device="cuda")
>>> # it = ComposeIterator(index, ComposeRule(Pairing.default(index.label_space, bg.label_space), 0.95), bg)
>>> # for epoch in range(10):
>>> #     it.set_epoch(epoch); it.set_correlation(0.95 if epoch < 5 else 0.5)
>>> #     for images, labels in it: ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import warnings
from collections.abc import Mapping

import torch

from .augment import AugmentedBatch
from .classes import LabelSpace
from .compose import ComposeChoice, ComposeRule, ComposeSpec, check_correlation, compose_backgrounds
from .config import RunConfig, resolve_options
from .errors import ConfigError
from .index import DatasetIndex, check_file_name
from .pipeline import create_loader
from .pool import build_background_pool
from .probe import probe_file
from .runs import file_digest
from .trainloader import TrainIterator
from .types import BackgroundPool, Batch

__all__ = ["IMAGE_EXTENSIONS", "scene_index", "source_digest", "spec_digests", "Backgrounds", "BackgroundsConfig", "load_backgrounds",
           "ComposeIterator"]

#: file name endings read as images in a scene folder (any case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ==============================================================================================================
# Backgrounds from a second source
# ==============================================================================================================


def scene_index(folder: str | os.PathLike, name: str | None = None) -> DatasetIndex:
    """An in-memory index of a Places-style folder: each subfolder is a background class (sorted by name), every
    image file below it (any depth) an image of that class, without boxes or masks.

    Each file is probed by its header (:func:`bgsynth.probe.probe_file`); an unusable one (zero bytes,
    truncated, not an image) is recorded in ``index.rejects`` with its path and reason, and the rest proceeds.

    Args:
        folder: the folder.
        name: the label space's name (default: the folder's name).

    Returns:
        A :class:`~bgsynth.index.DatasetIndex` rooted at ``folder`` whose label space is the subfolders.

    Raises:
        ConfigError: not a folder, or no subfolder (the message names the folder).
    """
    root = pathlib.Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: expected a folder of scene images with one subfolder per background class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root}: expected one subfolder per background class (Places-style), found none")
    space = LabelSpace(name or root.resolve().name or "scenes", tuple(classes), tuple(classes))
    index = DatasetIndex.empty(image_root=str(root.resolve()), label_space=space,
                               description=f"scene folder {root} ({len(classes)} classes)")
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        for p in files:
            rel = p.relative_to(root).as_posix()
            bad = check_file_name(rel)
            probe = probe_file(p, verify="header")
            if bad or not probe.ok:
                index.add_reject(rel, probe.reason or "unreadable_image", bad or probe.detail)
                continue
            index.add_image({"file_name": rel, "label": label, "split": "", "in1k_class": None, "wnid": None,
                             **probe.entry_fields()})
    if index.rejects:
        warnings.warn(f"{root}: {len(index.rejects)} scene file(s) could not be used (e.g. {index.rejects[0]['path']}: "
                      f"{index.rejects[0]['reason']}); see the index's rejects", stacklevel=2)
    return index


def source_digest(source: str | os.PathLike) -> str | None:
    """SHA-256 of what a background source holds, cheaply: for a folder, the sorted relative paths and byte sizes
    of its image files (a changed, added or removed image changes it); for a file, its bytes; ``None`` when the
    source does not exist."""
    p = pathlib.Path(source).expanduser()
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS):
        h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def spec_digests(spec: ComposeSpec) -> dict:
    """The digests of a :class:`~bgsynth.compose.ComposeSpec`'s inputs, for a run's fingerprint: its backgrounds
    (:func:`source_digest`) and its pairing file (``None`` for a mapping or the default pairing)."""
    pairing = None if spec.pairing is None or isinstance(spec.pairing, Mapping) else source_digest(spec.pairing)
    return {"backgrounds_digest": source_digest(spec.backgrounds), "pairing_digest": pairing}


@dataclasses.dataclass
class Backgrounds:
    """A background pool and where it came from.

    Attributes:
        pool: the resident :class:`~bgsynth.types.BackgroundPool` (labels: background classes, ``num_classes``
            the source's class count).
        index: the source's index (scene folders: the in-memory one), for file names and classes.
        kind: ``'scenes'`` (whole images, resized and cropped) or ``'only_bg_t'`` (the images' Only-BG-T).
        source: the folder or index path given.
        rejects: files of the source that could not be used (probe or decode), ``{path, reason, detail}``.
    """

    pool: BackgroundPool
    index: DatasetIndex
    kind: str
    source: str
    rejects: list[dict] = dataclasses.field(default_factory=list)

    @property
    def label_space(self) -> LabelSpace:
        return self.index.label_space

    def counts(self) -> dict[str, int]:
        """Backgrounds per class."""
        c = torch.bincount(self.pool.labels.cpu(), minlength=self.pool.num_classes).tolist()
        return {name: int(c[k]) for k, name in enumerate(self.label_space.classes)}

    def file_name(self, bg_id: int) -> str:
        """The file (relative to the source's image root) of a background id."""
        return self.index.image(int(bg_id))["file_name"] if int(bg_id) >= 0 else ""

    def describe(self) -> dict:
        """JSON-able provenance: source, kind, classes and counts."""
        return {"source": self.source, "kind": self.kind, "classes": list(self.label_space.classes),
                "counts": self.counts(), "rejects": len(self.rejects)}


@dataclasses.dataclass(frozen=True)
class BackgroundsConfig:
    """Which backgrounds of a source (the geometry, device, backends and seed are the run's).

    Attributes:
        split: of an index source, the split to use (``None``: every image).
        per_class: at most this many backgrounds per class, chosen with the run's seed (``None``: all).
        kind: ``'auto'`` (scenes for a folder or an index without boxes, else Only-BG-T), ``'scenes'`` or
            ``'only_bg_t'``.
    """

    split: str | None = None
    per_class: int | None = None
    kind: str = "auto"

    def __post_init__(self):
        if self.kind not in ("auto", "scenes", "only_bg_t"):
            raise ConfigError(f"load_backgrounds: expected kind 'auto', 'scenes' or 'only_bg_t', got {self.kind!r}")


def _scene_pool(index: DatasetIndex, run: RunConfig, rejects: list[dict]) -> BackgroundPool:
    """Every image of ``index`` decoded to the run's crop (the Original), resident on the run's device."""
    n, crop, dev = len(index), run.geometry.crop, run.device
    BackgroundPool.check_fits(n, crop, dev)
    images = torch.empty((n, 3, crop, crop), dtype=torch.uint8, device=dev)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    ids = torch.empty(n, dtype=torch.int64, device=dev)
    loader = create_loader(index, backend=run.backend, geometry=run.geometry, batch_size=run.batch_size, device=dev,
                           num_threads=run.num_threads, tiling="crop", only_bg_t=False)
    count = 0
    batches = loader
    if run.progress:
        from tqdm.auto import tqdm  # optional third-party display, loaded only when asked for

        batches = tqdm(loader, desc="scene backgrounds", unit="batch", leave=False)
    try:
        for b in batches:
            k = len(b)
            images[count : count + k] = b.images.to(dev)
            labels[count : count + k] = b.labels.to(dev)
            ids[count : count + k] = b.image_ids.to(dev)
            count += k
    finally:
        loader.close()
    rejects.extend(getattr(loader, "rejects", []))
    return BackgroundPool(images[:count].contiguous(), labels[:count], ids[:count], index.label_space.num_classes)


def load_backgrounds(source: str | os.PathLike | DatasetIndex, run: RunConfig | None = None,
                     config: BackgroundsConfig | None = None, **options) -> Backgrounds:
    """The background pool of a second source, resident on the run's device.

    Args:
        source: a folder of scene images with one subfolder per class (:func:`scene_index`), an index JSON, or a
            loaded :class:`~bgsynth.index.DatasetIndex`.
        run: the run's :class:`~bgsynth.config.RunConfig` (geometry: the model's crop; device, backend,
            kernel_backend, tiling of Only-BG-T, batch size, threads, progress, seed of ``per_class``).
        config: the :class:`BackgroundsConfig` (split, per_class, kind).
        **options: loose run options and :class:`BackgroundsConfig` fields.

    Returns:
        :class:`Backgrounds`.

    Raises:
        EmptyInputError: no usable image in the source (or the split); ConfigError: a bad source.
        PoolTooLargeError: the pool would not fit the device.
    """
    run, config = resolve_options("load_backgrounds", run, config, BackgroundsConfig, options, batch_kind="decode")
    if isinstance(source, DatasetIndex):
        full, where = source, str(source.path or "<in-memory index>")
    elif pathlib.Path(source).expanduser().is_dir():
        full, where = scene_index(source), os.fspath(source)
    elif pathlib.Path(source).expanduser().is_file():
        full, where = DatasetIndex.load(source), os.fspath(source)
    else:
        raise ConfigError(f"{source}: expected a folder of scene images or a dataset index JSON, found nothing there")
    index = full.select(split=config.split, per_class=config.per_class, seed=run.seed) if (
        config.split is not None or config.per_class is not None) else full
    full.require_images(index, "use as backgrounds", split=config.split)
    has_boxes = any(index.annotations(i) for i in index.ids)
    kind = config.kind if config.kind != "auto" else ("only_bg_t" if has_boxes else "scenes")
    rejects = list(full.rejects)
    if kind == "scenes":
        pool = _scene_pool(index, run, rejects)
    else:
        p = build_background_pool(index, run.geometry, run.backend, run.device, batch_size=run.batch_size,
                                  num_threads=run.num_threads, progress=run.progress, tiling=run.tiling,
                                  kernel_backend=run.kernel_backend)
        pool = BackgroundPool(p.images, p.labels, p.image_ids, index.label_space.num_classes)
    out = Backgrounds(pool, index, kind, where, rejects)
    empty = [c for c, n in out.counts().items() if n == 0]
    if empty:
        warnings.warn(f"{where}: no usable background of class(es) {empty[:9]}; samples drawn for them fall back to "
                      f"their Original", stacklevel=2)
    return out


# ==============================================================================================================
# The online iterator
# ==============================================================================================================


class ComposeIterator(TrainIterator):
    """``(images, labels)`` batches of a composed training set, made on the device every step.

    The foreground split is decoded, cached, ordered and sharded as by :class:`~bgsynth.trainloader.TrainIterator`;
    each sample's background is the one :func:`bgsynth.compose.compose_backgrounds` draws for
    ``(rule.seed, epoch, image id)`` at the epoch's correlation, and the composite is made by the same
    :class:`~bgsynth.augment.BackgroundSwap` pass (crop and flip of foreground, mask and background alike, one
    fused composite + normalise), as Mixed-Rand with the rule's background. The label is the foreground's.

    Args:
        index: the foreground :class:`~bgsynth.index.DatasetIndex` (or its path); its label space must be the
            pairing's foreground space.
        rule: the :class:`~bgsynth.compose.ComposeRule` (pairing, correlation or per-epoch correlations, seed).
        backgrounds: a :class:`Backgrounds` or a :class:`~bgsynth.types.BackgroundPool` in the pairing's
            background space, on the run's device.
        run, config: as for :class:`~bgsynth.trainloader.TrainIterator`.
        fixed: every epoch composes with epoch 0's draw (a fixed composed set, the one ``export`` writes) instead
            of a new draw per epoch (the default: a new background per sample and epoch, at the epoch's
            correlation).
        dist: the :class:`~bgsynth.distributed.DistContext`.
        **options: loose run options, :class:`~bgsynth.trainloader.LoaderConfig` fields and
            :class:`~bgsynth.augment.SwapConfig` fields other than ``probs`` and ``bg_source`` (``flip``,
            ``random_resized_crop``, ``scale``, ``mean``, ``std``, ``dtype``, ...).

    Attributes:
        last_choice: the :class:`~bgsynth.compose.ComposeChoice` of the latest batch (provenance: background ids,
            classes, aligned).
        counts: ``int64 [3]`` composites, aligned composites, composites that fell back to Original (no mask or
            no background of the drawn class), since construction (:meth:`stats`).
    """

    OWN_BACKGROUNDS = False

    def __init__(self, index, rule: ComposeRule, backgrounds: Backgrounds | BackgroundPool,
                 run: RunConfig | None = None, config=None, *, fixed: bool = False, dist=None, **options):
        if not isinstance(rule, ComposeRule):
            raise ConfigError(f"ComposeIterator: expected a ComposeRule, got {type(rule).__name__}")
        taken = sorted(k for k in ("probs", "bg_source", "swap", "pool") if k in options)
        if taken:
            raise ConfigError(f"ComposeIterator: the rule chooses the backgrounds; {taken} cannot be given")
        pool = backgrounds.pool if isinstance(backgrounds, Backgrounds) else backgrounds
        if not isinstance(pool, BackgroundPool):
            raise ConfigError(f"ComposeIterator: expected Backgrounds or a BackgroundPool, got "
                              f"{type(backgrounds).__name__}")
        super().__init__(index, run, config, pool=pool, dist=dist, probs={"mixed_rand": 1.0}, bg_source="pool",
                         **options)
        fg = self.index.label_space
        if fg.classes != rule.pairing.fg_space.classes:
            raise ConfigError(f"ComposeIterator: the index's classes {list(fg.classes)[:9]} are not the pairing's "
                              f"foreground classes {list(rule.pairing.fg_space.classes)[:9]}")
        if pool.device != self.run.device:
            raise ConfigError(f"ComposeIterator: expected the background pool on {self.run.device}, got {pool.device}")
        self.rule = rule
        self.fixed = bool(fixed)
        self.backgrounds = backgrounds if isinstance(backgrounds, Backgrounds) else None
        self._correlation: float | None = None
        self.last_choice: ComposeChoice | None = None
        self.counts = torch.zeros(3, dtype=torch.int64, device=self.run.device)

    def set_correlation(self, correlation: float | None) -> None:
        """The correlation of the next passes (``None``: the rule's per-epoch value again)."""
        self._correlation = None if correlation is None else check_correlation(correlation,
                                                                               "ComposeIterator.set_correlation")

    def correlation(self, epoch: int | None = None) -> float:
        """The correlation an epoch is composed at (default: the next pass's)."""
        epoch = self.epoch if epoch is None else epoch
        return self._correlation if self._correlation is not None else self.rule.correlation_at(epoch)

    def choose(self, batch: Batch, epoch: int) -> ComposeChoice:
        """The rule's backgrounds for a decoded batch at an epoch (epoch 0's draw when ``fixed``)."""
        return compose_backgrounds(batch.image_ids, batch.labels, self.pool, self.rule, 0 if self.fixed else epoch,
                                   self.correlation(epoch))

    def _augment(self, batch: Batch, epoch: int) -> AugmentedBatch:
        choice = self.choose(batch, epoch)
        out = self.swap.apply_batch(batch, epoch=epoch, backgrounds=choice.as_rows())
        self.last_choice = choice
        self.counts += torch.stack([torch.tensor(len(batch), device=self.counts.device),
                                    choice.aligned.sum().to(self.counts.device),
                                    out.fell_back.sum().to(self.counts.device)])
        return out

    def stats(self) -> dict[str, int]:
        """Composites made, how many were aligned, and how many fell back to Original (host sync)."""
        n, a, f = (int(v) for v in self.counts.tolist())
        return {"composites": n, "aligned": a, "fell_back": f}
