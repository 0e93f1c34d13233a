"""Reports of evaluation runs: ``report.md`` with the paper's table, plots and a contact sheet.

Pure reporting: everything here reads :class:`~bgsynth.results.EvalResult` objects (or the run folders that hold
them) and writes text and figures; nothing decodes an image or runs a model.

* :func:`write_report` writes one run's report, or several runs side by side (one table, one grouped chart).
* :mod:`bgsynth.report.tables` (Markdown/CSV tables) and :mod:`bgsynth.report.plots` (matplotlib/PIL figures) hold
  the pieces; :mod:`bgsynth.report.sheets` draws contact sheets of variants (made by :mod:`bgsynth.show`).

>>> write_report("runs/resnet50", "runs/resnet50")                       # doctest: +SKIP
>>> write_report(["runs/a", "runs/b"], "runs/compare", names=["A", "B"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Sequence

from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from ..results import EvalResult, load_result
from . import plots, tables

__all__ = ["write_report", "load_results"]


def load_results(sources) -> list[EvalResult]:
    """Results from :class:`~bgsynth.results.EvalResult` objects, run folders or ``results.json`` paths."""
    if isinstance(sources, (EvalResult, str, os.PathLike)):
        sources = [sources]
    out = []
    for s in sources:
        out.append(s if isinstance(s, EvalResult) else load_result(s))
    return out


def _source_dir(s) -> pathlib.Path | None:
    if isinstance(s, (str, os.PathLike)):
        p = pathlib.Path(s)
        return p if p.is_dir() else p.parent
    return None


def _header(r) -> list[str]:
    c, m, t = r.config, r.model, r.timing
    geom = c.get("geometry") or {}
    lines = [
        f"- model: `{m.get('spec', m.get('arch'))}` (arch `{m.get('arch')}`, {m.get('num_outputs')} outputs, "
        f"output space `{m.get('output_space')}`, label protocol **{r.label_protocol}**)",
        f"- data: `{c.get('index')}`, split `{c.get('split')}`, {r.dataset.get('images')} images"
        + (f" ({c['per_class']} per class)" if c.get("per_class") else ""),
        f"- geometry: resize {geom.get('resize')} -> crop {geom.get('crop')}; seed {c.get('seed')}; "
        f"backend `{c.get('backend')}`; device `{c.get('device')}`",
    ]
    if m.get("sha256"):
        lines.append(f"- checkpoint sha256: `{m['sha256'][:16]}...` ({m.get('layout')})")
    if t.get("seconds"):
        ips = t.get("images_per_s") or 0.0
        cps = t.get("composites_per_s") or 0.0
        lines.append(
            f"- time: {t['seconds']:.1f} s for {t.get('images')} images x {len(r.variants)} variants "
            f"({ips:.0f} images/s, {cps:.0f} composites/s, {t.get('forwards')} images forwarded)"
        )
    return lines


def _notes(r) -> list[str]:
    notes = []
    orig = r.metrics.get("original", {}).get("accuracy")
    bg_only = [v for v in ("only_bg_t", "only_bg_b", "no_fg") if r.metrics.get(v, {}).get("accuracy") is not None]
    if bg_only:
        best = max(bg_only, key=lambda v: r.metrics[v]["accuracy"])
        a = r.metrics[best]["accuracy"]
        verdict = "above" if a > 1 / 9 else "not above"
        notes.append(f"- Background-only accuracy ({best}: {100 * a:.1f}%) is {verdict} the 11.1% chance level.")
    if r.bg_gap is not None:
        notes.append(
            f"- BG-Gap = Mixed-Same - Mixed-Rand = {100 * r.bg_gap:+.1f} points "
            f"({'the model uses background correlation' if r.bg_gap > 0 else 'no positive gap on this run'})."
        )
    if orig is not None and "mixed_next" in r.metrics and r.metrics["mixed_next"].get("pred_is_bg_class") is not None:
        notes.append(
            f"- On Mixed-Next, {100 * r.metrics['mixed_next']['pred_is_bg_class']:.1f}% of predictions are the "
            "background's class."
        )
    inval = {v: r.metrics[v]["invalid"] for v in r.variants if r.metrics[v]["invalid"]}
    if inval:
        notes.append("- Excluded (variant undefined for the image): " + ", ".join(f"{v} {n}" for v, n in inval.items()) + ".")
    return notes


def write_report(
    result_or_dir,
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Write ``report.md`` and its figures into ``out_dir``.

    Args:
        result_or_dir: an :class:`~bgsynth.results.EvalResult`, a run folder / ``results.json``, or a list of
            them; several runs are put side by side (one table, one grouped chart, then each run's details).
        out_dir: output folder (created).
        names: display names of the runs (default: each model's name).
        title: report title.

    Returns:
        The path of ``report.md``. Figures: ``accuracy.png``, ``per_class.png`` and ``bg_class.png`` (one run; the
        last only with Mixed-*), ``examples.png`` when example composites are available.
    """
    single = not isinstance(result_or_dir, (list, tuple))
    sources = [result_or_dir] if single else list(result_or_dir)
    results = load_results(sources)
    names = _names(results, names)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    md: list[str] = [f"# {title or ('Background reliance: ' + names[0] if len(results) == 1 else 'Background reliance: comparison')}", ""]
    md += ["## Accuracy per variant (%)", "", tables.paper_table(results, names), ""]
    md += ["Accuracy is top-1 on IN-9 (chance 11.1%); BG-Gap = Mixed-Same - Mixed-Rand in points.", ""]
    plots.accuracy_bars(results, out / "accuracy.png", names)
    md += ["![accuracy per variant](accuracy.png)", ""]
    if len(results) > 1:
        atomic_write_bytes(out / "comparison.csv", tables.comparison_csv(results, names).encode("utf-8"))
    for k, (name, r, src) in enumerate(zip(names, results, sources)):
        suffix = "" if len(results) == 1 else f"_{k + 1}"
        md += _run_section(name, r, src, out, suffix, several=len(results) > 1)
    md += ["---", f"Generated by bgsynth {results[0].versions.get('bgsynth', '')} (schema {results[0].schema}).", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    return path


def _names(results: list[EvalResult], names: Sequence[str] | None) -> list[str]:
    """Display names of the runs: given, or each model's name (numbered when two agree)."""
    if names is None:
        names = [r.name for r in results]
        if len(set(names)) < len(names):
            names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    names = list(names)
    if len(names) != len(results):
        raise ConfigError(f"write_report: expected {len(results)} names, got {len(names)}")
    return names


def _run_section(name: str, r: EvalResult, src, out: pathlib.Path, suffix: str, several: bool) -> list[str]:
    """One run's part of the report: header, findings, tables, heatmaps and its example sheet."""
    md = [f"## {name}" if several else "## Run", ""] + _header(r) + [""]
    notes = _notes(r)
    if notes:
        md += ["### Findings", ""] + notes + [""]
    md += ["### Counts", "", tables.counts_table(r), ""]
    md += ["### Accuracy per class (%)", "", tables.per_class_table(r), ""]
    plots.per_class_heatmap(r, out / f"per_class{suffix}.png", title=f"{name}: accuracy per class (%)")
    md += [f"![per-class accuracy](per_class{suffix}.png)", ""]
    bgt = tables.bg_class_table(r)
    if bgt is not None:
        md += ["### Mixed-* accuracy by background class (%)", "", bgt, ""]
        if plots.bg_class_heatmap(r, out / f"bg_class{suffix}.png", title=f"{name}: accuracy by background class (%)"):
            md += [f"![accuracy by background class](bg_class{suffix}.png)", ""]
    sheet = out / f"examples{suffix}.png"
    src_dir = _source_dir(src)
    if r.example_images:
        plots.prediction_sheet(r.example_images, sheet)
    elif src_dir is not None and (src_dir / "examples.png").is_file() and (src_dir / "examples.png").resolve() != sheet.resolve():
        shutil.copyfile(src_dir / "examples.png", sheet)
    if sheet.is_file():
        md += ["### Examples", "", "Rows: one image per class; columns: variants. Green frame: correct, red: wrong, "
               "grey: variant undefined for the image; the prediction is written under each tile.", "",
               f"![examples](examples{suffix}.png)", ""]
    return md
