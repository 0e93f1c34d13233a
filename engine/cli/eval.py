"""``bgsynth eval INDEX --model ...``: all variants in one pass, results + report (see :func:`bgsynth.evaluate.evaluate`)."""

from __future__ import annotations

import argparse

from ._args import add_model_args, add_tiling_arg, positive_int, predictor_from_args, resolve_index

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on all variants in one pass (decode once, synthesize on the device, no disk)",
        description=(
            "Decode each image of a split once, synthesize every requested variant in-batch and feed the composites "
            "straight to the model. Writes results.json, results.csv, (optionally) provenance.csv, report.md and "
            "plots into --out, and prints the paper's table. INDEX is a dataset index JSON, or 'builtin' for the "
            "built-in dataset. Runs unchanged under torchrun (each rank evaluates its shard of the images, rank 0 "
            "writes the merged results, identical to a single-process run): "
            "torchrun --nproc_per_node=8 -m bgsynth.cli eval INDEX --model ckpt.pt"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index", help="dataset index (COCO-format JSON) or 'builtin'")
    add_model_args(p, unmapped="wrong")
    d = p.add_argument_group("data")
    d.add_argument("--variants", default="all", help="'all' or a comma-separated list (e.g. original,mixed_rand)")
    d.add_argument("--split", default="val", help="split to evaluate ('all': every image of the index)")
    d.add_argument("--per-class", type=positive_int, default=None, help="a balanced subset: N images of each class (seeded choice)")
    d.add_argument("--seed", type=int, default=0, help="seed of the Mixed-* background choice")
    d.add_argument("--resize", type=positive_int, default=None,
                   help="crop geometry: shorter side (default: the checkpoint's, else 256)")
    d.add_argument("--crop", type=positive_int, default=None,
                   help="crop geometry: centre crop (default: the checkpoint's, else 224)")
    add_tiling_arg(d)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default 64 CPU, 256 CUDA)")
    r.add_argument("--max-batch", type=positive_int, default=None,
                   help="largest forward chunk (halved automatically on out-of-memory)")
    r.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 on CUDA, off on CPU")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="bgsynth-eval", help="output folder")
    o.add_argument("--name", default=None, help="model name in tables (default: arch or checkpoint stem)")
    o.add_argument("--provenance", action="store_true",
                   help="write provenance.csv: image id, variant, background id/class, seed, label, prediction")
    o.add_argument("--no-report", dest="report", action="store_false", help="skip report.md and plots")
    o.add_argument("--examples-per-class", type=int, default=1, help="contact-sheet images per class (0: none)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..distributed import init_distributed
    from ..evaluate import evaluate_to_dir
    from ..index import DatasetIndex
    from ..report.tables import format_summary

    ctx = init_distributed()  # a no-op without torchrun
    device = ctx.device(None if args.device == "auto" else args.device)
    progress = args.progress and ctx.is_main
    index = DatasetIndex.load(resolve_index(args.index, ctx, progress=progress))  # loaded once, here
    _loaded, predictor = predictor_from_args(args, device)
    # --resize/--crop over the checkpoint's geometry, batch size by device: resolved by bgsynth.config in evaluate
    result, paths = evaluate_to_dir(
        index, predictor, args.out, provenance=args.provenance, report=args.report, name=args.name,
        variants=args.variants, split=None if args.split == "all" else args.split, seed=args.seed,
        resize=args.resize, crop=args.crop, backend=args.backend, batch_size=args.batch_size, progress=progress,
        per_class=args.per_class, examples_per_class=args.examples_per_class, dist=ctx, tiling=args.tiling,
    )
    if not ctx.is_main:
        return 0
    print(format_summary(result))
    t = result.timing
    print(f"{t['images']} images x {len(result.variants)} variants in {t['seconds']:.1f} s "
          f"({t['images_per_s']:.0f} images/s, {t['composites_per_s']:.0f} composites/s)"
          + (f" on {ctx.world_size} ranks" if ctx.enabled else ""))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
