"""``bgsynth ingest imagenet|in9|coco ... --out INDEX.json``: turn a dataset on disk into a dataset index."""

from __future__ import annotations

import argparse
import json

from ._args import fraction, positive_int

__all__ = ["register", "run"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", required=True, metavar="INDEX.json", help="where to write the index")
    p.add_argument("--workers", type=positive_int, default=None, help="probing processes (None: all cores)")
    p.add_argument("--verify", choices=("full", "header"), default="full",
                   help="full: decode every image; header: read headers and end markers only (faster)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--show-rejects", type=int, default=10, metavar="N", help="list the first N rejects")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ingest",
        help="index ImageNet folders + XML, the IN-9 release, or a COCO mask JSON",
        description=(
            "Probe every image (bad files become rejects with a reason, never a crash), read boxes or masks, "
            "map classes to IN-9 and write a COCO-format dataset index."
        ),
    )
    sub = p.add_subparsers(dest="format", metavar="FORMAT")
    sub.required = True

    im = sub.add_parser(
        "imagenet",
        help="ImageNet class folders (or a flat val folder + labels file) with ILSVRC XML boxes",
        description=(
            "Images in IMAGES/<wnid>/*.JPEG, or a flat folder with --labels-file (lines '<file> <wnid>' or "
            "'<file> <0-based class index>', whitespace or comma separated; a header line is skipped). Boxes from "
            "ILSVRC XML in ANN/<wnid>/<stem>.xml or ANN/<stem>.xml. Classes outside IN-9 are counted, not indexed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    im.add_argument("images", help="images root")
    im.add_argument("--annotations", default=None, help="ILSVRC XML root (without it: no boxes)")
    im.add_argument("--split", default="train", help="split name recorded in the index")
    im.add_argument("--labels-file", default=None, help="labels of a flat folder")
    _common(im)

    in9 = sub.add_parser(
        "in9",
        help="the IN-9 release: ROOT/<variant>/val/<NN_name>/*.JPEG with ROOT/fg_mask/val/<NN_name>/*.npy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    in9.add_argument("root", help="release root (holds original/, fg_mask/, ...)")
    in9.add_argument("--variant", default="original", help="variant folder to index")
    in9.add_argument("--split", default="val", help="split folder")
    m = in9.add_mutually_exclusive_group()
    m.add_argument("--require-masks", dest="masks", action="store_const", const=True, default=None,
                   help="a missing mask is a reject (default for 'original')")
    m.add_argument("--no-masks", dest="masks", action="store_const", const=False, help="ignore fg_mask")
    _common(in9)

    co = sub.add_parser(
        "coco",
        help="a COCO instance-mask JSON (polygons or RLE) with a category -> IN-9 map",
        description=(
            "The map is a JSON object or a text file of 'category = IN-9 class' lines; categories by name or id, "
            "IN-9 classes by id (0-8), name or folder. Unmapped categories are skipped and counted. Boxes: each "
            "annotation's COCO bbox is the box, as in COCO (clipped to the image; the tight box of its mask only "
            "when the bbox is missing, malformed or empty), unless --box-from mask. A bbox with less than "
            "--min-mask-inside (50%) of its mask's pixels inside it makes the image a 'box_mask_mismatch' reject."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    co.add_argument("annotations", help="COCO JSON with instance masks")
    co.add_argument("--images", required=True, help="folder the file_name fields are relative to")
    co.add_argument("--category-map", required=True, help="JSON or 'name=id' text file")
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
    return p


def run(args: argparse.Namespace) -> int:
    from ..sources import CocoIngestConfig, ingest_coco, ingest_imagenet, ingest_in9_release

    common = dict(out=args.out, workers=args.workers, verify=args.verify, progress=args.progress)
    if args.format == "imagenet":
        index = ingest_imagenet(args.images, args.annotations, split=args.split, labels_file=args.labels_file,
                                **common)
    elif args.format == "in9":
        index = ingest_in9_release(args.root, variant=args.variant, split=args.split, masks=args.masks, **common)
    else:
        config = CocoIngestConfig(split=args.split, mask_source=args.mask_source, box_from=args.box_from,
                                  min_mask_inside=args.min_mask_inside, workers=args.workers, verify=args.verify,
                                  progress=args.progress)
        index = ingest_coco(args.annotations, args.images, args.category_map, config, out=args.out)
    summary = index.summary()
    if args.json:
        print(json.dumps({"index": str(args.out), **summary, "reject_list": index.rejects[: args.show_rejects]},
                         indent=2))
        return 0
    print(f"wrote {args.out}: {summary['images']} images {summary['per_split']}")
    print("  per class: " + ", ".join(f"{c} {n}" for c, n in summary["per_class"].items()))
    print("  masks: " + (", ".join(f"{k} {v}" for k, v in summary["masks"].items()) or "none"))
    n_rej = sum(summary["rejects"].values())
    print(f"  rejects: {n_rej}" + (" (" + ", ".join(f"{k} {v}" for k, v in summary["rejects"].items()) + ")"
                                   if n_rej else ""))
    if summary["skipped"]:
        print("  skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()))
    for r in index.rejects[: max(0, args.show_rejects)]:
        print(f"    {r['reason']}: {r['path']}" + (f" ({r['detail']})" if r.get("detail") else ""))
    if n_rej > args.show_rejects > 0:
        print(f"    ... {n_rej - args.show_rejects} more in the index's 'rejects' list")
    return 0
