"""Ingest of ImageNet folders with ILSVRC bounding-box XML into a :class:`~bgsynth.index.DatasetIndex`.

Accepted image layouts:

* **class folders** (train, and val re-arranged by class): ``<images_root>/<wnid>/<file>`` with image files
  ending in ``.JPEG``/``.jpeg``/``.jpg``/``.png`` (any case);
* **flat folder + labels file** (the official val layout): ``<images_root>/<file>`` with ``labels_file``.

Labels file format (one image per line; blank lines and lines starting with ``#`` are ignored; a first line
that does not parse, such as a CSV header, is skipped): two fields separated by whitespace or a comma,

* ``<file> <wnid>`` e.g. ``ILSVRC2012_val_00000001.JPEG n01751748``, or
* ``<file> <index>`` with the 0-based ImageNet-1k class index in the standard sorted-wnid order (the Caffe
  ``val.txt`` convention), e.g. ``ILSVRC2012_val_00000001.JPEG 65``.

The file may be given with or without its extension (``ILSVRC2012_val_00000001``), so Kaggle's
``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first token is the wnid) works as is. The devkit's
``ILSVRC2012_validation_ground_truth.txt`` (indices only, in the devkit's own class order) is not accepted:
convert it to one of the forms above.

Accepted annotation layouts (``annotations_root``): ``<ann>/<wnid>/<stem>.xml`` (train) and ``<ann>/<stem>.xml``
(val), tried in that order. Coordinates are 0-based pixel indices in stored-pixel coordinates, ``xmax``/``ymax``
inclusive. A maximum equal to the image width/height (a 1-based file) is clamped to the last pixel; anything
further outside is a reject.

Each class folder's wnid maps to its ImageNet-1k index (timm's metadata). The label space (``label_space``, CLI
``--label-space``) says what the index's classes are:

* ``"in9"`` (default): the wnid maps on to IN-9; images of classes that map to no IN-9 class are counted in
  ``info.skipped['unmapped_class']`` and not indexed (nor probed);
* ``"in1k"``: all 1000 ImageNet-1k classes, label = class index in the standard sorted-wnid order, class names
  the wnids (:func:`in1k_label_space`); ``bgsynth prepare`` then runs GrabCut on them as on IN-9.

Every candidate image is probed (in a process pool for long jobs); bad input becomes a reject with its path
(relative to ``images_root``), reason and detail, and the ingest goes on. A file name that the index could not
hold (:func:`bgsynth.index.check_file_name`: absolute, or with a ``..`` component such as ``a\\..\\..\\b.JPEG``) is
a reject too, never an index that later fails to load.
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
import xml.etree.ElementTree as ET
from typing import Any

from ..classes import IN9, LabelSpace, in1k_wnids, wnid_to_in1k, wnid_to_in9
from ..index import DatasetIndex, Reject, inclusive_to_bbox
from ..probe import VERIFY_MODES, probe_file
from ._probe import IngestError, reject_bad_name, run_pool, summarize_rejects

__all__ = ["IMAGE_EXTENSIONS", "LABEL_SPACES", "ingest_imagenet", "in1k_label_space", "parse_voc_xml",
           "read_labels_file", "no_images_error"]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_WNID = re.compile(r"^n\d{8}$")
UNKNOWN_CLASS = "unknown_class"
NO_LABEL = "no_label"
#: what an ImageNet ingest's classes are: the 9 IN-9 superclasses, or all 1000 ImageNet-1k classes
LABEL_SPACES = ("in9", "in1k")


def in1k_label_space() -> LabelSpace:
    """The 1000 ImageNet-1k classes as a label space: class ``k`` is the ``k``-th wnid in the standard sorted order.

    The class names are the wnids (unique, unlike ImageNet's lemmas: there are two "crane" and two "maillot"
    classes), so the export folders are ``000_n01440764`` ... ``999_n15075141``.
    """
    return LabelSpace("in1k", in1k_wnids())


def no_images_error(kind: str, root: pathlib.Path, where: str = "") -> IngestError:
    """The one-line error of an ingest that found no image file to index under ``root`` (``where``: in which
    sub-folders it looked).

    >>> str(no_images_error("ImageNet", pathlib.Path("/data/empty")))
    'ImageNet ingest: /data/empty: no image files (*.jpeg, *.jpg, *.png, any case) found; check the path'
    """
    exts = ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS)
    return IngestError(f"{kind} ingest: {root}: no image files ({exts}, any case) found{where}; check the path")


class _AnnotationProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_voc_xml(path: str | os.PathLike) -> dict:
    """Parse an ILSVRC/VOC annotation.

    Args:
        path: the XML file.

    Returns:
        ``{"width": int | None, "height": int | None, "objects": [(name, (xmin, ymin, xmax, ymax)), ...]}``
        with integer coordinates as written.

    Raises:
        _AnnotationProblem: (internal) with :attr:`Reject.MISSING_ANNOTATION` or :attr:`Reject.BAD_ANNOTATION`.
    """
    path = str(path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise _AnnotationProblem(Reject.MISSING_ANNOTATION, f"annotation {path} not found") from None
    except (ET.ParseError, OSError, UnicodeDecodeError) as e:
        raise _AnnotationProblem(Reject.BAD_ANNOTATION, f"annotation {path} is not valid XML: {e}") from None
    root = tree.getroot()
    if root.tag != "annotation":
        raise _AnnotationProblem(Reject.BAD_ANNOTATION, f"annotation {path}: expected <annotation>, got <{root.tag}>")

    def num(node, tag: str, where: str) -> int:
        el = node.find(tag)
        if el is None or el.text is None or not el.text.strip():
            raise _AnnotationProblem(Reject.BAD_ANNOTATION, f"annotation {path}: {where}<{tag}> is missing")
        try:
            return int(round(float(el.text.strip())))
        except ValueError:
            raise _AnnotationProblem(
                Reject.BAD_ANNOTATION, f"annotation {path}: {where}<{tag}> expected a number, got {el.text.strip()!r}"
            ) from None

    size = root.find("size")
    width = height = None
    if size is not None:
        width, height = num(size, "width", "size/"), num(size, "height", "size/")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        bb = obj.find("bndbox")
        if bb is None:
            raise _AnnotationProblem(Reject.BAD_ANNOTATION, f"annotation {path}: object {i} has no <bndbox>")
        name_el = obj.find("name")
        name = name_el.text.strip() if name_el is not None and name_el.text else ""
        where = f"object {i} bndbox/"
        objects.append((name, tuple(num(bb, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))))
    return {"width": width, "height": height, "objects": objects}


def _check_boxes(objects: list, width: int, height: int, xml_path: str) -> list[tuple[int, int, int, int]]:
    boxes = []
    for i, (_name, (x0, y0, x1, y1)) in enumerate(objects):
        # a 1-based file ends exactly one past the last pixel: clamp that, reject anything further out
        x1 = width - 1 if x1 == width else x1
        y1 = height - 1 if y1 == height else y1
        if x1 < x0 or y1 < y0:
            raise _AnnotationProblem(Reject.EMPTY_BOX, f"{xml_path}: object {i} box {(x0, y0, x1, y1)} is empty")
        if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
            raise _AnnotationProblem(
                Reject.BOX_OUTSIDE_IMAGE,
                f"{xml_path}: object {i} box {(x0, y0, x1, y1)} is outside the {width}x{height} image",
            )
        boxes.append((x0, y0, x1, y1))
    return boxes


def _probe_task(task: tuple) -> dict:
    """Worker: probe one image and its annotation. Never raises for bad input."""
    img_path, rel, xml_candidates, verify = task
    pr = probe_file(img_path, verify)
    if not pr.ok:
        return {"rel": rel, "reason": pr.reason, "detail": pr.detail}
    out: dict[str, Any] = {"rel": rel, "reason": None, "probe": pr.entry_fields(), "boxes": None}
    if xml_candidates is None:  # indexing without annotations
        return out
    xml_path = next((p for p in xml_candidates if os.path.isfile(p)), None)
    if xml_path is None:
        return {"rel": rel, "reason": Reject.MISSING_ANNOTATION,
                "detail": f"no annotation found (looked for {' and '.join(xml_candidates)})"}
    try:
        ann = parse_voc_xml(xml_path)
        if ann["width"] is None:
            raise _AnnotationProblem(Reject.BAD_ANNOTATION, f"annotation {xml_path}: <size> is missing")
        if (ann["width"], ann["height"]) != (pr.width, pr.height):
            extra = ""
            if pr.exif_orientation in (5, 6, 7, 8) and (ann["width"], ann["height"]) == (pr.height, pr.width):
                extra = " (it matches the EXIF-rotated size; boxes must be in stored-pixel coordinates)"
            raise _AnnotationProblem(
                Reject.SIZE_MISMATCH,
                f"{xml_path} says {ann['width']}x{ann['height']}, the image is {pr.width}x{pr.height}{extra}",
            )
        if not ann["objects"]:
            raise _AnnotationProblem(Reject.NO_OBJECT, f"{xml_path} has no <object>")
        out["boxes"] = _check_boxes(ann["objects"], pr.width, pr.height, xml_path)
    except _AnnotationProblem as e:
        return {"rel": rel, "reason": e.reason, "detail": e.detail}
    return out


def read_labels_file(path: str | os.PathLike) -> dict[str, str]:
    """Read a val labels file (see the module docstring) into ``{file or stem: wnid}``.

    Raises:
        IngestError: naming the file and line when a line cannot be parsed or a class is unknown.
    """
    path = pathlib.Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"labels file {path}: cannot read ({e})") from e
    wnids = in1k_wnids()
    out: dict[str, str] = {}
    first = True
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [f for f in re.split(r"[,\s]+", text) if f]
        ok = len(fields) >= 2
        label = None
        if ok:
            tok = fields[1]
            if _WNID.match(tok):
                label = tok
            elif tok.isdigit() and int(tok) < len(wnids):
                label = wnids[int(tok)]
        if label is None:
            if first:  # a header line such as "ImageId,PredictionString"
                first = False
                continue
            raise IngestError(
                f"labels file {path}, line {lineno}: expected '<file> <wnid>' or '<file> <class index 0..999>', "
                f"got {text[:80]!r}"
            )
        first = False
        out[fields[0]] = label
    if not out:
        raise IngestError(f"labels file {path}: no labelled image found")
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _labelled_candidates(root: pathlib.Path, labels_file, index: DatasetIndex) -> list[tuple[str, str]]:
    """``(file, wnid)`` of a flat folder with a labels file; listed files that are missing become rejects."""
    labels = read_labels_file(labels_file)
    on_disk = {}
    for entry in os.scandir(root):
        if entry.is_file() and _is_image(entry.name):
            on_disk[entry.name] = entry.name
            on_disk.setdefault(os.path.splitext(entry.name)[0], entry.name)
    if not on_disk:
        raise no_images_error("ImageNet", root)
    used = set()
    candidates = []
    for key, wnid in labels.items():
        if reject_bad_name(index, key, f"listed in {labels_file}: "):
            continue
        name = on_disk.get(key) or on_disk.get(os.path.splitext(key)[0])
        if name is None:
            index.add_reject(key, Reject.MISSING_FILE, f"listed in {labels_file} but not found in {root}")
            continue
        used.add(name)
        candidates.append((name, wnid))
    unlabelled = len({v for v in on_disk.values()} - used)
    if unlabelled:
        index.count_skipped(NO_LABEL, unlabelled)
    return candidates


def _folder_candidates(root: pathlib.Path) -> list[tuple[str, str]]:
    """``(<wnid>/<file>, wnid)`` of class folders (folders that are not ImageNet-1k wnids are warned about)."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    loose = [e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name)]
    if not subdirs and loose:
        raise IngestError(
            f"ImageNet ingest: {root} holds {len(loose)} images but no class folders; "
            f"a flat folder needs labels_file"
        )
    candidates, unknown = [], []
    for wnid in subdirs:
        files = sorted(e.name for e in os.scandir(root / wnid) if e.is_file() and _is_image(e.name))
        candidates.extend((f"{wnid}/{f}", wnid) for f in files)
        if wnid_to_in1k(wnid) is None:
            unknown.append(wnid)
    if not candidates:
        raise no_images_error("ImageNet", root, f" in its {len(subdirs)} class folder(s)" if subdirs else "")
    if unknown:
        warnings.warn(
            f"ImageNet ingest: {len(unknown)} folder(s) of {root} are not ImageNet-1k wnids and are skipped: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
            stacklevel=3,
        )
    return candidates


def _probe_tasks(candidates: list[tuple[str, str]], root: pathlib.Path, ann_root: pathlib.Path | None, verify: str,
                 index: DatasetIndex, label_space: str) -> tuple[list[tuple], list[tuple[str, int, int]]]:
    """One probe task per candidate of a class of the label space (the others are counted in ``index``; a file
    name the index could not hold is a reject), with its ``(wnid, in1k class, label)``."""
    tasks, meta = [], []
    for rel, wnid in sorted(candidates):
        in1k = wnid_to_in1k(wnid)
        if in1k is None:
            index.count_skipped(UNKNOWN_CLASS)
            continue
        label = in1k if label_space == "in1k" else wnid_to_in9(wnid)
        if label is None:
            index.count_skipped(Reject.UNMAPPED_CLASS)
            continue
        if reject_bad_name(index, rel):
            continue
        stem = os.path.splitext(os.path.basename(rel))[0]
        xmls = None
        if ann_root is not None:
            xmls = [str(ann_root / wnid / f"{stem}.xml"), str(ann_root / f"{stem}.xml")]
        tasks.append((str(root / rel), rel, xmls, verify))
        meta.append((wnid, in1k, label))
    return tasks, meta


def _add_probed(index: DatasetIndex, meta: list[tuple[str, int, int]], results: list[dict], split: str) -> None:
    for (wnid, in1k, label), res in zip(meta, results):
        if res["reason"] is not None:
            index.add_reject(res["rel"], res["reason"], res["detail"])
            continue
        entry = {"file_name": res["rel"], "label": label, "split": split, "wnid": wnid, "in1k_class": in1k}
        entry.update(res["probe"])
        anns = [{"bbox": inclusive_to_bbox(b), "category_id": label} for b in (res["boxes"] or [])]
        index.add_image(entry, anns)


def _imagenet_roots(images_root, annotations_root, verify: str, label_space: str
                    ) -> tuple[pathlib.Path, pathlib.Path | None]:
    root = pathlib.Path(images_root).expanduser()
    if not root.is_dir():
        raise IngestError(f"ImageNet ingest: images root {root} is not a folder")
    if verify not in VERIFY_MODES:
        raise IngestError(f"ImageNet ingest: expected verify in {VERIFY_MODES}, got {verify!r}")
    if label_space not in LABEL_SPACES:
        raise IngestError(f"ImageNet ingest: expected label_space in {LABEL_SPACES}, got {label_space!r}")
    ann_root = None if annotations_root is None else pathlib.Path(annotations_root).expanduser()
    if ann_root is not None and not ann_root.is_dir():
        raise IngestError(f"ImageNet ingest: annotations root {ann_root} is not a folder")
    return root, ann_root


# size: the stable keyword API its callers use (the CLI, the built-in generator), one argument per ingest setting
def ingest_imagenet(
    images_root: str | os.PathLike,
    annotations_root: str | os.PathLike | None = None,
    split: str = "train",
    labels_file: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    verify: str = "full",
    progress: bool = True,
    label_space: str = "in9",
) -> DatasetIndex:
    """Index an ImageNet folder (class folders, or a flat folder with a labels file) with its ILSVRC boxes.

    Args:
        images_root: ``<root>`` holding ``<wnid>/<file>`` folders, or the image files themselves (flat).
        annotations_root: folder of ILSVRC XML files (``<ann>/<wnid>/<stem>.xml`` or ``<ann>/<stem>.xml``).
            Without it, images are indexed without boxes (enough for Original-only evaluation).
        split: split name recorded for every image (``'train'``, ``'val'``, ...).
        labels_file: labels of a flat folder (format in the module docstring).
        out: if given, the index is also saved there (atomically).
        workers: probing processes (default: CPU count).
        verify: ``'full'`` (decode every image) or ``'header'`` (header and end marker only; faster).
        progress: show a progress bar.
        label_space: ``"in9"`` (the 9 IN-9 classes; other ImageNet classes are counted, not indexed) or ``"in1k"``
            (all 1000 classes, :func:`in1k_label_space`).

    Returns:
        The :class:`~bgsynth.index.DatasetIndex`; image ids follow the sorted relative paths. Each image entry
        records ``wnid``, ``in1k_class``, ``split``, ``format``, ``mode`` and ``exif_orientation``.

    Raises:
        IngestError: when ``images_root`` does not exist or holds no image file, or when no image could be indexed
            (the message counts the rejects per reason and names the root).

    >>> idx = ingest_imagenet("/data/imagenet/train", "/data/imagenet/bbox/train")   # doctest: +SKIP
    """
    root, ann_root = _imagenet_roots(images_root, annotations_root, verify, label_space)
    space = in1k_label_space() if label_space == "in1k" else IN9
    index = DatasetIndex.empty(image_root=str(root.resolve()), description=f"ImageNet {split} from {root}",
                               label_space=space)
    index.data["info"]["source"] = {"kind": "imagenet", "images_root": str(root), "split": split,
                                    "annotations_root": None if ann_root is None else str(ann_root),
                                    "labels_file": None if labels_file is None else str(labels_file)}
    if labels_file is not None:
        candidates = _labelled_candidates(root, labels_file, index)
    else:
        candidates = _folder_candidates(root)
    tasks, meta = _probe_tasks(candidates, root, ann_root, verify, index, label_space)
    results = run_pool(_probe_task, tasks, workers, desc=f"ingest imagenet {split}", progress=progress)
    _add_probed(index, meta, results, split)
    if len(index) == 0:
        skipped = index.data["info"].get("skipped", {})
        raise IngestError(
            f"ImageNet ingest: nothing valid under {root} ({len(candidates)} image files found; "
            f"rejects: {summarize_rejects(index.rejects)}; skipped: {skipped or 'none'})"
        )
    if out is not None:
        index.save(out)
    return index
