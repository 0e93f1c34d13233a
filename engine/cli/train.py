"""``bgsynth train INDEX --out ckpt.pt``: train a model with online background-swap augmentation
(see :func:`bgsynth.train.train`)."""

from __future__ import annotations

import argparse

from ._args import add_tiling_arg, positive_int, unit_interval

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model on a split with online background-swap augmentation (Mixed-Rand etc. on the device)",
        description=(
            "Decode a split once, then train with per-sample Original / Mixed-Rand / Mixed-Same / Only-FG / No-FG "
            "composites (random resized crop and flip applied to image and mask before compositing) made on the "
            "device every step. Saves a checkpoint that `bgsynth eval --model` loads. INDEX is a dataset index "
            "JSON, or 'builtin' for the built-in dataset. The paper's Mixed-Rand training set is "
            "--augment mixed_rand=1.0. Under torchrun it trains as DistributedDataParallel (--batch-size is the "
            "global batch): torchrun --nproc_per_node=8 -m bgsynth.cli train INDEX --out ckpt.pt"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index", help="dataset index (COCO-format JSON) or 'builtin'")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    m = p.add_argument_group("model and optimisation")
    m.add_argument("--arch", default="bgsynth_cnn", help="bgsynth_cnn or any torchvision / timm architecture name")
    m.add_argument("--epochs", type=positive_int, default=14, help="passes over the training split")
    m.add_argument("--batch-size", type=positive_int, default=64, help="samples per step")
    m.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.1 for SGD, 2e-3 for AdamW, times batch-size/64)")
    m.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay")
    m.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    m.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), default="onecycle", help="LR schedule")
    m.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    m.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and augmentation draws")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment", default="original=1.0",
                   help="variant probabilities, e.g. 'mixed_rand=1.0' or 'original=0.5,mixed_rand=0.5' (variants: "
                        "original, mixed_rand, mixed_same, only_fg, no_fg; original takes the remainder)")
    a.add_argument("--bg-source", choices=("pool", "batch"), default="pool",
                   help="backgrounds from the split's Only-BG-T pool on the device, or from another sample of the "
                        "batch")
    a.add_argument("--random-resized-crop", action="store_true",
                   help="random resized crop (area fraction in [--min-scale, 1]); off by default (the demo's short "
                        "schedule on 64 px crops does better with flips alone)")
    a.add_argument("--min-scale", type=unit_interval, default=0.35,
                   help="random resized crop: smallest area fraction")
    a.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flip")
    add_tiling_arg(a)
    d = p.add_argument_group("data")
    d.add_argument("--split", default="train", help="training split")
    d.add_argument("--val-split", default="val", help="split for the final Original accuracy ('none': skip)")
    d.add_argument("--resize", type=positive_int, default=None, help="crop geometry: shorter side (default 72)")
    d.add_argument("--crop", type=positive_int, default=None, help="crop geometry: centre crop (default 64)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 on CUDA, off on CPU")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..distributed import init_distributed
    from ..train import train

    ctx = init_distributed()  # DistributedDataParallel under torchrun; a no-op otherwise
    index = args.index
    if index == "builtin":
        from ..sources.synthetic import build_builtin_dataset

        with ctx.main_first():  # one rank per node builds the cache, the others find it
            index = build_builtin_dataset(progress=args.progress and ctx.is_main)
    res = train(
        index, dist=ctx, arch=args.arch, split=args.split,
        val_split=None if args.val_split == "none" else args.val_split, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, resize=args.resize,
        crop=args.crop, device=args.device, augment=args.augment, bg_source=args.bg_source,
        random_resized_crop=args.random_resized_crop, flip=args.flip, scale=(args.min_scale, 1.0),
        optimizer=args.optimizer, schedule=args.schedule, label_smoothing=args.label_smoothing, out=args.out,
        progress=args.progress and ctx.is_main, amp=args.amp, backend=args.backend, tiling=args.tiling,
    )
    if ctx.is_main:
        _report(res, args.arch)
    return 0


def _report(res, arch: str) -> None:
    """Print what the run did: steps, last epoch, fallbacks, val accuracy, checkpoint."""
    last = res.history[-1] if res.history else {}
    aug = ", ".join(f"{k}={v:g}" for k, v in res.config["augment"].items())
    print(f"trained {arch} ({aug}) for {res.config['epochs']} epochs, {res.steps} steps, {res.images} samples "
          f"in {res.seconds:.1f} s; last epoch loss {last.get('loss', float('nan')):.3f}, "
          f"train accuracy {100 * last.get('accuracy', float('nan')):.1f}%")
    fell = {k: v["fell_back"] for k, v in res.augment_stats.items() if v["fell_back"]}
    if fell:
        print(f"samples that fell back to Original (no mask or no background): {fell}")
    if res.val_accuracy is not None:
        print(f"Original accuracy on {res.config['val_split']}: {100 * res.val_accuracy:.1f}% "
              f"of {res.val_total} images")
    print(f"wrote {res.checkpoint}")
