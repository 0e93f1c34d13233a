"""Reports of evaluation runs: ``report.md`` with the paper's table, plots and a contact sheet.

Pure reporting: everything here reads :class:`~bgsynth.results.EvalResult` objects (or the run folders that hold
them) and writes text and figures; nothing decodes an image or runs a model.

* :func:`write_report` writes one run's report, or several runs side by side (one table, one grouped chart), and
  where a result has group metrics (foreground class x background class) their table and chart.
* :mod:`bgsynth.report.tables` (Markdown/CSV tables) and :mod:`bgsynth.report.plots` (matplotlib/PIL figures) hold
  the pieces; :mod:`bgsynth.report.sheets` draws contact sheets of variants (made by :mod:`bgsynth.show`).
* Class names and the chance level come from each result's label space (IN-9 unless the result records another).
* A report belongs to one run (:mod:`bgsynth.runs`): ``report.md`` and its figures are claimed together, the record
  kept as ``report.md.bgsynth-run.json``, so a report can share a folder with the run it describes. A report of
  other runs at the same place is refused unless ``overwrite``; the same runs written again (with any names or
  title) rewrite the report and remove its own figures that no longer apply. A writer that owns the folder already (an
  evaluation writing its own report) passes its claim as ``folder``.

>>> write_report("runs/resnet50", "runs/resnet50")                       # doctest: +SKIP
>>> write_report(["runs/a", "runs/b"], "runs/compare", names=["A", "B"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Sequence

import json

from ..classes import IN9
from ..errors import ConfigError
from ..fileio import atomic_write_bytes
from ..results import EvalResult, load_result
from ..runs import Fingerprint, OutputFolder, check_output_path
from . import plots, tables

__all__ = ["write_report", "load_results", "REPORT_FILE"]

REPORT_FILE = "report.md"


def load_results(sources) -> list[EvalResult]:
    """Results from :class:`~bgsynth.results.EvalResult` objects, run folders or ``results.json`` paths.

    A result read from a file keeps the label space its JSON records (``label_space``, else ``classes``) as
    ``result.label_space`` when the result object carries none.
    """
    if isinstance(sources, (EvalResult, str, os.PathLike)):
        sources = [sources]
    out = []
    for s in sources:
        if isinstance(s, EvalResult):
            out.append(s)
            continue
        r = load_result(s)
        if getattr(r, "label_space", None) is None:
            recorded = _recorded_space(s)
            if recorded is not None:
                r.label_space = recorded
        out.append(r)
    return out


def _recorded_space(source) -> dict | list | None:
    """The ``label_space`` (or ``classes``) a ``results.json`` records, or ``None``."""
    p = pathlib.Path(source)
    p = p / "results.json" if p.is_dir() else p
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return (d.get("label_space") or d.get("classes")) if isinstance(d, dict) else None


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
        + (f" ({c['per_class']} per class)" if c.get("per_class") else "")
        + ("" if tables.label_space_of(r) == IN9 else f"; classes: {tables.space_label(tables.label_space_of(r))}"),
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
        chance = 1.0 / tables.label_space_of(r).num_classes
        verdict = "above" if a > chance else "not above"
        notes.append(f"- Background-only accuracy ({best}: {100 * a:.1f}%) is {verdict} the {100 * chance:.1f}% "
                     "chance level.")
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
        notes.append("- Excluded (variant undefined for the image): "
                     + ", ".join(f"{v} {n}" for v, n in inval.items()) + ".")
    return notes


# size: the public signature: what to report, where, how to name it, and who owns the folder (keyword-only)
def write_report(
    result_or_dir,
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    title: str | None = None,
    *,
    overwrite: bool = False,
    folder: OutputFolder | None = None,
) -> pathlib.Path:
    """Write ``report.md`` and its figures into ``out_dir``.

    Args:
        result_or_dir: an :class:`~bgsynth.results.EvalResult`, a run folder / ``results.json``, or a list of
            them; several runs are put side by side (one table, one grouped chart, then each run's details).
        out_dir: output folder (created).
        names: display names of the runs (default: each model's name).
        title: report title.
        overwrite: replace a report of other runs in ``out_dir`` (only its files).
        folder: the claim of a writer that owns ``out_dir`` already (e.g. an evaluation writing its report into
            its own folder): the report's files are recorded as that writer's, and no claim of its own is made.

    Returns:
        The path of ``report.md``. Figures: ``accuracy.png``, ``per_class.png`` and ``bg_class.png`` (one run; the
        last only with Mixed-*), ``groups.png`` with group metrics, ``examples.png`` when example composites are
        available (``_<k>`` suffixes with several runs).

    Raises:
        ConfigError: ``out_dir`` is a file, or holds a report of other runs (the message names them).
    """
    single = not isinstance(result_or_dir, (list, tuple))
    sources = [result_or_dir] if single else list(result_or_dir)
    results = load_results(sources)
    names = _names(results, names)
    out = pathlib.Path(out_dir).expanduser()
    claim = folder or _claim(out, sources, results, overwrite)
    written: list[pathlib.Path] = []

    md: list[str] = [f"# {title or _default_title(names)}", ""]
    md += ["## Accuracy per variant (%)", "", tables.paper_table(results, names), ""]
    md += [_accuracy_note(results), ""]
    written.append(plots.accuracy_bars(results, out / "accuracy.png", names))
    md += ["![accuracy per variant](accuracy.png)", ""]
    if len(results) > 1:
        atomic_write_bytes(out / "comparison.csv", tables.comparison_csv(results, names).encode("utf-8"))
        written.append(out / "comparison.csv")
    for k, (name, r, src) in enumerate(zip(names, results, sources)):
        suffix = "" if len(results) == 1 else f"_{k + 1}"
        md += _run_section(name, r, src, out, suffix, several=len(results) > 1, written=written)
    md += ["---", f"Generated by bgsynth {results[0].versions.get('bgsynth', '')} (schema {results[0].schema}).", ""]
    path = out / REPORT_FILE
    atomic_write_bytes(path, "\n".join(md).encode("utf-8"))
    written.append(path)
    _finish(claim, written, own=folder is None)
    return path


def _default_title(names: list[str]) -> str:
    return "Background reliance: " + names[0] if len(names) == 1 else "Background reliance: comparison"


def _accuracy_note(results: list[EvalResult]) -> str:
    """What the accuracies are: top-1 on the label space(s) of the runs, the chance level, BG-Gap."""
    spaces = list(dict.fromkeys(tables.label_space_of(r) for r in results))
    on = "; ".join(f"{tables.space_label(s)} (chance {100.0 / s.num_classes:.1f}%)" for s in spaces)
    return f"Accuracy is top-1 on {on}; BG-Gap = Mixed-Same - Mixed-Rand in points."


def _source_key(source, result: EvalResult, out: pathlib.Path) -> str:
    """How a report names a run in its fingerprint: the results' path relative to the report (short enough to be
    read in a refusal message), or the in-memory run's model and data."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.relpath(os.path.abspath(os.path.expanduser(os.fspath(source))), os.path.abspath(out))
    index = result.config.get("index")
    return f"{result.name}: {os.path.basename(str(index)) if index else None} / {result.config.get('split')}"


def _claim(out: pathlib.Path, sources, results, overwrite: bool) -> OutputFolder:
    """Claim ``report.md`` and its figures for this report before anything is drawn. What a report reports is its
    runs; names and title are how it shows them, so the same runs written again with another title are the same
    report, rewritten."""
    check_output_path(out, "folder")
    settings = {"runs": len(results), **{f"run {k + 1}": _source_key(s, r, out)
                                         for k, (s, r) in enumerate(zip(sources, results))}}
    return OutputFolder(out / REPORT_FILE, Fingerprint("report", settings), overwrite=overwrite,
                        single_file=True).claim()


def _finish(claim: OutputFolder, written: list[pathlib.Path], own: bool) -> None:
    """Record the report's files; its own figures of an earlier writing that no longer apply are removed."""
    base = claim.folder
    now = {p.resolve().relative_to(base.resolve()).as_posix() for p in written}
    if own:
        for rel in sorted(claim.files - now):
            (base / rel).unlink(missing_ok=True)
        claim.files = set()
    claim.commit(sorted(now))


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


# size: one run's part of the report; several small sections in the order a reader wants them
def _run_section(name: str, r: EvalResult, src, out: pathlib.Path, suffix: str, several: bool,
                 written: list) -> list[str]:
    """One run's part of the report: header, findings, tables, heatmaps, group metrics and its example sheet."""
    md = [f"## {name}" if several else "## Run", ""] + _header(r) + [""]
    notes = _notes(r)
    if notes:
        md += ["### Findings", ""] + notes + [""]
    md += ["### Counts", "", tables.counts_table(r), ""]
    md += ["### Accuracy per class (%)", "", tables.per_class_table(r), ""]
    written.append(plots.per_class_heatmap(r, out / f"per_class{suffix}.png", title=f"{name}: accuracy per class (%)"))
    md += [f"![per-class accuracy](per_class{suffix}.png)", ""]
    bgt = tables.bg_class_table(r)
    if bgt is not None:
        md += ["### Mixed-* accuracy by background class (%)", "", bgt, ""]
        p = plots.bg_class_heatmap(r, out / f"bg_class{suffix}.png", title=f"{name}: accuracy by background class (%)")
        if p:
            written.append(p)
            md += [f"![accuracy by background class](bg_class{suffix}.png)", ""]
    md += _group_section(name, r, out, suffix, written)
    md += _examples_section(r, src, out, suffix, written)
    return md


def _group_section(name: str, r: EvalResult, out: pathlib.Path, suffix: str, written: list) -> list[str]:
    """Group metrics (foreground class x background class), when the result has them: the summary (average and
    worst group, aligned-vs-conflicting gap), each variant's table and one chart."""
    summary = tables.group_summary_table(r)
    if summary is None:
        return []
    md = ["### Group accuracy (foreground class x background class)", "", summary, ""]
    for v in r.variants:
        if (r.metrics.get(v) or {}).get("groups"):
            md += [f"{tables.variant_label(v)}, accuracy % (correct/total):", "", tables.group_table(r, v), ""]
    p = plots.group_bars(r, out / f"groups{suffix}.png", title=f"{name}: accuracy per group (%)")
    if p:
        written.append(p)
        md += [f"![group accuracy](groups{suffix}.png)", ""]
    return md


def _examples_section(r: EvalResult, src, out: pathlib.Path, suffix: str, written: list) -> list[str]:
    """The run's example sheet: drawn from the result's example composites, or the run folder's copied."""
    sheet = out / f"examples{suffix}.png"
    src_dir = _source_dir(src)
    if r.example_images:
        written.append(plots.prediction_sheet(r.example_images, sheet, classes=tables.class_names(r)))
    elif src_dir is not None and (src_dir / "examples.png").is_file():
        if (src_dir / "examples.png").resolve() != sheet.resolve():  # else it is the run's own file, not ours
            shutil.copyfile(src_dir / "examples.png", sheet)
            written.append(sheet)
    if not sheet.is_file():
        return []
    return ["### Examples", "", "Rows: one image per class; columns: variants. Green frame: correct, red: wrong, "
            "grey: variant undefined for the image; the prediction is written under each tile.", "",
            f"![examples](examples{suffix}.png)", ""]
