"""``bgsynth compose {describe,export,eval} FG_INDEX --backgrounds BG --pairing P.json --correlation C --seed S``:
a composed dataset defined by a rule (:mod:`bgsynth.compose`), described, written to disk or evaluated per group.

Training on it online is ``bgsynth train FG_INDEX --backgrounds BG --pairing P.json --correlation C``.
"""

from __future__ import annotations

import argparse
import json

from ._args import HelpFormatter, index_path, jpeg_quality, out_dir, positive_int
from .train import add_compose_args, compose_spec, correlations

__all__ = ["register", "run"]

_RULE = (
    "The pairing maps each foreground class to its aligned background classes; each foreground's background is of "
    "an aligned class with probability --correlation, else of a conflicting one, and then one image of that class, "
    "each step a seeded hash of (seed, image id): the same set whatever the batch size, order or number of ranks. "
    "Backgrounds are resized and centre-cropped to the crop like the foreground (Mixed-* compositing: foreground "
    "pixels where the mask is 1)."
)


def _common(p: argparse.ArgumentParser, default_correlation=0.95) -> None:
    p.add_argument("index", type=index_path, metavar="FG_INDEX",
                   help="index of the foregrounds (masks needed), or 'builtin'")
    c = p.add_argument_group("the rule")
    add_compose_args(c, required=True, default_correlation=default_correlation)
    c.add_argument("--seed", type=int, default=0, help="seed of every draw of the rule")
    r = p.add_argument_group("runtime")
    r.add_argument("--resize", type=positive_int, default=None, help="crop geometry: shorter side")
    r.add_argument("--crop", type=positive_int, default=None, help="crop geometry: centre crop")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--batch-size", type=positive_int, default=None, help="images per decoded batch")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress messages")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compose",
        help="a composed dataset with a controlled spurious correlation (Waterbirds-style): describe, export, eval",
        description=("Foregrounds of FG_INDEX on backgrounds of a second source (--backgrounds) at a chosen "
                     "correlation, defined by a rule rather than by files. " + _RULE),
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("describe", help="the rule, the backgrounds per class and the composites per group",
                       formatter_class=HelpFormatter, description=_RULE)
    _common(d)
    d.add_argument("--split", default=None, help="foreground split (default: every image)")
    d.add_argument("--json", action="store_true", help="print JSON")
    e = sub.add_parser(
        "export", formatter_class=HelpFormatter,
        help="write the composed set: ImageFolder per split + metadata.csv in the Waterbirds columns",
        description=("Write OUT/<split>/<fg class>/<stem>.jpg, OUT/metadata.csv (img_id, img_filename, y, split, "
                     "place, place_filename as in the Waterbirds metadata of group DRO / WILDS, then fg_class, "
                     "bg_class, group, bg_id, aligned) and OUT/manifest.json. Rerun the same command with "
                     "--resume to finish a killed export. " + _RULE))
    _common(e)
    e.add_argument("--out", required=True, type=out_dir, help="export folder")
    e.add_argument("--split", default=None, help="foreground split(s), comma-separated (default: every split)")
    e.add_argument("--split-correlation", default=None, metavar="SPLIT=C,...",
                   help="per-split correlations, e.g. 'val=0.5,test=0.5' (Waterbirds' balanced evaluation splits)")
    e.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg", help="image format")
    e.add_argument("--quality", type=jpeg_quality, default=95, help="JPEG quality (1..100)")
    e.add_argument("--resume", action="store_true", help="continue an export with the same settings")
    e.add_argument("--overwrite", action="store_true", help="replace an export made with other settings")
    v = sub.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="a model's accuracy per group (fg class x bg class), average and worst group, aligned gap",
        description=("Composite every foreground of the split on its rule-chosen background (or, with --all-groups, "
                     "on one background of every class) and score the model: results.json (under "
                     "variants.composed: groups, worst_group, average_group, aligned_gap), records.csv, report.md. "
                     + _RULE))
    _common(v, default_correlation=0.5)
    v.add_argument("--model", required=True, help="checkpoint (bgsynth train) or --model spec of bgsynth eval")
    v.add_argument("--out", required=True, type=out_dir, help="output folder")
    v.add_argument("--split", default="val", help="foreground split ('all': every image)")
    v.add_argument("--all-groups", action="store_true",
                   help="each foreground on one background of every class (balanced groups) instead of the rule's one")
    v.add_argument("--name", default=None, help="model name in the table")
    v.add_argument("--overwrite", action="store_true", help="replace results made with other settings")
    return p


def _split_correlations(text: str | None) -> dict[str, float] | None:
    from ..errors import ConfigError

    if not text:
        return None
    out = {}
    for part in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--split-correlation: expected 'split=probability', got {part!r}")
        try:
            out[name.strip()] = correlations(value)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--split-correlation {part!r}: {e}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..distributed import current
    from ._args import resolve_index

    index = resolve_index(args.index, current(), args.progress)
    spec = compose_spec(args)
    geom = None if args.resize is None and args.crop is None else (args.resize or args.crop, args.crop or args.resize)
    kw = dict(seed=args.seed, device=args.device, backend=args.backend, batch_size=args.batch_size)
    if geom is not None:
        kw["geometry"] = geom
    return {"describe": _describe, "export": _export, "eval": _eval}[args.action](args, index, spec, kw)


def _describe(args, index, spec, kw) -> int:
    from ..compose_jobs import describe_composed

    d = describe_composed(index, spec, split=args.split, **kw)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"rule: {json.dumps(d['rule']['pairing'])}, correlation {d['rule']['correlation']}, seed {d['rule']['seed']}")
    print(f"backgrounds: {d['backgrounds']['source']} ({d['backgrounds']['kind']}): {d['backgrounds']['counts']}")
    for split, groups in d["groups"].items():
        print(f"split {split!r}: " + ", ".join(f"{g}: {n}" for g, n in groups.items()))
    return 0


def _export(args, index, spec, kw) -> int:
    from ..compose_jobs import export_composed

    split = None if args.split in (None, "all") else [s.strip() for s in args.split.split(",") if s.strip()]
    res = export_composed(index, spec, args.out, split=split, split_correlation=_split_correlations(args.split_correlation),
                          image_format=args.image_format, quality=args.quality, resume=args.resume,
                          overwrite=args.overwrite, progress=args.progress, **kw)
    print(f"wrote {res.written} composites to {res.out_dir} in {res.seconds:.1f} s; metadata {res.metadata}")
    for split, groups in res.groups.items():
        print(f"  {split}: " + ", ".join(f"group {g}: {n}" for g, n in sorted(groups.items())))
    if res.skipped:
        print(f"  not exported: {res.skipped} (see manifest.json)")
    return 0


def _eval(args, index, spec, kw) -> int:
    from ..compose_jobs import evaluate_composed

    res = evaluate_composed(index, args.model, spec, split=None if args.split == "all" else args.split,
                            all_groups=args.all_groups, name=args.name, progress=args.progress, **kw)
    files = res.save(args.out, overwrite=args.overwrite)
    print(res.table())
    print(f"wrote {files['results']}")
    return 0
