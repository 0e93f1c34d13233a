"""``bgsynth prepare INDEX``: the paper's selection filters and GrabCut masks (see :func:`bgsynth.prepare.prepare`)."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from ._args import HelpFormatter, existing_file, fraction, out_file, positive_int

__all__ = ["register", "run", "memory_size"]

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def memory_size(text: str) -> int:
    """``--max-memory``: bytes, or a number with a binary unit (``512M``, ``8G``, ``1.5GiB``, ``2t``).

    >>> memory_size("8G"), memory_size("1.5GiB"), memory_size("4096")
    (8589934592, 1610612736, 4096)
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise argparse.ArgumentTypeError(f"expected a memory size such as 8G, 512M or 1.5GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare",
        help="select images as the paper did and fill in GrabCut foreground masks (parallel, resumable)",
        description=(
            "Apply the paper's IN-9 selection filters to every image, whatever its mask source (released, "
            "synthetic, external, grabcut or none), in the model's crop geometry: one box; box at most 90% of "
            "the crop; at least 50% of it inside the crop; some margin left for Only-BG-T (per --tiling); the mask "
            "covers at least 10% of the box. Then give every surviving image without a mask a GrabCut mask seeded "
            "by its box (5 iterations, accepted when it covers at least 10% of the box, up to 10 seeds). Each "
            "filter can be switched off (--no-<filter>, or --no-filters for all); what they drop is counted per "
            "reason in the output's info.prepare.filtered. Runs on all cores; results are journaled next to "
            "the output so that a killed run continues with --resume and ends with the same index. Under torchrun "
            "each rank takes a share of the images (and of the node's cores) with its own journal, and rank 0 writes "
            "the index a single process would: torchrun --nnodes=4 --nproc_per_node=1 ... -m bgsynth.cli prepare INDEX"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", type=existing_file, help="input dataset index (COCO-format JSON)")
    p.add_argument("-o", "--out", type=out_file, default=None,
                   help="output index path (default: <INDEX stem>.prepared.json beside the input)")
    p.add_argument("--split", action="append", default=None,
                   help="only process this split (repeatable)")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help="balanced subset: keep the first N surviving images of each class in a seeded order")
    p.add_argument("--seed", type=int, default=0, help="seed of GrabCut (per image) and of --per-class")
    p.add_argument("--recompute", action="store_true",
                   help="replace existing masks with GrabCut masks (and report IoU against the replaced ones)")
    # removed: the filters now apply to images with existing masks by default (a deprecation note, no effect)
    p.add_argument("--filter-existing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes (default: all cores; under torchrun, each rank its share of the node's cores)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="run GrabCut on a copy whose longer side is at most this (default: full resolution; GrabCut "
                        "needs about 210 bytes per working pixel: 5 GiB for a 5000x5000 image)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="refuse, before any work, a run whose GrabCut memory estimate for all workers at once "
                        "exceeds SIZE (e.g. 8G); the message names the --max-side that fits")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its journal")
    p.add_argument("--show", type=out_file, default=None, metavar="PNG",
                   help="write a contact sheet of the worst and best masks")
    p.add_argument("--show-count", type=positive_int, default=8, help="rows of worst and of best masks")
    p.add_argument("--resize", type=positive_int, default=256, help="crop geometry: shorter side resized to")
    p.add_argument("--crop", type=positive_int, default=224, help="crop geometry: centre crop side")
    g = p.add_argument_group(
        "selection filters (each on by default, applied to every image whatever its mask source; one switch each)")
    g.add_argument("--no-filters", dest="filters", action="store_false",
                   help="switch every selection filter off (only the sanity checks remain: no box, box outside "
                        "the image, unreadable file; GrabCut still needs a non-empty mask)")
    g.add_argument("--no-single-object", dest="single_object", action="store_false",
                   help="keep images with several boxes (their union box is used)")
    g.add_argument("--no-box-size", dest="box_size", action="store_false",
                   help="keep boxes covering more than --max-box-fraction of the crop")
    g.add_argument("--no-box-inside", dest="box_inside", action="store_false",
                   help="keep boxes with less than --min-inside-fraction inside the crop")
    g.add_argument("--no-bgt-margin", dest="bgt_margin", action="store_false",
                   help="keep boxes that leave no margin for Only-BG-T (see --tiling)")
    g.add_argument("--no-mask-size", dest="mask_size", action="store_false",
                   help="keep masks covering less than --min-fraction of the box: GrabCut accepts its first "
                        "non-empty mask, existing masks are not measured")
    g.add_argument("--max-box-fraction", type=fraction, default=0.9, help="box size filter threshold")
    g.add_argument("--min-inside-fraction", type=fraction, default=0.5, help="box inside filter threshold")
    g.add_argument("--tiling", choices=("paper", "crop"), default="paper",
                   help="Only-BG-T the margin filter checks: paper = strip rule on the stored image at full "
                        "resolution (dropped only when the union box covers the whole image); crop = strip rule "
                        "on the crop-space box inside the crop (the faster approximation). Use the tiling the "
                        "variants will be built with")
    gc = p.add_argument_group("GrabCut")
    gc.add_argument("--iterations", type=positive_int, default=5, help="GrabCut iterations per attempt")
    gc.add_argument("--attempts", type=positive_int, default=10, help="seeds tried before an image is dropped")
    gc.add_argument("--min-fraction", type=fraction, default=0.10,
                    help="accept a mask covering at least this fraction of the box (GrabCut's acceptance rule and "
                         "the mask size filter of existing masks)")
    p.add_argument("--checkpoint-every", type=positive_int, default=64,
                   help="journal chunk (images) flushed to disk at a time")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of the summary")
    return p


def _filters(args: argparse.Namespace):
    from ..masks import SelectionFilters

    on = args.filters  # --no-filters switches every one off
    return SelectionFilters(single_object=on and args.single_object, box_size=on and args.box_size,
                            box_inside=on and args.box_inside, bgt_margin=on and args.bgt_margin,
                            mask_size=on and args.mask_size, max_box_fraction=args.max_box_fraction,
                            min_inside_fraction=args.min_inside_fraction)


def _config(args: argparse.Namespace):
    from ..prepare import PrepareConfig

    split = None if not args.split else (args.split[0] if len(args.split) == 1 else args.split)
    return PrepareConfig(filters=_filters(args), recompute=args.recompute, per_class=args.per_class, split=split,
                         iterations=args.iterations, attempts=args.attempts, min_fraction=args.min_fraction,
                         max_side=args.max_side, max_memory=args.max_memory, workers=args.workers,
                         resume=args.resume,
                         checkpoint_every=args.checkpoint_every, show=args.show, show_count=args.show_count)


def run(args: argparse.Namespace) -> int:
    from ..config import resolve_run
    from ..distributed import init_distributed
    from ..index import DatasetIndex
    from ..prepare import format_prepare_summary, prepare

    ctx = init_distributed()  # under torchrun each rank runs GrabCut on its share; a no-op otherwise
    if args.filter_existing and ctx.is_main:
        print("bgsynth prepare: warning: --filter-existing is deprecated and has no effect: the selection filters "
              "now apply to every image, existing masks included, by default (--no-filters or --no-<filter> "
              "switch them off)", file=sys.stderr)
    out = args.out
    if out is None:
        src = pathlib.Path(args.index)
        out = src.with_name(f"{src.stem}.prepared.json")
    run_cfg = resolve_run(resize=args.resize, crop=args.crop, tiling=args.tiling, seed=args.seed, device="cpu",
                          progress=args.progress and ctx.is_main)
    index = prepare(DatasetIndex.load(args.index), run_cfg, _config(args), out=out, dist=ctx)
    if not ctx.is_main:
        return 0
    report = index.data["info"]["prepare"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_prepare_summary(report))
        print(f"wrote {index.path}" + (f" and {args.show}" if args.show else ""))
    return 0
