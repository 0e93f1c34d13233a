"""``bgsynth report DIR [DIR ...] --out DIR``: one run's report, or several runs side by side."""

from __future__ import annotations

import argparse

from ._args import HelpFormatter, out_dir

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="write report.md (paper's table, charts, examples) for one or several eval runs",
        description=(
            "Read the results.json of one or more `bgsynth eval` output folders and write report.md with the paper's "
            "table (one row per run), a grouped bar chart of variant accuracies with the chance line, per-class and "
            "per-background-class heatmaps, group accuracy (foreground class x background class) where the results "
            "have it, and each run's example sheet. Class names come from each result's label space. The report "
            "belongs to one set of runs: a report of other runs in --out is refused unless --overwrite."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="DIR", help="eval output folders (or results.json files)")
    p.add_argument("--out", required=True, type=out_dir, help="output folder of the report")
    p.add_argument("--names", default=None, help="comma-separated display names, one per run")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report of other runs in --out (only that report's files)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..report import load_results, write_report
    from ..report.tables import format_summary

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    path = write_report(list(args.runs), args.out, names=names, title=args.title, overwrite=args.overwrite)
    results = load_results(list(args.runs))
    print(format_summary(results, names))
    print(f"wrote {path}")
    return 0
