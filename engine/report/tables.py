"""Tables of evaluation results: the paper's variant table, counts, per-class and per-background-class accuracy.

Every function takes :class:`~bgsynth.results.EvalResult` objects and returns text (Markdown or CSV); nothing is
printed or written here.

>>> markdown_table(["a", "b"], [[1, 2.5]])
'| a | b |\\n|---|---|\\n| 1 | 2.5 |'
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from ..classes import IN9_CLASSES
from ..variants import VARIANTS

__all__ = [
    "VARIANT_LABELS",
    "PAPER_COLUMNS",
    "variant_label",
    "fmt_pct",
    "markdown_table",
    "paper_table",
    "paper_rows",
    "counts_table",
    "per_class_table",
    "bg_class_table",
    "comparison_csv",
    "text_table",
    "format_summary",
]

#: the paper's name of every registered variant (``'mixed_rand'`` -> ``'Mixed-Rand'``), from the one registry
VARIANT_LABELS = {name: spec.display for name, spec in VARIANTS.items()}
#: the paper's table order: the registry's (Original, Only-BG-B, Only-BG-T, No-FG, Only-FG, Mixed-Same, -Rand, -Next)
PAPER_COLUMNS = tuple(VARIANT_LABELS)


def variant_label(name: str) -> str:
    """Display name of a variant (``'mixed_rand'`` -> ``'Mixed-Rand'``); unknown names are returned as is."""
    return VARIANT_LABELS.get(name, name)


def fmt_pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    """A fraction as a percentage string (``None`` -> ``'-'``)."""
    if x is None:
        return "-"
    return f"{100.0 * x:+.{digits}f}" if signed else f"{100.0 * x:.{digits}f}"


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``; ``|`` escaped)."""
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(esc(c) for c in r) + " |")
    return "\n".join(lines)


def text_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table for the console."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def _columns(results) -> list[str]:
    present = set()
    for r in results:
        present.update(r.variants)
    cols = [v for v in PAPER_COLUMNS if v in present]
    cols += sorted(present - set(cols))
    return cols


def paper_rows(results, names: Sequence[str] | None = None, digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the paper's table: one row per result, accuracies in %, then BG-Gap (points)."""
    results = list(results)
    names = list(names) if names is not None else [r.name for r in results]
    cols = _columns(results)
    headers = ["model"] + [variant_label(v) for v in cols] + ["BG-Gap"]
    rows = []
    for name, r in zip(names, results):
        row = [name] + [fmt_pct(r.metrics[v]["accuracy"], digits) if v in r.metrics else "-" for v in cols]
        row.append(fmt_pct(r.bg_gap, digits) if r.bg_gap is not None else "-")
        rows.append(row)
    return headers, rows


def paper_table(results, names: Sequence[str] | None = None, digits: int = 1) -> str:
    """The paper's table (Original, Only-BG-B, Only-BG-T, No-FG, Only-FG, Mixed-Same, Mixed-Rand, Mixed-Next,
    BG-Gap) as Markdown, one row per result; accuracies in percent."""
    return markdown_table(*paper_rows(results, names, digits))


def counts_table(result) -> str:
    """Per variant: accuracy, correct/total, invalid (excluded) and unmapped predictions."""
    rows = []
    for v in result.variants:
        m = result.metrics[v]
        rows.append([variant_label(v), fmt_pct(m["accuracy"], 2), f"{m['correct']}/{m['total']}", m["invalid"],
                     m.get("unmapped", 0)])
    return markdown_table(["variant", "accuracy %", "correct/total", "invalid (excluded)", "unmapped preds"], rows)


def per_class_table(result, digits: int = 1) -> str:
    """Accuracy (%) per IN-9 class (columns) and variant (rows)."""
    rows = []
    for v in result.variants:
        acc = result.metrics[v]["per_class"]["accuracy"]
        rows.append([variant_label(v)] + [fmt_pct(a, digits) for a in acc])
    return markdown_table(["variant"] + list(IN9_CLASSES), rows)


def bg_class_table(result, digits: int = 1) -> str | None:
    """For variants with backgrounds (Mixed-*): accuracy (%) split by the background's class; ``None`` if none."""
    rows = []
    for v in result.variants:
        m = result.metrics[v]
        if m.get("by_bg_class") is None:
            continue
        acc = m["by_bg_class"]["accuracy"]
        rows.append([variant_label(v)] + [fmt_pct(a, digits) for a in acc] + [fmt_pct(m.get("pred_is_bg_class"), digits)])
    if not rows:
        return None
    return markdown_table(["variant \\ background class"] + list(IN9_CLASSES) + ["pred = bg class"], rows)


def comparison_csv(results, names: Sequence[str] | None = None) -> str:
    """CSV of the paper's table for several runs (accuracies in %, full precision)."""
    results = list(results)
    names = list(names) if names is not None else [r.name for r in results]
    cols = _columns(results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model"] + cols + ["bg_gap", "label_protocol", "seed"])
    for name, r in zip(names, results):
        acc = [("" if r.metrics.get(v, {}).get("accuracy") is None else f"{100 * r.metrics[v]['accuracy']:.4f}") for v in cols]
        gap = "" if r.bg_gap is None else f"{100 * r.bg_gap:.4f}"
        w.writerow([name] + acc + [gap, r.label_protocol, r.config.get("seed", "")])
    return buf.getvalue()


def format_summary(results, names: Sequence[str] | None = None) -> str:
    """The paper's table as aligned console text (accuracies in %), with the label protocol and image counts."""
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    headers, rows = paper_rows(results, names)
    lines = [text_table(headers, rows)]
    for name, r in zip(names or [r.name for r in results], results):
        inval = sum(r.metrics[v]["invalid"] for v in r.variants)
        lines.append(
            f"{name}: {r.dataset.get('images')} images, label protocol '{r.label_protocol}', "
            f"seed {r.config.get('seed')}" + (f", {inval} invalid composites excluded" if inval else "")
        )
    return "\n".join(lines)
