"""``bgsynth eval INDEX --model ...``: all variants in one pass, results + report (see :func:`engine.evaluate.evaluate`)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


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
            "torchrun --nproc_per_node=8 -m engine.cli eval INDEX --model ckpt.pt"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index", help="dataset index (COCO-format JSON) or 'builtin'")
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="architecture name (bgsynth_cnn, any torchvision/timm name; random init unless --weights) "
                        "or a checkpoint file (bgsynth checkpoint, TorchScript, pickled module with --trust-checkpoint)")
    m.add_argument("--weights", default=None,
                   help="state_dict file for --model ARCH (plain, nested under 'model'/'state_dict', prefixed, or the "
                        "official backgrounds-challenge normaliser layout)")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="allow unpickling Python objects from the checkpoint (can run arbitrary code: trusted files only)")
    m.add_argument("--num-classes", type=_positive_int, default=None,
                   help="output width of a fresh architecture (default 9; taken from --weights when given)")
    m.add_argument("--output-space", choices=("auto", "in9", "in1k"), default="auto",
                   help="what the outputs are: auto = 9 outputs -> IN-9, 1000 -> ImageNet-1k mapped to IN-9")
    m.add_argument("--label-protocol", choices=("official", "restricted"), default="official",
                   help="1000-class models: official = top-1 over all classes (unmapped = wrong); restricted = "
                        "argmax over the 370 classes that map to IN-9")
    m.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="input normalisation mean (default: by output space, or stored in the checkpoint)")
    m.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="input normalisation std")
    d = p.add_argument_group("data")
    d.add_argument("--variants", default="all", help="'all' or a comma-separated list (e.g. original,mixed_rand)")
    d.add_argument("--split", default="val", help="split to evaluate ('all': every image of the index)")
    d.add_argument("--per-class", type=_positive_int, default=None, help="a balanced subset: N images of each class (seeded choice)")
    d.add_argument("--seed", type=int, default=0, help="seed of the Mixed-* background choice")
    d.add_argument("--resize", type=_positive_int, default=None,
                   help="crop geometry: shorter side (default: the checkpoint's, else 256)")
    d.add_argument("--crop", type=_positive_int, default=None,
                   help="crop geometry: centre crop (default: the checkpoint's, else 224)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    r.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default 64 CPU, 256 CUDA)")
    r.add_argument("--max-batch", type=_positive_int, default=None,
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
    from engine.distributed import init_distributed
    from engine.evaluate import evaluate_to_dir
    from engine.geometry import CropGeometry
    from engine.models import Predictor, load_model
    from engine.report.tables import format_summary

    ctx = init_distributed()  # a no-op without torchrun
    device = ctx.device(None if args.device == "auto" else args.device)
    progress = args.progress and ctx.is_main
    index = args.index
    if index == "builtin":
        from engine.sources.synthetic import build_builtin_dataset

        with ctx.main_first():  # one rank per node builds the cache, the others find it
            index = build_builtin_dataset(progress=progress)
    loaded = load_model(args.model, weights=args.weights, trust_checkpoint=args.trust_checkpoint,
                        num_classes=args.num_classes, output_space=args.output_space)
    predictor = Predictor(loaded, device=device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                          label_protocol=args.label_protocol, mean=args.mean, std=args.std, max_batch=args.max_batch)
    geometry = None
    if args.resize is not None or args.crop is not None:
        g = loaded.geometry or {}
        resize = args.resize or int(g.get("resize", 256))
        crop = args.crop or int(g.get("crop", min(224, resize)))
        geometry = CropGeometry(resize, crop)
    batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    result, paths = evaluate_to_dir(
        index, predictor, args.out, provenance=args.provenance, report=args.report, name=args.name,
        variants=args.variants, split=None if args.split == "all" else args.split, seed=args.seed,
        geometry=geometry, backend=args.backend, device=device, batch_size=batch_size, progress=progress,
        per_class=args.per_class, examples_per_class=args.examples_per_class, dist=ctx,
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
