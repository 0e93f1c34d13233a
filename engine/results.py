"""Evaluation records and the metrics computed from them: the functional floor under every evaluation consumer.

Every composite of an evaluation leaves one row in :class:`EvalRecords` (image id, variant, label, prediction,
background id and class, validity), and every metric is a pure function of those rows
(:func:`metrics_from_records`), so records of several shards or ranks can simply be concatenated and scored again
(:func:`merge_results`). :class:`EvalResult` holds a run's metrics, configuration and provenance and reads and writes
``results.json`` / ``results.csv`` / ``provenance.csv``; :func:`load_result` reads a run folder back.

:func:`bgsynth.evaluate.evaluate` makes these objects; :mod:`bgsynth.report` reads them. Nothing here decodes an
image or runs a model.

Class counts and names come from a :class:`~bgsynth.classes.LabelSpace` (the index's; IN-9 by default): per-class
lists have ``N`` entries, confusion matrices are ``N x (N + 1)``. With ``groups`` (or a ``pairing``) the metrics of
every variant with backgrounds also hold per-group accuracy (foreground class x background class), the average
and worst group, and the gap between aligned and conflicting groups.

>>> rec = EvalRecords(("original",), 0, [1, 2], [0, 0], [3, 4], [3, 0], [-1, -1], [-1, -1], [True, True])
>>> metrics_from_records(rec)["variants"]["original"]["accuracy"]
0.5
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .classes import IN9, LabelSpace
from .errors import ConfigError
from .fileio import atomic_write_bytes
from .variants import VARIANTS

__all__ = [
    "SCHEMA",
    "VARIANT_ORDER",
    "RECORD_COLUMNS",
    "EvalRecords",
    "EvalResult",
    "metrics_from_records",
    "merge_results",
    "load_result",
    "pick_examples",
    "normalise_pairing",
    "group_metrics",
    "model_digest",
]

SCHEMA = "bgsynth.eval/1"
#: the paper's table order: the variant registry's order (:data:`bgsynth.variants.VARIANTS`, Original ... Mixed-Next)
VARIANT_ORDER: tuple[str, ...] = tuple(VARIANTS)
RECORD_COLUMNS = ("image_id", "variant", "label", "pred", "bg_id", "bg_label", "valid")


# --------------------------------------------------------------------------------------------------------------
# Model digest
# --------------------------------------------------------------------------------------------------------------


def model_digest(model) -> str:
    """SHA-256 of a model's weights: the model part of a run's fingerprint (:class:`bgsynth.runs.Fingerprint`).

    Args:
        model: a :class:`~bgsynth.models.Predictor`, a :class:`~bgsynth.models.LoadedModel`, an ``nn.Module``, or
            any predictor-like object (its ``fingerprint()`` or ``fingerprint`` attribute is hashed, else its type).

    Returns:
        The hex digest. It depends on the parameters and buffers (names, dtypes, values), not on the device or on
        where the weights were loaded from, so the same weights give the same digest on any machine.

    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> model_digest(a) == model_digest(b)
    True
    """
    loaded = getattr(model, "loaded", model)
    module = getattr(loaded, "module", loaded)
    h = hashlib.sha256()
    if isinstance(module, torch.nn.Module):
        for k, v in sorted(module.state_dict().items()):
            h.update(k.encode())
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
        fp = getattr(model, "fingerprint", None)
        if fp is not None:
            h.update(str(fp() if callable(fp) else fp).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalRecords:
    """Per-composite provenance and outcome: one row per (image, variant).

    Attributes:
        variants: variant names; the ``variant`` column indexes into it.
        seed: the background-choice seed of the run.
        image_id, variant, label, pred, bg_id, bg_label: ``int64 [N]`` columns. ``pred`` is the IN-9 prediction
            (-1: an unmapped ImageNet class); ``bg_id``/``bg_label`` the background image id and its class for
            Mixed-* (-1 elsewhere).
        valid: ``bool [N]``; False where the variant does not exist for the image (e.g. no Only-BG-T margin);
            such rows are excluded from accuracies and counted as invalid.
    """

    variants: tuple[str, ...]
    seed: int
    image_id: np.ndarray
    variant: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    bg_id: np.ndarray
    bg_label: np.ndarray
    valid: np.ndarray

    def __post_init__(self):
        self.variants = tuple(self.variants)
        n = len(self.image_id)
        for name in RECORD_COLUMNS:
            arr = np.asarray(getattr(self, name))
            arr = arr.astype(bool if name == "valid" else np.int64, copy=False)
            if arr.shape != (n,):
                raise ConfigError(f"EvalRecords.{name}: expected shape ({n},), got {arr.shape}")
            setattr(self, name, arr)
        if n and (self.variant.min() < 0 or self.variant.max() >= len(self.variants)):
            raise ConfigError(f"EvalRecords.variant: expected indices in [0, {len(self.variants)}), got out-of-range values")

    def __len__(self) -> int:
        return int(len(self.image_id))

    @classmethod
    def empty(cls, variants: Sequence[str], seed: int) -> "EvalRecords":
        z = np.zeros(0, np.int64)
        return cls(tuple(variants), int(seed), z, z, z, z, z, z, np.zeros(0, bool))

    def sorted(self) -> "EvalRecords":
        """Rows ordered by (variant, image id): the canonical order, independent of batching and sharding."""
        order = np.lexsort((self.image_id, self.variant))
        return self.take(order)

    def take(self, index) -> "EvalRecords":
        return EvalRecords(self.variants, self.seed, *(getattr(self, c)[index] for c in RECORD_COLUMNS))

    def of_variant(self, name: str) -> "EvalRecords":
        return self.take(self.variant == self.variants.index(name))

    @classmethod
    def cat(cls, parts: Sequence["EvalRecords"]) -> "EvalRecords":
        """Concatenate records of several shards/ranks (same variants and seed); duplicates are an error."""
        parts = list(parts)
        if not parts:
            raise ConfigError("EvalRecords.cat: expected at least one part")
        v0, s0 = parts[0].variants, parts[0].seed
        for p in parts[1:]:
            if p.variants != v0 or p.seed != s0:
                raise ConfigError(
                    f"EvalRecords.cat: parts disagree: variants {p.variants} vs {v0}, seed {p.seed} vs {s0}"
                )
        out = cls(v0, s0, *(np.concatenate([getattr(p, c) for p in parts]) for c in RECORD_COLUMNS)).sorted()
        key = out.variant * (int(out.image_id.max(initial=0)) + 1) + out.image_id
        if len(key) and (np.diff(key) == 0).any():
            dup = int(out.image_id[np.flatnonzero(np.diff(key) == 0)[0]])
            raise ConfigError(f"EvalRecords.cat: image {dup} appears in more than one part (overlapping shards?)")
        return out

    def to_tensor(self) -> torch.Tensor:
        """``int64 [N, 7]`` in :data:`RECORD_COLUMNS` order (for ``all_gather``)."""
        return torch.from_numpy(np.stack([getattr(self, c).astype(np.int64) for c in RECORD_COLUMNS], axis=1).copy())

    @classmethod
    def from_tensor(cls, t: torch.Tensor, variants: Sequence[str], seed: int) -> "EvalRecords":
        if t.ndim != 2 or t.shape[1] != len(RECORD_COLUMNS):
            raise ConfigError(f"EvalRecords.from_tensor: expected [N, {len(RECORD_COLUMNS)}], got {tuple(t.shape)}")
        a = t.detach().cpu().numpy()
        return cls(tuple(variants), int(seed), *(a[:, i] for i in range(len(RECORD_COLUMNS))))

    def to_columns(self) -> dict:
        """JSON-able columnar dict (variant as names)."""
        d = {c: getattr(self, c).tolist() for c in RECORD_COLUMNS if c != "variant"}
        d["variant"] = [self.variants[i] for i in self.variant.tolist()]
        return {"variants": list(self.variants), "seed": self.seed, "columns": d}

    @classmethod
    def from_columns(cls, d: Mapping[str, Any]) -> "EvalRecords":
        variants = tuple(d["variants"])
        cols = d["columns"]
        vidx = np.asarray([variants.index(v) for v in cols["variant"]], np.int64)
        return cls(variants, int(d["seed"]), cols["image_id"], vidx, cols["label"], cols["pred"], cols["bg_id"],
                   cols["bg_label"], cols["valid"])

    def write_csv(self, path: str | os.PathLike) -> pathlib.Path:
        """Provenance CSV: ``image_id, variant, bg_id, bg_label, seed, label, pred, valid, correct`` per composite."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image_id", "variant", "bg_id", "bg_label", "seed", "label", "pred", "valid", "correct"])
        correct = (self.pred == self.label) & self.valid
        for i in range(len(self)):
            w.writerow([int(self.image_id[i]), self.variants[int(self.variant[i])], int(self.bg_id[i]),
                        int(self.bg_label[i]), self.seed, int(self.label[i]), int(self.pred[i]),
                        int(self.valid[i]), int(correct[i])])
        path = pathlib.Path(path)
        atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
        return path

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> "EvalRecords":
        path = pathlib.Path(path)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in rows)]
        names += sorted({r["variant"] for r in rows} - set(names))
        seeds = {int(r["seed"]) for r in rows}
        if len(seeds) > 1:
            raise ConfigError(f"{path}: expected one seed, found {sorted(seeds)}")
        col = lambda k: np.asarray([int(r[k]) for r in rows], np.int64)  # noqa: E731
        return cls(tuple(names), seeds.pop() if seeds else 0, col("image_id"),
                   np.asarray([names.index(r["variant"]) for r in rows], np.int64), col("label"), col("pred"),
                   col("bg_id"), col("bg_label"), col("valid").astype(bool))


# --------------------------------------------------------------------------------------------------------------
# Metrics: a pure function of the records
# --------------------------------------------------------------------------------------------------------------


def _ratio(a: int, b: int) -> float | None:
    return None if b == 0 else float(a) / float(b)


def _label_space(label_space) -> LabelSpace:
    """A :class:`LabelSpace` from ``None`` (IN-9), a LabelSpace, its dict, or a list of class names."""
    if label_space is None:
        return IN9
    if isinstance(label_space, LabelSpace):
        return label_space
    if isinstance(label_space, Mapping):
        return LabelSpace.from_dict(label_space)
    if isinstance(label_space, (list, tuple)):
        return LabelSpace.from_names(label_space)
    raise ConfigError(f"expected a LabelSpace, its dict or a list of class names, got {type(label_space).__name__}")


def _check_labels(values: np.ndarray, n: int, what: str) -> None:
    bad = values[(values < 0) | (values >= n)]
    if len(bad):
        raise ConfigError(f"metrics_from_records: expected {what} in 0..{n - 1} (the label space's classes), got "
                          f"{int(bad[0])}; give the label space the records were made in")


def _counts(labels: np.ndarray, ok: np.ndarray, n: int) -> dict:
    """``correct``/``total``/``accuracy`` lists indexed by class id ``0..n-1``."""
    total = np.bincount(labels, minlength=n)[:n]
    correct = np.bincount(labels[ok], minlength=n)[:n]
    return {"correct": correct.tolist(), "total": total.tolist(),
            "accuracy": [_ratio(int(c), int(t)) for c, t in zip(correct, total)]}


def normalise_pairing(pairing, num_fg: int | None = None, num_bg: int | None = None) -> dict[int, tuple[int, ...]] | None:
    """A pairing ``{fg_class: [aligned bg classes]}`` (JSON keys may be strings; one class may stand for a
    one-element list) as ``{int: sorted tuple of int}``, checked against the class counts when given.

    >>> normalise_pairing({"0": [0], 1: 1})
    {0: (0,), 1: (1,)}
    """
    if pairing is None:
        return None
    if not isinstance(pairing, Mapping):
        raise ConfigError(f"pairing: expected a mapping {{fg_class: [aligned bg classes]}}, got {type(pairing).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for k, v in pairing.items():
        try:
            fg = int(k)
            bgs = (int(v),) if isinstance(v, (int, np.integer, str)) else tuple(int(b) for b in v)
        except (TypeError, ValueError):
            raise ConfigError(f"pairing: expected integer class ids, got {k!r}: {v!r}") from None
        if num_fg is not None and not 0 <= fg < num_fg:
            raise ConfigError(f"pairing: expected foreground classes in 0..{num_fg - 1}, got {fg}")
        if num_bg is not None and any(not 0 <= b < num_bg for b in bgs):
            raise ConfigError(f"pairing: expected background classes in 0..{num_bg - 1}, got {list(bgs)} for {fg}")
        out[fg] = tuple(sorted(set(bgs)))
    return dict(sorted(out.items()))


def group_metrics(label: np.ndarray, bg_label: np.ndarray, ok: np.ndarray, fg_space: LabelSpace,
                  bg_space: LabelSpace, pairing: Mapping[int, Sequence[int]] | None = None) -> dict:
    """Accuracy per group (foreground class ``y`` x background class ``b``) of valid composites with a background.

    Args:
        label, bg_label, ok: ``int64 [R]`` foreground classes, background classes and ``bool [R]`` correctness of
            the rows (valid rows with ``bg_label >= 0``).
        fg_space, bg_space: the label spaces of the foregrounds and of the backgrounds (e.g. scene classes).
        pairing: ``{fg_class: aligned bg classes}`` (:func:`normalise_pairing`); groups not named are conflicting.

    Returns:
        ``groups``: the non-empty groups, sorted by ``(fg_class, bg_class)``, each ``{"fg_class", "bg_class",
        "fg_name", "bg_name", "correct", "total", "accuracy"}`` (plus ``"aligned"`` with a pairing);
        ``average_group`` (mean of the group accuracies), ``worst_group`` (the lowest) and ``worst_group_of``
        (its ``[fg_class, bg_class]``); with a pairing ``aligned_accuracy`` and ``conflicting_accuracy`` (pooled
        over the composites of the aligned, resp. conflicting, groups) and ``aligned_gap`` = their difference
        (``None`` where a side is empty). Without rows every figure is ``None``.
    """
    nb = bg_space.num_classes
    key = label.astype(np.int64) * nb + bg_label.astype(np.int64)
    keys, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv, minlength=len(keys))
    correct = np.bincount(inv, weights=ok.astype(np.float64), minlength=len(keys)).astype(np.int64)
    groups = []
    for g, t, c in zip(keys.tolist(), total.tolist(), correct.tolist()):
        y, b = divmod(int(g), nb)
        groups.append({"fg_class": y, "bg_class": b, "fg_name": fg_space.classes[y], "bg_name": bg_space.classes[b],
                       "correct": int(c), "total": int(t), "accuracy": c / t})
    accs = [g["accuracy"] for g in groups]
    worst = int(np.argmin(accs)) if accs else None
    out = {
        "groups": groups,
        "average_group": float(np.mean(accs)) if accs else None,
        "worst_group": accs[worst] if accs else None,
        "worst_group_of": [groups[worst]["fg_class"], groups[worst]["bg_class"]] if accs else None,
    }
    if pairing is not None:
        aligned = np.array([b in pairing.get(y, ()) for y, b in zip(label.tolist(), bg_label.tolist())], bool)
        for g in groups:
            g["aligned"] = g["bg_class"] in pairing.get(g["fg_class"], ())
        a = _ratio(int(ok[aligned].sum()), int(aligned.sum()))
        c = _ratio(int(ok[~aligned].sum()), int((~aligned).sum()))
        out.update(aligned_accuracy=a, conflicting_accuracy=c, aligned_gap=None if a is None or c is None else a - c)
    return out


# size: the one metric function of every evaluation; the label spaces and the group options are keyword-only
def metrics_from_records(records: EvalRecords, label_space=None, *, bg_label_space=None, groups: bool | None = None,
                         pairing: Mapping | None = None) -> dict:
    """All metrics of a run from its per-composite records (the same records give the same numbers).

    Args:
        records: the per-composite records.
        label_space: the classes of the labels and predictions (:class:`~bgsynth.classes.LabelSpace`, its dict or
            a list of names); default IN-9.
        bg_label_space: the classes of ``bg_label`` (default: ``label_space``; e.g. scene classes for composites
            of a controlled-correlation set).
        groups: add the per-group metrics (:func:`group_metrics`) to every variant with backgrounds (default: only
            when a ``pairing`` is given).
        pairing: ``{fg_class: [aligned bg classes]}``: which groups are aligned, for ``aligned_gap``.

    Returns:
        ``{"variants": {name: {...}}, "bg_gap": float | None}`` where each variant entry holds ``accuracy``
        (fraction in [0, 1] or ``None`` without valid rows), ``correct``, ``total`` (valid rows), ``invalid``,
        ``unmapped`` (predictions of no class of the label space, e.g. an unmapped ImageNet class), ``per_class``
        (``correct``/``total``/``accuracy`` lists indexed by class id), ``confusion`` (``N x (N + 1)`` counts: rows
        the true class, columns the predicted class then ``unmapped``), and for variants with backgrounds
        ``by_bg_class`` (the same three lists indexed by the background's class) and ``pred_is_bg_class`` (fraction
        of predictions equal to the background's class; meaningful when both share a label space). With groups:
        ``groups``, ``average_group``, ``worst_group``, ``worst_group_of`` and, with a pairing,
        ``aligned_accuracy``, ``conflicting_accuracy``, ``aligned_gap`` (``None`` for variants without backgrounds).
        ``bg_gap`` = accuracy(mixed_same) - accuracy(mixed_rand) when both exist.

    Raises:
        ConfigError: a label or background class outside its label space, or a malformed pairing.
    """
    space = _label_space(label_space)
    bg_space = space if bg_label_space is None else _label_space(bg_label_space)
    n, nb = space.num_classes, bg_space.num_classes
    pairing = normalise_pairing(pairing, n, nb)
    with_groups = bool(groups) or (groups is None and pairing is not None)
    out: dict[str, Any] = {}
    for vi, name in enumerate(records.variants):
        sel = records.variant == vi
        valid = records.valid[sel]
        lab = records.label[sel][valid]
        pred = records.pred[sel][valid]
        bgl = records.bg_label[sel][valid]
        _check_labels(lab, n, "labels")
        ok = pred == lab
        conf = np.zeros((n, n + 1), np.int64)
        col = np.where((pred >= 0) & (pred < n), pred, n)
        np.add.at(conf, (lab, col), 1)
        entry: dict[str, Any] = {
            "accuracy": _ratio(int(ok.sum()), int(valid.sum())),
            "correct": int(ok.sum()),
            "total": int(valid.sum()),
            "invalid": int((~valid).sum()),
            "unmapped": int((col == n).sum()),
            "per_class": _counts(lab, ok, n),
            "confusion": conf.tolist(),
            "by_bg_class": None,
            "pred_is_bg_class": None,
        }
        has_bg = bgl >= 0
        if has_bg.any():
            _check_labels(bgl[has_bg], nb, "background classes")
            entry["by_bg_class"] = _counts(bgl[has_bg], ok[has_bg], nb)
            entry["pred_is_bg_class"] = _ratio(int((pred[has_bg] == bgl[has_bg]).sum()), int(has_bg.sum()))
        if with_groups:
            empty = {"groups": None, "average_group": None, "worst_group": None, "worst_group_of": None}
            if pairing is not None:
                empty.update(aligned_accuracy=None, conflicting_accuracy=None, aligned_gap=None)
            entry.update(group_metrics(lab[has_bg], bgl[has_bg], ok[has_bg], space, bg_space, pairing)
                         if has_bg.any() else empty)
        out[name] = entry
    gap = None
    if "mixed_same" in out and "mixed_rand" in out:
        a, b = out["mixed_same"]["accuracy"], out["mixed_rand"]["accuracy"]
        gap = None if a is None or b is None else a - b
    return {"variants": out, "bg_gap": gap}


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalResult:
    """The outcome of :func:`evaluate`: metrics, run configuration, model provenance and (optionally) records.

    JSON (:meth:`to_json`) has the same schema for every run (see ``docs/eval.md``); records are kept in memory
    and written to ``provenance.csv`` on request, or embedded with ``to_json(include_records=True)``. The classes
    are those of :attr:`label_space` (the index's; IN-9 by default): JSON ``classes`` holds their names and
    ``label_space`` the whole definition.
    """

    variants: list[str]
    metrics: dict
    bg_gap: float | None
    label_protocol: str
    model: dict
    config: dict
    dataset: dict
    timing: dict = dataclasses.field(default_factory=dict)
    versions: dict = dataclasses.field(default_factory=dict)
    examples: dict = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA
    records: EvalRecords | None = dataclasses.field(default=None, repr=False)
    example_images: dict | None = dataclasses.field(default=None, repr=False)
    label_space: LabelSpace = IN9

    def __post_init__(self):
        self.label_space = _label_space(self.label_space)

    # ------------------------------------------------------------------------------------------ access
    def accuracy(self, variant: str) -> float | None:
        """Top-1 accuracy (fraction) of one variant, ``None`` if it has no valid composite."""
        if variant not in self.metrics:
            raise ConfigError(f"variant {variant!r} was not evaluated; have {list(self.metrics)}")
        return self.metrics[variant]["accuracy"]

    @property
    def name(self) -> str:
        """A short label for tables (the model's arch or file stem)."""
        m = self.model
        if m.get("name"):
            return str(m["name"])
        if m.get("file"):
            return pathlib.Path(m["file"]).stem
        return str(m.get("arch") or m.get("spec") or "model")

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self, include_records: bool = False) -> dict:
        d = {
            "schema": self.schema,
            "created": self.created,
            "variants": list(self.variants),
            "accuracy": {v: self.metrics[v]["accuracy"] for v in self.variants},
            "bg_gap": self.bg_gap,
            "label_protocol": self.label_protocol,
            "classes": list(self.label_space.classes),
            "label_space": self.label_space.to_dict(),
            "metrics": self.metrics,
            "model": self.model,
            "config": self.config,
            "dataset": self.dataset,
            "timing": self.timing,
            "versions": self.versions,
            "examples": self.examples,
            "records": self.records.to_columns() if include_records and self.records is not None else None,
        }
        return d

    def to_json(self, path: str | os.PathLike | None = None, include_records: bool = False, indent: int = 1) -> str:
        """Serialise (and write atomically to ``path`` if given); returns the JSON text."""
        text = json.dumps(self.to_dict(include_records), indent=indent)
        if path is not None:
                atomic_write_bytes(path, text.encode("utf-8"))
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "EvalResult":
        """Read a result from JSON text or a ``results.json`` path."""
        src = "<text>"
        if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
            src = str(text_or_path)
            try:
                text = pathlib.Path(text_or_path).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{src}: cannot read results ({e})") from e
        else:
            text = str(text_or_path)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{src}: not a JSON results file ({e})") from e
        if not isinstance(d, dict) or not str(d.get("schema", "")).startswith("bgsynth.eval/"):
            raise ConfigError(f"{src}: expected a bgsynth eval result (schema {SCHEMA}), got schema {d.get('schema') if isinstance(d, dict) else None!r}")
        recs = EvalRecords.from_columns(d["records"]) if d.get("records") else None
        return cls(
            variants=list(d["variants"]), metrics=d["metrics"], bg_gap=d.get("bg_gap"),
            label_protocol=d.get("label_protocol", "official"), model=d.get("model", {}),
            config=d.get("config", {}), dataset=d.get("dataset", {}), timing=d.get("timing", {}),
            versions=d.get("versions", {}), examples=d.get("examples", {}), created=d.get("created", ""),
            schema=d["schema"], records=recs,
            label_space=LabelSpace.from_dict(d["label_space"]) if d.get("label_space") else IN9,
        )

    # ------------------------------------------------------------------------------------------ CSV
    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per variant (accuracy %, counts, per-class accuracy %) and a ``bg_gap`` row."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["variant", "accuracy", "correct", "total", "invalid", "unmapped"] + [f"acc_{c}" for c in self.label_space.classes])
        pct = lambda x: "" if x is None else f"{100.0 * x:.4f}"  # noqa: E731
        for v in self.variants:
            m = self.metrics[v]
            w.writerow([v, pct(m["accuracy"]), m["correct"], m["total"], m["invalid"], m.get("unmapped", 0)]
                       + [pct(a) for a in m["per_class"]["accuracy"]])
        if self.bg_gap is not None:
            w.writerow(["bg_gap", f"{100.0 * self.bg_gap:.4f}", "", "", "", ""] + [""] * self.label_space.num_classes)
        text = buf.getvalue()
        if path is not None:
                atomic_write_bytes(path, text.encode("utf-8"))
        return text

    def save(self, out_dir: str | os.PathLike, provenance: bool = False) -> dict[str, pathlib.Path]:
        """Write ``results.json``, ``results.csv`` and (with ``provenance``) ``provenance.csv`` into ``out_dir``."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "csv": out / "results.csv"}
        self.to_json(paths["json"])
        self.to_csv(paths["csv"])
        if provenance:
            if self.records is None:
                raise ConfigError("save(provenance=True): this result holds no records (record_provenance=False?)")
            paths["provenance"] = self.records.write_csv(out / "provenance.csv")
        return paths


def load_result(path: str | os.PathLike) -> EvalResult:
    """Load a result from a run folder (its ``results.json``) or a JSON file; attaches ``provenance.csv`` if present."""
    p = pathlib.Path(path)
    if p.is_dir():
        j = p / "results.json"
        if not j.is_file():
            raise ConfigError(f"{p}: expected a run folder with results.json, found none")
        res = EvalResult.from_json(j)
        prov = p / "provenance.csv"
        if res.records is None and prov.is_file():
            res.records = EvalRecords.read_csv(prov)
        return res
    return EvalResult.from_json(p)


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """Merge the results of several shards (each holding records) into one, with metrics recomputed."""
    results = list(results)
    if not results:
        raise ConfigError("merge_results: expected at least one result")
    if any(r.records is None for r in results):
        raise ConfigError("merge_results: every part needs its records (run with record_provenance=True)")
    recs = EvalRecords.cat([r.records for r in results])
    first = results[0]
    m = metrics_from_records(recs, first.label_space, **_group_options(first.config))
    cfg = dict(first.config)
    cfg.update(shard_id=0, num_shards=1, merged_from=len(results))
    ds = dict(first.dataset)
    ids, first_row = np.unique(recs.image_id, return_index=True)
    ds["images"] = int(len(ids))
    n = first.label_space.num_classes
    if any(r.label_space != first.label_space for r in results[1:]):
        raise ConfigError("merge_results: the parts were evaluated in different label spaces")
    ds["per_class"] = np.bincount(recs.label[first_row], minlength=n)[:n].tolist()
    ds["planned"] = sum(int(r.dataset.get("planned", 0)) for r in results)
    ds["rejects"] = [rej for r in results for rej in r.dataset.get("rejects", [])]
    timing = dict(first.timing)
    timing["seconds"] = max(float(r.timing.get("seconds", 0.0)) for r in results)
    timing["images"] = ds["images"]
    timing["composites"] = len(recs)
    timing["forwards"] = sum(int(r.timing.get("forwards", 0)) for r in results)
    if timing["seconds"] > 0:
        timing["images_per_s"] = timing["images"] / timing["seconds"]
        timing["composites_per_s"] = timing["composites"] / timing["seconds"]
    timing["oom_backoffs"] = sum(int(r.timing.get("oom_backoffs", 0)) for r in results)
    timing["shards"] = [{"shard_id": int(r.config.get("shard_id", k)), "images": int(r.dataset.get("images", 0)),
                         "forwards": int(r.timing.get("forwards", 0)), "seconds": float(r.timing.get("seconds", 0.0))}
                        for k, r in enumerate(results)]
    return dataclasses.replace(first, metrics=m["variants"], bg_gap=m["bg_gap"], config=cfg, dataset=ds,
                               timing=timing, records=recs, examples=pick_examples(recs, first.examples.get("per_class", 1)),
                               example_images=None)


def _group_options(config: Mapping) -> dict:
    """The group-metric options a result's ``config`` records (so that merged shards are scored the same way)."""
    return {"groups": bool(config.get("groups")) or None, "pairing": config.get("pairing")}


def pick_examples(records: EvalRecords, per_class: int) -> dict:
    """Example images for the contact sheet: the ``per_class`` smallest image ids of each class, in class order."""
    ids: list[int] = []
    if per_class > 0 and len(records):
        ids_all, first = np.unique(records.image_id, return_index=True)
        labels = records.label[first]
        for c in np.unique(labels).tolist():
            ids += ids_all[labels == c][:per_class].tolist()
    return {"per_class": int(per_class), "image_ids": [int(i) for i in ids]}
