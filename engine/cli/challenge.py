"""``bgsynth challenge INDEX --model ... --out DIR``: the Backgrounds Challenge (see :mod:`bgsynth.challenge`)."""

from __future__ import annotations

import argparse

from ._args import (
    HelpFormatter,
    add_model_args,
    add_tiling_arg,
    nonneg_int,
    out_dir,
    positive_int,
    predictor_from_args,
    resolve_index,
    seconds,
)

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "challenge",
        help="the Backgrounds Challenge: every foreground against every Only-BG-T background (exact, resumable)",
        description=(
            "Every foreground (image with a mask) of a split against every Only-BG-T background of the same split "
            "(its own included, as in the official script). A foreground is vulnerable if any background makes the "
            "model predict another class; challenge accuracy = 1 - vulnerable / total. Backgrounds stay decoded on "
            "the device, composites are made there in batches, a foreground leaves the search when it is fooled, "
            "and the most fooling backgrounds are tried first: the identical answer for a fraction of the forwards. "
            "Writes challenge.json (and, with --full-matrix, challenge_matrix.npz and plots) into --out; "
            "checkpoints there and continues with --resume. The output folder belongs to one run: a folder written "
            "with other settings, data or model is refused (naming what differs) unless --overwrite, and --resume "
            "continues only a run with the same settings. INDEX is a dataset index JSON, or 'builtin'."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", help="dataset index (COCO-format JSON) or 'builtin'")
    add_model_args(p, unmapped="fooled")
    d = p.add_argument_group("data")
    d.add_argument("--split", default="val", help="split of foregrounds and backgrounds ('all': the whole index)")
    d.add_argument("--fg-per-class", type=positive_int, default=None,
                   help="at most N foregrounds per class (seeded subset; the official challenge uses all)")
    d.add_argument("--bg-per-class", type=positive_int, default=None,
                   help="at most N backgrounds per class (seeded subset; the official challenge uses all)")
    d.add_argument("--seed", type=int, default=0, help="seed of the subsets and of the adaptive order's tie-break")
    d.add_argument("--resize", type=positive_int, default=None, help="shorter side (default: the checkpoint's, else 256)")
    d.add_argument("--crop", type=positive_int, default=None, help="centre crop (default: the checkpoint's, else 224)")
    add_tiling_arg(d)
    s = p.add_argument_group("search")
    s.add_argument("--full-matrix", action="store_true",
                   help="evaluate every pair: fooling matrix, per-background fool fractions, gallery, histogram")
    s.add_argument("--store-predictions", action="store_true", help="with --full-matrix: keep every pair's prediction")
    s.add_argument("--order", choices=("adaptive", "reference"), default="adaptive",
                   help="adaptive = most fooling backgrounds (per class) first; reference = fixed order")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="composites per forward (default 512 CUDA, 64 CPU)")
    s.add_argument("--fg-tile", type=positive_int, default=None,
                   help="foregrounds searched at once (default 4 x batch size)")
    s.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (only a run with the same settings, data and model)")
    s.add_argument("--checkpoint-every", type=seconds, default=60.0, help="seconds between checkpoints")
    s.add_argument("--share-every", type=nonneg_int, default=8,
                   help="under torchrun, adaptive order: exchange the ranks' fooling statistics every N search steps "
                        "(0: never; the answer does not depend on it)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 on CUDA, off on CPU")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    r.add_argument("--max-batch", type=positive_int, default=None,
                   help="largest forward chunk (halved automatically on out-of-memory)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=positive_int, default=None,
                   help="CPU device: the model's intra-op threads (default: the cores less the decoder's, at least 1)")
    r.add_argument("--decode-threads", type=positive_int, default=None,
                   help="decoder threads (default: 1 on a CPU device; the decoder's own default on CUDA)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=out_dir, required=True, help="output folder (result, checkpoint, plots)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run in --out (only the files that run wrote, its checkpoints "
                        "included)")
    o.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from ..challenge import ChallengeConfig, challenge_foregrounds, challenge_to_dir
    from ..distributed import init_distributed
    from ..evaluate import cpu_thread_split
    from ..index import DatasetIndex

    split = None if args.split == "all" else args.split
    # the job's settings first: refused before the index or the model is loaded
    config = ChallengeConfig(split=split, bg_per_class=args.bg_per_class, fg_tile=args.fg_tile,
                             order=args.order, full_matrix=args.full_matrix, store_predictions=args.store_predictions,
                             resume=args.resume, checkpoint_every=args.checkpoint_every, share_every=args.share_every)
    ctx = init_distributed()
    device = ctx.device(None if args.device == "auto" else args.device)
    model_threads, decode_threads = cpu_thread_split(device, args.threads, args.decode_threads)
    if model_threads is not None:
        torch.set_num_threads(model_threads)  # this process is the command's: the model's share of the cores
    index = DatasetIndex.load(resolve_index(args.index, ctx, progress=args.progress and ctx.is_main))
    _loaded, predictor = predictor_from_args(args, device, index.label_space)
    if args.fg_per_class is not None:
        fg_ids = challenge_foregrounds(index, split, fg_per_class=args.fg_per_class, seed=args.seed)
        config = dataclasses.replace(config, fg_ids=fg_ids)
    # the run's options: resolve_run turns them into the RunConfig (the crop geometry from --resize/--crop over the
    # checkpoint's, the batch size as composites per forward)
    # the output folder is claimed (fingerprint: settings, index, model) before the search starts
    result, paths = challenge_to_dir(
        index, predictor, args.out, config=config, plots=args.plots, overwrite=args.overwrite, resize=args.resize,
        crop=args.crop, backend=args.backend, device=device, seed=args.seed, batch_size=args.batch_size,
        tiling=args.tiling, progress=args.progress and ctx.is_main, num_threads=decode_threads,
    )
    if ctx.is_main:
        print(result.format())
        t = result.timing
        if "forwards_per_s" in t and t.get("forwards_per_s"):
            print(f"  {t['forwards_this_process']:,} forwards in {t['wall_s']:.1f} s ({t['forwards_per_s']:.0f} /s)"
                  + (" (resumed)" if t.get("resumed") else ""))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
