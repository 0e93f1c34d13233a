"""Ingest of a folder of images plus a folder of PNG segmentation masks into a :class:`~bgsynth.index.DatasetIndex`.

This is how ImageNet-S, PASCAL VOC segmentation and CUB-200 masks are shipped: ``IMAGES/<path>/<stem>.<ext>`` and,
mirroring it, ``MASKS/<path>/<stem>.png`` (any case of ``.png``) of the same pixel size. The masks become RLE
segmentations with their tight boxes, and the index's label space (``info.label_space``) is the dataset's own
classes.

What a mask's pixel values mean (``values``, CLI ``--values``):

* ``"binary"``: any nonzero pixel is the object (one object per image; CUB's masks, 0/255 masks);
* ``"objects"``: each distinct nonzero value is one object (instance-id masks such as VOC's SegmentationObject);
  every object becomes an annotation with its own box, all of the image's class;
* ``"classes"``: each pixel's value is a class id (VOC's SegmentationClass, ImageNet-S). The image's label is the
  class with the largest area, and its pixels (all values of that class) become the one annotation. Values the
  class map does not name (0 background, 255 VOC's void border) are no class.

Where the classes come from (``classes``, CLI ``--classes``):

* ``"folders"`` (with ``binary`` / ``objects``): an image's class is its first folder under ``IMAGES``
  (``IMAGES/<class>/.../<file>``); the classes are those folders, sorted by name;
* a JSON file: with ``binary`` / ``objects``, ``{"<image>": "<class>"}`` (the image by its path under ``IMAGES``,
  with or without extension, or by its stem), optionally wrapped as ``{"classes": [...], "images": {...}}`` to fix
  the class order (sorted names otherwise); with ``classes``, the class of each mask value: a list of names for
  the values 1, 2, ... (0 is background), or ``{"<value>": "<class>"}`` (several values may share a class; the
  classes are ordered by their smallest value).

Bad input becomes a recorded reject, never a crash: an image without a mask (:attr:`Reject.MISSING_MASK`, or only
counted with ``missing_mask="skip"``), a mask without an image (:attr:`Reject.MISSING_FILE`, its path under
``MASKS``), an unreadable mask (:attr:`Reject.BAD_ANNOTATION`), a mask of another size than its image
(:attr:`Reject.MASK_SHAPE`), an empty mask or one with no pixel of a known class (:attr:`Reject.NO_OBJECT`), an
image of no known class (:attr:`Reject.UNMAPPED_CLASS`), a bad image (the probe's reasons) and a file name the
index could not hold (``bad_file_name``).

>>> idx = ingest_masks("/data/CUB/images", "/data/CUB/segmentations", values="binary")   # doctest: +SKIP
>>> idx.label_space.num_classes                                                          # doctest: +SKIP
200
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from ..classes import LabelSpace, wnid_to_in1k
from ..errors import ConfigError
from ..fileio import read_json
from ..index import MASK_SOURCES, DatasetIndex, Reject, inclusive_to_bbox, mask_extent, rle_encode
from ..probe import VERIFY_MODES, probe_file
from ._probe import IngestError, reject_bad_name, run_pool, summarize_rejects, with_options
from .imagenet import _is_image, no_images_error

__all__ = ["MaskIngestConfig", "ingest_masks", "read_mask", "MASK_VALUES", "MISSING_MASK_POLICIES"]

#: what a mask's pixel values mean (see the module docstring)
MASK_VALUES = ("binary", "objects", "classes")
#: what an image without a mask becomes: a reject, or only a count in ``info.skipped``
MISSING_MASK_POLICIES = ("reject", "skip")
MASK_EXTENSIONS = (".png",)
_WNID = re.compile(r"^n\d{8}$")
NO_MASK = "images_without_mask"


@dataclasses.dataclass(frozen=True)
class MaskIngestConfig:
    """The mask-folder ingest's settings (module docstring).

    Attributes:
        values: ``"binary"``, ``"objects"`` or ``"classes"``: what a mask's pixel values mean.
        classes: ``"folders"`` or the path of a JSON class map.
        name: the label space's name (default: the images folder's name).
        split: split name recorded for every image.
        mask_source: provenance recorded on the masks (one of :data:`bgsynth.index.MASK_SOURCES`).
        missing_mask: ``"reject"`` (default) or ``"skip"`` (only counted: VOC ships masks for a subset).
        workers: probing processes (default: CPU count).
        verify: ``'full'`` or ``'header'`` image verification.
        progress: show a progress bar.
    """

    values: str = "binary"
    classes: str | os.PathLike = "folders"
    name: str | None = None
    split: str = "val"
    mask_source: str = "external"
    missing_mask: str = "reject"
    workers: int | None = None
    verify: str = "full"
    progress: bool = True

    def __post_init__(self):
        checks = (("values", MASK_VALUES), ("mask_source", MASK_SOURCES), ("missing_mask", MISSING_MASK_POLICIES),
                  ("verify", VERIFY_MODES))
        for field, allowed in checks:
            if getattr(self, field) not in allowed:
                raise IngestError(f"mask ingest: expected {field} in {allowed}, got {getattr(self, field)!r}")
        if self.values == "classes" and str(self.classes) == "folders":
            raise IngestError("mask ingest: values='classes' reads each pixel's class from the mask, so it needs a "
                              "JSON map of mask values to class names (--classes MAP.json), not class folders")


# --------------------------------------------------------------------------------------------------------------
# Class maps
# --------------------------------------------------------------------------------------------------------------


def _value_classes(obj: Any, path: pathlib.Path) -> tuple[list[str], dict[int, int]]:
    """``(class names, {mask value: class id})`` of a ``values='classes'`` map (list for values 1.., or object)."""
    if isinstance(obj, list):
        pairs = [(v, n) for v, n in enumerate(obj, start=1) if n is not None]
    elif isinstance(obj, Mapping):
        try:
            pairs = sorted((int(k), v) for k, v in obj.items() if v is not None)
        except ValueError as e:
            raise IngestError(f"mask ingest: class map {path}: expected integer mask values as keys ({e})") from e
    else:
        raise IngestError(f"mask ingest: class map {path}: expected a list of class names for the values 1, 2, ... "
                          f"or an object {{value: class}}, got {type(obj).__name__}")
    names: list[str] = []
    table: dict[int, int] = {}
    for value, name in pairs:
        name = str(name).strip()
        if value < 0 or not name:
            raise IngestError(f"mask ingest: class map {path}: expected a value >= 0 and a class name, "
                              f"got {value}: {name!r}")
        if name not in names:
            names.append(name)
        table[value] = names.index(name)
    if not names:
        raise IngestError(f"mask ingest: class map {path}: no classes")
    return names, table


def _image_classes(obj: Any, path: pathlib.Path) -> tuple[list[str], dict[str, str]]:
    """``(class names, {image key: class name})`` of a ``binary``/``objects`` map."""
    order = None
    if isinstance(obj, Mapping) and isinstance(obj.get("images"), Mapping):
        order = obj.get("classes")
        obj = obj["images"]
    if not isinstance(obj, Mapping) or not obj:
        raise IngestError(f"mask ingest: class map {path}: expected an object {{image: class}} (or {{'classes': "
                          f"[...], 'images': {{...}}}}), got {type(obj).__name__ if obj else 'nothing'}")
    images = {str(k): str(v).strip() for k, v in obj.items()}
    names = sorted(set(images.values()))
    if order is not None:
        if not isinstance(order, list) or sorted(set(map(str, order))) != sorted(map(str, order)):
            raise IngestError(f"mask ingest: class map {path}: 'classes' must be a list of unique names")
        missing = sorted(set(names) - set(map(str, order)))
        if missing:
            raise IngestError(f"mask ingest: class map {path}: images name classes missing from 'classes': {missing[:5]}")
        names = [str(c) for c in order]
    return names, images


# --------------------------------------------------------------------------------------------------------------
# Reading one mask (runs in the pool; never raises for bad input)
# --------------------------------------------------------------------------------------------------------------


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file's pixel values as an integer array ``[H, W]``.

    Grey, 16-bit and 32-bit masks give their values, palette masks (VOC) their palette indices, RGB masks
    ``R + 256 G + 65536 B`` (ImageNet-S stores class ``R + 256 G``); an alpha channel is ignored.

    Raises:
        OSError, ValueError: the file is not a readable image.
    """
    from PIL import Image  # Pillow: only where masks are read

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        arr = np.asarray(im)
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = arr[..., :3].astype(np.int64)
        return arr[..., 0] + 256 * arr[..., 1] + 65536 * arr[..., 2]
    if arr.ndim == 3:  # LA, PA: the first channel
        arr = arr[..., 0]
    return arr.astype(np.int64)


def _objects(values: np.ndarray, mode: str, table: Mapping[int, int] | None) -> tuple[int | None, list[np.ndarray]]:
    """``(class id or None, object masks)`` of one mask: one per object, or (``classes``) the largest class's."""
    if mode == "binary":
        return None, [(values != 0).astype(np.uint8)]
    if mode == "objects":
        return None, [(values == v).astype(np.uint8) for v in np.unique(values) if v != 0]
    uniq, inverse = np.unique(values, return_inverse=True)
    cls = np.asarray([table.get(int(v), -1) for v in uniq], np.int64)[inverse.reshape(values.shape)]
    area = np.bincount(cls[cls >= 0].ravel())
    if area.size == 0 or not area.any():
        return None, []
    label = int(np.argmax(area))  # ties: the smaller class id
    return label, [(cls == label).astype(np.uint8)]


def _mask_task(task: tuple) -> dict:
    """Worker: probe one image, read its mask, cut it into objects. Never raises for bad input."""
    img_path, rel, mask_path, label, mode, table, verify = task
    pr = probe_file(img_path, verify)
    if not pr.ok:
        return {"rel": rel, "reason": pr.reason, "detail": pr.detail}
    try:
        values = read_mask(mask_path)
    except (OSError, ValueError, SyntaxError) as e:
        return {"rel": rel, "reason": Reject.BAD_ANNOTATION, "detail": f"mask {mask_path} is not a readable image ({e})"}
    if values.shape != (pr.height, pr.width):
        return {"rel": rel, "reason": Reject.MASK_SHAPE,
                "detail": f"mask {mask_path} is {values.shape[1]}x{values.shape[0]}, the image is {pr.width}x{pr.height}"}
    found, masks = _objects(values, mode, table)
    masks = [m for m in masks if m.any()]
    if not masks:
        what = "pixel of a class in the class map" if mode == "classes" else "nonzero pixel"
        return {"rel": rel, "reason": Reject.NO_OBJECT, "detail": f"mask {mask_path} has no {what}"}
    anns = [{"bbox": inclusive_to_bbox(mask_extent(m)), "segmentation": rle_encode(m), "area": float(m.sum())}
            for m in masks]
    return {"rel": rel, "reason": None, "probe": pr.entry_fields(), "label": label if found is None else found,
            "anns": anns}


# --------------------------------------------------------------------------------------------------------------
# The ingest
# --------------------------------------------------------------------------------------------------------------


def _walk(root: pathlib.Path, keep) -> list[str]:
    """Relative POSIX paths of the files under ``root`` that ``keep(name)`` accepts (hidden entries skipped), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = pathlib.Path(folder).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in files if not f.startswith(".") and keep(f)]
    return sorted(found)


def _stem_key(rel: str) -> str:
    return os.path.splitext(rel)[0]


@dataclasses.dataclass
class _Classes:
    """The label space and how an image's class is found (``by_folder``, ``by_image`` or a value table)."""

    names: list[str]
    by_image: dict[str, str] | None = None
    table: dict[int, int] | None = None

    def label_of(self, rel: str) -> tuple[int | None, str]:
        """``(class id or None, why not)`` of an image by its path under the images root."""
        if self.table is not None:
            return -1, ""  # read from the mask
        if self.by_image is None:
            folder = rel.split("/", 1)[0] if "/" in rel else None
            if folder is None:
                return None, "not in a class folder"
            return self.names.index(folder), ""
        for key in (rel, _stem_key(rel), pathlib.PurePosixPath(_stem_key(rel)).name):
            if key in self.by_image:
                return self.names.index(self.by_image[key]), ""
        return None, "not listed in the class map"


def _classes(config: MaskIngestConfig, images: list[str]) -> _Classes:
    if str(config.classes) == "folders":
        names = sorted({rel.split("/", 1)[0] for rel in images if "/" in rel})
        if not names:
            raise IngestError("mask ingest: classes='folders' needs the images in class folders (IMAGES/<class>/...); "
                              "none found; give a JSON class map (--classes MAP.json) instead")
        return _Classes(names)
    path = pathlib.Path(config.classes).expanduser()
    obj = read_json(path, "class map JSON (mask ingest)", IngestError)
    if config.values == "classes":
        names, table = _value_classes(obj, path)
        return _Classes(names, table=table)
    names, by_image = _image_classes(obj, path)
    return _Classes(names, by_image=by_image)


def _label_space(names: list[str], name: str) -> LabelSpace:
    try:
        return LabelSpace(name, tuple(names))
    except ConfigError as e:
        raise IngestError(f"mask ingest: the classes cannot form a label space: {e}") from None


def _tasks(images: list[str], masks: dict[str, str], root: pathlib.Path, mask_root: pathlib.Path,
           cls: _Classes, config: MaskIngestConfig, index: DatasetIndex) -> list[tuple]:
    """One task per image with a mask and a class; the others are rejects (or skips); the masks used are
    removed from ``masks`` (what is left has no image)."""
    tasks = []
    for rel in images:
        if reject_bad_name(index, rel):
            masks.pop(_stem_key(rel), None)
            continue
        mask_rel = masks.pop(_stem_key(rel), None)
        if mask_rel is None:
            if config.missing_mask == "skip":
                index.count_skipped(NO_MASK)
            else:
                index.add_reject(rel, Reject.MISSING_MASK, f"no mask {mask_root / _stem_key(rel)}.png")
            continue
        label, why = cls.label_of(rel)
        if label is None:
            index.add_reject(rel, Reject.UNMAPPED_CLASS, why)
            continue
        tasks.append((str(root / rel), rel, str(mask_root / mask_rel), label, config.values, cls.table,
                      config.verify))
    return tasks


def _add(index: DatasetIndex, names: list[str], results: list[dict], config: MaskIngestConfig) -> None:
    for res in results:
        if res["reason"] is not None:
            index.add_reject(res["rel"], res["reason"], res["detail"])
            continue
        name = names[res["label"]]
        wnid = name if _WNID.match(name) else None
        entry = {"file_name": res["rel"], "label": res["label"], "split": config.split, "wnid": wnid,
                 "in1k_class": wnid_to_in1k(wnid) if wnid else None}
        entry.update(res["probe"])
        anns = [dict(a, category_id=res["label"], mask_source=config.mask_source) for a in res["anns"]]
        index.add_image(entry, anns)


def ingest_masks(
    images_root: str | os.PathLike,
    masks_root: str | os.PathLike,
    config: MaskIngestConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    **options,
) -> DatasetIndex:
    """Index a folder of images with a mirrored folder of PNG segmentation masks (module docstring).

    Args:
        images_root: ``IMAGES``: the images, in class folders or any layout (with a JSON class map).
        masks_root: ``MASKS``: ``<path>/<stem>.png`` for ``IMAGES/<path>/<stem>.<ext>``.
        config: the ingest's settings (:class:`MaskIngestConfig`).
        out: if given, the index is also saved there.
        **options: :class:`MaskIngestConfig` fields by name (``values=``, ``classes=``, ``split=``, ...),
            overriding ``config``.

    Returns:
        The :class:`~bgsynth.index.DatasetIndex`: its label space the dataset's classes, every image with RLE masks
        and their tight boxes (image ids follow the sorted relative paths).

    Raises:
        IngestError: a root that is not a folder or holds no image, an unreadable class map, a bad option, or
            nothing valid remaining (the message counts the rejects per reason).
    """
    config = with_options("mask ingest", config, MaskIngestConfig, options)
    root, mask_root = (pathlib.Path(p).expanduser() for p in (images_root, masks_root))
    for what, folder in (("images", root), ("masks", mask_root)):
        if not folder.is_dir():
            raise IngestError(f"mask ingest: {what} root {folder} is not a folder")
    images = _walk(root, _is_image)
    if not images:
        raise no_images_error("mask", root)
    masks = {_stem_key(m): m for m in _walk(mask_root, lambda f: f.lower().endswith(MASK_EXTENSIONS))}
    cls = _classes(config, images)
    index = DatasetIndex.empty(image_root=str(root.resolve()), description=f"segmentation masks from {mask_root}",
                               label_space=_label_space(cls.names, config.name or root.resolve().name or "masks"))
    index.data["info"]["source"] = {"kind": "masks", "images_root": str(root), "masks_root": str(mask_root),
                                    "values": config.values, "classes": str(config.classes)}
    tasks = _tasks(images, masks, root, mask_root, cls, config, index)
    results = run_pool(_mask_task, tasks, config.workers, desc="ingest masks", progress=config.progress)
    _add(index, cls.names, results, config)
    for mask_rel in sorted(masks.values()):  # masks whose image does not exist
        index.add_reject(str(mask_root / mask_rel), Reject.MISSING_FILE,
                         f"mask without an image: no {root / _stem_key(mask_rel)}.<jpeg|jpg|png>")
    if len(index) == 0:
        raise IngestError(f"mask ingest: nothing valid under {root} ({len(images)} image files, {len(tasks)} with a "
                          f"mask and a class; rejects: {summarize_rejects(index.rejects)})")
    if out is not None:
        index.save(out)
    return index
