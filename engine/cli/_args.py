"""Argument types and the option groups several commands share (one definition for every command)."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "fraction", "unit_interval", "seconds", "add_model_args", "add_tiling_arg",
           "predictor_from_args", "resolve_index", "geometry_from_args"]


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return v


def unit_interval(text: str) -> float:
    v = float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def seconds(text: str) -> float:
    v = float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return v


def add_model_args(p: argparse.ArgumentParser, unmapped: str = "wrong") -> argparse._ArgumentGroup:
    """The ``model`` option group of the commands that run a classifier (eval, challenge)."""
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="architecture name (bgsynth_cnn, any torchvision/timm name; random init unless --weights) "
                        "or a checkpoint file (bgsynth checkpoint, TorchScript, pickled module with --trust-checkpoint)")
    m.add_argument("--weights", default=None,
                   help="state_dict file for --model ARCH (plain, nested under 'model'/'state_dict', prefixed, or the "
                        "official backgrounds-challenge normaliser layout)")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling Python objects from the checkpoint (can run arbitrary code: trusted files only)")
    m.add_argument("--num-classes", type=positive_int, default=None,
                   help="output width of a fresh architecture (default 9; taken from --weights when given)")
    m.add_argument("--output-space", choices=("auto", "in9", "in1k"), default="auto",
                   help="what the outputs are: auto = 9 outputs -> IN-9, 1000 -> ImageNet-1k mapped to IN-9")
    m.add_argument("--label-protocol", choices=("official", "restricted"), default="official",
                   help=f"1000-class models: official = top-1 over all classes (unmapped = {unmapped}); restricted = "
                        "argmax over the 370 classes that map to IN-9")
    m.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="input normalisation mean (default: by output space, or stored in the checkpoint)")
    m.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="input normalisation std")
    return m


def add_tiling_arg(group) -> None:
    """``--tiling paper|crop``: how Only-BG-T (and so every Mixed-* background) is built."""
    group.add_argument("--tiling", choices=("paper", "crop"), default="paper",
                       help="Only-BG-T construction: paper = the strip rule and tiling on the stored image at full "
                            "resolution, then resize + crop (the authors' backgrounds); crop = tiled inside the crop "
                            "(a faster approximation that differs on real photographs, see docs/variants.md)")


def predictor_from_args(args, device):
    """Load ``--model`` and wrap it in a :class:`~bgsynth.models.Predictor`; returns ``(loaded, predictor)``."""
    from ..models import Predictor, load_model

    loaded = load_model(args.model, weights=args.weights, trust_checkpoint=args.trust_checkpoint,
                        num_classes=args.num_classes, output_space=args.output_space)
    return loaded, Predictor(loaded, device=device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                             label_protocol=args.label_protocol, mean=args.mean, std=args.std,
                             max_batch=getattr(args, "max_batch", None))


def resolve_index(arg: str, ctx, progress: bool):
    """``'builtin'`` -> the built-in dataset's index path (built once per node under torchrun); else ``arg``."""
    if arg != "builtin":
        return arg
    from ..sources.synthetic import build_builtin_dataset

    with ctx.main_first():  # one rank per node builds the cache, the others find it
        return build_builtin_dataset(progress=progress)


def geometry_from_args(args, loaded):
    """``--resize/--crop`` over the checkpoint's geometry; ``None`` when neither is given (the consumer decides)."""
    from ..geometry import CropGeometry

    if args.resize is None and args.crop is None:
        return None
    g = loaded.geometry or {}
    resize = args.resize or int(g.get("resize", 256))
    crop = args.crop or int(g.get("crop", min(224, resize)))
    return CropGeometry(resize, crop)
