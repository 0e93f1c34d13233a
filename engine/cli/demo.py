"""`bgsynth demo`: the main job on a built-in dataset (IN-9-like: the paper's findings; waterbirds-like: the
group-robustness result of a controlled spurious correlation)."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, add_tiling_arg, nonneg_int, positive_int


def register(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="build the built-in dataset, train the demo model, evaluate all variants, run the challenge, report",
        description=("The whole pipeline end to end on a built-in dataset (cached between runs). --kind in9 (the "
                     "default): the IN-9-like set, all eight variants, BG-Gap and the Backgrounds Challenge. "
                     "--kind waterbirds-like: the demo CNN trained online on composites at correlation 0.95 and with "
                     "the balanced rule (0.5), each evaluated on every group (bird class x scene family): average "
                     "and worst-group accuracy."),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--kind", choices=("in9", "waterbirds-like"), default="in9", help="which built-in dataset")
    p.add_argument("--out", default="bgsynth-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $BGSYNTH_CACHE or ~/.cache/bgsynth)")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs of the demo model (default 14; waterbirds-like: 28 for each of its two)")
    p.add_argument("--no-challenge", action="store_true", help="in9: skip the Backgrounds Challenge")
    p.add_argument("--challenge-per-class", type=nonneg_int, default=25,
                   help="in9: foregrounds and backgrounds per class in the challenge (0: the whole val split)")
    p.add_argument("--compare-training", action="store_true",
                   help="in9: also train on Mixed-Rand and compare BG-Gap and challenge accuracy")
    p.add_argument("--backend", default="auto", help="decode backend: auto | dali | torchvision | pil")
    add_tiling_arg(p)
    p.add_argument("--force", action="store_true", help="ignore cached prepared index and model")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..report.tables import format_summary

    n = args.challenge_per_class or None
    res = run_demo(out_dir=args.out, seed=args.seed, device=args.device, cache_dir=args.cache_dir,
                   epochs=args.epochs, challenge=not args.no_challenge, challenge_fg_per_class=n,
                   challenge_bg_per_class=n, compare_training=args.compare_training, backend=args.backend,
                   progress=not args.quiet, force=args.force, tiling=args.tiling, kind=args.kind)
    print()
    if args.kind == "waterbirds-like":
        print(res.comparison.table())
    else:
        print(format_summary([res.eval_result]))
        if res.challenge is not None:
            print()
            print(res.challenge.format())
        if res.comparison is not None:
            print()
            print(res.comparison.table())
    print()
    for f in res.findings:
        print(f"{'observed' if f['observed'] else 'NOT observed'}: {f['finding']} ({f['evidence']})")
    print(f"\nreport: {res.report.resolve()}  ({res.seconds:.0f} s)")
    return 0
