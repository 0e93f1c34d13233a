"""``bgsynth export INDEX --out DIR``: the variants in the IN-9 release layout (see :func:`bgsynth.export.export`)."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, add_tiling_arg, index_path, jpeg_quality, out_dir, positive_int

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write the variants as JPEGs in the IN-9 release layout (+ fg_mask/*.npy, backgrounds.csv)",
        description=(
            "Decode each image once, synthesize the requested variants and write DIR/<variant>/<split>/<class>/"
            "<stem>.JPEG, DIR/fg_mask/<split>/<class>/<stem>.npy, DIR/backgrounds.csv (the background of every "
            "Mixed-* image) and DIR/manifest.json; class folders come from the index's label space (IN-9: 00_dog "
            "...). DIR belongs to one export: rerun the same command to finish a killed export; other settings are "
            "refused unless --overwrite. INDEX is a dataset index JSON, or 'builtin' for the built-in dataset."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", type=index_path, help="dataset index (COCO-format JSON) or 'builtin'")
    p.add_argument("--out", required=True, type=out_dir, help="release root to write (a folder)")
    p.add_argument("--variants", default="all",
                   help="'all' (every variant that exists for some image; the others are skipped and named) or a "
                        "comma-separated list (e.g. original,mixed_rand)")
    p.add_argument("--split", default="val", help="split to export ('all': every image of the index)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Mixed-* background choice")
    p.add_argument("--format", dest="image_format", choices=("jpeg", "png"), default="jpeg",
                   help="jpeg (<stem>.JPEG, as released) or png (<stem>.png, lossless: a reader of the export sees "
                        "exactly the pixels bgsynth eval feeds the model)")
    p.add_argument("--quality", type=jpeg_quality, default=95, help="JPEG quality (1..100)")
    p.add_argument("--resize", type=positive_int, default=256, help="crop geometry: shorter side")
    p.add_argument("--crop", type=positive_int, default=224, help="crop geometry: centre crop")
    add_tiling_arg(p)
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--backend", default="auto", help="decode backend: auto, dali, torchvision, pil")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"), help="variant kernels backend")
    p.add_argument("--encoder", default="auto", choices=("auto", "opencv", "pil", "torchvision"),
                   help="JPEG encoder: auto = nvJPEG (torchvision) on CUDA, OpenCV threads on the CPU (the same "
                        "bytes as PIL, which does not scale over threads)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per decoded batch")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", dest="resume", action="store_true", default=True,
                       help="continue an earlier export of the same settings in DIR, keeping its finished images "
                            "(the default)")
    again.add_argument("--no-resume", dest="resume", action="store_false",
                       help="rewrite every file of an earlier export of the same settings")
    p.add_argument("--overwrite", action="store_true",
                   help="DIR holds an export with other settings: delete its files (only those) and export anew")
    p.add_argument("--partial", action="store_true",
                   help="also write images for which some variant does not exist (the release writes none)")
    p.add_argument("--no-masks", action="store_true", help="do not write fg_mask/")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="JPEG encode/decode threads (default: min(8, CPUs))")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..export import export
    from ..index import DatasetIndex

    path = args.index
    if path == "builtin":
        from ..sources.synthetic import build_builtin_dataset

        path = build_builtin_dataset(progress=not args.quiet)
    index = DatasetIndex.load(path)  # loaded once, here
    res = export(
        index, args.out, variants=args.variants, seed=args.seed, jpeg_quality=args.quality,
        resize=args.resize, crop=args.crop, backend=args.backend, kernel_backend=args.kernels,
        device=args.device, split=None if args.split == "all" else args.split, batch_size=args.batch_size,
        resume=args.resume, overwrite=args.overwrite, consistent=not args.partial, masks=not args.no_masks,
        num_threads=args.threads, progress=not args.quiet, image_format=args.image_format, tiling=args.tiling,
        encoder=args.encoder,
    )
    print(f"exported {res.images} images to {res.out_dir} ({res.written} written now, "
          f"{max(0, res.images - res.written)} already there)")
    for folder, n in res.files.items():
        print(f"  {folder:<12} {n:>7} files")
    for name, why in res.skipped.items():
        print(f"  skipped: {name} ({why})")
    for reason, n in sorted(res.excluded.items()):
        print(f"  left out: {n} x {reason}")
    print(f"manifest: {res.manifest}\nbackgrounds: {res.backgrounds}")
    return 0
