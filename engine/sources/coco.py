"""Ingest of any COCO-format instance-mask JSON into a :class:`~bgsynth.index.DatasetIndex`.

The masks may come from COCO itself or from a segmentation model: polygons, uncompressed or compressed RLE
(decoded with :mod:`pycocotools.mask`). The label space (``label_space``, CLI ``--label-space``):

* ``"in9"`` (default): the user says which source categories are which IN-9 class with a category map;
  annotations of categories outside the map are skipped and counted;
* ``"coco"``: the JSON's own categories are the classes (no map): class ``k`` is the category with the ``k``-th
  smallest id, named by its ``name`` (``info.source.category_ids`` keeps the original ids).

Category map forms (``category_map``):

* a dict ``{source category: IN-9 class}``;
* a JSON file holding such an object;
* a text file with one ``source category = IN-9 class`` per line (``#`` comments allowed).

A source category is its ``name`` or its numeric ``id`` (names are matched first); an IN-9 class is its id
(``0``..``8``), its name (``"dog"``, ``"wheeled vehicle"``) or its release folder (``"02_wheeled vehicle"``).

Each image's label is the class with the largest mapped mask area (ties: the smaller class id); its annotations of
that class become the index annotations (``mask_source='external'`` unless told otherwise). An image whose
``file_name`` an index cannot hold (absolute, or with a ``..`` component, :func:`bgsynth.index.check_file_name`) is
a ``bad_file_name`` reject.

**Boxes** (``box_from``, CLI ``--box-from``). The box is what the selection filters and Only-BG-B use, so it
matters which one is recorded:

* ``box_from="bbox"`` (default): each annotation's COCO ``bbox`` ``[x, y, w, h]`` **is** the box, as in COCO. It
  is kept as given (a fractional one is rounded to whole pixels as everywhere in the index:
  :func:`~bgsynth.index.bbox_to_inclusive`); a bbox that sticks out of the image is clipped to it (as
  :func:`bgsynth.masks.prepare` clips boxes), and one with no pixel inside the image is a reject
  (:attr:`Reject.BOX_OUTSIDE_IMAGE`). The tight box of the decoded mask is used instead only when the
  annotation has no usable ``bbox``: missing, not four finite numbers, or ``w <= 0`` / ``h <= 0`` (counted in
  ``info.source.boxes.mask_fallback``).
* ``box_from="mask"``: every box is the tight box (extent) of the annotation's decoded mask, whatever its ``bbox``.

Each index annotation records where its box came from in ``box_source`` (``"bbox"``, ``"mask"`` or
``"mask_fallback"``), and ``info.source.boxes`` counts them (plus ``clipped`` bboxes).

**Box/mask agreement** (with ``box_from="bbox"``). A bbox that disagrees grossly with its own mask is a recorded
reject: when less than ``min_mask_inside`` (default :data:`MIN_MASK_INSIDE_BOX` = 0.5, i.e. 50%) of the
annotation's mask pixels lie inside its (clipped) bbox, the image is not indexed and ``rejects[]`` gets
``{"path": file_name, "reason": "box_mask_mismatch", "detail": "annotation <id>: <fraction> of its mask ...
lies inside its bbox ..., the mask fills <fraction> of the bbox"}``. Exactly 50% inside passes. Only the
annotations that become index annotations (those of the image's label) are checked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from ..classes import IN9, IN9_CLASSES, IN9_FOLDERS, NUM_IN9, LabelSpace
from ..index import (
    MASK_SOURCES,
    DatasetIndex,
    Reject,
    bbox_to_inclusive,
    inclusive_to_bbox,
    mask_extent,
    rle_encode,
)
from ..probe import VERIFY_MODES, probe_file
from ._probe import IngestError, reject_bad_name, run_pool, summarize_rejects, with_options

__all__ = ["ingest_coco", "CocoIngestConfig", "read_category_map", "decode_segmentation", "BOX_SOURCES",
           "MIN_MASK_INSIDE_BOX", "LABEL_SPACES", "coco_label_space"]

UNMAPPED_CATEGORY = "unmapped_category_annotations"
NO_MAPPED_CATEGORY = "images_without_mapped_category"
EMPTY_MASK = "empty_mask_annotations"

#: Where the index boxes come from: the annotations' COCO ``bbox`` (default) or the tight box of their masks.
BOX_SOURCES = ("bbox", "mask")
#: A bbox with less than this fraction of its annotation's mask pixels inside is a ``box_mask_mismatch`` reject.
MIN_MASK_INSIDE_BOX = 0.5
#: the classes of a COCO ingest: IN-9 through a category map, or the JSON's own categories
LABEL_SPACES = ("in9", "coco")


def _in9_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise IngestError(f"{where}: expected an IN-9 class, got {value!r}")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
        v = int(value)
        if 0 <= v < NUM_IN9:
            return v
        raise IngestError(f"{where}: expected an IN-9 class id 0..{NUM_IN9 - 1}, got {v}")
    if isinstance(value, str):
        v = value.strip()
        if v in IN9_CLASSES:
            return IN9_CLASSES.index(v)
        if v in IN9_FOLDERS:
            return IN9_FOLDERS.index(v)
    raise IngestError(f"{where}: expected an IN-9 class id, name {IN9_CLASSES} or folder, got {value!r}")


def read_category_map(spec: Mapping | str | os.PathLike) -> dict[str, int]:
    """Normalise a category map (dict, JSON file or ``name=id`` text file) to ``{source key: IN-9 id}``.

    Raises:
        IngestError: naming the file (and line) on anything it cannot read.

    >>> read_category_map({"dog": "dog", "18": 0, "bird": 1})
    {'dog': 0, '18': 0, 'bird': 1}
    """
    if isinstance(spec, Mapping):
        return {str(k).strip(): _in9_id(v, f"category map entry {k!r}") for k, v in spec.items()}
    path = pathlib.Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"category map {path}: cannot read ({e})") from e
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise IngestError(f"category map {path}: invalid JSON ({e})") from e
        return {str(k).strip(): _in9_id(v, f"category map {path}, entry {k!r}") for k, v in obj.items()}
    out: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise IngestError(f"category map {path}, line {lineno}: expected 'category = IN-9 class', got {line!r}")
        key, value = line.rsplit("=", 1)
        out[key.strip()] = _in9_id(value, f"category map {path}, line {lineno}")
    if not out:
        raise IngestError(f"category map {path}: no entries")
    return out


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE) to ``uint8 [H, W]`` 0/1.

    Raises:
        ValueError: when the segmentation is malformed or its RLE size differs from ``(height, width)``.
    """
    from pycocotools import mask as mask_utils  # pycocotools: imported by the ingest that needs it

    if isinstance(seg, list):
        if not seg:
            return np.zeros((height, width), np.uint8)
        polys = [list(map(float, p)) for p in seg]
        if any(len(p) < 6 or len(p) % 2 for p in polys):
            raise ValueError("polygon with fewer than 3 points or an odd number of coordinates")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg, Mapping) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        counts = seg["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(dict(seg), height, width)
        else:
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"expected polygons or an RLE dict, got {type(seg).__name__}")
    m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    return np.ascontiguousarray(m, np.uint8)


def _parse_bbox(bbox: Any) -> tuple[int, int, int, int] | None:
    """A COCO ``[x, y, w, h]`` -> inclusive integer box, or ``None`` when missing, malformed or empty."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) for v in bbox):
        return None
    if bbox[2] <= 0 or bbox[3] <= 0:
        return None
    return bbox_to_inclusive(bbox)


def _choose_box(ann_id: Any, bbox: Any, m: np.ndarray, box_from: str, min_inside: float) -> dict:
    """The index box of one annotation: ``{"box", "source", "clipped"}`` or ``{"reason", "detail"}``."""
    height, width = m.shape
    parsed = None if box_from == "mask" else _parse_bbox(bbox)
    if parsed is None:
        return {"box": mask_extent(m), "source": "mask" if box_from == "mask" else "mask_fallback",
                "clipped": False}
    x0, y0, x1, y1 = parsed
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    if cx1 < cx0 or cy1 < cy0:
        return {"reason": Reject.BOX_OUTSIDE_IMAGE,
                "detail": f"annotation {ann_id}: bbox {list(bbox)} has no pixel inside the {width}x{height} image"}
    total = int(np.count_nonzero(m))
    inside = int(np.count_nonzero(m[cy0 : cy1 + 1, cx0 : cx1 + 1]))
    frac = inside / total
    if frac < min_inside:
        box_area = (cx1 - cx0 + 1) * (cy1 - cy0 + 1)
        return {"reason": Reject.BOX_MASK_MISMATCH,
                "detail": f"annotation {ann_id}: {frac:.1%} of its mask ({inside} of {total} pixels) lies inside its "
                          f"bbox {list(bbox)} (at least {min_inside:.0%} required); the mask fills "
                          f"{inside / box_area:.1%} of the bbox; its tight mask box is "
                          f"{inclusive_to_bbox(mask_extent(m))} (use --box-from mask to take it)"}
    return {"box": (cx0, cy0, cx1, cy1), "source": "bbox", "clipped": (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)}


def _coco_task(task: tuple) -> dict:
    img_path, rel, width, height, anns, verify, box_from, min_inside = task
    pr = probe_file(img_path, verify)
    if not pr.ok:
        return {"rel": rel, "reason": pr.reason, "detail": pr.detail}
    if (pr.width, pr.height) != (width, height):
        return {"rel": rel, "reason": Reject.SIZE_MISMATCH,
                "detail": f"the COCO JSON says {width}x{height}, the image is {pr.width}x{pr.height}"}
    decoded = []
    empty = 0
    for ann_id, label, seg, bbox in anns:
        try:
            m = decode_segmentation(seg, height, width)
        except (ValueError, TypeError, KeyError) as e:
            return {"rel": rel, "reason": Reject.BAD_ANNOTATION, "detail": f"annotation {ann_id}: {e}"}
        if not m.any():
            empty += 1
            continue
        decoded.append((label, m, ann_id, bbox))
    if not decoded:
        return {"rel": rel, "reason": Reject.NO_OBJECT, "detail": "every mapped annotation has an empty mask",
                "empty": empty}
    area = collections.Counter()
    for label, m, _id, _bbox in decoded:
        area[label] += int(m.sum())
    label = max(sorted(area), key=lambda k: area[k])  # ties: the smaller class id
    out_anns = []
    for lab, m, ann_id, bbox in decoded:
        if lab != label:
            continue
        chosen = _choose_box(ann_id, bbox, m, box_from, min_inside)
        if "reason" in chosen:
            return {"rel": rel, "reason": chosen["reason"], "detail": chosen["detail"], "empty": empty}
        out_anns.append({"bbox": inclusive_to_bbox(chosen["box"]), "segmentation": rle_encode(m),
                         "area": float(m.sum()), "box_source": chosen["source"], "_clipped": chosen["clipped"]})
    return {"rel": rel, "reason": None, "probe": pr.entry_fields(), "label": label, "anns": out_anns,
            "empty": empty}


@dataclasses.dataclass(frozen=True)
class CocoIngestConfig:
    """The COCO ingest's settings.

    Attributes:
        split: split name recorded for every image.
        mask_source: provenance recorded on the masks (one of :data:`bgsynth.index.MASK_SOURCES`).
        box_from: ``"bbox"`` (default): the annotations' COCO ``bbox`` is the box (clipped to the image; the
            mask's tight box only where ``bbox`` is missing, malformed or empty); ``"mask"``: the tight box of each
            mask. See the module docstring.
        min_mask_inside: with ``box_from="bbox"``, an annotation with less than this fraction of its mask pixels
            inside its bbox makes its image a ``box_mask_mismatch`` reject (default 0.5; 0 switches it off).
        workers: probing processes (default: CPU count).
        verify: ``'full'`` or ``'header'`` image verification.
        progress: show a progress bar.
        label_space: ``"in9"`` (through the category map) or ``"coco"`` (the JSON's own categories, no map).
    """

    split: str = "val"
    mask_source: str = "external"
    box_from: str = "bbox"
    min_mask_inside: float = MIN_MASK_INSIDE_BOX
    workers: int | None = None
    verify: str = "full"
    progress: bool = True
    label_space: str = "in9"

    def __post_init__(self):
        if self.label_space not in LABEL_SPACES:
            raise IngestError(f"COCO ingest: expected label_space in {LABEL_SPACES}, got {self.label_space!r}")
        if self.box_from not in BOX_SOURCES:
            raise IngestError(f"COCO ingest: expected box_from in {BOX_SOURCES}, got {self.box_from!r}")
        v = self.min_mask_inside
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise IngestError(f"COCO ingest: expected min_mask_inside in [0, 1], got {v!r}")
        if self.verify not in VERIFY_MODES:
            raise IngestError(f"COCO ingest: expected verify in {VERIFY_MODES}, got {self.verify!r}")
        if self.mask_source not in MASK_SOURCES:
            raise IngestError(f"COCO ingest: expected mask_source in {MASK_SOURCES}, got {self.mask_source!r}")


def _load_coco(annotations: str | os.PathLike | Mapping):
    """The annotations as a ``pycocotools`` COCO object, and how to name them in messages."""
    from pycocotools.coco import COCO  # pycocotools: imported by the ingest that needs it

    where = "<dict>" if isinstance(annotations, Mapping) else str(annotations)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            if isinstance(annotations, Mapping):
                coco = COCO()
                coco.dataset = dict(annotations)
                coco.createIndex()
            else:
                coco = COCO(str(annotations))
    except FileNotFoundError as e:
        raise IngestError(f"COCO ingest: annotation file {where} not found") from e
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise IngestError(f"COCO ingest: {where} is not a readable COCO JSON ({type(e).__name__}: {e})") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise IngestError(f"COCO ingest: {where}: expected a list under '{key}'")
    return coco, where


def _category_labels(categories: list[dict], cmap: Mapping[str, int], where: str) -> tuple[dict[int, int], list[str]]:
    """Source category id -> IN-9 label (by name first, then by id), and the map keys no category has."""
    cat_label: dict[int, int] = {}
    for cat in categories:
        name, cid = str(cat.get("name", "")), cat.get("id")
        if name in cmap:
            cat_label[cid] = cmap[name]
        elif str(cid) in cmap:
            cat_label[cid] = cmap[str(cid)]
    known = {str(c.get("name")) for c in categories} | {str(c.get("id")) for c in categories}
    if not cat_label:
        raise IngestError(
            f"COCO ingest: no category of {where} is in the category map (map keys: {sorted(cmap)[:10]}; "
            f"categories: {[c.get('name') for c in categories][:10]})"
        )
    return cat_label, sorted(k for k in cmap if k not in known)


def coco_label_space(categories: list[dict], where: str) -> tuple[LabelSpace, dict[Any, int]]:
    """The JSON's own categories as a label space (class ``k``: the category with the ``k``-th smallest id) and the
    source category id -> class id map.

    Raises:
        IngestError: no categories, or names that are missing or not unique.

    >>> ls, ids = coco_label_space([{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}], "x.json")
    >>> ls.classes, ids
    (('person', 'dog'), {1: 0, 18: 1})
    """
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise IngestError(f"COCO ingest: {where}: every category needs an integer 'id' ({type(e).__name__}: {e})") from e
    names = [str(c.get("name") or "").strip() for c in cats]
    dup = sorted({n for n in names if names.count(n) > 1 or not n})
    if not cats or dup:
        raise IngestError(f"COCO ingest: {where}: expected categories with unique, non-empty names to use as the label "
                          f"space, got {'none' if not cats else f'repeated or empty names {dup[:5]}'}")
    return LabelSpace("coco", tuple(names)), {c["id"]: k for k, c in enumerate(cats)}


def _coco_tasks(coco, cat_label: Mapping[int, int], root: pathlib.Path, config: CocoIngestConfig,
                index: DatasetIndex) -> tuple[list[tuple], list]:
    """One probe task per image with a mapped annotation (the others are counted or rejected in ``index``)."""
    tasks, src_ids = [], []
    for im in sorted(coco.dataset["images"], key=lambda d: d.get("id", 0)):
        anns = coco.imgToAnns.get(im.get("id"), [])
        mapped = [(a.get("id"), cat_label[a["category_id"]], a.get("segmentation"), a.get("bbox")) for a in anns
                  if a.get("category_id") in cat_label]
        unmapped = len(anns) - len(mapped)
        if unmapped:
            index.count_skipped(UNMAPPED_CATEGORY, unmapped)
        if not mapped:
            index.count_skipped(NO_MAPPED_CATEGORY)
            continue
        fn = str(im.get("file_name", ""))
        try:
            w, h = int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            index.add_reject(fn, Reject.BAD_ANNOTATION, f"image entry {im.get('id')} lacks width/height")
            continue
        if reject_bad_name(index, fn, f"image entry {im.get('id')}: "):
            continue
        tasks.append((str(root / fn), fn, w, h, mapped, config.verify, config.box_from, float(config.min_mask_inside)))
        src_ids.append(im.get("id"))
    return tasks, src_ids


def _add_results(index: DatasetIndex, src_ids: list, results: list[dict], config: CocoIngestConfig) -> None:
    """The probed images (or their rejects) into ``index``, with the box sources and empty masks counted."""
    empty = 0
    boxes = collections.Counter({"bbox": 0, "mask": 0, "mask_fallback": 0, "clipped": 0})
    for src_id, res in zip(src_ids, results):
        empty += int(res.get("empty", 0))
        if res["reason"] is not None:
            index.add_reject(res["rel"], res["reason"], res["detail"])
            continue
        entry = {"file_name": res["rel"], "label": res["label"], "split": config.split, "wnid": None,
                 "in1k_class": None, "source_id": src_id}
        entry.update(res["probe"])
        anns = []
        for a in res["anns"]:
            a = dict(a, category_id=res["label"], mask_source=config.mask_source)
            boxes[a["box_source"]] += 1
            boxes["clipped"] += int(a.pop("_clipped"))
            anns.append(a)
        index.add_image(entry, anns)
    index.data["info"]["source"]["boxes"] = dict(boxes)
    if empty:
        index.count_skipped(EMPTY_MASK, empty)


def _read_map(config: CocoIngestConfig, category_map) -> dict[str, int] | None:
    """The normalised category map of an IN-9 ingest (checked before the JSON is read); ``None`` for ``'coco'``."""
    if config.label_space == "coco":
        if category_map is not None:
            raise IngestError("COCO ingest: label_space='coco' takes the JSON's own categories as the classes; "
                              "give no category map (or label_space='in9' to map categories onto IN-9)")
        return None
    if category_map is None:
        raise IngestError("COCO ingest: label_space='in9' needs a category map (category -> IN-9 class); or use "
                          "label_space='coco' (--label-space coco) to keep the JSON's own categories")
    return read_category_map(category_map)


def _labels(cmap: dict[str, int] | None, categories: list[dict], where: str
            ) -> tuple[LabelSpace, dict[Any, int], dict]:
    """The label space, the source category id -> class id map and what ``info.source`` records about them."""
    if cmap is None:
        space, cat_label = coco_label_space(categories, where)
        return space, cat_label, {"category_ids": [c for c, _k in sorted(cat_label.items(), key=lambda t: t[1])]}
    cat_label, missing = _category_labels(categories, cmap, where)
    return IN9, cat_label, {"category_map": {str(k): v for k, v in cmap.items()}, "unknown_map_keys": missing}


def ingest_coco(
    annotations: str | os.PathLike | Mapping,
    images_root: str | os.PathLike,
    category_map: Mapping | str | os.PathLike | None = None,
    config: CocoIngestConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    **options,
) -> DatasetIndex:
    """Index a COCO-format instance-mask dataset, its categories mapped onto IN-9 or kept as the label space.

    Args:
        annotations: the COCO JSON file (or its already-loaded dict).
        images_root: folder that the images' ``file_name`` fields are relative to.
        category_map: source category (name or id) -> IN-9 class (see the module docstring); required with
            ``label_space="in9"``, not allowed with ``"coco"``.
        config: the ingest's settings (:class:`CocoIngestConfig`: split, mask_source, box_from, min_mask_inside,
            workers, verify, progress, label_space).
        out: if given, the index is also saved there.
        **options: :class:`CocoIngestConfig` fields by name, overriding ``config``.

    Returns:
        The :class:`~bgsynth.index.DatasetIndex` (image ids follow the source image ids' order); with
        ``label_space="coco"`` its ``info.label_space`` and ``categories[]`` are the JSON's categories.

    Raises:
        IngestError: unreadable JSON, bad or missing category map, bad option, or nothing valid remaining.
    """
    config = with_options("COCO ingest", config, CocoIngestConfig, options)
    root = pathlib.Path(images_root).expanduser()
    if not root.is_dir():
        raise IngestError(f"COCO ingest: images root {root} is not a folder")
    cmap = _read_map(config, category_map)
    coco, where = _load_coco(annotations)
    space, cat_label, about = _labels(cmap, coco.dataset["categories"], where)
    index = DatasetIndex.empty(image_root=str(root.resolve()), description=f"COCO masks from {where}",
                               label_space=space)
    index.data["info"]["source"] = {"kind": "coco", "annotations": where, "images_root": str(root),
                                    "label_space": config.label_space, **about, "box_from": config.box_from,
                                    "min_mask_inside": float(config.min_mask_inside)}
    tasks, src_ids = _coco_tasks(coco, cat_label, root, config, index)
    results = run_pool(_coco_task, tasks, config.workers, desc="ingest coco", progress=config.progress)
    _add_results(index, src_ids, results, config)
    if len(index) == 0:
        raise IngestError(
            f"COCO ingest: nothing valid under {root} ({len(tasks)} candidate images; "
            f"rejects: {summarize_rejects(index.rejects)}; skipped: {index.data['info'].get('skipped') or 'none'})"
        )
    if out is not None:
        index.save(out)
    return index
