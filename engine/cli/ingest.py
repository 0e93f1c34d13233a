"""``bgsynth ingest imagenet|in9|coco|masks ... --out INDEX.json``: turn a dataset on disk into a dataset index."""

from __future__ import annotations

import argparse
import json

from ._args import HelpFormatter, existing_dir, existing_file, fraction, nonneg_int, out_file, positive_int

__all__ = ["register", "run"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, type=out_file, metavar="INDEX.json", help="where to write the index")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="probing processes (default: all cores; a pool starts only for jobs of more than a second)")
    p.add_argument("--verify", choices=("full", "header"), default="full",
                   help="full: decode every image; header: read headers and end markers only (faster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--show-rejects", type=nonneg_int, default=10, metavar="N", help="list the first N rejects")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _imagenet(sub) -> None:
    im = sub.add_parser(
        "imagenet",
        help="ImageNet class folders (or a flat val folder + labels file) with ILSVRC XML boxes",
        description=(
            "Images in IMAGES/<wnid>/*.JPEG, or a flat folder with --labels-file (lines '<file> <wnid>' or "
            "'<file> <0-based class index>', whitespace or comma separated; a header line is skipped). Boxes from "
            "ILSVRC XML in ANN/<wnid>/<stem>.xml or ANN/<stem>.xml. With --label-space in9 (default) classes "
            "outside IN-9 are counted, not indexed; with in1k every ImageNet-1k class is a class of the index."
        ),
        formatter_class=HelpFormatter,
    )
    im.add_argument("images", type=existing_dir, help="images root")
    im.add_argument("--annotations", type=existing_dir, default=None, help="ILSVRC XML root (without it: no boxes)")
    im.add_argument("--split", default="train", help="split name recorded in the index")
    im.add_argument("--labels-file", type=existing_file, default=None, help="labels of a flat folder")
    im.add_argument("--label-space", choices=("in9", "in1k"), default="in9",
                    help="in9: the 9 IN-9 superclasses; in1k: all 1000 ImageNet-1k classes (class names: wnids)")
    _common(im)


def _in9(sub) -> None:
    in9 = sub.add_parser(
        "in9",
        help="the IN-9 release: ROOT/<variant>/val/<NN_name>/*.JPEG with ROOT/fg_mask/val/<NN_name>/*.npy",
        formatter_class=HelpFormatter,
    )
    in9.add_argument("root", type=existing_dir, help="release root (holds original/, fg_mask/, ...)")
    in9.add_argument("--variant", default="original", help="variant folder to index")
    in9.add_argument("--split", default="val", help="split folder")
    m = in9.add_mutually_exclusive_group()
    m.add_argument("--require-masks", dest="masks", action="store_const", const=True, default=None,
                   help="a missing mask is a reject (default for 'original')")
    m.add_argument("--no-masks", dest="masks", action="store_const", const=False, help="ignore fg_mask")
    _common(in9)


def _coco(sub) -> None:
    co = sub.add_parser(
        "coco",
        help="a COCO instance-mask JSON (polygons or RLE), mapped onto IN-9 or with its own categories",
        description=(
            "--label-space in9 (default) needs --category-map: a JSON object or a text file of 'category = IN-9 "
            "class' lines; categories by name or id, IN-9 classes by id (0-8), name or folder; unmapped categories "
            "are skipped and counted. --label-space coco keeps the JSON's own categories as the classes (no map). "
            "Boxes: each annotation's COCO bbox is the box, as in COCO (clipped to the image; the tight box of its "
            "mask only when the bbox is missing, malformed or empty), unless --box-from mask. A bbox with less "
            "than --min-mask-inside (50%) of its mask's pixels inside it makes the image a 'box_mask_mismatch' "
            "reject."
        ),
        formatter_class=HelpFormatter,
    )
    co.add_argument("annotations", type=existing_file, help="COCO JSON with instance masks")
    co.add_argument("--images", required=True, type=existing_dir, help="folder the file_name fields are relative to")
    co.add_argument("--label-space", choices=("in9", "coco"), default="in9",
                    help="in9: categories mapped onto IN-9 with --category-map; coco: the JSON's own categories")
    co.add_argument("--category-map", type=existing_file, default=None,
                    help="JSON or 'name=id' text file (required with --label-space in9)")
    co.add_argument("--split", default="val", help="split name recorded in the index")
    co.add_argument("--mask-source", default="external", choices=("external", "released", "grabcut", "synthetic"),
                    help="provenance recorded on the masks")
    co.add_argument("--box-from", default="bbox", choices=("bbox", "mask"),
                    help="bbox: the annotation's COCO bbox is the box (mask's tight box only where bbox is missing, "
                         "malformed or empty); mask: the tight box of each decoded mask")
    co.add_argument("--min-mask-inside", type=fraction, default=0.5,
                    help="with --box-from bbox: reject an image (box_mask_mismatch) when less than this fraction "
                         "of an annotation's mask pixels lies inside its bbox (0 switches the check off)")
    _common(co)


def _classes(text: str) -> str:
    """``--classes``: ``'folders'`` or an existing JSON file."""
    return text if text == "folders" else existing_file(text)


def _masks(sub) -> None:
    ma = sub.add_parser(
        "masks",
        help="a folder of images plus a mirrored folder of PNG segmentation masks (ImageNet-S, VOC, CUB)",
        description=(
            "IMAGES/<path>/<stem>.<jpeg|jpg|png> with MASKS/<path>/<stem>.png of the same size. --values says what "
            "the mask's pixel values are: binary (any nonzero pixel is the object), objects (each nonzero value one "
            "object) or classes (each value a class id; the image's label is its largest class). --classes says "
            "where the classes come from: folders (IMAGES/<class>/..., with binary/objects) or a JSON map: "
            "{image: class} with binary/objects, or the class of each mask value with classes (a list of names "
            "for the values 1, 2, ..., or {value: class}; unlisted values such as 0 and 255 are no class). "
            "An image without a mask, a mask without an image, an unreadable, empty or wrongly sized mask are "
            "recorded rejects."
        ),
        formatter_class=HelpFormatter,
    )
    ma.add_argument("images", type=existing_dir, help="images root (IMAGES)")
    ma.add_argument("masks", type=existing_dir, help="masks root (MASKS), mirroring IMAGES")
    ma.add_argument("--values", choices=("binary", "objects", "classes"), default="binary",
                    help="what a mask's pixel values mean")
    ma.add_argument("--classes", type=_classes, default="folders", metavar="folders|MAP.json",
                    help="'folders' (class = first folder under IMAGES) or a JSON class map")
    ma.add_argument("--name", default=None, help="label space name (default: the images folder's name)")
    ma.add_argument("--split", default="val", help="split name recorded in the index")
    ma.add_argument("--mask-source", default="external", choices=("external", "released", "grabcut", "synthetic"),
                    help="provenance recorded on the masks")
    ma.add_argument("--skip-unmasked", dest="missing_mask", action="store_const", const="skip", default="reject",
                    help="count images without a mask instead of listing each as a reject (VOC masks a subset)")
    _common(ma)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ingest",
        help="index ImageNet folders + XML, the IN-9 release, a COCO mask JSON or a folder of PNG masks",
        description=(
            "Probe every image (bad files and unusable file names become rejects with a reason, never a crash), "
            "read boxes or masks, map classes to the label space (IN-9 by default) and write a COCO-format dataset "
            "index whose image root is relative to it when both lie in one tree (move them together)."
        ),
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="format", metavar="FORMAT")
    sub.required = True
    for add in (_imagenet, _in9, _coco, _masks):
        add(sub)
    return p


def _ingest(args: argparse.Namespace):
    from ..sources import (CocoIngestConfig, MaskIngestConfig, ingest_coco, ingest_imagenet, ingest_in9_release,
                           ingest_masks)

    common = dict(workers=args.workers, verify=args.verify, progress=args.progress)
    if args.format == "imagenet":
        return ingest_imagenet(args.images, args.annotations, split=args.split, labels_file=args.labels_file,
                               label_space=args.label_space, out=args.out, **common)
    if args.format == "in9":
        return ingest_in9_release(args.root, variant=args.variant, split=args.split, masks=args.masks, out=args.out,
                                  **common)
    if args.format == "coco":
        config = CocoIngestConfig(split=args.split, mask_source=args.mask_source, box_from=args.box_from,
                                  min_mask_inside=args.min_mask_inside, label_space=args.label_space, **common)
        return ingest_coco(args.annotations, args.images, args.category_map, config, out=args.out)
    config = MaskIngestConfig(values=args.values, classes=args.classes, name=args.name,
                              split=args.split, mask_source=args.mask_source, missing_mask=args.missing_mask, **common)
    return ingest_masks(args.images, args.masks, config, out=args.out)


def run(args: argparse.Namespace) -> int:
    index = _ingest(args)
    summary = index.summary()
    if args.json:
        print(json.dumps({"index": str(args.out), "label_space": index.label_space.name, **summary,
                          "reject_list": index.rejects[: args.show_rejects]}, indent=2))
        return 0
    space = index.label_space
    print(f"wrote {args.out}: {summary['images']} images {summary['per_split']}, label space {space.name!r} "
          f"({space.num_classes} classes)")
    per_class = [(c, n) for c, n in summary["per_class"].items() if n or space.num_classes <= 20]
    print("  per class: " + ", ".join(f"{c} {n}" for c, n in per_class[:20])
          + (f", ... ({len(per_class) - 20} more classes with images)" if len(per_class) > 20 else ""))
    print("  masks: " + (", ".join(f"{k} {v}" for k, v in summary["masks"].items()) or "none"))
    n_rej = sum(summary["rejects"].values())
    print(f"  rejects: {n_rej}" + (" (" + ", ".join(f"{k} {v}" for k, v in summary["rejects"].items()) + ")"
                                   if n_rej else ""))
    if summary["skipped"]:
        print("  skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()))
    for r in index.rejects[: args.show_rejects]:
        print(f"    {r['reason']}: {r['path']}" + (f" ({r['detail']})" if r.get("detail") else ""))
    if n_rej > args.show_rejects > 0:
        print(f"    ... {n_rej - args.show_rejects} more in the index's 'rejects' list")
    return 0
