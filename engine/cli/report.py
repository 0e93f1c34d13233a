"""``bgsynth report DIR [DIR ...] --out DIR``: one run's report, or several runs side by side."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="write report.md (paper's table, charts, examples) for one or several eval runs",
        description=(
            "Read the results.json of one or more `bgsynth eval` output folders and write report.md with the paper's "
            "table (one row per run), a grouped bar chart of variant accuracies with the chance line, per-class and "
            "per-background-class heatmaps, and each run's example sheet."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="DIR", help="eval output folders (or results.json files)")
    p.add_argument("--out", required=True, help="output folder of the report")
    p.add_argument("--names", default=None, help="comma-separated display names, one per run")
    p.add_argument("--title", default=None, help="report title")
    return p


def run(args: argparse.Namespace) -> int:
    from ..report import load_results, write_report
    from ..report.tables import format_summary

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    path = write_report(list(args.runs), args.out, names=names, title=args.title)
    results = load_results(list(args.runs))
    print(format_summary(results, names))
    print(f"wrote {path}")
    return 0
