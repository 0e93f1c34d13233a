"""Argument types and the option groups several commands share (one definition for every command).

One argparse type per kind of value, so every command rejects the same bad value with the same one-line message
before any work starts (argparse prints ``bgsynth CMD: error: argument --x: <message>`` and exits with 2):

=====================  ================================================================================
``positive_int``       counts, sizes, batch sizes, thread numbers (>= 1)
``nonneg_int``         counts that may be 0 (e.g. examples per class)
``fraction``           [0, 1]; ``unit_interval`` (0, 1]; ``seconds`` >= 0
``existing_file``      an input file that must exist and be a file
``existing_dir``       an input folder that must exist and be a folder
``index_path``         ``'builtin'`` or an existing index JSON file
``out_dir``            an output folder: not an existing file, its nearest existing parent a folder
``out_file``           an output file: not an existing folder, its nearest existing parent a folder
=====================  ================================================================================

The output types check the kind of path only (they create nothing); :class:`bgsynth.runs.OutputFolder` then
claims the folder, with a real write probe, before the command's work.

:class:`HelpFormatter` shows defaults without the misleading ``(default: True)`` of ``--no-x`` switches.
"""

from __future__ import annotations

import argparse
import os
import pathlib

__all__ = ["positive_int", "jpeg_quality", "nonneg_int", "fraction", "unit_interval", "seconds", "existing_file", "existing_dir",
           "index_path", "out_dir", "out_file", "HelpFormatter", "add_model_args", "add_tiling_arg",
           "predictor_from_args", "resolve_index", "geometry_from_args"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for on/off switches (``--no-progress`` reads "(default: True)" otherwise)."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def existing_file(text: str) -> str:
    p = pathlib.Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: expected a file, found a folder")
    return str(p)


def existing_dir(text: str) -> str:
    p = pathlib.Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: expected a folder, found a file")
    return str(p)


def index_path(text: str) -> str:
    """``'builtin'`` or an existing file (its content is checked when the command loads it, before any work)."""
    return text if text == "builtin" else existing_file(text)


def _nearest_parent_is_dir(p: pathlib.Path, text: str) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, so nothing can be written below it")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not writable")


def out_dir(text: str) -> str:
    p = pathlib.Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is an existing file, expected a folder")
    _nearest_parent_is_dir(p, text)
    return str(p)


def out_file(text: str) -> str:
    p = pathlib.Path(text).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is an existing folder, expected a file name")
    _nearest_parent_is_dir(p, text)
    return str(p)


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def jpeg_quality(text: str) -> int:
    v = positive_int(text)
    if v > 100:
        raise argparse.ArgumentTypeError(f"expected a JPEG quality in 1..100, got {text}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return v


def fraction(text: str) -> float:
    v = _float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return v


def unit_interval(text: str) -> float:
    v = _float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def seconds(text: str) -> float:
    v = _float(text)
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
    m.add_argument("--output-map", type=existing_file, default=None, metavar="MAP.json",
                   help="how the model's outputs map onto the index's classes: a JSON {\"<output>\": <class id>} "
                        "(many-to-one; unnamed outputs map to no class). Default: identity when the widths match, "
                        "ImageNet-1k -> IN-9 on IN-9 data")
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


def predictor_from_args(args, device, label_space=None):
    """Load ``--model`` and wrap it in a :class:`~bgsynth.models.Predictor` answering in ``label_space`` (the
    index's; IN-9 when ``None``) through ``--output-map``; returns ``(loaded, predictor)``."""
    from ..models import Predictor, load_model

    loaded = load_model(args.model, weights=args.weights, trust_checkpoint=args.trust_checkpoint,
                        num_classes=args.num_classes, output_space=args.output_space)
    return loaded, Predictor(loaded, device=device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                             label_protocol=args.label_protocol, mean=args.mean, std=args.std,
                             max_batch=getattr(args, "max_batch", None), label_space=label_space,
                             output_map=getattr(args, "output_map", None))


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
