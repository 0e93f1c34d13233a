"""Plots of a Backgrounds Challenge result (matplotlib, Agg backend).

* :func:`adversarial_gallery`: per background class, the most adversarial backgrounds (the paper's figure of
  adversarial backgrounds): each image with the fraction of foregrounds of the other classes it fools above it.
* :func:`vulnerability_histogram`: how many backgrounds fool each foreground (0 = robust).
* :func:`class_accuracy_bars`: challenge accuracy per class.
* :func:`challenge_plots`: all that apply to a result, written into a folder.

The first two need a ``full_matrix`` result (:attr:`bgsynth.challenge.ChallengeResult.has_matrix`).

A result is read through its attributes only: this module imports nothing of :mod:`bgsynth.challenge` (which
imports it to write the plots of a run), so there is no import cycle.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from ..errors import ConfigError
from .plots import _plt, _save
from .tables import class_names

__all__ = ["adversarial_gallery", "vulnerability_histogram", "class_accuracy_bars", "challenge_plots"]


def _need_matrix(result, what: str) -> None:
    if not result.has_matrix:
        raise ConfigError(f"{what}: expected a full-matrix challenge result (run with full_matrix=True)")


def adversarial_gallery(result, path: str | os.PathLike, k: int = 8, classes=None) -> pathlib.Path:
    """Gallery of the most adversarial backgrounds per class, with the fraction of other-class foregrounds
    each one fools above it (as in the paper's figure).

    Args:
        result: a full-matrix :class:`~bgsynth.challenge.ChallengeResult` with ``gallery_images`` (filled by
            :func:`~bgsynth.challenge.run_challenge`); a background whose image is missing is drawn as a blank
            tile with its id.
        path: output PNG.
        k: backgrounds per class (columns).
        classes: class ids to show (rows; default: every class that has backgrounds); names come from the
            result's label space (IN-9 unless it records another).

    Returns:
        The path written.
    """
    _need_matrix(result, "adversarial_gallery")
    plt = _plt()
    top = result.most_adversarial(k)
    rows = [c for c in (sorted(top) if classes is None else classes) if top.get(c)]
    names = class_names(result)
    if not rows:
        raise ConfigError("adversarial_gallery: the result has no background to show")
    cols = max(len(top[c]) for c in rows)
    images = result.gallery_images or {}
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1.4, 1.85 * len(rows)), squeeze=False)
    for r, c in enumerate(rows):
        for j in range(cols):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(top[c]):
                ax.axis("off")
                continue
            bg, frac = top[c][j]
            img = images.get(bg)
            if img is not None:
                ax.imshow(np.asarray(img))
            else:
                ax.text(0.5, 0.5, f"bg {bg}", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ax.set_title(f"{frac:.0%}", fontsize=9)
            if j == 0:
                ax.set_ylabel(names[c] if 0 <= c < len(names) else f"class {c}", fontsize=9)
    fig.suptitle("Most adversarial backgrounds per class\n(fraction of foregrounds of the other classes they fool)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def vulnerability_histogram(result, path: str | os.PathLike, bins: int = 40) -> pathlib.Path:
    """Histogram of the number of backgrounds that fool each foreground (robust foregrounds at 0).

    Args:
        result: a full-matrix :class:`~bgsynth.challenge.ChallengeResult`.
        path: output PNG.
        bins: number of bins over ``0..N`` (a bin per value when ``N + 1 <= bins``).

    Returns:
        The path written.
    """
    _need_matrix(result, "vulnerability_histogram")
    plt = _plt()
    counts = result.vulnerability_counts()
    n = result.num_backgrounds
    edges = np.arange(n + 2) - 0.5 if n + 1 <= bins else np.linspace(-0.5, n + 0.5, bins + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.hist(counts, bins=edges, color="#c0504d", edgecolor="white")
    robust = int((counts == 0).sum())
    ax.axvline(0, color="#4f81bd", lw=1)
    ax.set_xlabel(f"backgrounds that fool the foreground (of {n})")
    ax.set_ylabel("foregrounds")
    ax.set_title(f"Vulnerability: {result.num_vulnerable} of {result.num_foregrounds} foregrounds fooled by at least "
                 f"one background; {robust} robust", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def class_accuracy_bars(result, path: str | os.PathLike) -> pathlib.Path:
    """Challenge accuracy per class (named by the result's ``per_class()``), with the overall accuracy as a line."""
    plt = _plt()
    rows = [r for r in result.per_class() if r["foregrounds"]]
    if not rows:
        raise ConfigError("class_accuracy_bars: the result has no foreground")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(rows))
    acc = [100 * r["accuracy"] for r in rows]
    ax.bar(x, acc, color="#4f81bd")
    ax.axhline(100 * result.accuracy, color="#c0504d", lw=1, ls="--", label=f"overall {result.accuracy:.1%}")
    for xi, r, a in zip(x, rows, acc):
        ax.text(xi, a + 1, f"{r['robust']}/{r['foregrounds']}", ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("challenge accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("Backgrounds Challenge accuracy per class (robust / foregrounds above each bar)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def challenge_plots(result, out_dir: str | os.PathLike, k: int = 8) -> dict[str, pathlib.Path]:
    """Write every plot that applies to ``result`` into ``out_dir``.

    Returns:
        ``{"class_accuracy": ...}`` plus ``"gallery"`` and ``"vulnerability"`` for full-matrix results.
    """
    out = pathlib.Path(out_dir)
    paths = {}
    if result.num_foregrounds:
        paths["class_accuracy"] = class_accuracy_bars(result, out / "challenge_class_accuracy.png")
    if result.has_matrix:
        paths["gallery"] = adversarial_gallery(result, out / "challenge_gallery.png", k=k)
        paths["vulnerability"] = vulnerability_histogram(result, out / "challenge_vulnerability.png")
    return paths
