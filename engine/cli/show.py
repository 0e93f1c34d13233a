"""``bgsynth show INDEX --out sheet.png``: a contact sheet of the variants (see :func:`bgsynth.show.show_index`)."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, add_tiling_arg, index_path, out_file, positive_int

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "show",
        help="contact sheet of the variants of a few images (one row per image, one column per variant)",
        description=(
            "Decode the first N images of a split (N spread over the classes with --per-class), synthesize the "
            "variants and draw them as a labelled contact sheet like the paper's figure; --decoded draws the decoded "
            "crops with mask and box instead. The sheet belongs to one run: a sheet of other settings at --out is "
            "refused unless --overwrite. INDEX is a dataset index JSON, or 'builtin' for the built-in dataset."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", type=index_path, help="dataset index (COCO-format JSON) or 'builtin'")
    p.add_argument("--out", required=True, type=out_file, help="PNG file to write")
    p.add_argument("-n", "--images", type=positive_int, default=8, help="number of images (rows)")
    p.add_argument("--per-class", action="store_true", help="take -n images spread over the classes")
    p.add_argument("--variants", default="all", help="'all' or a comma-separated list")
    p.add_argument("--split", default="val", help="split to draw from ('all': every image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Mixed-* background choice")
    p.add_argument("--resize", type=positive_int, default=256, help="crop geometry: shorter side")
    p.add_argument("--crop", type=positive_int, default=224, help="crop geometry: centre crop")
    add_tiling_arg(p)
    p.add_argument("--tile", type=positive_int, default=None, help="tile side in pixels (default: crop, at most 128)")
    p.add_argument("--decoded", action="store_true", help="draw decoded crops with mask and box instead")
    p.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a sheet made with other settings (or a file of no recorded run) at --out")
    return p


def run(args) -> int:
    from ..index import DatasetIndex
    from ..show import show_index

    path = args.index
    if path == "builtin":
        from ..sources.synthetic import build_builtin_dataset

        path = build_builtin_dataset(progress=False)
    index = DatasetIndex.load(path)  # loaded once, here
    out, n = show_index(
        index, args.out, n=args.images, per_class=args.per_class, variants=args.variants,
        split=None if args.split == "all" else args.split, seed=args.seed, resize=args.resize, crop=args.crop,
        tile=args.tile, decoded=args.decoded, backend=args.backend, device=args.device, tiling=args.tiling,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} ({n} images)")
    return 0
