"""Export variants to disk in the IN-9 release layout, for tools that read ``bg_challenge/``.

Layout (PAPER.md), under ``out_dir``::

    <variant>/<split>/<folder>/<stem>.JPEG      one folder per variant: original, only_bg_b, only_bg_t, no_fg,
                                                only_fg, mixed_same, mixed_rand, mixed_next (``.png`` with
                                                ``image_format="png"``: lossless, see below)
    fg_mask/<split>/<folder>/<stem>.npy         the foreground mask, uint8 0/1 at the crop's size
    backgrounds.csv                              the background each Mixed-* image used
    manifest.json                                parameters, counts and the images left out (with reasons)
    bgsynth-run.json                             the run that owns the folder (:mod:`bgsynth.runs`)

``<split>`` is the index's split name (the release has ``val``); ``<folder>`` the class folder of the index's label
space (:attr:`bgsynth.classes.LabelSpace.folders`; for IN-9 the release's ``00_dog`` .. ``08_fish``, two with a
space). Images are the crops the model sees (:class:`~bgsynth.geometry.CropGeometry`), so, as in the release, a
reader applies only ``ToTensor``.

* **One run owns the folder**: the export's fingerprint (variants, split, format, quality, seed, geometry,
  tiling, decoder, encoder, the index's digest) is recorded in ``bgsynth-run.json`` before any work. A rerun with
  the same settings continues (``resume``, the default: images whose files all exist are kept); one with other
  settings is refused with a message naming every setting that differs, unless ``overwrite``, which deletes the
  files of the earlier export (and nothing else). Files the export does not write (``notes.txt``, a stray
  ``mine.JPEG``) are never counted and never deleted; the counts come from the layout of the index's images.
* **Format**: JPEG (default, as released; quality in the manifest) or PNG (``image_format="png"``): lossless, so a
  tool that reads the export (e.g. the official evaluation code) sees exactly the pixels ``bgsynth eval`` feeds
  the model in memory, and gives the same predictions.
* **Tiling**: Only-BG-T and the Mixed-* backgrounds follow ``tiling`` (``"paper"``: the authors' full-resolution
  construction, the default; ``"crop"``: the crop-space approximation); recorded in the manifest.
* **File names** are the source file's stem made safe: the base name only (no folders, no ``..``), characters
  outside ``[A-Za-z0-9._-]`` replaced by ``_``, no leading dot; stems that would collide in one class folder get
  ``_<image id>`` appended, so every image keeps its own file.
* **Consistent sets** (default): like the release, an image is written only if every requested variant exists for
  it (a mask, an Only-BG-T margin, a Mixed-* background); the others are listed in ``manifest.json``. With
  ``variants="all"`` a variant that exists for no image of the set (Mixed-Next of a one-class set, every
  mask-based variant of a set without masks) is skipped with a warning and named in the manifest, so the others
  are still written; a variant asked for by name is never skipped.
* **Resumable**: files are renamed into place when complete (``.<name>.<random>.tmp`` first; a killed run's
  temporary files are removed when the folder is claimed again), so a killed export rerun with the same
  arguments finishes with the same files (the background choice is a pure function of ``(seed, variant, image
  id)``). Files are not fsynced one by one (nine fsyncs per image cost more than making it); an empty file, what
  a power cut can leave, counts as missing and is written again.

How it runs (the speed of ``bgsynth export``, ``benchmarks/bench_export.py``): each image is decoded once; when
Mixed-* variants need the background pool, the decoded batches are kept in memory while the pool is gathered from
them (above a quarter of the free memory, the pool is decoded in a pass of its own). Every variant is made
batched on the device in the channels-last layout the decoders produce, so each row is a plain ``H x W x 3`` array
for the encoder; JPEGs are encoded by a thread pool one job per image (OpenCV's libjpeg-turbo, which releases the
GIL, so the threads scale; byte for byte the files PIL writes, which holds the GIL and does not scale), or batched on
the GPU with nvJPEG (``encoder="torchvision"``, the default on CUDA). On the CPU, torch's intra-op threads are set to
one for the duration of the writing (and restored after): the encoder threads use the cores, and OpenMP threads
spinning beside them made the composites several times slower.

The run's settings (geometry, device, decode and kernel backends, tiling, batch size, seed, threads) are a
:class:`~bgsynth.config.RunConfig`, the export's own (variants, split, format, resume, overwrite, consistency,
masks, encoder) an :class:`ExportConfig`; :class:`ReleaseLayout` is the one place that knows where every file
goes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import os
import pathlib
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from .config import RunConfig, resolve_options
from .errors import ConfigError, PoolTooLargeError
from .fileio import atomic_write_bytes, atomic_write_json
from .index import DatasetIndex, require_index
from .pipeline import auto_backend, create_loader
from .pool import build_background_pool, pool_from_batches
from .runs import Fingerprint, OutputFolder, index_digest
from .types import BackgroundPool, Batch
from .variants import MIXED_VARIANTS, VARIANTS, choose_backgrounds, resolve_variants, synthesize

__all__ = ["export", "ExportConfig", "ExportResult", "ReleaseLayout", "safe_stem", "release_paths", "MASK_FOLDER",
           "IMAGE_FORMATS", "ENCODERS", "unavailable_variants"]

MASK_FOLDER = "fg_mask"
IMAGE_FORMATS = {"jpeg": ".JPEG", "png": ".png"}
#: JPEG encoders: ``opencv`` (libjpeg-turbo through ``cv2.imencode`` on host threads: it releases the GIL, so the
#: threads scale; the same bytes as PIL's), ``pil`` (the same libjpeg-turbo settings, but PIL holds the GIL while it
#: encodes: two threads run no faster than one), ``torchvision`` (``torchvision.io.encode_jpeg``: batched nvJPEG on
#: CUDA tensors, libjpeg on the CPU); ``auto`` takes torchvision on CUDA devices and OpenCV elsewhere
ENCODERS = ("auto", "opencv", "pil", "torchvision")
#: encoders that write the same bytes (libjpeg-turbo with the same settings): one name in an export's fingerprint
_SAME_BYTES = {"opencv": "pil"}
MANIFEST = "manifest.json"
BACKGROUNDS = "backgrounds.csv"
#: share of the free memory the decoded batches of an export may hold to be decoded only once
RETAIN_HEADROOM = 0.25
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclasses.dataclass
class ExportResult:
    """Summary of an export.

    Attributes:
        out_dir: the release root written.
        images: images exported (all their files exist now).
        written: images whose files this run wrote (``images - written`` were already complete).
        excluded: ``{reason: count}`` of images left out (e.g. ``'no only_bg_t'``).
        files: files per variant folder (and ``fg_mask``) in the export: files of this export's layout only.
        manifest: path of ``manifest.json``; backgrounds: path of ``backgrounds.csv``.
        skipped: ``{variant or 'fg_mask': reason}`` of what ``variants="all"`` left out because it exists for no
            image of the set.
    """

    out_dir: pathlib.Path
    images: int
    written: int
    excluded: dict
    files: dict
    manifest: pathlib.Path
    backgrounds: pathlib.Path
    skipped: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What an export writes; how it runs (geometry, device, backends, tiling, batch size, seed, threads) is its
    :class:`~bgsynth.config.RunConfig`.

    Attributes:
        variants: ``'all'`` or a selection (:func:`bgsynth.variants.resolve_variants`); stored resolved.
        split: export only this split (``None``: every image of the index).
        jpeg_quality: JPEG quality (1..100).
        image_format: ``"jpeg"`` (``<stem>.JPEG`` at ``jpeg_quality``, as released) or ``"png"`` (``<stem>.png``,
            lossless).
        resume: continue an earlier export of the same settings: images whose files all exist are kept (otherwise
            this run rewrites every file).
        overwrite: an earlier export with other settings (or files of no recorded run) in the folder is replaced:
            its files are deleted first. Without it such a folder is refused.
        consistent: write an image only if all requested variants exist for it.
        masks: also write ``fg_mask/`` (images without a mask are then left out).
        skip_missing: leave out, with a warning, a variant that exists for no image of the set; default: ``True``
            when ``variants`` is ``'all'``, ``False`` for variants named one by one.
        encoder: JPEG encoder, one of :data:`ENCODERS`.
    """

    variants: tuple[str, ...] | str = "all"
    split: str | None = None
    jpeg_quality: int = 95
    image_format: str = "jpeg"
    resume: bool = True
    overwrite: bool = False
    consistent: bool = True
    masks: bool = True
    skip_missing: bool | None = None
    encoder: str = "auto"

    def __post_init__(self):
        if self.skip_missing is None:
            every = isinstance(self.variants, str) and self.variants.strip().lower() == "all"
            object.__setattr__(self, "skip_missing", every)
        object.__setattr__(self, "variants", tuple(resolve_variants(self.variants)))
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ConfigError(f"export: expected jpeg_quality an integer in 1..100, got {q!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"export: expected image_format in {tuple(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"export: expected encoder in {ENCODERS}, got {self.encoder!r}")

    @property
    def ext(self) -> str:
        """Extension of the image files (``.JPEG`` or ``.png``)."""
        return IMAGE_FORMATS[self.image_format]


def safe_stem(file_name: str, fallback: str = "image") -> str:
    """A file-system-safe stem of ``file_name``: base name without extension, no separators or path escapes.

    >>> safe_stem("train/n01440764/n01440764_10026.JPEG")
    'n01440764_10026'
    >>> safe_stem("../../etc/pass wd.jpg")
    'pass_wd'
    >>> safe_stem("..")
    'image'
    """
    base = re.split(r"[\\/]", str(file_name))[-1]
    stem, _ext = os.path.splitext(base)
    stem = _SAFE.sub("_", stem).lstrip(".")
    return stem if stem and stem not in (".", "..") else fallback


def release_paths(index: DatasetIndex, ids: Iterable[int]) -> dict[int, tuple[str, str, str]]:
    """``{image id: (split folder, class folder, stem)}`` with stems unique within each class folder.

    The class folder is the label space's (``index.label_space.folders``; IN-9: ``00_dog`` ...).

    Raises:
        ConfigError: an image's label is outside the label space (naming the image and its file).
    """
    space = index.label_space
    entries: dict[int, tuple[str, str, str]] = {}
    for i in sorted(int(v) for v in ids):
        im = index.image(i)
        label, file_name = int(im["label"]), str(im.get("file_name", ""))
        if not 0 <= label < space.num_classes:
            raise ConfigError(f"export: image {i} ({file_name}) has label {label}, expected a class of the label "
                              f"space {space.name!r} (0..{space.num_classes - 1})")
        split = safe_stem(im.get("split") or "val", fallback="val")
        entries[i] = (split, space.folders[label], safe_stem(file_name, fallback=f"img{i}"))
    seen: dict[tuple[str, str, str], list[int]] = {}
    for i, key in entries.items():
        seen.setdefault((key[0], key[1], key[2].lower()), []).append(i)  # case-insensitive file systems too
    for group in seen.values():
        if len(group) > 1:
            for i in group:
                s, c, stem = entries[i]
                entries[i] = (s, c, f"{stem}_{i}")
    return entries


@dataclasses.dataclass(frozen=True)
class ReleaseLayout:
    """Where every file of an export goes: the one place that knows the output folder (see the module docstring).

    Attributes:
        root: the release root.
        where: ``{image id: (split folder, class folder, stem)}`` (:func:`release_paths`).
        variants: the variant folders written.
        ext: extension of the image files.
        masks: whether ``fg_mask/`` is part of the export.
    """

    root: pathlib.Path
    where: Mapping[int, tuple[str, str, str]]
    variants: tuple[str, ...]
    ext: str
    masks: bool

    @classmethod
    def create(cls, out_dir: str | os.PathLike, index: DatasetIndex, config: ExportConfig,
               variants: tuple[str, ...] | None = None, masks: bool | None = None) -> "ReleaseLayout":
        """The layout of ``index``'s images under ``out_dir`` (nothing is created)."""
        root = pathlib.Path(os.path.abspath(pathlib.Path(out_dir).expanduser()))
        return cls(root, release_paths(index, index.ids), config.variants if variants is None else tuple(variants),
                   config.ext, config.masks if masks is None else bool(masks))

    @property
    def description(self) -> str:
        return f"<variant>/<split>/<class folder>/<stem>{self.ext}; {MASK_FOLDER}/<split>/<class folder>/<stem>.npy"

    @property
    def manifest(self) -> pathlib.Path:
        return self.root / MANIFEST

    @property
    def backgrounds(self) -> pathlib.Path:
        return self.root / BACKGROUNDS

    def _path(self, folder: str, image_id: int, ext: str) -> str:
        split, cls, stem = self.where[image_id]
        return os.path.join(self.root, folder, split, cls, stem + ext)

    def relative(self, path: str) -> str:
        """A path of :meth:`paths` relative to the root, ``/``-separated (as ``backgrounds.csv`` names files)."""
        if os.sep == "/":
            return path[len(str(self.root)) + 1 :]  # paths() joins onto the root: slicing is exact
        return pathlib.PurePath(os.path.relpath(path, self.root)).as_posix()

    def variant_file(self, variant: str, image_id: int) -> pathlib.Path:
        return pathlib.Path(self._path(variant, image_id, self.ext))

    def mask_file(self, image_id: int) -> pathlib.Path:
        return pathlib.Path(self._path(MASK_FOLDER, image_id, ".npy"))

    def paths(self, image_id: int) -> list[str]:
        """Every file an image has in a complete export (variants in order, then the mask), as strings."""
        fs = [self._path(n, image_id, self.ext) for n in self.variants]
        return fs + ([self._path(MASK_FOLDER, image_id, ".npy")] if self.masks else [])

    def files(self, image_id: int) -> list[pathlib.Path]:
        """Every file an image has in a complete export."""
        return [pathlib.Path(p) for p in self.paths(image_id)]

    def all_files(self) -> list[str]:
        """Every file of the export (images, masks, ``manifest.json``, ``backgrounds.csv``), as strings."""
        out = [p for i in self.where for p in self.paths(i)]
        return out + [str(self.manifest), str(self.backgrounds)]

    def is_complete(self, image_id: int) -> bool:
        """All files of the image exist and are not empty (an empty file is what a power cut can leave)."""
        return all(_nonempty(p) for p in self.paths(image_id))

    def exported(self, ids: Iterable[int], consistent: bool) -> list[int]:
        """The images in the export, including those finished by an earlier run: all their files (consistent
        sets), or any of them."""
        if consistent:
            return [i for i in ids if self.is_complete(i)]
        return [i for i in ids if any(_nonempty(p) for p in self.paths(i))]

    def file_counts(self) -> dict[str, int]:
        """Files per variant folder (and ``fg_mask``) of this layout that exist: never a file it does not name."""
        counts = {n: sum(_nonempty(self._path(n, i, self.ext)) for i in self.where) for n in self.variants}
        if self.masks:
            counts[MASK_FOLDER] = sum(_nonempty(self._path(MASK_FOLDER, i, ".npy")) for i in self.where)
        return counts


def _nonempty(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def unavailable_variants(index: DatasetIndex, variants: Iterable[str], masks: bool = True,
                         backgrounds: np.ndarray | None = None) -> dict[str, str]:
    """The variants (and ``'fg_mask'``) that exist for no image of ``index``, with the reason; judged from the
    labels and masks alone, before anything is decoded.

    Args:
        index: the images to export.
        variants: the variants asked for.
        masks: whether ``fg_mask/`` was asked for.
        backgrounds: labels of the Mixed-* candidates when they are a given pool; default: the images of
            ``index`` themselves (an image is never its own background).

    A foreground needs its mask; Mixed-Same needs a candidate of its class, Mixed-Next one of the next class
    ``(y + 1) mod N`` of the label space, Mixed-Rand any candidate.

    >>> from bgsynth.index import DatasetIndex
    >>> unavailable_variants(DatasetIndex.empty("/data"), ["original", "no_fg"])
    {'no_fg': 'no image has a foreground mask'}
    """
    n_cls = index.label_space.num_classes
    labels = index.labels()
    with_mask = np.asarray([any(a.get("segmentation") is not None for a in index.annotations(i)) for i in index.ids],
                           bool)
    own = backgrounds is None
    cand = labels if own else np.asarray(backgrounds, np.int64)
    counts = np.bincount(cand[(cand >= 0) & (cand < n_cls)], minlength=n_cls)
    fg = labels[with_mask] if len(labels) else labels
    nxt = (fg + 1) % n_cls

    def others(target: np.ndarray, same: np.ndarray) -> np.ndarray:  # candidates of class target, self excluded
        return counts[target] - (same if own else 0)

    out: dict[str, str] = {}
    for name in variants:
        if VARIANTS[name].needs_mask and not with_mask.any():
            out[name] = "no image has a foreground mask"
        elif name == "mixed_rand" and len(cand) - int(own) < 1:
            out[name] = "no second image to take a background from"
        elif name == "mixed_same" and not (others(fg, np.ones(len(fg), np.int64)) >= 1).any():
            out[name] = "no class holds a second image to take a background from"
        elif name == "mixed_next" and not (others(nxt, (nxt == fg).astype(np.int64)) >= 1).any():
            out[name] = f"no image of the next class ((y + 1) mod {n_cls}) for any foreground"
    if masks and not with_mask.any():
        out[MASK_FOLDER] = "no image has a foreground mask"
    return out


def export(index: DatasetIndex, out_dir: str | os.PathLike, run: RunConfig | None = None,
           config: ExportConfig | None = None, *, pool: BackgroundPool | None = None,
           **options: Any) -> ExportResult:
    """Write the variants of an index in the IN-9 release layout (see the module docstring).

    Args:
        index: the loaded :class:`~bgsynth.index.DatasetIndex`; class folders come from its label space.
        out_dir: the release root to write (claimed for this run before any work, see :mod:`bgsynth.runs`).
        run: the resolved run configuration (default: from ``options``; the CPU, 256 -> 224, paper tiling,
            ``num_threads`` also the JPEG encoding threads, default ``min(8, cpu_count)``).
        config: the export's :class:`ExportConfig` (default: from ``options``).
        pool: backgrounds for Mixed-*; default: the Only-BG-T images of the exported images themselves (as the
            release, whose Mixed-* backgrounds come from its own test set).
        **options: run options (``seed`` of the Mixed-* background choice, ``geometry``/``resize``/``crop``,
            ``backend``, ``kernel_backend``, ``device``, ``batch_size``, ``num_threads``, ``progress``, ``tiling``)
            and :class:`ExportConfig` fields (``variants``, ``split``, ``jpeg_quality``, ``image_format``,
            ``resume``, ``overwrite``, ``consistent``, ``masks``, ``skip_missing``, ``encoder``).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: bad arguments (unknown variant, quality out of range, labels outside the label space, a path
            for ``index``, ``out_dir`` an existing file), or ``out_dir`` holds another export (the message names
            the settings that differ; ``overwrite=True`` replaces it).
        EmptyInputError: no image to export (an empty index, or a split without images).
    """
    require_index(index, "export")
    run, config = resolve_options("export", run, config, ExportConfig, options, batch_kind="decode", device="cpu",
                                  amp=None, progress=True)
    return _Export(index, out_dir, run, config, pool).run()


@dataclasses.dataclass
class _Tally:
    """What this run wrote and left out."""

    written: int = 0
    excluded: dict = dataclasses.field(default_factory=dict)
    left_out: list = dataclasses.field(default_factory=list)

    def exclude(self, image_id: int | None, file_name, reason: str) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + 1
        self.left_out.append({"image_id": image_id, "file_name": file_name, "reason": reason})


class _Writer:
    """Encodes and writes files on a thread pool, one job per image, a bounded number in flight; re-raises the
    first failure. A job is a list of ``(kind, path, payload)``: ``'hwc'`` or ``'chw'`` (an ``H x W x 3`` or
    ``3 x H x W`` uint8 array, encoded in the job), ``'mask'`` (a 0/1 array, written as ``.npy``) or ``'bytes'``
    (already encoded)."""

    def __init__(self, threads: int, image_format: str, quality: int, encoder: str = "opencv"):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bgsynth-export")
        self.pending: collections.deque = collections.deque()
        self.keep = 4 * threads
        self.image_format, self.quality, self.encoder = image_format, quality, encoder

    def submit(self, job: list[tuple[str, str, Any]]) -> None:
        self.pending.append(self.pool.submit(_run_job, job, self.image_format, self.quality, self.encoder))

    def drain(self, keep: int | None = None) -> None:
        """Wait until at most ``keep`` jobs are in flight (bounded memory); re-raise the first failure."""
        keep = self.keep if keep is None else keep
        while len(self.pending) > keep:
            self.pending.popleft().result()

    def close(self) -> None:
        # an interrupted run drops the queued jobs; those already running finish (no half-written file is left)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_job(job: list[tuple[str, str, Any]], image_format: str, quality: int, encoder: str) -> None:
    for kind, path, payload in job:
        if kind in ("hwc", "chw"):
            _write(path, payload, image_format, quality, encoder, kind == "chw")
        elif kind == "mask":
            _write_mask(path, payload)
        else:
            atomic_write_bytes(path, payload, durable=False)


class _Export:
    """One :func:`export` call: the claim, the images to write, the writing, then backgrounds.csv and the manifest."""

    def __init__(self, index: DatasetIndex, out_dir, run: RunConfig, config: ExportConfig,
                 pool: BackgroundPool | None):
        self.index, self.run_cfg, self.config = index, run, config
        self.sub = index.select(split=config.split) if config.split is not None else index
        index.require_images(self.sub, "export", config.split)
        self.space = index.label_space
        bg_labels = None if pool is None else pool.labels.cpu().numpy()
        self.skipped = (unavailable_variants(self.sub, config.variants, config.masks, bg_labels)
                        if config.skip_missing else {})
        variants = tuple(v for v in config.variants if v not in self.skipped)
        masks = config.masks and MASK_FOLDER not in self.skipped
        self.layout = ReleaseLayout.create(out_dir, self.sub, config, variants, masks)
        self.threads = run.num_threads or max(1, min(8, os.cpu_count() or 1))
        self.encoder = _resolve_encoder(config, run.device)
        self.given_pool = pool
        self.pool = None if pool is None else _with_classes(pool.to(run.device), pool.num_classes)
        self.tally = _Tally()
        self.folder = self._claim()
        for n, why in self.skipped.items():
            warnings.warn(f"export: {n} skipped: {why} (the other variants are written)", stacklevel=3)

    # -------------------------------------------------------------------------------------------- claim
    def _fingerprint(self) -> Fingerprint:
        r, c = self.run_cfg, self.config
        settings = {
            "variants": list(c.variants), "split": c.split, "image_format": c.image_format,
            "jpeg_quality": c.jpeg_quality if c.image_format == "jpeg" else None,
            "consistent": c.consistent, "masks": c.masks, "seed": int(r.seed),
            "resize": r.geometry.resize, "crop": r.geometry.crop, "tiling": r.tiling,
            "backend": auto_backend(r.device) if r.backend == "auto" else r.backend,
            "device": r.device.type,
            "encoder": _SAME_BYTES.get(self.encoder, self.encoder) if c.image_format == "jpeg" else "pil",
            "label_space": self.space.name, "pool": "the exported images" if self.given_pool is None
            else _pool_digest(self.given_pool),
        }
        return Fingerprint("export", settings, index=index_digest(self.sub))

    def _claim(self) -> OutputFolder:
        """Claim the folder for this run (refused before any work if another export owns it) and record every file
        the run may write, before it writes one: a killed run's files are known to the next run."""
        owned = set(self.layout.all_files())
        folder = OutputFolder(self.layout.root, self._fingerprint(), overwrite=self.config.overwrite,
                              owned=lambda p: str(p) in owned).claim()
        if self.config.overwrite:
            _prune_empty(self.layout.root, list(VARIANTS) + [MASK_FOLDER])
        folder.commit(sorted(owned))
        return folder

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> ExportResult:
        c = self.config
        resume = c.resume and not c.overwrite
        todo = [i for i in self.sub.ids if not (resume and self.layout.is_complete(i))]
        mixed = [n for n in self.layout.variants if n in MIXED_VARIANTS]
        need_pool = bool(mixed) and self.pool is None and (bool(todo) or not self._backgrounds_complete(mixed))
        self._write_images(todo, need_pool)
        exported = self.layout.exported(self.sub.ids, c.consistent)
        if self.pool is not None or not mixed:
            _write_backgrounds(self.layout, self.sub, exported, self.pool, self.run_cfg.seed)
        counts = self.layout.file_counts()
        atomic_write_json(self.layout.manifest, self._manifest(exported, counts), indent=1)
        self.folder.commit()
        if len(exported) == 0:
            warnings.warn(f"export: none of the {len(self.sub)} images was exported: every one lacks a requested "
                          f"variant ({', '.join(sorted(self.tally.excluded)) or 'see manifest.json'}); see "
                          f"{self.layout.manifest}", stacklevel=3)
        return ExportResult(self.layout.root, len(exported), self.tally.written, self.tally.excluded, counts,
                            self.layout.manifest, self.layout.backgrounds, dict(self.skipped))

    def _backgrounds_complete(self, mixed: list[str]) -> bool:
        """Whether ``backgrounds.csv`` already names the background of every Mixed-* file of the layout (then a
        run with nothing to write need not decode the pool again)."""
        try:
            rows = list(csv.DictReader(io.StringIO(self.layout.backgrounds.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        have = {(r.get("variant"), r.get("image_id")) for r in rows}
        return all((n, str(i)) in have for n in mixed for i in self.sub.ids
                   if _nonempty(self.layout._path(n, i, self.layout.ext)))

    def _loader(self, ids: list[int], only_bg_t: bool):
        r = self.run_cfg
        return create_loader(self.sub, backend=r.backend, geometry=r.geometry, batch_size=r.batch_size,
                             device=r.device, ids=ids, num_threads=self.threads, tiling=r.tiling, only_bg_t=only_bg_t)

    def _write_images(self, todo: list[int], need_pool: bool) -> None:
        """Decode what the run needs once, gather the pool when it must be made, write the images of ``todo``."""
        r = self.run_cfg
        writer = _Writer(self.threads, self.config.image_format, self.config.jpeg_quality, self.encoder)
        bar = _progress(r.progress, len(todo))
        threads_before, cv_threads_before = torch.get_num_threads(), cv2.getNumThreads()
        cv2.setNumThreads(1)  # the encoder threads are the parallelism; OpenCV's own pool inside each would spin
        if r.device.type == "cpu":
            # the encoder threads use the cores; torch's intra-op threads spinning beside them made the CPU
            # composites several times slower (benchmarks/bench_export.py), so the kernels run on this thread
            torch.set_num_threads(1)
        try:
            if need_pool and self._retain_fits(len(self.sub)):
                batches = self._decode(self.sub.ids, only_bg_t=True)  # every image: the pool is all of them
                self.pool = _with_classes(pool_from_batches(batches, r.geometry.crop, r.device, r.kernel_backend),
                                          self.space.num_classes)
                wanted = torch.tensor(todo, dtype=torch.int64)
                while batches:
                    batch = batches.popleft()  # released once written
                    keep = torch.isin(batch.image_ids.cpu(), wanted)
                    # a fresh run writes every row: the batch as decoded (a row selection would copy it)
                    self._write_batch(batch if bool(keep.all()) else batch.slice(keep.to(batch.device)), writer, bar)
            else:
                if need_pool:  # too many images to keep: the pool is decoded in a pass of its own
                    self.pool = _with_classes(build_background_pool(
                        self.sub, geometry=r.geometry, backend=r.backend, device=r.device, batch_size=r.batch_size,
                        num_threads=self.threads, progress=r.progress, tiling=r.tiling,
                        kernel_backend=r.kernel_backend), self.space.num_classes)
                if todo:
                    for batch in self._decode(todo, only_bg_t="only_bg_t" in self.layout.variants, stream=True):
                        self._write_batch(batch, writer, bar)
            writer.drain(0)
        finally:
            torch.set_num_threads(threads_before)
            cv2.setNumThreads(cv_threads_before)
            writer.close()
            if bar is not None:
                bar.close()

    def _decode(self, ids: list[int], only_bg_t: bool, stream: bool = False):
        """The decoded batches of ``ids`` (a deque, or with ``stream`` a generator); rejects are tallied."""
        loader = self._loader(ids, only_bg_t)

        def gen():
            try:
                yield from loader
                for rej in loader.rejects:
                    self.tally.exclude(None, rej["path"], f"decode: {rej['reason']}")
            finally:
                loader.close()

        if stream:
            return gen()
        bar = _progress(self.run_cfg.progress, len(ids), "decode")
        kept = collections.deque()
        try:
            for batch in gen():
                kept.append(_planar(batch))  # laid out once: the pool and every variant read it
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return kept

    def _retain_fits(self, n: int) -> bool:
        """Whether ``n`` decoded images (crop, mask, Only-BG-T) plus their pool fit in :data:`RETAIN_HEADROOM` of
        the device's free memory, so each image is decoded once."""
        crop = self.run_cfg.geometry.crop
        per_image = 10 * crop * crop + 64  # images 3C², mask C², Only-BG-T 3C², pool 3C², ids
        try:
            BackgroundPool.check_fits(-(-n * per_image // BackgroundPool.estimate_bytes(1, crop)), crop,
                                      self.run_cfg.device, headroom=RETAIN_HEADROOM)
        except PoolTooLargeError:
            return False
        return True

    def _write_batch(self, batch: Batch, writer: _Writer, bar) -> None:
        """Synthesize a batch's variants and queue the files of every image that is written (consistent sets:
        only images for which every requested variant, and the mask, exist)."""
        if len(batch) == 0:
            return
        c, lay = self.config, self.layout
        outs = self._synthesize(batch)
        valid = {n: o.valid.cpu().numpy() for n, o in outs.items()}
        has_mask = batch.has_mask.cpu().numpy().astype(bool)
        ok = np.logical_and.reduce([valid[n] for n in lay.variants] + ([has_mask] if lay.masks else []))
        ids = batch.image_ids.cpu().tolist()
        rows = [k for k in range(len(ids)) if ok[k] or not c.consistent]
        for k in np.flatnonzero(~ok) if c.consistent else ():
            missing = [f"no {n}" for n in lay.variants if not valid[n][k]] + (
                ["no mask"] if lay.masks and not has_mask[k] else [])
            self.tally.exclude(ids[k], self.sub.image(ids[k]).get("file_name"), ", ".join(missing))
        encoded = self._encode_on_device(outs, rows)
        host = {n: _host_rows(o.images) for n, o in outs.items() if n not in encoded}
        masks = batch.masks[:, 0].cpu().numpy() if lay.masks else None
        for j, k in enumerate(rows):
            i = ids[k]
            job = [("bytes", lay._path(n, i, lay.ext), encoded[n][j]) if n in encoded else
                   (host[n][0], lay._path(n, i, lay.ext), host[n][1][k]) for n in lay.variants if valid[n][k]]
            if lay.masks and has_mask[k]:
                job.append(("mask", lay._path(MASK_FOLDER, i, ".npy"), masks[k]))
            if job:
                writer.submit(job)
                self.tally.written += 1
                writer.drain()
        if bar is not None:
            bar.update(len(batch))

    def _synthesize(self, batch: Batch) -> dict:
        """Every variant of the batch, NCHW. The decoders give channels-last crops (torchvision, DALI); the CPU
        kernels composite fastest in NCHW, so the crops are laid out planar once per batch instead of once per
        variant, and the encoder reads the planes as they are."""
        r = self.run_cfg
        return synthesize(_planar(batch), list(self.layout.variants), pool=self.pool, seed=r.seed,
                          backend=r.kernel_backend)

    def _encode_on_device(self, outs: dict, rows: list[int]) -> dict[str, list[bytes]]:
        """JPEG bytes of the rows of every variant, batched through ``torchvision.io.encode_jpeg`` (nvJPEG on CUDA)
        when that is the encoder; ``{}`` otherwise (the writer threads encode with PIL)."""
        if self.encoder != "torchvision" or self.config.image_format != "jpeg" or not rows:
            return {}
        from torchvision.io import encode_jpeg  # the device encoder, imported when it runs

        sel = torch.tensor(rows, dtype=torch.int64, device=next(iter(outs.values())).images.device)
        out = {}
        for n, o in outs.items():
            imgs = o.images.index_select(0, sel).contiguous()  # encode_jpeg wants contiguous [3, H, W] images
            out[n] = [e.cpu().numpy().tobytes() for e in encode_jpeg(list(imgs), quality=self.config.jpeg_quality)]
        return out

    def _manifest(self, exported: list[int], counts: dict) -> dict:
        r, c = self.run_cfg, self.config
        d = {
            "format": "bgsynth-export",
            "layout": self.layout.description,
            "index": str(self.index.path) if self.index.path else None,
            "label_space": self.space.to_dict(),
            "variants": list(self.layout.variants),
            "skipped_variants": dict(self.skipped),
            "display_names": {n: VARIANTS[n].display for n in self.layout.variants},
            "seed": int(r.seed),
            "image_format": c.image_format,
            "jpeg_quality": c.jpeg_quality if c.image_format == "jpeg" else None,
            "encoder": self.encoder if c.image_format == "jpeg" else "pil",
            "geometry": r.geometry.to_dict(),
            "tiling": r.tiling,
            "split": c.split,
            "consistent": c.consistent,
            "images": len(exported),
            "files": counts,
            "excluded_this_run": self.tally.excluded,
            "left_out_this_run": self.tally.left_out,
            "pool_size": 0 if self.pool is None else len(self.pool),
        }
        # the rest of the run's settings, but not the batch size: it changes no file, and an export resumed with
        # another batch size must end with the same manifest
        extra = {k: v for k, v in r.to_dict().items() if k not in d and k != "batch_size"}
        return {**d, **extra, "masks": self.layout.masks}


def _planar(batch: Batch) -> Batch:
    """The batch with its images (and Only-BG-T images) in NCHW memory: where the CPU kernels are fastest, and what
    the encoder reads plane by plane (itself when they are already)."""
    if batch.images.is_contiguous() and (batch.bgt is None or batch.bgt.is_contiguous()):
        return batch
    return dataclasses.replace(batch, images=batch.images.contiguous(),
                               bgt=None if batch.bgt is None else batch.bgt.contiguous())


def _resolve_encoder(config: ExportConfig, device: torch.device) -> str:
    if config.encoder != "auto":
        return config.encoder
    return "torchvision" if device.type == "cuda" else "opencv"


def _with_classes(pool: BackgroundPool, num_classes: int) -> BackgroundPool:
    """The pool with the label space's class count (Mixed-Next's ``(y + 1) mod N``)."""
    return pool if pool.num_classes == num_classes else dataclasses.replace(pool, num_classes=int(num_classes))


def _pool_digest(pool: BackgroundPool) -> str:
    """A short digest of a given pool's ids and labels (part of the fingerprint: other backgrounds, other files)."""
    h = hashlib.sha256()
    h.update(pool.image_ids.cpu().numpy().astype(np.int64).tobytes())
    h.update(pool.labels.cpu().numpy().astype(np.int64).tobytes())
    return f"{len(pool)} backgrounds, sha256 {h.hexdigest()[:16]}"


def _prune_empty(root: pathlib.Path, top: list[str]) -> None:
    """Remove the empty folders below the export's top folders (left by the files ``overwrite`` deleted)."""
    for name in top:
        base = root / name
        if not base.is_dir():
            continue
        for dirpath, _dirs, _files in os.walk(base, topdown=False):  # children first: parents empty in turn
            try:
                if not os.listdir(dirpath):
                    os.rmdir(dirpath)
            except OSError:
                pass


def _progress(enabled: bool, total: int, desc: str = "export"):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tqdm only for a visible bar

    return tqdm(total=total, desc=desc, unit="img")


def _channels_last(t: torch.Tensor) -> bool:
    """Whether a ``[B, 3, H, W]`` tensor is laid out ``B x H x W x 3`` in memory."""
    return t.permute(0, 2, 3, 1).is_contiguous()


def _host_rows(images: torch.Tensor) -> tuple[str, np.ndarray]:
    """``('hwc', uint8 [B, H, W, 3])`` of a channels-last batch or ``('chw', uint8 [B, 3, H, W])`` otherwise, on
    the host, without a copy on the CPU: the encoder reads either (a transposing copy costs more than the
    encoding)."""
    if _channels_last(images):
        return "hwc", images.permute(0, 2, 3, 1).cpu().numpy()
    return "chw", images.contiguous().cpu().numpy()


def _pil_image(arr: np.ndarray, planar: bool) -> Image.Image:
    """A PIL RGB image of an ``H x W x 3`` or ``3 x H x W`` (``planar``: merged by PIL, no numpy transpose) array."""
    if not planar:
        return Image.fromarray(np.ascontiguousarray(arr))
    h, w = arr.shape[1:]
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), np.ascontiguousarray(p), "raw", "L", 0, 1) for p in arr])


def _image_bytes(img: np.ndarray, image_format: str, quality: int, encoder: str = "opencv",
                 planar: bool = False) -> bytes:
    """The file bytes of an ``H x W x 3`` (or, ``planar``, ``3 x H x W``) uint8 RGB image: JPEG at ``quality``
    (OpenCV or PIL: the same bytes) or PNG (lossless)."""
    if image_format == "jpeg" and encoder == "opencv":
        bgr = cv2.merge([img[2], img[1], img[0]]) if planar else cv2.cvtColor(np.ascontiguousarray(img),
                                                                                  cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise OSError(f"OpenCV could not encode a {img.shape} image as JPEG")
        return data.tobytes()
    buf = io.BytesIO()
    if image_format == "png":
        _pil_image(img, planar).save(buf, format="PNG", compress_level=1)  # lossless; level 1 is the fast one
    else:
        _pil_image(img, planar).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, mask, allow_pickle=False)
    return buf.getvalue()


def _write(path: str, img: np.ndarray, image_format: str, quality: int, encoder: str, planar: bool) -> None:
    atomic_write_bytes(path, _image_bytes(img, image_format, quality, encoder, planar), durable=False)


def _write_mask(path: str, mask: np.ndarray) -> None:
    atomic_write_bytes(path, _npy_bytes((mask != 0).astype(np.uint8)), durable=False)


def _write_backgrounds(layout: ReleaseLayout, index: DatasetIndex, ids: list[int], pool, seed: int) -> None:
    """``backgrounds.csv``: variant, image, its file, the background image id/label/file (Mixed-* only)."""
    rows = []
    mixed = [n for n in layout.variants if n in MIXED_VARIANTS]
    if mixed and ids and pool is not None:
        dev = pool.device
        t_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        t_lab = torch.tensor([index.image(i)["label"] for i in ids], dtype=torch.int64, device=dev)
        for n in mixed:
            _, bg_ids, bg_labels = choose_backgrounds(t_ids, t_lab, n, pool, seed)
            for i, b, bl in zip(ids, bg_ids.cpu().tolist(), bg_labels.cpu().tolist()):
                f = layout._path(n, i, layout.ext)
                if not _nonempty(f):
                    continue
                bg_file = index.image(b).get("file_name", "") if b >= 0 and _has(index, b) else ""
                rows.append([n, i, layout.relative(f), b, bl, bg_file])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "image_id", "file", "bg_image_id", "bg_label", "bg_source_file"])
    w.writerows(rows)
    atomic_write_bytes(layout.backgrounds, buf.getvalue().encode("utf-8"))


def _has(index: DatasetIndex, image_id: int) -> bool:
    try:
        index.image(image_id)
    except (KeyError, IndexError):
        return False
    return True
