"""Ingest of the released ImageNet-9 layout (``bg_challenge/``) into a :class:`~bgsynth.index.DatasetIndex`.

Layout (PAPER.md): ``<root>/<variant>/<split>/<NN_name>/<file>.JPEG`` with class folders ``00_dog`` ..
``08_fish`` (two contain a space: ``02_wheeled vehicle``, ``06_musical instrument``), and foreground masks
``<root>/fg_mask/<split>/<NN_name>/<stem>.npy``: a 0/1 array of the image's stored size.

Each mask becomes the image's RLE segmentation (``mask_source='released'``) and its box is the mask's extent.
A missing mask, an unreadable ``.npy``, a mask whose shape differs from the image or an empty mask is a
reject. The released images are already the crop the models see.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np

from ..classes import IN9_FOLDERS, folder_to_in9
from ..index import DatasetIndex, Reject, inclusive_to_bbox, mask_extent, rle_encode
from ..probe import VERIFY_MODES, probe_file
from ._probe import IngestError, reject_bad_name, run_pool, summarize_rejects
from .imagenet import _is_image, no_images_error

__all__ = ["ingest_in9_release", "load_release_mask"]

UNKNOWN_CLASS = "unknown_class"


def load_release_mask(path: str | os.PathLike, height: int, width: int) -> tuple[np.ndarray | None, str, str]:
    """Load a released ``.npy`` foreground mask and check it against the image size.

    Accepted shapes: ``[H, W]``, ``[H, W, 1]``, ``[1, H, W]`` and ``[H, W, C]`` (a pixel is foreground when any
    channel is nonzero). Any nonzero value counts as foreground.

    Returns:
        ``(mask uint8 [H, W] or None, reject reason or '', detail)``.
    """
    path = str(path)
    if not os.path.isfile(path):
        return None, Reject.MISSING_MASK, f"mask {path} not found"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return None, Reject.MISSING_MASK, f"mask {path} is not a readable .npy array: {e}"
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = (arr != 0).any(axis=2)
    if arr.ndim != 2 or arr.shape != (height, width):
        return None, Reject.MASK_SHAPE, f"mask {path} has shape {tuple(arr.shape)}, the image is {height}x{width}"
    mask = (arr != 0).astype(np.uint8)
    if not mask.any():
        return None, Reject.NO_OBJECT, f"mask {path} is empty"
    return mask, "", ""


def _release_task(task: tuple) -> dict:
    img_path, rel, mask_path, mask_required, verify = task
    pr = probe_file(img_path, verify)
    if not pr.ok:
        return {"rel": rel, "reason": pr.reason, "detail": pr.detail}
    out = {"rel": rel, "reason": None, "probe": pr.entry_fields(), "rle": None, "box": None}
    if mask_path is None or (not mask_required and not os.path.isfile(mask_path)):
        return out
    mask, reason, detail = load_release_mask(mask_path, pr.height, pr.width)
    if mask is None:
        return {"rel": rel, "reason": reason, "detail": detail}
    out["rle"] = rle_encode(mask)
    out["box"] = mask_extent(mask)
    out["area"] = float(mask.sum())
    return out


def _mask_policy(masks: bool | None, variant: str) -> tuple[bool, bool]:
    """``(attach masks, a missing mask is a reject)``: see :func:`ingest_in9_release`'s ``masks``."""
    return (masks if masks is not None else True), (masks if masks is not None else (variant == "original"))


def _release_tasks(images_dir: pathlib.Path, mask_dir: pathlib.Path, policy: tuple[bool, bool], verify: str,
                   index: DatasetIndex) -> tuple[list[tuple], list[int]]:
    """One probe task per image of the IN-9 class folders (other folders are counted and warned about), and the
    images' labels."""
    want_masks, mask_required = policy
    if want_masks and mask_required and not mask_dir.is_dir():
        warnings.warn(f"IN-9 ingest: mask folder {mask_dir} not found; every image will be rejected", stacklevel=3)
    tasks, labels, unknown = [], [], []
    for folder in sorted(e.name for e in os.scandir(images_dir) if e.is_dir()):
        label = folder_to_in9(folder)
        files = sorted(e.name for e in os.scandir(images_dir / folder) if e.is_file() and _is_image(e.name))
        if label is None:
            unknown.append(folder)
            index.count_skipped(UNKNOWN_CLASS, len(files))
            continue
        for f in files:
            if reject_bad_name(index, f"{folder}/{f}"):
                continue
            stem = os.path.splitext(f)[0]
            mask_path = str(mask_dir / folder / f"{stem}.npy") if want_masks else None
            tasks.append((str(images_dir / folder / f), f"{folder}/{f}", mask_path, mask_required, verify))
            labels.append(label)
    if unknown:
        warnings.warn(
            f"IN-9 ingest: folder(s) {unknown[:5]} of {images_dir} are not IN-9 class folders {IN9_FOLDERS}; skipped",
            stacklevel=3,
        )
    return tasks, labels


def _add_release_results(index: DatasetIndex, labels: list[int], results: list[dict], split: str,
                         variant: str) -> int:
    """The probed images (or their rejects) into ``index``; returns how many carry no mask."""
    no_mask = 0
    for label, res in zip(labels, results):
        if res["reason"] is not None:
            index.add_reject(res["rel"], res["reason"], res["detail"])
            continue
        entry = {"file_name": res["rel"], "label": label, "split": split, "wnid": None, "in1k_class": None,
                 "variant": variant}
        entry.update(res["probe"])
        anns = []
        if res["rle"] is not None:
            anns.append({"bbox": inclusive_to_bbox(res["box"]), "segmentation": res["rle"], "area": res["area"],
                         "mask_source": "released"})
        else:
            no_mask += 1
        index.add_image(entry, anns)
    return no_mask


def ingest_in9_release(
    root: str | os.PathLike,
    variant: str = "original",
    split: str = "val",
    masks: bool | None = None,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    verify: str = "full",
    progress: bool = True,
) -> DatasetIndex:
    """Index one variant folder of the IN-9 release.

    Args:
        root: the release root (the folder holding ``original/``, ``fg_mask/``, ``mixed_rand/``, ...).
        variant: the variant folder to index (``'original'``, ``'mixed_rand'``, ``'only_fg'``, ...).
        split: the split folder (the release has ``'val'``).
        masks: attach the ``fg_mask`` masks. ``True``: required (a missing mask is a reject). ``False``: never.
            ``None`` (default): required for ``'original'``, attached where a mask of the same stem exists for
            other variants (images without one are indexed without boxes).
        out: if given, the index is also saved there.
        workers: probing processes (default: CPU count).
        verify: ``'full'`` or ``'header'`` image verification (see :func:`~bgsynth.probe.probe_file`).
        progress: show a progress bar.

    Returns:
        The :class:`~bgsynth.index.DatasetIndex` (image ids follow the sorted relative paths).

    Raises:
        IngestError: when the variant folder does not exist or nothing valid remains.
    """
    root = pathlib.Path(root).expanduser()
    if verify not in VERIFY_MODES:
        raise IngestError(f"IN-9 ingest: expected verify in {VERIFY_MODES}, got {verify!r}")
    images_dir = root / variant / split
    if not images_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise IngestError(f"IN-9 ingest: {images_dir} is not a folder (folders under {root}: {found or 'none'})")
    index = DatasetIndex.empty(image_root=str(images_dir.resolve()), description=f"IN-9 release {variant}/{split}")
    index.data["info"]["source"] = {"kind": "in9_release", "root": str(root), "variant": variant, "split": split}
    tasks, labels = _release_tasks(images_dir, root / "fg_mask" / split, _mask_policy(masks, variant), verify, index)
    if not tasks and not index.rejects:
        raise no_images_error("IN-9", images_dir, f" in the IN-9 class folders ({IN9_FOLDERS[0]} ... {IN9_FOLDERS[-1]})")
    results = run_pool(_release_task, tasks, workers, desc=f"ingest in9 {variant}/{split}", progress=progress)
    index.data["info"]["source"]["images_without_mask"] = _add_release_results(index, labels, results, split, variant)
    if len(index) == 0:
        raise IngestError(
            f"IN-9 ingest: nothing valid under {images_dir} ({len(tasks)} image files found; "
            f"rejects: {summarize_rejects(index.rejects)})"
        )
    if out is not None:
        index.save(out)
    return index
