"""Tables of evaluation results: the paper's variant table, counts, per-class and per-background-class accuracy,
and group accuracy (foreground class x background class) where a result has it.

Every function takes :class:`~bgsynth.results.EvalResult` objects and returns text (Markdown or CSV); nothing is
printed or written here. Class names and their number come from the result's label space
(:func:`label_space_of`: the result's own when it records one, else IN-9's).

>>> markdown_table(["a", "b"], [[1, 2.5]])
'| a | b |\\n|---|---|\\n| 1 | 2.5 |'
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping
from typing import Any, Sequence

from ..classes import IN9, LabelSpace
from ..errors import ConfigError
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
    "label_space_of",
    "class_names",
    "space_label",
    "has_groups",
    "group_summary_table",
    "group_table",
]

#: the paper's name of every registered variant (``'mixed_rand'`` -> ``'Mixed-Rand'``), from the one registry
VARIANT_LABELS = {name: spec.display for name, spec in VARIANTS.items()}
#: the paper's table order: the registry's (Original, Only-BG-B, Only-BG-T, No-FG, Only-FG, Mixed-Same, -Rand, -Next)
PAPER_COLUMNS = tuple(VARIANT_LABELS)


def _as_space(value) -> LabelSpace | None:
    """A label space from what a result may record: a :class:`LabelSpace`, its dict, or a list of class names."""
    if value is None:
        return None
    if isinstance(value, LabelSpace):
        return value
    try:
        if isinstance(value, Mapping):
            return LabelSpace.from_dict(value)
        names = tuple(str(v) for v in value)
    except (ConfigError, TypeError):
        return None
    return IN9 if names == IN9.classes else LabelSpace.from_names(names)


def _class_count(result) -> int | None:
    """The number of classes a result's per-class metrics have (``None`` without metrics)."""
    for m in (getattr(result, "metrics", None) or {}).values():
        acc = (m.get("per_class") or {}).get("accuracy") if isinstance(m, Mapping) else None
        if acc is not None:
            return len(acc)
    return None


def label_space_of(result) -> LabelSpace:
    """The label space of a result: the one it records (``result.label_space``, or ``label_space`` / ``classes`` in
    its config or dataset record), else IN-9 (results written before label spaces existed).

    A recorded space whose size disagrees with the result's per-class metrics is not trusted: the classes are then
    named ``class 0`` .. ``class N-1`` (with a warning).

    >>> class R: metrics = {}
    >>> label_space_of(R()).name
    'in9'
    >>> r = R(); r.label_space = {"name": "wb", "classes": ["land", "water"]}
    >>> label_space_of(r).classes
    ('land', 'water')
    """
    space = _as_space(getattr(result, "label_space", None))
    for rec in (getattr(result, "config", None), getattr(result, "dataset", None)):
        if space is None and isinstance(rec, Mapping):
            space = _as_space(rec.get("label_space")) or _as_space(rec.get("classes"))
    space = space or _as_space(getattr(result, "classes", None)) or IN9
    n = _class_count(result)
    if n is not None and n != space.num_classes:
        warnings.warn(f"result {getattr(result, 'name', '')!r}: its label space {space.name!r} has "
                      f"{space.num_classes} classes, its per-class metrics {n}; classes shown by number",
                      stacklevel=2)
        space = LabelSpace.from_names([f"class {k}" for k in range(n)], name="unnamed")
    return space


def class_names(result) -> tuple[str, ...]:
    """The class names of a result's label space (:func:`label_space_of`)."""
    return label_space_of(result).classes


def space_label(space: LabelSpace) -> str:
    """How a label space is named in text: ``'IN-9'`` for IN-9, else its name and size."""
    return "IN-9" if space == IN9 else f"{space.name} ({space.num_classes} classes)"


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
    """Accuracy (%) per class of the result's label space (columns) and variant (rows)."""
    rows = []
    for v in result.variants:
        acc = result.metrics[v]["per_class"]["accuracy"]
        rows.append([variant_label(v)] + [fmt_pct(a, digits) for a in acc])
    return markdown_table(["variant"] + list(class_names(result)), rows)


def bg_class_table(result, digits: int = 1) -> str | None:
    """For variants with backgrounds (Mixed-*): accuracy (%) split by the background's class; ``None`` if none."""
    rows = []
    for v in result.variants:
        m = result.metrics[v]
        if m.get("by_bg_class") is None:
            continue
        acc = m["by_bg_class"]["accuracy"]
        rows.append([variant_label(v)] + [fmt_pct(a, digits) for a in acc]
                    + [fmt_pct(m.get("pred_is_bg_class"), digits)])
    if not rows:
        return None
    return markdown_table(["variant \\ background class"] + list(class_names(result)) + ["pred = bg class"], rows)


def comparison_csv(results, names: Sequence[str] | None = None) -> str:
    """CSV of the paper's table for several runs (accuracies in %, full precision)."""
    results = list(results)
    names = list(names) if names is not None else [r.name for r in results]
    cols = _columns(results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model"] + cols + ["bg_gap", "label_protocol", "seed"])
    for name, r in zip(names, results):
        acc = [("" if r.metrics.get(v, {}).get("accuracy") is None else f"{100 * r.metrics[v]['accuracy']:.4f}")
               for v in cols]
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


# ----------------------------------------------------------------------------------------------- group metrics
def has_groups(result) -> bool:
    """Whether any variant of the result carries group metrics (``metrics[v]["groups"]``)."""
    return any(isinstance(result.metrics.get(v), Mapping) and result.metrics[v].get("groups")
               for v in result.variants)


def _group_value(value) -> float | None:
    """A group statistic as a fraction: a number, or a group record's ``accuracy``."""
    if isinstance(value, Mapping):
        value = value.get("accuracy")
    return None if value is None else float(value)


def _class_name(value, names: Sequence[str]) -> str:
    """A group's class: an id of the label space (named), or a name as recorded."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= int(value) < len(names):
        return str(names[int(value)])
    return str(value)


def group_summary_table(result, digits: int = 1) -> str | None:
    """Per variant with group metrics: the number of groups, average-group and worst-group accuracy (%) and the
    aligned-vs-conflicting gap (points; foreground class = background class vs not); ``None`` without groups.

    >>> class R:
    ...     variants = ["original"]
    ...     metrics = {"original": {"groups": [{"fg_class": 0, "bg_class": 0, "correct": 3, "total": 4,
    ...                "accuracy": 0.75}], "worst_group": 0.75, "average_group": 0.75, "aligned_gap": None}}
    >>> print(group_summary_table(R()))
    | variant | groups | average group % | worst group % | aligned - conflicting (points) |
    |---|---|---|---|---|
    | Original | 1 | 75.0 | 75.0 (dog on dog) | - |
    """
    if not has_groups(result):
        return None
    names = class_names(result)
    rows = []
    for v in result.variants:
        m = result.metrics[v]
        groups = m.get("groups") if isinstance(m, Mapping) else None
        if not groups:
            continue
        worst = m.get("worst_group")
        w_acc = _group_value(worst)
        if w_acc is None and groups:
            w_acc = min(float(g["accuracy"]) for g in groups if g.get("accuracy") is not None)
        at = [g for g in groups if g.get("accuracy") is not None and w_acc is not None
              and abs(float(g["accuracy"]) - w_acc) < 1e-12]
        where = (f" ({_class_name(at[0]['fg_class'], names)} on {_class_name(at[0]['bg_class'], names)})"
                 if at else "")
        rows.append([variant_label(v), len(groups), fmt_pct(_group_value(m.get("average_group")), digits),
                     fmt_pct(w_acc, digits) + where, fmt_pct(_group_value(m.get("aligned_gap")), digits, signed=True)])
    headers = ["variant", "groups", "average group %", "worst group %", "aligned - conflicting (points)"]
    return markdown_table(headers, rows)


def group_table(result, variant: str, digits: int = 1) -> str:
    """Accuracy (%) of one variant per group: foreground class (rows) x background class (columns), each cell
    ``accuracy (correct/total)``; ``-`` for a group without images."""
    names = class_names(result)
    groups = result.metrics[variant].get("groups") or []
    fgs = sorted({g["fg_class"] for g in groups}, key=lambda c: (isinstance(c, str), c))
    bgs = sorted({g["bg_class"] for g in groups}, key=lambda c: (isinstance(c, str), c))
    cell = {(g["fg_class"], g["bg_class"]): g for g in groups}
    rows = []
    for f in fgs:
        row = [_class_name(f, names)]
        for b in bgs:
            g = cell.get((f, b))
            row.append("-" if g is None or not g.get("total") else
                       f"{fmt_pct(_group_value(g), digits)} ({g.get('correct')}/{g.get('total')})")
        rows.append(row)
    return markdown_table(["foreground \\ background"] + [_class_name(b, names) for b in bgs], rows)
