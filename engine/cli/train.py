"""``bgsynth train INDEX --out ckpt.pt``: train a model with online background-swap augmentation, or on a composed
set at a chosen correlation (see :func:`bgsynth.train.train`)."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, add_tiling_arg, index_path, out_file, positive_int, unit_interval

__all__ = ["register", "run", "correlations", "add_compose_args", "compose_spec"]


def correlations(text: str):
    """``--correlation``: one probability in [0, 1], or a comma-separated list of one per epoch (the last one holds
    after its end)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or a comma-separated list, got {text!r}")
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {p!r}") from None
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {p}")
        out.append(v)
    return out[0] if len(out) == 1 else tuple(out)


def add_compose_args(group, required: bool = False, default_correlation=0.95) -> None:
    """The options that define a composed set (``bgsynth train`` and ``bgsynth compose``)."""
    group.add_argument("--backgrounds", default=None, required=required, metavar="BG",
                       help="backgrounds of the composed set: a folder with one subfolder of scene images per "
                            "background class (Places-style, no masks needed), or a dataset index JSON (its Only-BG-T)")
    group.add_argument("--pairing", default=None, metavar="PAIRING.json",
                       help='JSON {"fg class": ["aligned bg class", ...]} (names or ids); default: classes of the '
                            "same name, else of the same position")
    group.add_argument("--correlation", type=correlations, default=default_correlation,
                       help="probability that a sample's background class is aligned with its class; a list "
                            "'0.95,0.9,0.5' gives one per epoch (the last holds after its end)")
    group.add_argument("--bg-split", default=None, help="of an index of backgrounds: the split to use")
    group.add_argument("--bg-per-class", type=positive_int, default=None, help="at most N backgrounds per class")


def compose_spec(args, **more):
    """The :class:`~bgsynth.compose.ComposeSpec` of the parsed compose options (``None`` without --backgrounds)."""
    from ..compose import ComposeSpec

    if args.backgrounds is None:
        return None
    return ComposeSpec(backgrounds=args.backgrounds, pairing=args.pairing, correlation=args.correlation,
                       bg_split=args.bg_split, bg_per_class=args.bg_per_class, **more)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model on a split with online background-swap augmentation (Mixed-Rand etc. on the device), "
             "or on a composed set at a chosen correlation",
        description=(
            "Decode a split once, then train with per-sample Original / Mixed-Rand / Mixed-Same / Only-FG / No-FG "
            "composites (random resized crop and flip applied to image and mask before compositing) made on the "
            "device every step. Saves a checkpoint that `bgsynth eval --model` loads. INDEX is a dataset index "
            "JSON, or 'builtin' for the built-in dataset. The paper's Mixed-Rand training set is "
            "--augment mixed_rand=1.0. With --backgrounds the training set is a composed one: each foreground on a "
            "background of the other source whose class is aligned with its own with probability --correlation "
            "(drawn anew every epoch; nothing is written). The run owns its checkpoint (a run with other settings "
            "onto it is refused unless --overwrite) and saves its state every --checkpoint-every steps and every "
            "epoch; --resume continues a killed run to the same final weights. Under torchrun it trains as "
            "DistributedDataParallel (--batch-size is the global batch): "
            "torchrun --nproc_per_node=8 -m bgsynth.cli train INDEX --out ckpt.pt"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", type=index_path, help="dataset index (COCO-format JSON) or 'builtin'")
    p.add_argument("--out", required=True, type=out_file, help="checkpoint file to write")
    add_train_args(p)
    c = p.add_argument_group("composed training set (bgsynth compose)")
    add_compose_args(c)
    c.add_argument("--fixed-draw", action="store_true",
                   help="compose every epoch with epoch 0's backgrounds (the fixed set `bgsynth compose export` "
                        "writes) instead of a new draw per epoch")
    return p


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The model, optimisation, augmentation, data, runtime and run-state options of ``bgsynth train``."""
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
    m.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after N steps (the schedule still spans --epochs)")
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
    s = p.add_argument_group("run state")
    s.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="save the run's state (<out>.state) every N steps (it is always saved at each epoch's end)")
    s.add_argument("--resume", action="store_true",
                   help="continue a killed run with the same settings from <out>.state (a finished one is returned)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint written by a run with other settings")


def train_options(args: argparse.Namespace) -> dict:
    """The keyword options of :func:`bgsynth.train.train` from the parsed ``add_train_args`` options."""
    return dict(
        arch=args.arch, split=args.split, val_split=None if args.val_split == "none" else args.val_split,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        resize=args.resize, crop=args.crop, device=args.device, augment=args.augment, bg_source=args.bg_source,
        random_resized_crop=args.random_resized_crop, flip=args.flip, scale=(args.min_scale, 1.0),
        optimizer=args.optimizer, schedule=args.schedule, label_smoothing=args.label_smoothing, amp=args.amp,
        backend=args.backend, tiling=args.tiling, max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
        resume=args.resume, overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    from ..distributed import init_distributed
    from ..train import train
    from ._args import resolve_index

    ctx = init_distributed()  # DistributedDataParallel under torchrun; a no-op otherwise
    index = resolve_index(args.index, ctx, args.progress and ctx.is_main)
    res = train(index, dist=ctx, out=args.out, progress=args.progress and ctx.is_main,
                compose=compose_spec(args, fixed=args.fixed_draw), **train_options(args))
    if ctx.is_main:
        _report(res, args.arch)
    return 0


def _report(res, arch: str) -> None:
    """Print what the run did: steps, last epoch, fallbacks, val accuracy, checkpoint."""
    if not res.history:
        print(f"{res.checkpoint}: the run had finished; nothing to train (its Original accuracy on "
              f"{res.config.get('val_split')}: {_pct(res.val_accuracy)})")
        return
    last = res.history[-1]
    aug = ", ".join(f"{k}={v:g}" for k, v in res.config["augment"].items())
    if "compose" in res.config:
        c = res.config["compose"]
        aug = f"composed on {c['backgrounds']}, correlation {c['correlation']}"
    print(f"trained {arch} ({aug}) for {res.config['epochs']} epochs, {res.steps} steps, {res.images} samples "
          f"in {res.seconds:.1f} s; last epoch loss {last.get('loss', float('nan')):.3f}, "
          f"train accuracy {100 * last.get('accuracy', float('nan')):.1f}%")
    fell = {k: v["fell_back"] for k, v in res.augment_stats.items() if v.get("fell_back")}
    if fell:
        print(f"samples that fell back to Original (no mask or no background): {fell}")
    if "compose" in res.augment_stats:
        s = res.augment_stats["compose"]
        print(f"composites: {s['composites']}, aligned {s['aligned']} "
              f"({100 * s['aligned'] / max(s['composites'], 1):.1f}%)")
    if res.val_accuracy is not None:
        print(f"Original accuracy on {res.config['val_split']}: {100 * res.val_accuracy:.1f}% "
              f"of {res.val_total} images")
    print(f"wrote {res.checkpoint}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
