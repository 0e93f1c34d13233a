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
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import pathlib
import re
from collections.abc import Iterable

import numpy as np
import torch

from .classes import IN9_FOLDERS, NUM_IN9
from .errors import ConfigError
from .fileio import atomic_write_bytes, atomic_write_json
from .geometry import CropGeometry
from .index import DatasetIndex
from .types import TILINGS, BackgroundPool
from .variants import MIXED_VARIANTS, VARIANTS, choose_backgrounds, resolve_variants, synthesize

__all__ = ["export", "ExportResult", "safe_stem", "release_paths", "MASK_FOLDER", "IMAGE_FORMATS"]

MASK_FOLDER = "fg_mask"
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


def _variant_file(out: pathlib.Path, variant: str, where: tuple[str, str, str], ext: str = ".JPEG") -> pathlib.Path:
    split, folder, stem = where
    return out / variant / split / folder / f"{stem}{ext}"


def _mask_file(out: pathlib.Path, where: tuple[str, str, str]) -> pathlib.Path:
    split, folder, stem = where
    return out / MASK_FOLDER / split / folder / f"{stem}.npy"


IMAGE_FORMATS = {"jpeg": ".JPEG", "png": ".png"}


def _image_bytes(hwc: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

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


def export(
    index: DatasetIndex | str | os.PathLike,
    out_dir: str | os.PathLike,
    variants: str | Iterable[str] = "all",
    seed: int = 0,
    jpeg_quality: int = 95,
    geometry: CropGeometry | None = None,
    backend: str = "auto",
    kernel_backend: str = "auto",
    device: str | torch.device = "cpu",
    split: str | None = None,
    pool: BackgroundPool | None = None,
    batch_size: int = 64,
    resume: bool = True,
    consistent: bool = True,
    masks: bool = True,
    num_threads: int | None = None,
    progress: bool = True,
    image_format: str = "jpeg",
    tiling: str = "paper",
) -> ExportResult:
    """Write the variants of an index in the IN-9 release layout (see the module docstring).

    Args:
        index: the dataset index (or the path of its JSON); images need an IN-9 label.
        out_dir: the release root to write.
        variants: ``'all'`` or a selection (see :func:`bgsynth.variants.resolve_variants`).
        seed: seed of the Mixed-* background choice.
        jpeg_quality: JPEG quality (1..100).
        geometry: crop geometry (default 256 -> 224).
        backend: decode backend (see :func:`bgsynth.pipeline.create_loader`).
        kernel_backend: variant kernels backend (``'auto'``, ``'torch'``, ``'triton'``).
        device: where decoding and synthesis run.
        split: export only this split (default: every image of the index).
        pool: backgrounds for Mixed-*; default: the Only-BG-T images of the exported images themselves (as the
            release, whose Mixed-* backgrounds come from its own test set).
        batch_size: decode batch size.
        resume: skip images whose files already all exist (otherwise rewrite everything).
        consistent: write an image only if all requested variants exist for it.
        masks: also write ``fg_mask/`` (images without a mask are then left out).
        num_threads: JPEG encoding/decoding threads (default ``min(8, cpu_count)``).
        progress: show a progress bar.
        image_format: ``"jpeg"`` (``<stem>.JPEG`` at ``jpeg_quality``, as released) or ``"png"`` (``<stem>.png``,
            lossless).
        tiling: ``"paper"`` or ``"crop"`` Only-BG-T (see the module docstring).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: bad arguments (unknown variant, quality out of range, non-IN-9 labels).
    """
    from .pipeline import create_loader
    from .pool import build_background_pool

    if not isinstance(index, DatasetIndex):
        index = DatasetIndex.load(index)
    names = resolve_variants(variants)
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"export: expected jpeg_quality an integer in 1..100, got {jpeg_quality!r}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"export: expected image_format in {tuple(IMAGE_FORMATS)}, got {image_format!r}")
    if tiling not in TILINGS:
        raise ConfigError(f"export: expected tiling in {TILINGS}, got {tiling!r}")
    ext = IMAGE_FORMATS[image_format]
    geometry = CropGeometry() if geometry is None else geometry
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sub = index.select(split=split) if split is not None else index
    where = release_paths(sub, sub.ids)
    dev = torch.device(device)
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    need_pool = any(n in MIXED_VARIANTS for n in names)
    if need_pool and pool is None:
        pool = build_background_pool(sub, geometry=geometry, backend=backend, device=dev, batch_size=batch_size,
                                     num_threads=threads, progress=progress, tiling=tiling)
    if pool is not None:
        pool = pool.to(dev)

    def files_of(i: int) -> list[pathlib.Path]:
        fs = [_variant_file(out, n, where[i], ext) for n in names]
        return fs + ([_mask_file(out, where[i])] if masks else [])

    todo = [i for i in sub.ids if not (resume and all(f.exists() for f in files_of(i)))]
    excluded: dict[str, int] = {}
    left_out: list[dict] = []
    written = 0

    def exclude(i: int, reason: str) -> None:
        excluded[reason] = excluded.get(reason, 0) + 1
        left_out.append({"image_id": i, "file_name": sub.image(i).get("file_name"), "reason": reason})

    def reasons(o_valid: dict, has_mask: bool) -> list[str]:
        r = [f"no {n}" for n in names if not o_valid[n]]
        if masks and not has_mask:
            r.append("no mask")
        return r

    pending: list[concurrent.futures.Future] = []
    pool_exec = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="export", unit="img")
    try:
        if todo:
            loader = create_loader(sub, backend=backend, geometry=geometry, batch_size=batch_size, device=dev,
                                   ids=todo, num_threads=threads, tiling=tiling, only_bg_t="only_bg_t" in names)
            try:
                for batch in loader:
                    outs = synthesize(batch, names, pool=pool, seed=seed, backend=kernel_backend)
                    host = {n: o.images.permute(0, 2, 3, 1).contiguous().cpu().numpy() for n, o in outs.items()}
                    valid = {n: o.valid.cpu().numpy() for n, o in outs.items()}
                    ids = batch.image_ids.cpu().tolist()
                    has_mask = batch.has_mask.cpu().numpy()
                    mask_np = batch.masks[:, 0].cpu().numpy() if masks else None
                    for k, i in enumerate(ids):
                        bad = reasons({n: bool(valid[n][k]) for n in names}, bool(has_mask[k]))
                        if bad and consistent:
                            exclude(i, ", ".join(bad))
                            continue
                        for n in names:
                            if valid[n][k]:
                                f = _variant_file(out, n, where[i], ext)
                                pending.append(pool_exec.submit(_write, f, host[n][k], image_format, jpeg_quality))
                        if masks and has_mask[k]:
                            f = _mask_file(out, where[i])
                            pending.append(pool_exec.submit(_write_mask, f, mask_np[k]))
                        written += 1
                    _drain(pending, keep=4 * threads)
                    if bar is not None:
                        bar.update(len(ids))
                for r in loader.rejects:
                    excluded[f"decode: {r['reason']}"] = excluded.get(f"decode: {r['reason']}", 0) + 1
                    left_out.append({"image_id": None, "file_name": r["path"], "reason": f"decode: {r['reason']}"})
            finally:
                loader.close()
        _drain(pending, keep=0)
    finally:
        pool_exec.shutdown(wait=True)
        if bar is not None:
            bar.close()

    # the manifest covers every exported image, including those finished by an earlier run
    if consistent:
        exported = [i for i in sub.ids if all(f.exists() for f in files_of(i))]
    else:
        exported = [i for i in sub.ids if any(f.exists() for f in files_of(i))]
    bg_csv = out / "backgrounds.csv"
    _write_backgrounds(bg_csv, sub, exported, names, pool, seed, where, out, ext)
    counts = {n: _count(out / n, f"*{ext}") for n in names}
    if masks:
        counts[MASK_FOLDER] = _count(out / MASK_FOLDER, "*.npy")
    manifest = out / "manifest.json"
    atomic_write_json(manifest, {
        "format": "bgsynth-export",
        "layout": f"<variant>/<split>/<NN_name>/<stem>{ext}; fg_mask/<split>/<NN_name>/<stem>.npy",
        "index": str(index.path) if index.path else None,
        "variants": names,
        "display_names": {n: VARIANTS[n].display for n in names},
        "seed": int(seed),
        "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
        "geometry": geometry.to_dict(),
        "tiling": tiling,
        "split": split,
        "consistent": consistent,
        "images": len(exported),
        "files": counts,
        "excluded_this_run": excluded,
        "left_out_this_run": left_out,
        "pool_size": 0 if pool is None else len(pool),
    }, indent=1)
    return ExportResult(out, len(exported), written, excluded, counts, manifest, bg_csv)


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


def _write_backgrounds(path, index: DatasetIndex, ids: list[int], names: list[str], pool, seed: int, where, out,
                       ext: str):
    """``backgrounds.csv``: variant, image, its file, the background image id/label/file (Mixed-* only)."""
    rows = []
    mixed = [n for n in names if n in MIXED_VARIANTS]
    if mixed and ids and pool is not None:
        dev = pool.device
        t_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        t_lab = torch.tensor([index.image(i)["label"] for i in ids], dtype=torch.int64, device=dev)
        for n in mixed:
            _, bg_ids, bg_labels = choose_backgrounds(t_ids, t_lab, n, pool, seed)
            for i, b, bl in zip(ids, bg_ids.cpu().tolist(), bg_labels.cpu().tolist()):
                f = _variant_file(out, n, where[i], ext)
                if not f.exists():
                    continue
                bg_file = index.image(b).get("file_name", "") if b >= 0 and _has(index, b) else ""
                rows.append([n, i, f.relative_to(out).as_posix(), b, bl, bg_file])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "image_id", "file", "bg_image_id", "bg_label", "bg_source_file"])
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _has(index: DatasetIndex, image_id: int) -> bool:
    try:
        index.image(image_id)
    except (KeyError, IndexError):
        return False
    return True
