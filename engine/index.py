"""The dataset index: the single description of a dataset that every stage after ingest reads.

An index is one COCO-format JSON file that :class:`pycocotools.coco.COCO` loads as is:

* ``images``: ``id``, ``file_name`` (relative to the image root), ``width``/``height`` (stored pixel size, no EXIF
  rotation), ``label`` (class id in the index's label space), ``in1k_class`` (ImageNet-1k index or ``None``), ``wnid`` (or ``None``),
  ``split`` (``"train"``/``"val"``/...), optional ``format`` (``"JPEG"``, ``"PNG"``, ...) and ``mode``.
* ``annotations``: ``id``, ``image_id``, ``category_id`` (class id), ``bbox`` ``[x, y, w, h]`` covering pixels
  ``x..x+w-1`` and ``y..y+h-1``, ``area``, ``iscrowd`` 0, optional ``segmentation`` as compressed RLE and
  ``mask_source`` (``released``/``grabcut``/``synthetic``/``external``) when a mask is known.
* ``categories``: the classes of the label space (``info.label_space``, :class:`~bgsynth.classes.LabelSpace`; ids
  0..N-1; the 9 IN-9 classes by default).
* ``rejects``: ``{"path", "reason", "detail"}`` for every input that was not indexed, and ``info`` with the
  image root, counts of skipped (e.g. unmapped-class) inputs and free-form provenance.

>>> from bgsynth.index import DatasetIndex
>>> idx = DatasetIndex.empty(image_root="/data")
>>> len(idx)
0
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import pathlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .classes import IN9, LabelSpace
from .errors import ConfigError, EmptyInputError, IndexFormatError
from .fileio import atomic_write_json, read_json

__all__ = [
    "INDEX_VERSION",
    "MASK_SOURCES",
    "Reject",
    "ImageRecord",
    "DatasetIndex",
    "require_index",
    "rle_encode",
    "rle_decode",
    "rle_union",
    "portable_root",
    "check_file_name",
]

INDEX_VERSION = 1
MASK_SOURCES = ("released", "grabcut", "synthetic", "external")


class Reject:
    """Reason strings of rejected inputs (one vocabulary for ingest, prepare and decode)."""

    ZERO_BYTE = "zero_byte_file"
    UNREADABLE = "unreadable_image"
    TRUNCATED = "truncated_image"
    MISSING_FILE = "missing_file"
    MISSING_ANNOTATION = "missing_annotation"
    BAD_ANNOTATION = "unparsable_annotation"
    SIZE_MISMATCH = "annotation_size_mismatch"
    NO_OBJECT = "no_object"
    EMPTY_BOX = "empty_box"
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    MISSING_MASK = "missing_mask"
    MASK_SHAPE = "mask_shape_mismatch"
    UNMAPPED_CLASS = "unmapped_class"
    MULTIPLE_OBJECTS = "multiple_objects"
    BOX_TOO_LARGE = "box_too_large"
    BOX_OUTSIDE_CROP = "box_outside_crop"
    NO_BGT_MARGIN = "no_bgt_margin"
    GRABCUT_FAILED = "grabcut_failed"
    MASK_TOO_SMALL = "mask_too_small"
    BOX_MASK_MISMATCH = "box_mask_mismatch"
    DECODE_FAILED = "decode_failed"


# --------------------------------------------------------------------------------------------------------------
# RLE helpers (pycocotools compressed RLE with ``counts`` as str so the JSON stays plain)
# --------------------------------------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """Encode a binary ``[H, W]`` mask as COCO compressed RLE with a ``str`` ``counts`` field.

    >>> m = np.zeros((4, 5), np.uint8); m[1:3, 2:4] = 1
    >>> bool((rle_decode(rle_encode(m)) == m).all())
    True
    """
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise IndexFormatError(f"rle_encode: expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray((mask != 0).astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed or uncompressed) into a ``uint8`` 0/1 array ``[H, W]``."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise IndexFormatError(f"rle_decode: expected an RLE dict with 'size' and 'counts', got {type(rle).__name__}")
    counts = rle["counts"]
    h, w = int(rle["size"][0]), int(rle["size"][1])
    if isinstance(counts, list):
        obj = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        obj = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return np.ascontiguousarray(mask_utils.decode(obj)).astype(np.uint8)


def rle_union(rles: Sequence[Mapping[str, Any]], height: int, width: int) -> dict | None:
    """Union of several RLE masks of the same ``[height, width]`` (``None`` for an empty list)."""
    if not rles:
        return None
    if len(rles) == 1:
        return dict(rles[0])
    acc = np.zeros((height, width), np.uint8)
    for r in rles:
        m = rle_decode(r)
        if m.shape != (height, width):
            raise IndexFormatError(f"rle_union: expected masks of size {(height, width)}, got {m.shape}")
        acc |= m
    return rle_encode(acc)


def check_file_name(name: str) -> str | None:
    """Why an image's ``file_name`` is not acceptable in an index, or ``None`` when it is.

    The one rule, applied by :meth:`DatasetIndex.validate` on load and by every ingest before a file is indexed
    (so a bad name becomes a recorded reject instead of an index that later fails to load): the name must be
    relative to the image root and must not climb out of it (no ``..`` component, with ``/`` or ``\\`` as separator,
    no drive or absolute path, no empty name).

    >>> check_file_name("n01440764/x.JPEG") is None
    True
    >>> check_file_name("a\\..\\..\\b.JPEG")
    "must be relative to the image root, without '..' (a path component climbs out of it)"
    """
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty relative path"
    norm = name.replace("\\", "/")
    if os.path.isabs(name) or norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "must be relative to the image root, not an absolute path"
    if ".." in pathlib.PurePosixPath(norm).parts:
        return "must be relative to the image root, without '..' (a path component climbs out of it)"
    return None


def portable_root(root: pathlib.Path, index_file: str | os.PathLike) -> str:
    """How ``info.image_root`` is written: relative to the index file's folder when both lie in one tree, so that an
    index moved or copied together with its images keeps working; absolute otherwise.

    "One tree" means the two paths share an ancestor below the file system's root (``/data/in9/index.json`` and
    ``/data/imagenet/val`` -> ``../imagenet/val``; ``/tmp/x.json`` and ``/data/imagenet`` -> absolute).

    >>> portable_root(pathlib.Path("/data/imagenet/val"), "/data/in9/index.json")
    '../imagenet/val'
    >>> portable_root(pathlib.Path("/data/imagenet/val"), "/tmp/index.json")
    '/data/imagenet/val'
    """
    root = pathlib.Path(os.path.realpath(root))
    folder = pathlib.Path(os.path.realpath(index_file)).parent
    common = pathlib.Path(os.path.commonpath([str(root), str(folder)]))
    if common == pathlib.Path(common.anchor):
        return str(root)
    return os.path.relpath(root, folder)


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of an index with its annotations joined.

    Attributes:
        id: image id (unique in the index).
        path: absolute path of the image file.
        file_name: path relative to the image root, as stored.
        width, height: stored pixel size.
        label: class id (in the index's label space).
        split: split name.
        boxes: ``int64 [K, 4]`` inclusive ``(x0, y0, x1, y1)`` of each annotation (K may be 0).
        mask_rle: RLE of the foreground mask M (union of the annotations' masks) or ``None``.
        mask_source: where the mask came from, or ``None``.
        meta: the raw image entry (extra fields such as ``in1k_class``, ``wnid``, ``format``).
    """

    id: int
    path: str
    file_name: str
    width: int
    height: int
    label: int
    split: str
    boxes: np.ndarray
    mask_rle: dict | None
    mask_source: str | None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def union_box(self) -> tuple[int, int, int, int] | None:
        """Inclusive ``(x0, y0, x1, y1)`` of the union of all boxes (the paper's B), ``None`` without boxes."""
        if len(self.boxes) == 0:
            return None
        b = self.boxes
        return int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())

    def mask(self) -> np.ndarray | None:
        """The decoded foreground mask ``uint8 [H, W]`` (0/1), or ``None`` if the image has no mask."""
        if self.mask_rle is None:
            return None
        m = rle_decode(self.mask_rle)
        if m.shape != (self.height, self.width):
            raise IndexFormatError(
                f"image {self.id} ({self.file_name}): mask size {m.shape} != image size {(self.height, self.width)}"
            )
        return m


def bbox_to_inclusive(bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` -> inclusive integer ``(x0, y0, x1, y1)``."""
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = int(round(x)), int(round(y))
    return x0, y0, x0 + max(int(round(w)), 1) - 1, y0 + max(int(round(h)), 1) - 1


def inclusive_to_bbox(box: Sequence[int]) -> list[int]:
    """Inclusive ``(x0, y0, x1, y1)`` -> COCO ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def mask_extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive ``(x0, y0, x1, y1)`` extent of the nonzero pixels of a mask (``None`` if empty)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


__all__ += ["bbox_to_inclusive", "inclusive_to_bbox", "mask_extent"]


# --------------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------------


class DatasetIndex:
    """A COCO-format dataset description plus the list of rejected inputs.

    Args:
        data: the COCO dict (``images``, ``annotations``, ``categories``, ``info``, ``rejects``).
        path: where the index was loaded from (used to resolve a relative image root and in error messages).

    The image root is ``data["info"]["image_root"]``; a relative root is relative to the index file's folder.
    The label space is ``data["info"]["label_space"]`` (:class:`~bgsynth.classes.LabelSpace`; IN-9 when absent, as
    in indexes written before label spaces existed), and ``categories[]`` are its classes.
    """

    def __init__(self, data: dict, path: str | os.PathLike | None = None):
        self.data = data
        self.path = None if path is None else pathlib.Path(path)
        self.data.setdefault("info", {})
        self.data.setdefault("rejects", [])
        self.data.setdefault("categories", self.label_space.categories())
        self._build()

    # ---------------------------------------------------------------------------------------------- creation
    @classmethod
    def empty(cls, image_root: str | os.PathLike, description: str = "", label_space: LabelSpace = IN9
              ) -> "DatasetIndex":
        """A new index with no images, rooted at ``image_root``, whose classes are ``label_space`` (IN-9)."""
        info = {"version": INDEX_VERSION, "image_root": str(image_root), "description": description, "skipped": {},
                "label_space": label_space.to_dict()}
        return cls({"info": info, "images": [], "annotations": [], "categories": label_space.categories(),
                    "rejects": []})

    @property
    def label_space(self) -> LabelSpace:
        """The index's classes (IN-9 for an index that names none)."""
        d = self.data.get("info", {}).get("label_space")
        if d is None:
            return IN9
        cached = getattr(self, "_label_space", None)
        if cached is None or cached[0] is not d:
            try:
                cached = (d, LabelSpace.from_dict(d))
            except ConfigError as e:
                raise IndexFormatError(f"{self._where()}: info.label_space: {e}") from None
            self._label_space = cached
        return cached[1]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetIndex":
        """Load and validate an index JSON; raises :class:`IndexFormatError` naming the file on any problem."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise IndexFormatError(f"{path}: index file not found")
        data = read_json(path, "JSON index", IndexFormatError)
        if not isinstance(data, dict):
            raise IndexFormatError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
        idx = cls(data, path)
        idx.validate()
        return idx

    def save(self, path: str | os.PathLike | None = None, indent: int | None = None) -> pathlib.Path:
        """Write the index atomically (to ``path`` or where it was loaded from) and return the path."""
        target = pathlib.Path(path) if path is not None else self.path
        if target is None:
            raise IndexFormatError("DatasetIndex.save: no path given and the index was not loaded from a file")
        root = self.data["info"].get("image_root")
        # a relative root of an index never saved is relative to where it is saved now: kept as is
        if root is not None and (self.path is not None or os.path.isabs(os.path.expanduser(root))):
            self.data["info"]["image_root"] = portable_root(self._absolute_root(), target)
        atomic_write_json(target, self.data, indent=indent)
        self.path = target
        return target

    def _absolute_root(self) -> pathlib.Path:
        """The image root as an absolute path (a relative root is relative to the index file)."""
        root = pathlib.Path(self.data["info"]["image_root"]).expanduser()
        if root.is_absolute() or self.path is None:
            return root.resolve()
        return (self.path.resolve().parent / root).resolve()

    def copy(self) -> "DatasetIndex":
        return DatasetIndex(copy.deepcopy(self.data), self.path)

    # ---------------------------------------------------------------------------------------------- internals
    def _build(self) -> None:
        self._images = {int(im["id"]): im for im in self.data.get("images", [])}
        self._anns: dict[int, list[dict]] = collections.defaultdict(list)
        for a in self.data.get("annotations", []):
            self._anns[int(a["image_id"])].append(a)
        self._next_ann = max((int(a["id"]) for a in self.data.get("annotations", [])), default=-1) + 1

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory index>"

    # ---------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check the structure; raises :class:`IndexFormatError` with the file, entry and field at fault."""
        where = self._where()
        d = self.data
        for key in ("images", "annotations", "categories"):
            if not isinstance(d.get(key), list):
                raise IndexFormatError(f"{where}: expected a list under '{key}', got {type(d.get(key)).__name__}")
        if "image_root" not in d["info"]:
            raise IndexFormatError(f"{where}: 'info.image_root' is missing")
        n_classes = self.label_space.num_classes
        cat_ids = sorted(int(c.get("id", -1)) for c in d["categories"])
        if cat_ids != list(range(n_classes)):
            raise IndexFormatError(f"{where}: expected categories with ids 0..{n_classes - 1} (the label space "
                                   f"{self.label_space.name!r}), got {cat_ids[:20]}")
        seen: set[int] = set()
        for i, im in enumerate(d["images"]):
            for field, typ in (("id", int), ("file_name", str), ("width", int), ("height", int), ("label", int)):
                if not isinstance(im.get(field), typ) or isinstance(im.get(field), bool):
                    raise IndexFormatError(
                        f"{where}: images[{i}].{field}: expected {typ.__name__}, got {im.get(field)!r}"
                    )
            if im["id"] in seen:
                raise IndexFormatError(f"{where}: images[{i}]: duplicate image id {im['id']}")
            seen.add(im["id"])
            if not 0 <= im["label"] < n_classes:
                raise IndexFormatError(f"{where}: images[{i}].label: expected 0..{n_classes - 1}, got {im['label']}")
            if im["width"] <= 0 or im["height"] <= 0:
                raise IndexFormatError(f"{where}: images[{i}]: expected a positive size, got {im['width']}x{im['height']}")
            bad = check_file_name(im["file_name"])
            if bad:
                raise IndexFormatError(f"{where}: images[{i}].file_name {im['file_name']!r}: {bad}")
        ann_ids: set[int] = set()
        for i, a in enumerate(d["annotations"]):
            if int(a.get("image_id", -1)) not in seen:
                raise IndexFormatError(f"{where}: annotations[{i}]: image_id {a.get('image_id')!r} not in images")
            if a.get("id") in ann_ids:
                raise IndexFormatError(f"{where}: annotations[{i}]: duplicate annotation id {a.get('id')}")
            ann_ids.add(a.get("id"))
            bbox = a.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise IndexFormatError(f"{where}: annotations[{i}].bbox: expected [x, y, w, h], got {bbox!r}")
            if bbox[2] <= 0 or bbox[3] <= 0:
                raise IndexFormatError(f"{where}: annotations[{i}].bbox: expected positive w/h, got {bbox!r}")
            seg = a.get("segmentation")
            if seg is not None and not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
                raise IndexFormatError(
                    f"{where}: annotations[{i}].segmentation: expected an RLE dict with size/counts, got {type(seg).__name__}"
                )
            src = a.get("mask_source")
            if seg is not None and src not in MASK_SOURCES:
                raise IndexFormatError(
                    f"{where}: annotations[{i}].mask_source: expected one of {MASK_SOURCES}, got {src!r}"
                )
        if not isinstance(d.get("rejects", []), list):
            raise IndexFormatError(f"{where}: expected a list under 'rejects'")

    # ---------------------------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._images)

    @property
    def image_root(self) -> pathlib.Path:
        root = pathlib.Path(self.data["info"]["image_root"])
        if not root.is_absolute() and self.path is not None:
            root = self.path.parent / root
        return root

    @property
    def ids(self) -> list[int]:
        """All image ids, sorted."""
        return sorted(self._images)

    @property
    def rejects(self) -> list[dict]:
        return self.data["rejects"]

    def image(self, image_id: int) -> dict:
        return self._images[int(image_id)]

    def annotations(self, image_id: int) -> list[dict]:
        return list(self._anns.get(int(image_id), ()))

    def record(self, image_id: int) -> ImageRecord:
        """The :class:`ImageRecord` of one image."""
        im = self._images[int(image_id)]
        anns = self._anns.get(int(image_id), ())
        boxes = np.asarray([bbox_to_inclusive(a["bbox"]) for a in anns], dtype=np.int64).reshape(-1, 4)
        segs = [a["segmentation"] for a in anns if a.get("segmentation") is not None]
        srcs = [a.get("mask_source") for a in anns if a.get("segmentation") is not None]
        rle = rle_union(segs, im["height"], im["width"]) if segs else None
        return ImageRecord(
            id=int(im["id"]),
            path=str(self.image_root / im["file_name"]),
            file_name=im["file_name"],
            width=int(im["width"]),
            height=int(im["height"]),
            label=int(im["label"]),
            split=str(im.get("split", "")),
            boxes=boxes,
            mask_rle=rle,
            mask_source=srcs[0] if srcs else None,
            meta=im,
        )

    def records(self, ids: Iterable[int] | None = None) -> Iterator[ImageRecord]:
        for i in self.ids if ids is None else ids:
            yield self.record(i)

    def labels(self, ids: Iterable[int] | None = None) -> np.ndarray:
        return np.asarray([self._images[int(i)]["label"] for i in (self.ids if ids is None else ids)], np.int64)

    def to_coco(self):
        """A :class:`pycocotools.coco.COCO` object over this index (no file round-trip)."""
        from pycocotools.coco import COCO

        c = COCO()
        c.dataset = copy.deepcopy(self.data)
        c.createIndex()
        return c

    # ---------------------------------------------------------------------------------------------- mutation
    def next_image_id(self) -> int:
        return max(self._images, default=-1) + 1

    def add_image(self, entry: dict, annotations: Sequence[dict] = ()) -> int:
        """Add one image entry (``id`` assigned if absent) and its annotations (``id``/``image_id`` filled in)."""
        entry = dict(entry)
        entry.setdefault("id", self.next_image_id())
        if entry["id"] in self._images:
            raise IndexFormatError(f"{self._where()}: duplicate image id {entry['id']}")
        self.data["images"].append(entry)
        self._images[entry["id"]] = entry
        next_ann = self._next_ann
        for a in annotations:
            a = dict(a)
            a["id"] = next_ann
            a["image_id"] = entry["id"]
            a.setdefault("category_id", entry["label"])
            a.setdefault("iscrowd", 0)
            if "area" not in a:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
            next_ann += 1
            self.data["annotations"].append(a)
            self._anns[entry["id"]].append(a)
        self._next_ann = next_ann
        return entry["id"]

    def add_reject(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        """Record an input that was not indexed (path, reason from :class:`Reject`, free-form detail)."""
        self.data["rejects"].append({"path": str(path), "reason": str(reason), "detail": str(detail)})

    def count_skipped(self, reason: str, n: int = 1) -> None:
        """Count inputs skipped on purpose without listing them (e.g. images of unmapped ImageNet classes)."""
        sk = self.data["info"].setdefault("skipped", {})
        sk[reason] = int(sk.get(reason, 0)) + int(n)

    def set_mask(self, image_id: int, mask_rle: dict | None, source: str | None) -> None:
        """Set (or clear, with ``None``) the mask of every annotation of an image; it becomes the image's M."""
        if mask_rle is not None and source not in MASK_SOURCES:
            raise IndexFormatError(f"set_mask: expected mask source in {MASK_SOURCES}, got {source!r}")
        anns = self._anns.get(int(image_id))
        if not anns:
            raise IndexFormatError(f"{self._where()}: image {image_id} has no annotation to attach a mask to")
        for j, a in enumerate(anns):
            if mask_rle is None or j > 0:
                a.pop("segmentation", None)
                a.pop("mask_source", None)
            else:
                a["segmentation"] = mask_rle
                a["mask_source"] = source
                from pycocotools import mask as mask_utils

                a["area"] = float(mask_utils.area({"size": mask_rle["size"], "counts": mask_rle["counts"].encode()}))

    def remove_images(self, ids: Iterable[int]) -> None:
        drop = {int(i) for i in ids}
        self.data["images"] = [im for im in self.data["images"] if int(im["id"]) not in drop]
        self.data["annotations"] = [a for a in self.data["annotations"] if int(a["image_id"]) not in drop]
        self._build()

    # ---------------------------------------------------------------------------------------------- subsets
    def require_images(self, selected: "DatasetIndex", verb: str, split: str | Sequence[str] | None = None,
                       what: str = "images") -> None:
        """Raise :class:`EmptyInputError` unless ``selected`` (the subset of this index a command will process) holds
        images: the one wording every command uses for empty input.

        Args:
            selected: the subset (e.g. ``index.select(split=...)``).
            verb: what the command would do (``'evaluate'``, ``'export'``, ``'prepare'``, ...).
            split: the split the command was asked for (named in the message), or ``None``.
            what: the kind of images wanted (``'images'``, ``'foregrounds (images with a mask)'``).

        >>> DatasetIndex.empty("/data").require_images(DatasetIndex.empty("/data"), "export")
        Traceback (most recent call last):
        ...
        bgsynth.errors.EmptyInputError: <in-memory index>: no images to export: the index is empty
        """
        if len(selected) > 0:
            return
        where = self._where()
        if len(self) == 0:
            raise EmptyInputError(f"{where}: no {what} to {verb}: the index is empty")
        present = sorted({str(im.get("split")) for im in self.data["images"]})
        in_split = "" if split is None else f" in split {split!r}"
        raise EmptyInputError(f"{where}: no {what} to {verb}{in_split}; the index holds {len(self)} images, "
                              f"splits present: {present}")

    def select(
        self,
        split: str | Sequence[str] | None = None,
        classes: Sequence[int] | None = None,
        per_class: int | None = None,
        seed: int = 0,
        ids: Iterable[int] | None = None,
        require_mask: bool = False,
    ) -> "DatasetIndex":
        """A new index restricted to a subset (rejects and info are kept).

        Args:
            split: keep only these split names.
            classes: keep only these class ids.
            per_class: keep at most N images per class, chosen uniformly with ``seed`` (balanced subset).
            seed: seed of the per-class choice; the choice depends only on (seed, class, the candidate ids).
            ids: keep only these image ids.
            require_mask: keep only images that carry a mask.
        """
        keep = self.ids
        if ids is not None:
            wanted = {int(i) for i in ids}
            keep = [i for i in keep if i in wanted]
        if split is not None:
            splits = {split} if isinstance(split, str) else set(split)
            keep = [i for i in keep if self._images[i].get("split") in splits]
        if classes is not None:
            cls = {int(c) for c in classes}
            keep = [i for i in keep if self._images[i]["label"] in cls]
        if require_mask:
            keep = [i for i in keep if any(a.get("segmentation") is not None for a in self._anns.get(i, ()))]
        if per_class is not None:
            by_class: dict[int, list[int]] = collections.defaultdict(list)
            for i in keep:
                by_class[self._images[i]["label"]].append(i)
            chosen: list[int] = []
            for c, members in sorted(by_class.items()):
                rng = np.random.default_rng([int(seed), int(c)])
                members = sorted(members)
                if len(members) > per_class:
                    pick = rng.choice(len(members), size=per_class, replace=False)
                    members = [members[j] for j in sorted(pick)]
                chosen.extend(members)
            keep = sorted(chosen)
        keep_set = set(keep)
        data = {k: v for k, v in self.data.items() if k not in ("images", "annotations")}
        data = copy.deepcopy(data)
        data["images"] = [copy.deepcopy(self._images[i]) for i in keep]
        data["annotations"] = [copy.deepcopy(a) for a in self.data["annotations"] if int(a["image_id"]) in keep_set]
        return DatasetIndex(data, self.path)

    # ---------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict:
        """Counts: images per split and class, images with masks per source, rejects and skips per reason."""
        per_split: collections.Counter = collections.Counter()
        per_class: collections.Counter = collections.Counter()
        for im in self._images.values():
            per_split[im.get("split", "")] += 1
            per_class[im["label"]] += 1
        masks: collections.Counter = collections.Counter()
        for i in self._images:
            srcs = {a.get("mask_source") for a in self._anns.get(i, ()) if a.get("segmentation") is not None}
            masks[next(iter(srcs)) if srcs else "none"] += 1
        rejects = collections.Counter(r["reason"] for r in self.rejects)
        return {
            "images": len(self),
            "per_split": dict(sorted(per_split.items())),
            "per_class": {c: per_class.get(k, 0) for k, c in enumerate(self.label_space.classes)},
            "masks": dict(sorted(masks.items())),
            "rejects": dict(sorted(rejects.items())),
            "skipped": dict(self.data["info"].get("skipped", {})),
        }

    def __repr__(self) -> str:
        return f"DatasetIndex({self._where()}, images={len(self)}, rejects={len(self.rejects)})"


def require_index(index: Any, owner: str, *, load_paths: bool = False) -> DatasetIndex:
    """The :class:`DatasetIndex` a public function was given (the one check of every consumer).

    Args:
        index: a loaded index, or (with ``load_paths``) the path of one, loaded here.
        owner: the function's name, for the error.
        load_paths: accept a path (the training entry points); elsewhere an index is loaded once, by the caller.

    Raises:
        ConfigError: anything else, naming ``owner`` and how to load an index once.
    """
    is_path = isinstance(index, (str, bytes)) or hasattr(index, "__fspath__")
    if is_path and load_paths:
        return DatasetIndex.load(index)
    if not isinstance(index, DatasetIndex):
        got = f"the path {os.fsdecode(index)!r}" if is_path else type(index).__name__
        raise ConfigError(f"{owner}: expected a DatasetIndex, got {got}; load the index file once with "
                          f"bgsynth.index.DatasetIndex.load(path) and pass the index")
    return index
