"""Export variants to disk in the IN-9 release layout, for tools that read ``bg_challenge/``.

Layout (PAPER.md), under ``out_dir``::

    <variant>/<split>/<NN_name>/<stem>.JPEG     one folder per variant: original, only_bg_b, only_bg_t, no_fg,
                                                only_fg, mixed_same, mixed_rand, mixed_next (``.png`` with
                                                ``image_format="png"``: lossless, see below)
    fg_mask/<split>/<NN_name>/<stem>.npy        the foreground mask, uint8 0/1 at the crop's size
    backgrounds.csv                              the background each Mixed-* image used
    manifest.json                                parameters, counts and the images left out (with reasons)

``<split>`` is the index's split name (the release has ``val``); ``<NN_name>`` the IN-9 class folder
(``00_dog`` .. ``08_fish``; two contain a space, as released). Images are the crops the model sees
(:class:`~bgsynth.geometry.CropGeometry`), so, as in the release, a reader applies only ``ToTensor``.

* **Format**: JPEG (default, as released; quality in the manifest) or PNG (``image_format="png"``): lossless, so a
  tool that reads the export (e.g. the official evaluation code) sees exactly the pixels ``bgsynth eval`` feeds
  the model in memory, and gives the same predictions.
* **Tiling**: Only-BG-T and the Mixed-* backgrounds follow ``tiling`` (``"paper"``: the authors' full-resolution
  construction, the default; ``"crop"``: the crop-space approximation); recorded in the manifest.

* **File names** are the source file's stem made safe: the base name only (no folders, no ``..``), characters
  outside ``[A-Za-z0-9._-]`` replaced by ``_``, no leading dot; stems that would collide in one class folder get
  ``_<image id>`` appended, so every image keeps its own file.
* **Consistent sets** (default): like the release, an image is written only if every requested variant exists for
  it (a mask, an Only-BG-T margin, a Mixed-* background); the others are listed in ``manifest.json``.
* **Resumable**: each file is written atomically (temporary file + rename), and an image whose files all exist is
  not decoded again; a killed export rerun with the same arguments finishes with the same files (the background
  choice is a pure function of ``(seed, variant, image id)``).

The run's settings (geometry, device, decode and kernel backends, tiling, batch size, seed, threads) are a
:class:`~bgsynth.config.RunConfig`, the export's own (variants, split, format, resume, consistency, masks) an
:class:`ExportConfig`; :class:`ReleaseLayout` is the one place that knows where every file goes.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from .classes import IN9_FOLDERS, NUM_IN9
from .config import RunConfig, resolve_options
from .errors import ConfigError
from .fileio import atomic_write_bytes, atomic_write_json
from .index import DatasetIndex
from .pipeline import create_loader
from .pool import build_background_pool
from .types import BackgroundPool, Batch
from .variants import MIXED_VARIANTS, VARIANTS, choose_backgrounds, resolve_variants, synthesize

__all__ = ["export", "ExportConfig", "ExportResult", "ReleaseLayout", "safe_stem", "release_paths", "MASK_FOLDER",
           "IMAGE_FORMATS"]

MASK_FOLDER = "fg_mask"
IMAGE_FORMATS = {"jpeg": ".JPEG", "png": ".png"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclasses.dataclass
class ExportResult:
    """Summary of an export.

    Attributes:
        out_dir: the release root written.
        images: images exported (all their files exist now).
        written: images whose files this run wrote (``images - written`` were already complete).
        excluded: ``{reason: count}`` of images left out (e.g. ``'no only_bg_t (no margin)'``).
        files: files per variant folder (and ``fg_mask``) in the export.
        manifest: path of ``manifest.json``; backgrounds: path of ``backgrounds.csv``.
    """

    out_dir: pathlib.Path
    images: int
    written: int
    excluded: dict
    files: dict
    manifest: pathlib.Path
    backgrounds: pathlib.Path


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
        resume: skip images whose files already all exist (otherwise rewrite everything).
        consistent: write an image only if all requested variants exist for it.
        masks: also write ``fg_mask/`` (images without a mask are then left out).
    """

    variants: tuple[str, ...] | str = "all"
    split: str | None = None
    jpeg_quality: int = 95
    image_format: str = "jpeg"
    resume: bool = True
    consistent: bool = True
    masks: bool = True

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(resolve_variants(self.variants)))
        q = self.jpeg_quality
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ConfigError(f"export: expected jpeg_quality an integer in 1..100, got {q!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"export: expected image_format in {tuple(IMAGE_FORMATS)}, got {self.image_format!r}")

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
    """``{image id: (split folder, class folder, stem)}`` with stems unique within each class folder."""
    entries: dict[int, tuple[str, str, str]] = {}
    for i in sorted(int(v) for v in ids):
        rec = index.record(i)
        if not 0 <= rec.label < NUM_IN9:
            raise ConfigError(f"export: image {i} ({rec.file_name}) has label {rec.label}, not an IN-9 class")
        split = safe_stem(rec.split or "val", fallback="val")
        entries[i] = (split, IN9_FOLDERS[rec.label], safe_stem(rec.file_name, fallback=f"img{i}"))
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
    def create(cls, out_dir: str | os.PathLike, index: DatasetIndex, config: ExportConfig) -> "ReleaseLayout":
        """The layout of ``index``'s images under ``out_dir`` (created)."""
        root = pathlib.Path(out_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, release_paths(index, index.ids), config.variants, config.ext, config.masks)

    @property
    def description(self) -> str:
        return f"<variant>/<split>/<NN_name>/<stem>{self.ext}; {MASK_FOLDER}/<split>/<NN_name>/<stem>.npy"

    @property
    def manifest(self) -> pathlib.Path:
        return self.root / "manifest.json"

    @property
    def backgrounds(self) -> pathlib.Path:
        return self.root / "backgrounds.csv"

    def variant_file(self, variant: str, image_id: int) -> pathlib.Path:
        split, folder, stem = self.where[image_id]
        return self.root / variant / split / folder / f"{stem}{self.ext}"

    def mask_file(self, image_id: int) -> pathlib.Path:
        split, folder, stem = self.where[image_id]
        return self.root / MASK_FOLDER / split / folder / f"{stem}.npy"

    def files(self, image_id: int) -> list[pathlib.Path]:
        """Every file an image has in a complete export."""
        fs = [self.variant_file(n, image_id) for n in self.variants]
        return fs + ([self.mask_file(image_id)] if self.masks else [])

    def is_complete(self, image_id: int) -> bool:
        return all(f.exists() for f in self.files(image_id))

    def exported(self, ids: Iterable[int], consistent: bool) -> list[int]:
        """The images in the export, including those finished by an earlier run: all their files (consistent
        sets), or any of them."""
        if consistent:
            return [i for i in ids if self.is_complete(i)]
        return [i for i in ids if any(f.exists() for f in self.files(i))]

    def file_counts(self) -> dict[str, int]:
        """Files per variant folder (and ``fg_mask``)."""
        counts = {n: _count(self.root / n, f"*{self.ext}") for n in self.variants}
        if self.masks:
            counts[MASK_FOLDER] = _count(self.root / MASK_FOLDER, "*.npy")
        return counts


def export(index: DatasetIndex, out_dir: str | os.PathLike, run: RunConfig | None = None,
           config: ExportConfig | None = None, *, pool: BackgroundPool | None = None,
           **options: Any) -> ExportResult:
    """Write the variants of an index in the IN-9 release layout (see the module docstring).

    Args:
        index: the loaded :class:`~bgsynth.index.DatasetIndex`; images need an IN-9 label.
        out_dir: the release root to write.
        run: the resolved run configuration (default: from ``options``; the CPU, 256 -> 224, paper tiling,
            ``num_threads`` also the JPEG encoding threads, default ``min(8, cpu_count)``).
        config: the export's :class:`ExportConfig` (default: from ``options``).
        pool: backgrounds for Mixed-*; default: the Only-BG-T images of the exported images themselves (as the
            release, whose Mixed-* backgrounds come from its own test set).
        **options: run options (``seed`` of the Mixed-* background choice, ``geometry``/``resize``/``crop``,
            ``backend``, ``kernel_backend``, ``device``, ``batch_size``, ``num_threads``, ``progress``, ``tiling``)
            and :class:`ExportConfig` fields (``variants``, ``split``, ``jpeg_quality``, ``image_format``,
            ``resume``, ``consistent``, ``masks``).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: bad arguments (unknown variant, quality out of range, non-IN-9 labels, a path for ``index``).
    """
    if not isinstance(index, DatasetIndex):
        raise ConfigError(f"export: expected a DatasetIndex, got {type(index).__name__}; load an index file once "
                          f"with bgsynth.index.DatasetIndex.load(path)")
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
    """Encodes and writes files on a thread pool, a bounded number in flight; re-raises the first failure."""

    def __init__(self, threads: int, image_format: str, quality: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
        self.pending: list[concurrent.futures.Future] = []
        self.keep = 4 * threads
        self.image_format, self.quality = image_format, quality

    def image(self, path: pathlib.Path, hwc: np.ndarray) -> None:
        self.pending.append(self.pool.submit(_write, path, hwc, self.image_format, self.quality))

    def mask(self, path: pathlib.Path, mask: np.ndarray) -> None:
        self.pending.append(self.pool.submit(_write_mask, path, mask))

    def drain(self, keep: int | None = None) -> None:
        _drain(self.pending, self.keep if keep is None else keep)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _Export:
    """One :func:`export` call: the pool, the images to write, the writing, then backgrounds.csv and the manifest."""

    def __init__(self, index: DatasetIndex, out_dir, run: RunConfig, config: ExportConfig,
                 pool: BackgroundPool | None):
        self.index, self.run_cfg, self.config = index, run, config
        self.sub = index.select(split=config.split) if config.split is not None else index
        self.layout = ReleaseLayout.create(out_dir, self.sub, config)
        self.threads = run.num_threads or max(1, min(8, os.cpu_count() or 1))
        self.pool = self._pool(pool)
        self.tally = _Tally()

    def run(self) -> ExportResult:
        todo = [i for i in self.sub.ids if not (self.config.resume and self.layout.is_complete(i))]
        self._write_images(todo)
        exported = self.layout.exported(self.sub.ids, self.config.consistent)
        _write_backgrounds(self.layout, self.sub, exported, self.pool, self.run_cfg.seed)
        counts = self.layout.file_counts()
        atomic_write_json(self.layout.manifest, self._manifest(exported, counts), indent=1)
        return ExportResult(self.layout.root, len(exported), self.tally.written, self.tally.excluded, counts,
                            self.layout.manifest, self.layout.backgrounds)

    def _pool(self, pool: BackgroundPool | None) -> BackgroundPool | None:
        r = self.run_cfg
        if pool is None and any(n in MIXED_VARIANTS for n in self.config.variants):
            pool = build_background_pool(self.sub, geometry=r.geometry, backend=r.backend, device=r.device,
                                         batch_size=r.batch_size, num_threads=self.threads, progress=r.progress,
                                         tiling=r.tiling, kernel_backend=r.kernel_backend)
        return None if pool is None else pool.to(r.device)

    def _write_images(self, todo: list[int]) -> None:
        r, c = self.run_cfg, self.config
        writer = _Writer(self.threads, c.image_format, c.jpeg_quality)
        bar = _progress(r.progress, len(todo))
        try:
            if todo:
                loader = create_loader(self.sub, backend=r.backend, geometry=r.geometry, batch_size=r.batch_size,
                                       device=r.device, ids=todo, num_threads=self.threads, tiling=r.tiling,
                                       only_bg_t="only_bg_t" in c.variants)
                try:
                    for batch in loader:
                        self._write_batch(batch, writer)
                        if bar is not None:
                            bar.update(len(batch))
                    for rej in loader.rejects:
                        self.tally.exclude(None, rej["path"], f"decode: {rej['reason']}")
                finally:
                    loader.close()
            writer.drain(0)
        finally:
            writer.close()
            if bar is not None:
                bar.close()

    def _write_batch(self, batch: Batch, writer: _Writer) -> None:
        """Synthesize a batch's variants and queue the files of every image that is written (consistent sets:
        only images for which every requested variant, and the mask, exist)."""
        c = self.config
        outs = synthesize(batch, list(c.variants), pool=self.pool, seed=self.run_cfg.seed,
                          backend=self.run_cfg.kernel_backend)
        host = {n: o.images.permute(0, 2, 3, 1).contiguous().cpu().numpy() for n, o in outs.items()}
        valid = {n: o.valid.cpu().numpy() for n, o in outs.items()}
        has_mask = batch.has_mask.cpu().numpy()
        masks = batch.masks[:, 0].cpu().numpy() if c.masks else None
        for k, i in enumerate(batch.image_ids.cpu().tolist()):
            missing = [f"no {n}" for n in c.variants if not valid[n][k]]
            if c.masks and not has_mask[k]:
                missing.append("no mask")
            if missing and c.consistent:
                self.tally.exclude(i, self.sub.image(i).get("file_name"), ", ".join(missing))
                continue
            for n in c.variants:
                if valid[n][k]:
                    writer.image(self.layout.variant_file(n, i), host[n][k])
            if c.masks and has_mask[k]:
                writer.mask(self.layout.mask_file(i), masks[k])
            self.tally.written += 1
        writer.drain()

    def _manifest(self, exported: list[int], counts: dict) -> dict:
        r, c = self.run_cfg, self.config
        d = {
            "format": "bgsynth-export",
            "layout": self.layout.description,
            "index": str(self.index.path) if self.index.path else None,
            "variants": list(c.variants),
            "display_names": {n: VARIANTS[n].display for n in c.variants},
            "seed": int(r.seed),
            "image_format": c.image_format,
            "jpeg_quality": c.jpeg_quality if c.image_format == "jpeg" else None,
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
        return {**d, **extra, "masks": c.masks}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tqdm only for a visible bar

    return tqdm(total=total, desc="export", unit="img")


def _image_bytes(hwc: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(hwc).save(buf, format="PNG", compress_level=1)  # lossless; level 1 is the fast one
    else:
        Image.fromarray(hwc).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, mask, allow_pickle=False)
    return buf.getvalue()


def _write(path: pathlib.Path, hwc: np.ndarray, image_format: str, quality: int) -> None:
    atomic_write_bytes(path, _image_bytes(hwc, image_format, quality))


def _write_mask(path: pathlib.Path, mask: np.ndarray) -> None:
    atomic_write_bytes(path, _npy_bytes((mask != 0).astype(np.uint8)))


def _drain(pending: list, keep: int) -> None:
    """Wait for writes until at most ``keep`` are in flight (bounded memory); re-raise the first failure."""
    while len(pending) > keep:
        pending.pop(0).result()


def _count(folder: pathlib.Path, pattern: str = "*.JPEG") -> int:
    return sum(1 for _ in folder.rglob(pattern)) if folder.is_dir() else 0


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
                f = layout.variant_file(n, i)
                if not f.exists():
                    continue
                bg_file = index.image(b).get("file_name", "") if b >= 0 and _has(index, b) else ""
                rows.append([n, i, f.relative_to(layout.root).as_posix(), b, bl, bg_file])
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
