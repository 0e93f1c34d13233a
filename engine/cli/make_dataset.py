"""``bgsynth make-dataset``: build (or find in the cache) the procedural built-in dataset."""

from __future__ import annotations

import argparse
import json

from ._args import fraction, positive_int

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-dataset",
        help="build the built-in IN-9-like dataset (deterministic, cached)",
        description=(
            "Render 9 classes of procedural objects on 9 scene families (class/background correlation "
            "configurable) as ImageNet-layout JPEGs with ILSVRC XML boxes and true masks, and index them. "
            "The result is cached in a folder named after the parameters; a second call returns at once."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same bytes)")
    p.add_argument("--train-per-class", type=positive_int, default=200, help="train images per class")
    p.add_argument("--val-per-class", type=positive_int, default=50, help="val images per class")
    p.add_argument("--correlation", type=fraction, default=0.8,
                   help="probability that an image's scene is its class's own family (1/9: independent)")
    p.add_argument("--two-object-rate", type=fraction, default=0.04, help="fraction of images with two objects")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="cache folder (None: $BGSYNTH_CACHE or ~/.cache/bgsynth)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (None: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from ..index import DatasetIndex
    from ..sources.synthetic import BuiltinSpec, build_builtin_dataset

    spec = BuiltinSpec(seed=args.seed, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                       correlation=args.correlation, two_object_rate=args.two_object_rate)
    path = build_builtin_dataset(args.out, spec, force=args.force, progress=args.progress, workers=args.workers)
    summary = DatasetIndex.load(path).summary()
    if args.json:
        print(json.dumps({"index": str(path), **summary}, indent=2))
    else:
        print(f"index: {path}")
        print(f"  {summary['images']} images {summary['per_split']}, masks {summary['masks']}")
    return 0
