"""``bgsynth make-dataset``: build (or find in the cache) a procedural built-in dataset (IN-9-like or
waterbirds-like)."""

from __future__ import annotations

import argparse
import json

from ._args import HelpFormatter, fraction, positive_int

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-dataset",
        help="build a built-in dataset: IN-9-like (default) or waterbirds-like (deterministic, cached)",
        description=(
            "--kind in9: render 9 classes of procedural objects on 9 scene families (class/background correlation "
            "configurable) as ImageNet-layout JPEGs with ILSVRC XML boxes and true masks, and index them. "
            "--kind waterbirds-like: 2 bird classes (land, water) on 2 scene families (land, water) at a chosen "
            "train correlation (val balanced by default), true masks, plus bird-free scenes per family in "
            "places/<split>/<family>/ (the Places-like backgrounds of `bgsynth compose`) and pairing.json. "
            "The result is cached in a folder named after the parameters; a second call returns at once."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--kind", choices=("in9", "waterbirds-like"), default="in9", help="which built-in dataset")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same bytes)")
    p.add_argument("--train-per-class", type=positive_int, default=None,
                   help="train images per class (default 200 in9, 300 waterbirds-like)")
    p.add_argument("--val-per-class", type=positive_int, default=None,
                   help="val images per class (default 50 in9, 100 waterbirds-like)")
    p.add_argument("--correlation", type=fraction, default=None,
                   help="probability that a (train) image's scene is its class's own family (default 0.8 in9: 1/9 is "
                        "independent; 0.95 waterbirds-like, as Waterbirds)")
    p.add_argument("--two-object-rate", type=fraction, default=None,
                   help="in9: fraction of images with two objects (default 0.04)")
    w = p.add_argument_group("waterbirds-like")
    w.add_argument("--val-correlation", type=fraction, default=None,
                   help="the val split's correlation (default 0.5: balanced groups, as Waterbirds' val and test)")
    w.add_argument("--places-per-class", type=positive_int, default=None,
                   help="bird-free train scenes per family (default 150)")
    w.add_argument("--val-places-per-class", type=positive_int, default=None,
                   help="bird-free val scenes per family (default 50)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="cache folder (default: $BGSYNTH_CACHE or ~/.cache/bgsynth)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _spec(args: argparse.Namespace):
    """The kind's spec: its defaults, with what the command line said."""
    from ..errors import ConfigError
    from ..sources.synthetic import BuiltinSpec, WaterbirdsSpec

    common = {"seed": args.seed, "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
              "correlation": args.correlation}
    wb = {"val_correlation": args.val_correlation, "train_places_per_class": args.places_per_class,
          "val_places_per_class": args.val_places_per_class}
    if args.kind == "in9":
        given = [f"--{k.replace('_', '-')}" for k, v in wb.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: options of --kind waterbirds-like, got --kind in9")
        kw = {k: v for k, v in {**common, "two_object_rate": args.two_object_rate}.items() if v is not None}
        return BuiltinSpec(**kw)
    if args.two_object_rate is not None:
        raise ConfigError("--two-object-rate: an option of --kind in9 (waterbirds-like images hold one bird)")
    return WaterbirdsSpec(**{k: v for k, v in {**common, **wb}.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from ..index import DatasetIndex
    from ..sources.synthetic import build_builtin_dataset

    spec = _spec(args)
    path = build_builtin_dataset(args.out, spec, force=args.force, progress=args.progress, workers=args.workers)
    summary = DatasetIndex.load(path).summary()
    if args.json:
        print(json.dumps({"index": str(path), **summary}, indent=2))
    else:
        print(f"index: {path}")
        print(f"  {summary['images']} images {summary['per_split']}, masks {summary['masks']}")
        if args.kind == "waterbirds-like":
            print(f"  backgrounds: {path.parent / 'places' / 'train'} (train), {path.parent / 'places' / 'val'} "
                  f"(val); pairing: {path.parent / 'pairing.json'}")
    return 0
