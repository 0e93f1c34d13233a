"""Plots of evaluation results (matplotlib, Agg backend) and a contact sheet of example predictions (PIL).

* :func:`accuracy_bars`: variant accuracies as bars, grouped by model when several runs are compared, with the
  chance line ``1 / N`` of the label space (11.1% for IN-9's 9 classes).
* :func:`per_class_heatmap`: accuracy per variant (rows) and class (columns).
* :func:`bg_class_heatmap`: Mixed-* accuracy per variant and background class.
* :func:`group_bars`: accuracy per group (foreground class x background class) for results with group metrics.
* :func:`prediction_sheet`: example composites (rows: images, columns: variants) framed green where the model is
  right and red where it is wrong, with the prediction written under each tile.

Class names and their number come from each result's label space (:func:`bgsynth.report.tables.label_space_of`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..classes import IN9_CLASSES
from .tables import _class_name, _columns, _group_value, class_names, label_space_of, space_label, variant_label

__all__ = ["accuracy_bars", "per_class_heatmap", "bg_class_heatmap", "group_bars", "prediction_sheet"]


def _plt():
    """matplotlib.pyplot on the Agg backend, imported here: a command that draws no chart never imports matplotlib
    (it is heavy to import and optional for everything but figures)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def accuracy_bars(results, path: str | os.PathLike, names: Sequence[str] | None = None,
                  title: str | None = None) -> pathlib.Path:
    """Bar chart of variant accuracies (%), one group per variant and one bar per run, with the chance line of each
    label space among the runs (``1 / N``).

    Args:
        results: one or several :class:`~bgsynth.results.EvalResult`.
        path: output PNG.
        names: legend labels (default: each result's name).
        title: figure title.

    Returns:
        The path written.
    """
    plt = _plt()
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    names = list(names) if names is not None else [r.name for r in results]
    cols = _columns(results)
    n = len(results)
    width = 0.8 / n
    x = np.arange(len(cols))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) + 0.4 * n), 4.0))
    for k, (name, r) in enumerate(zip(names, results)):
        vals = [100 * (r.metrics.get(v, {}).get("accuracy") or 0.0) for v in cols]
        bars = ax.bar(x - 0.4 + width * (k + 0.5), vals, width, label=name)
        if n <= 3:
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    spaces = list(dict.fromkeys(label_space_of(r) for r in results))
    for sp in spaces:
        chance = 100.0 / sp.num_classes
        what = "" if len(spaces) == 1 else f", {sp.name}"
        ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.1f}%{what})")
    ax.set_xticks(x)
    ax.set_xticklabels([variant_label(v) for v in cols], rotation=25, ha="right")
    ax.set_ylabel("top-1 accuracy (%)" if len(spaces) > 1 else f"top-1 accuracy on {space_label(spaces[0])} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Accuracy per variant")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], path, title: str, cbar: str) -> pathlib.Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 0.8 + 0.45 * len(rows)))
    masked = np.ma.masked_invalid(matrix)
    im = ax.imshow(masked, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            v = matrix[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.04)
    return _save(fig, path)


def per_class_heatmap(result, path: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """Heatmap of accuracy (%) per variant (rows) and class of the result's label space (columns)."""
    m = np.array([[np.nan if a is None else 100 * a for a in result.metrics[v]["per_class"]["accuracy"]]
                  for v in result.variants], dtype=float)
    return _heatmap(m, [variant_label(v) for v in result.variants], list(class_names(result)), path,
                    title or "Accuracy per class (%)", "accuracy (%)")


def bg_class_heatmap(result, path: str | os.PathLike, title: str | None = None) -> pathlib.Path | None:
    """Heatmap of Mixed-* accuracy (%) per variant and background class; ``None`` without such variants."""
    vs = [v for v in result.variants if result.metrics[v].get("by_bg_class") is not None]
    if not vs:
        return None
    m = np.array([[np.nan if a is None else 100 * a for a in result.metrics[v]["by_bg_class"]["accuracy"]]
                  for v in vs], dtype=float)
    return _heatmap(m, [variant_label(v) for v in vs], list(class_names(result)), path,
                    title or "Accuracy by background class (%)", "accuracy (%)")


def group_bars(result, path: str | os.PathLike, title: str | None = None) -> pathlib.Path | None:
    """Bar chart of accuracy (%) per group (foreground class on background class), one bar per variant with group
    metrics; groups whose foreground and background classes agree (aligned) are hatched, and each variant's
    worst group is drawn darker. ``None`` when the result has no group metrics.

    Args:
        result: an :class:`~bgsynth.results.EvalResult` with ``metrics[v]["groups"]`` (list of ``{"fg_class",
            "bg_class", "correct", "total", "accuracy"}``).
        path: output PNG.
        title: figure title.
    """
    vs = [v for v in result.variants if (result.metrics.get(v) or {}).get("groups")]
    if not vs:
        return None
    plt = _plt()
    names = class_names(result)
    keys = sorted({(g["fg_class"], g["bg_class"]) for v in vs for g in result.metrics[v]["groups"]},
                  key=lambda k: (str(type(k[0])), k[0], str(type(k[1])), k[1]))
    width = 0.8 / len(vs)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(keys) * len(vs) + 1.5), 4.0))
    for j, v in enumerate(vs):
        acc = {(g["fg_class"], g["bg_class"]): _group_value(g) for g in result.metrics[v]["groups"]}
        vals = [100 * (acc.get(k) if acc.get(k) is not None else np.nan) for k in keys]
        worst = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
        bars = ax.bar(x - 0.4 + width * (j + 0.5), vals, width, label=variant_label(v))
        for b, k, val in zip(bars, keys, vals):
            if k[0] == k[1]:
                b.set_hatch("//")
            if val == worst:
                b.set_edgecolor("black")
                b.set_linewidth(1.5)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{_class_name(f, names)} on {_class_name(b, names)}" for f, b in keys], rotation=35,
                       ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Accuracy per group (hatched: aligned; black edge: worst group)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def prediction_sheet(examples: dict, path: str | os.PathLike, tile: int = 96, title: str | None = None,
                     classes: Sequence[str] | None = None) -> pathlib.Path:
    """Contact sheet of example composites with predictions marked right (green) or wrong (red).

    Args:
        examples: ``{'variants': [V names], 'image_ids': [n], 'labels': [n], 'images': uint8 [n, V, 3, C, C]
            (tensor or array), 'pred': int [n, V], 'valid': bool [n, V]}`` (what :func:`bgsynth.evaluate.evaluate`
            keeps in ``EvalResult.example_images``).
        path: output PNG.
        tile: side of each tile in pixels.
        title: text in the top band.
        classes: the class names of labels and predictions (the result's label space; default IN-9's).

    Returns:
        The path written. Invalid composites (variant undefined for the image) are drawn grey and crossed.
    """
    imgs = examples["images"]
    imgs = imgs.numpy() if hasattr(imgs, "numpy") else np.asarray(imgs)
    n, V = imgs.shape[:2]
    pred = np.asarray(examples["pred"])
    valid = np.asarray(examples["valid"], bool)
    labels = list(examples["labels"])
    names = list(examples["variants"])
    classes = list(IN9_CLASSES if classes is None else classes)
    pad, cap, left, top = 4, 14, 112, 34
    W = left + V * (tile + pad) + pad
    H = top + n * (tile + cap + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 2), title or "Examples: green = correct, red = wrong, grey = variant undefined", fill=(0, 0, 0),
              font=font)
    for j, v in enumerate(names):
        draw.text((left + j * (tile + pad) + pad, 18), variant_label(v)[: tile // 6], fill=(0, 0, 0), font=font)
    for i in range(n):
        y = top + i * (tile + cap + pad)
        lab = int(labels[i])
        draw.text((pad, y + tile // 2 - 12), f"id {int(examples['image_ids'][i])}", fill=(0, 0, 0), font=font)
        draw.text((pad, y + tile // 2), classes[lab] if 0 <= lab < len(classes) else str(lab), fill=(0, 0, 0),
                  font=font)
        for j in range(V):
            x = left + j * (tile + pad) + pad
            arr = np.ascontiguousarray(imgs[i, j].transpose(1, 2, 0)).astype(np.uint8)
            im = Image.fromarray(arr).resize((tile - 4, tile - 4), Image.NEAREST)
            ok = bool(valid[i, j]) and int(pred[i, j]) == lab
            colour = (150, 150, 150) if not valid[i, j] else (0, 170, 0) if ok else (220, 0, 0)
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=colour)
            sheet.paste(im, (x + 2, y + 2))
            if not valid[i, j]:
                draw.line([x, y, x + tile - 1, y + tile - 1], fill=colour, width=2)
                text = "n/a"
            else:
                p = int(pred[i, j])
                text = classes[p] if 0 <= p < len(classes) else "unmapped"
            draw.text((x, y + tile), text[: tile // 6], fill=colour, font=font)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
