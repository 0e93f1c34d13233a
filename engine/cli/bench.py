"""``bgsynth bench [INDEX]``: images/s of every stage (decode, synthesis, model, end to end) and the bottleneck
(see :mod:`bgsynth.bench`); ``bgsynth bench --compare A B ...`` puts several ``bench.json`` side by side."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, existing_file, index_path, nonneg_int, out_dir, positive_int

__all__ = ["register", "run"]


def _int_list(text: str) -> tuple[int, ...]:
    """``'32,64'`` -> ``(32, 64)``: positive integers, comma-separated."""
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return tuple(positive_int(t.strip()) for t in parts)


def _bench_file(text: str) -> str:
    """A ``bench.json`` or a folder holding one."""
    import pathlib

    p = pathlib.Path(text).expanduser()
    if p.is_dir():
        p = p / "bench.json"
    return existing_file(str(p))


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="throughput of every stage (decode, synthesis, model, end to end) and the bottleneck",
        description=(
            "Measure images/s of each stage of an evaluation for a model, batch sizes, dtype, device and resolution: "
            "decode (each available backend), synthesis (each variant and all), the model's forward alone and "
            "bgsynth eval end to end; on CUDA also the composite kernel's memory bandwidth as a share of the "
            "device's peak. Prints a table, names the bottleneck and writes bench.json and bench.png into --out. "
            "INDEX is a dataset index JSON or 'builtin' (default). With --compare, puts several bench.json side by "
            "side instead (a table, and compare.png in --out)."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("index", nargs="?", type=index_path, default="builtin", help="dataset index (JSON) or 'builtin'")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="bgsynth_cnn", help="architecture name or checkpoint file (as for bgsynth eval)")
    m.add_argument("--weights", default=None, type=existing_file, help="state_dict file for --model ARCH")
    m.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling Python objects (trusted files only)")
    m.add_argument("--batch-sizes", type=_int_list, default=None,
                   help="forward batch sizes, comma-separated; the first is also the evaluation's (default 64 CPU, "
                        "256 CUDA)")
    m.add_argument("--dtype", choices=("auto", "float32", "bf16", "fp16"), default="auto",
                   help="compute dtype: auto = bf16 on CUDA, float32 on the CPU")
    d = p.add_argument_group("data")
    d.add_argument("--split", default="val", help="split of the images ('all': every image)")
    d.add_argument("--images", type=positive_int, default=96, help="images measured (the first of the sorted ids)")
    d.add_argument("--variants", default="all", help="'all' or a comma-separated list")
    d.add_argument("--resize", type=positive_int, default=None, help="shorter side (default: the model's, else 72 "
                   "for bgsynth_cnn and 256 otherwise)")
    d.add_argument("--crop", type=positive_int, default=None, help="centre crop (default: 64 for bgsynth_cnn, else 224)")
    d.add_argument("--tiling", choices=("paper", "crop"), default="paper", help="Only-BG-T construction")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    r.add_argument("--backend", default="auto", help="decode backend of synthesis and end to end")
    r.add_argument("--backends", default="all", help="decode backends of the decode stage ('all': every available)")
    r.add_argument("--threads", type=positive_int, default=None, help="decoder threads (default: a quarter of the "
                   "cores on CPU, all but one on CUDA)")
    r.add_argument("--stages", default="all", help="comma-separated subset of decode,synthesis,model,end_to_end,kernel")
    r.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement (median), after a warm-up")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of the Mixed-* background choice")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=out_dir, default="bgsynth-bench", help="output folder")
    o.add_argument("--overwrite", action="store_true", help="replace the files of another bench run in --out")
    o.add_argument("--no-chart", dest="chart", action="store_false", help="skip bench.png")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    o.add_argument("--compare", nargs="+", type=_bench_file, default=None, metavar="BENCH",
                   help="bench.json files (or their folders) to put side by side; no measuring")
    return p


def run(args: argparse.Namespace) -> int:
    from ..bench import STAGES, bench_chart, compare_benches, index_sha, load_bench, run_bench
    from ..index import DatasetIndex

    if args.compare:
        return _compare(args, load_bench, compare_benches, bench_chart)
    if args.index == "builtin":
        from ..sources.synthetic import build_builtin_dataset

        args.index = str(build_builtin_dataset(progress=args.progress))
    index = DatasetIndex.load(args.index)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    backends = None if args.backends == "all" else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    model = args.model
    if args.weights or args.trust_checkpoint:
        from ..models import load_model

        model = load_model(args.model, weights=args.weights, trust_checkpoint=args.trust_checkpoint)
    result = run_bench(
        index, model=model, batch_sizes=args.batch_sizes or (), dtype=args.dtype, variants=args.variants,
        split=None if args.split == "all" else args.split, images=args.images, repeats=args.repeats, stages=stages,
        decode_backends=backends, device=args.device, resize=args.resize, crop=args.crop, backend=args.backend,
        tiling=args.tiling, num_threads=args.threads, seed=args.seed, progress=args.progress,
    )
    paths = result.save(args.out, overwrite=args.overwrite, index_sha=index_sha(index), chart=args.chart)
    dev = result.device
    print(f"{dev['name']} ({dev['type']}, {dev['cores']} cores, torch threads {dev['torch_threads']}), "
          f"{result.config['images']} images at {result.run['geometry']['crop']} px, amp {result.run['amp']}, "
          f"load average {' '.join(f'{v:.1f}' for v in result.load_average['start'])} -> "
          f"{' '.join(f'{v:.1f}' for v in result.load_average['end'])}")
    print(result.table())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _compare(args, load_bench, compare_benches, bench_chart) -> int:
    import pathlib

    from ..runs import Fingerprint, OutputFolder

    results = [load_bench(f) for f in args.compare]
    labels = [pathlib.Path(f).parent.name or r.device.get("name", "") for f, r in zip(args.compare, results)]
    print(compare_benches(results, labels))
    if args.chart:
        folder = OutputFolder(args.out, Fingerprint("bench-compare", {"inputs": [str(f) for f in args.compare]}),
                              overwrite=args.overwrite, owned=lambda p: p.name == "compare.png").claim()
        path = bench_chart(results, folder.path / "compare.png", labels=labels)
        folder.commit([path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # `python -m bgsynth.cli.bench ...` before the command is listed in bgsynth.cli.COMMANDS
    import sys

    _parser = argparse.ArgumentParser(prog="bgsynth")
    _sub = _parser.add_subparsers(dest="command")
    register(_sub)
    sys.exit(run(_parser.parse_args(["bench", *sys.argv[1:]])))
