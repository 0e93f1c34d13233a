"""``bgsynth eval INDEX --model ...``: all variants in one pass, results + report (see :func:`bgsynth.evaluate.evaluate`)."""

from __future__ import annotations

import argparse

from ._args import (
    HelpFormatter,
    add_model_args,
    add_tiling_arg,
    existing_file,
    nonneg_int,
    out_dir,
    positive_int,
    predictor_from_args,
    resolve_index,
)

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on all variants in one pass (decode once, synthesize on the device, no disk)",
        description=(
            "Decode each image of a split once, synthesize every requested variant in-batch and feed the composites "
            "straight to the model. Writes results.json, results.csv, (optionally) provenance.csv, report.md and "
            "plots into --out, and prints the paper's table. INDEX is a dataset index JSON, or 'builtin' for the "
            "built-in dataset. The output folder belongs to one run: a folder written with other settings, data or "
            "model is refused (naming what differs) unless --overwrite. Runs unchanged under torchrun (each rank "
            "evaluates its shard of the images, rank 0 writes the merged results, identical to a single-process "
            "run): torchrun --nproc_per_node=8 -m bgsynth.cli eval INDEX --model ckpt.pt"
        ),
        formatter_class=HelpFormatter,
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
    g = p.add_argument_group("group metrics (foreground class x background class)")
    g.add_argument("--group-metrics", action="store_true",
                   help="accuracy per group (foreground class x background class) of the Mixed-* variants, with the "
                        "average and the worst group")
    g.add_argument("--pairing", type=existing_file, default=None, metavar="JSON",
                   help="JSON {fg_class: [aligned bg classes]}: which groups are aligned; adds the gap between aligned "
                        "and conflicting groups (implies --group-metrics)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default 64 CPU, 256 CUDA)")
    r.add_argument("--max-batch", type=positive_int, default=None,
                   help="largest forward chunk (halved automatically on out-of-memory)")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="CPU device: the model's intra-op threads (default: the cores less the decoder's, at least 1)")
    r.add_argument("--decode-threads", type=positive_int, default=None,
                   help="decoder threads (default: 1 on a CPU device, so decoding overlaps the model instead of "
                        "preempting it; the decoder's own default on CUDA)")
    r.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 on CUDA, off on CPU")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=out_dir, default="bgsynth-eval", help="output folder")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run in --out (only the files that run wrote)")
    o.add_argument("--name", default=None, help="model name in tables (default: arch or checkpoint stem)")
    o.add_argument("--provenance", action="store_true",
                   help="write provenance.csv: image id, variant, background id/class, seed, label, prediction")
    o.add_argument("--no-report", dest="report", action="store_false", help="skip report.md and plots")
    o.add_argument("--examples-per-class", type=nonneg_int, default=None,
                   help="contact-sheet images per class (0: none; default 1, 0 with --no-report)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _read_pairing(path: str):
    """``--pairing``: the JSON object ``{fg_class: [aligned bg classes]}``; a ConfigError names the file."""
    from ..errors import ConfigError
    from ..fileio import read_json

    d = read_json(path, "pairing JSON (--pairing)")
    if not isinstance(d, dict):
        raise ConfigError(f"--pairing {path}: expected a JSON object {{fg_class: [aligned bg classes]}}, got "
                          f"{type(d).__name__}")
    return d


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import init_distributed
    from ..evaluate import EvalConfig, cpu_thread_split, evaluate_to_dir
    from ..index import DatasetIndex
    from ..report.tables import format_summary

    examples = args.examples_per_class if args.examples_per_class is not None else int(args.report)
    # the job's settings first: a bad variant name or pairing is refused before the index or the model is loaded
    config = EvalConfig(variants=args.variants, split=None if args.split == "all" else args.split,
                        per_class=args.per_class, examples_per_class=examples, groups=args.group_metrics,
                        pairing=_read_pairing(args.pairing) if args.pairing else None)
    ctx = init_distributed()  # a no-op without torchrun
    device = ctx.device(None if args.device == "auto" else args.device)
    model_threads, decode_threads = cpu_thread_split(device, args.threads, args.decode_threads)
    if model_threads is not None:
        torch.set_num_threads(model_threads)  # this process is the command's: the model's share of the cores
    progress = args.progress and ctx.is_main
    index = DatasetIndex.load(resolve_index(args.index, ctx, progress=progress))  # loaded once, here
    _loaded, predictor = predictor_from_args(args, device, index.label_space)
    # --resize/--crop over the checkpoint's geometry, batch size by device: resolved by bgsynth.config in evaluate;
    # the output folder is claimed (fingerprint: settings, index, model) before the evaluation starts
    result, paths = evaluate_to_dir(
        index, predictor, args.out, config=config, provenance=args.provenance, report=args.report, name=args.name,
        overwrite=args.overwrite, seed=args.seed, resize=args.resize, crop=args.crop, backend=args.backend,
        batch_size=args.batch_size, progress=progress, dist=ctx, tiling=args.tiling,
        num_threads=decode_threads,
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
