"""Evaluation: every requested variant in one pass over the data, composites fed straight to the model.

:func:`evaluate` decodes each image of a split once, synthesizes all requested variants in-batch on the device
(normalised, in the model's dtype and memory format, see :func:`bgsynth.variants.synthesize`) and forwards them.
Every composite leaves one row in :class:`EvalRecords` (image id, variant, label, prediction, background id and
class, validity), and every metric is a pure function of those rows (:func:`metrics_from_records`), so records of
several shards or ranks can simply be concatenated and scored again (:func:`merge_results`).

Data flow of a single-process run with Mixed-* variants and no pool given (``two_phase``):

1. One pass of the decode loader (it prefetches: decoding batch k+1 overlaps the model on batch k). Per batch,
   the non-Mixed variants are synthesized and forwarded, the Only-BG-T of every image is kept as the background
   pool, and the decoded batch is kept for phase 2.
2. The pool is complete; the Mixed-* variants are synthesized from the kept batches and forwarded.

So each JPEG is decoded exactly once. When the kept batches would not fit ``cache_bytes``, or for a manual
shard, or when given a pool, the pool comes from :func:`bgsynth.pipeline.build_background_pool` (or the argument)
and all variants run in one loop.

Under ``torchrun`` (:mod:`bgsynth.distributed`) each rank runs the same two phases on its shard of the image ids;
between them the ranks' Only-BG-T parts are gathered into the whole split's pool (still one decode per JPEG in
the whole job), and at the end the records are gathered, so the metrics equal a single-process run's.

>>> from bgsynth.models import load_model
>>> result = evaluate("index.json", load_model("ckpt.pt"), variants="all", device="cuda")  # doctest: +SKIP
>>> result.accuracy("mixed_rand"), result.bg_gap                                           # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import os
import pathlib
import platform
import sys
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .classes import IN9_CLASSES, NUM_IN9
from .config import resolve_geometry
from .errors import ConfigError
from .geometry import CropGeometry
from .types import TILINGS

__all__ = [
    "SCHEMA",
    "VARIANT_ORDER",
    "MIXED_VARIANTS",
    "RECORD_COLUMNS",
    "EvalRecords",
    "EvalResult",
    "evaluate",
    "evaluate_to_dir",
    "metrics_from_records",
    "merge_results",
    "resolve_variants",
    "load_result",
]

SCHEMA = "bgsynth.eval/1"
# the paper's table order
VARIANT_ORDER = ("original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next")
MIXED_VARIANTS = ("mixed_same", "mixed_rand", "mixed_next")
RECORD_COLUMNS = ("image_id", "variant", "label", "pred", "bg_id", "bg_label", "valid")


def _registry_names() -> tuple[str, ...]:
    try:
        from .variants import VARIANTS
    except ImportError:
        return VARIANT_ORDER
    names = tuple(VARIANTS)
    order = [v for v in VARIANT_ORDER if v in names] + [v for v in names if v not in VARIANT_ORDER]
    return tuple(order)


def resolve_variants(variants: str | Sequence[str]) -> tuple[str, ...]:
    """``'all'``, a comma-separated string or a list of names (registry or paper names) -> tuple in the paper's
    order (:data:`VARIANT_ORDER`), validated against :data:`bgsynth.variants.VARIANTS`."""
    from .variants import resolve_variants as _resolve

    names = set(_resolve(variants))
    return tuple(v for v in _registry_names() if v in names)


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
        from .fileio import atomic_write_bytes

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


def metrics_from_records(records: EvalRecords) -> dict:
    """All metrics of a run from its per-composite records (the same records give the same numbers).

    Returns:
        ``{"variants": {name: {...}}, "bg_gap": float | None}`` where each variant entry holds ``accuracy``
        (fraction in [0, 1] or ``None`` without valid rows), ``correct``, ``total`` (valid rows), ``invalid``,
        ``unmapped`` (predictions of an unmapped ImageNet class), ``per_class`` (``correct``/``total``/``accuracy``
        lists indexed by IN-9 id), ``confusion`` (9 x 10 counts: rows the true class, columns the predicted class
        then ``unmapped``), and for variants with backgrounds ``by_bg_class`` (the same three lists indexed by the
        background's class) and ``pred_is_bg_class`` (fraction of predictions equal to the background's class).
        ``bg_gap`` = accuracy(mixed_same) - accuracy(mixed_rand) when both exist.
    """
    out: dict[str, Any] = {}
    for vi, name in enumerate(records.variants):
        sel = records.variant == vi
        valid = records.valid[sel]
        lab = records.label[sel][valid]
        pred = records.pred[sel][valid]
        bgl = records.bg_label[sel][valid]
        ok = pred == lab
        pc_total = np.bincount(lab, minlength=NUM_IN9)[:NUM_IN9]
        pc_correct = np.bincount(lab[ok], minlength=NUM_IN9)[:NUM_IN9]
        conf = np.zeros((NUM_IN9, NUM_IN9 + 1), np.int64)
        col = np.where((pred >= 0) & (pred < NUM_IN9), pred, NUM_IN9)
        np.add.at(conf, (lab, col), 1)
        entry: dict[str, Any] = {
            "accuracy": _ratio(int(ok.sum()), int(valid.sum())),
            "correct": int(ok.sum()),
            "total": int(valid.sum()),
            "invalid": int((~valid).sum()),
            "unmapped": int((col == NUM_IN9).sum()),
            "per_class": {
                "correct": pc_correct.tolist(),
                "total": pc_total.tolist(),
                "accuracy": [_ratio(int(c), int(t)) for c, t in zip(pc_correct, pc_total)],
            },
            "confusion": conf.tolist(),
            "by_bg_class": None,
            "pred_is_bg_class": None,
        }
        has_bg = bgl >= 0
        if has_bg.any():
            bt = np.bincount(bgl[has_bg], minlength=NUM_IN9)[:NUM_IN9]
            bc = np.bincount(bgl[has_bg & ok], minlength=NUM_IN9)[:NUM_IN9]
            entry["by_bg_class"] = {
                "correct": bc.tolist(),
                "total": bt.tolist(),
                "accuracy": [_ratio(int(c), int(t)) for c, t in zip(bc, bt)],
            }
            entry["pred_is_bg_class"] = _ratio(int((pred[has_bg] == bgl[has_bg]).sum()), int(has_bg.sum()))
        out[name] = entry
    gap = None
    if "mixed_same" in out and "mixed_rand" in out:
        a, b = out["mixed_same"]["accuracy"], out["mixed_rand"]["accuracy"]
        gap = None if a is None or b is None else a - b
    return {"variants": out, "bg_gap": gap}


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import bgsynth

    v = {"bgsynth": bgsynth.__version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__}
    # only what this process already uses (importing timm just to name its version costs seconds)
    for key, mod in (("torchvision", "torchvision"), ("timm", "timm"), ("dali", "nvidia.dali"), ("triton", "triton")):
        m = sys.modules.get(mod)
        if m is not None:
            v[key] = getattr(m, "__version__", None)
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name()
    return v


@dataclasses.dataclass
class EvalResult:
    """The outcome of :func:`evaluate`: metrics, run configuration, model provenance and (optionally) records.

    JSON (:meth:`to_json`) has the same schema for every run (see ``docs/eval.md``); records are kept in memory
    and written to ``provenance.csv`` on request, or embedded with ``to_json(include_records=True)``.
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
            "classes": list(IN9_CLASSES),
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
            from .fileio import atomic_write_bytes

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
        )

    # ------------------------------------------------------------------------------------------ CSV
    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per variant (accuracy %, counts, per-class accuracy %) and a ``bg_gap`` row."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["variant", "accuracy", "correct", "total", "invalid", "unmapped"] + [f"acc_{c}" for c in IN9_CLASSES])
        pct = lambda x: "" if x is None else f"{100.0 * x:.4f}"  # noqa: E731
        for v in self.variants:
            m = self.metrics[v]
            w.writerow([v, pct(m["accuracy"]), m["correct"], m["total"], m["invalid"], m.get("unmapped", 0)]
                       + [pct(a) for a in m["per_class"]["accuracy"]])
        if self.bg_gap is not None:
            w.writerow(["bg_gap", f"{100.0 * self.bg_gap:.4f}", "", "", "", ""] + [""] * NUM_IN9)
        text = buf.getvalue()
        if path is not None:
            from .fileio import atomic_write_bytes

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
    m = metrics_from_records(recs)
    first = results[0]
    cfg = dict(first.config)
    cfg.update(shard_id=0, num_shards=1, merged_from=len(results))
    ds = dict(first.dataset)
    ids, first_row = np.unique(recs.image_id, return_index=True)
    ds["images"] = int(len(ids))
    ds["per_class"] = np.bincount(recs.label[first_row], minlength=NUM_IN9)[:NUM_IN9].tolist()
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
                               timing=timing, records=recs, examples=_pick_examples(recs, first.examples.get("per_class", 1)),
                               example_images=None)


# --------------------------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------------------------


def _pick_examples(records: EvalRecords, per_class: int) -> dict:
    """Example images for the contact sheet: the ``per_class`` smallest image ids of each class."""
    ids: list[int] = []
    if per_class > 0 and len(records):
        ids_all, first = np.unique(records.image_id, return_index=True)
        labels = records.label[first]
        for c in range(NUM_IN9):
            ids += ids_all[labels == c][:per_class].tolist()
    return {"per_class": int(per_class), "image_ids": [int(i) for i in ids]}


def _resolve_geometry(geometry, predictor) -> tuple[CropGeometry, str]:
    loaded = getattr(predictor, "loaded", None)
    return resolve_geometry(geometry, stored=getattr(loaded, "geometry", None),
                            checkpoint=(getattr(loaded, "provenance", None) or {}).get("file"))


def _synthesize(batch, names, pool, seed, predictor):
    from .variants import synthesize

    return synthesize(
        batch, list(names), pool=pool, seed=seed, normalize=(predictor.mean, predictor.std),
        dtype=predictor.input_dtype, channels_last=predictor.channels_last,
    )


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(8 << 30, 0.25 * avail))


def evaluate(
    index,
    model,
    variants: str | Sequence[str] = "all",
    split: str | Sequence[str] | None = "val",
    seed: int = 0,
    geometry: CropGeometry | Mapping | None = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    pool=None,
    shard_id: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    record_provenance: bool = True,
    label_protocol: str = "official",
    per_class: int | None = None,
    examples_per_class: int = 1,
    cache_bytes: int | None = None,
    prefetch: int = 2,
    dist=None,
    tiling: str = "paper",
) -> EvalResult:
    """Evaluate a model on all requested variants of a split in one pass over the data.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or the path of one.
        model: a :class:`~bgsynth.models.LoadedModel` (wrapped in a :class:`~bgsynth.models.Predictor` on
            ``device`` with ``label_protocol``) or a ready :class:`~bgsynth.models.Predictor`.
        variants: ``'all'``, a comma-separated string or a list of variant names.
        split: split(s) to evaluate (``None``: every image of the index).
        seed: seed of the Mixed-* background choice (a pure function of seed, variant and image id).
        geometry: crop geometry; default: the checkpoint's, else ``CropGeometry()`` (256 -> 224).
        backend: decode backend (``'auto'``, ``'dali'``, ``'torchvision'``, ``'pil'``).
        device: where decode output, composites and the model live.
        batch_size: images per decoded batch (each batch yields one forward per variant).
        pool: a :class:`~bgsynth.pipeline.BackgroundPool` for Mixed-*; default: the Only-BG-T images of the same
            split (all shards share it).
        shard_id, num_shards: evaluate ``ids[shard_id::num_shards]`` of the sorted image ids (a manual shard,
            merged later with :func:`merge_results`; no collectives).
        progress: show a progress bar (images/s).
        record_provenance: keep the per-composite records in the result (needed for ``provenance.csv`` and for
            merging shards; metrics are computed from them either way).
        label_protocol: ``'official'`` or ``'restricted'`` (used when ``model`` is a LoadedModel).
        per_class: evaluate only N images per class of the split (a balanced quick subset, seeded choice).
        examples_per_class: images per class whose composites are kept for the report's contact sheet (0: none).
        cache_bytes: memory budget for keeping decoded batches so that Mixed-* needs no second decode
            (default: 40% of free GPU memory, or min(8 GiB, 25% of RAM)); 0 forces the pool-first path.
        prefetch: batches the loader decodes ahead.
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`). Under
            ``torchrun`` with several ranks (and ``num_shards=1``) every rank must call :func:`evaluate` with the
            same arguments: each evaluates its shard of the image ids, the Mixed-* background pool is gathered
            from all shards (each JPEG is decoded by one rank), the per-composite records are gathered, and every
            rank returns the merged result, identical in records and metrics to a single-process run (contact-sheet
            composites are rendered on rank 0 only; ``timing['ranks']`` holds the per-rank figures).
        tiling: Only-BG-T (and so every Mixed-* background) as the paper made it, ``"paper"`` (tiled at full
            resolution, then resized and cropped), or the crop-space approximation ``"crop"``; recorded in
            ``config['tiling']``.

    Returns:
        An :class:`EvalResult`.
    """
    from .distributed import DistContext, current
    from .distributed import shard_ids as _shard_ids
    from .index import DatasetIndex
    from .models import LoadedModel, Predictor
    from .pool import gather_background_pool

    t_start = time.perf_counter()
    if isinstance(index, (str, os.PathLike)):
        index = DatasetIndex.load(index)
    if not isinstance(index, DatasetIndex):
        raise ConfigError(f"evaluate: expected a DatasetIndex or its path, got {type(index).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluate: expected batch_size >= 1, got {batch_size!r}")
    if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard_id, int) and 0 <= shard_id < num_shards):
        raise ConfigError(f"evaluate: expected 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    dev = torch.device(device)
    if isinstance(model, LoadedModel):
        predictor = Predictor(model, device=dev, label_protocol=label_protocol)
    elif isinstance(model, Predictor):
        predictor = model
        dev = predictor.device
    else:
        raise ConfigError(f"evaluate: expected a LoadedModel or Predictor, got {type(model).__name__}")
    ctx = current() if dist is None else dist
    if not isinstance(ctx, DistContext):
        raise ConfigError(f"evaluate: expected dist to be a DistContext or None, got {type(ctx).__name__}")
    distributed = ctx.enabled and num_shards == 1
    if distributed:
        shard_id, num_shards = ctx.rank, ctx.world_size
    else:
        ctx = DistContext.single()  # a manual shard (or one process): no collectives
    progress = bool(progress) and ctx.is_main
    names = resolve_variants(variants)
    if tiling not in TILINGS:
        raise ConfigError(f"evaluate: expected tiling in {TILINGS}, got {tiling!r}")
    geom, geom_source = _resolve_geometry(geometry, predictor)
    forwards0, backoffs0 = predictor.forwards, predictor.oom_backoffs

    sub = index.select(split=split) if split is not None else index
    if per_class is not None:
        sub = sub.select(per_class=int(per_class), seed=0)
    if len(sub) == 0:
        splits = sorted({str(index.image(i).get("split")) for i in index.ids})
        raise ConfigError(f"evaluate: no images in split {split!r} of {index.path}; splits present: {splits}")
    all_ids = sub.ids
    shard_ids = _shard_ids(all_ids, shard_id, num_shards)

    mixed = [v for v in names if v in MIXED_VARIANTS]
    plain = [v for v in names if v not in MIXED_VARIANTS]
    n_img = len(shard_ids)
    if cache_bytes is None:
        cache_bytes = _default_cache_bytes(dev)
    need = n_img * (4 * geom.crop * geom.crop + 64)
    # keep the decoded batches for a Mixed-* second phase (each JPEG decoded once). A manual shard cannot: it
    # needs the whole split's pool; ranks can, by gathering the pool parts. Every rank must take the same path.
    two_phase = bool(mixed) and pool is None and (num_shards == 1 or distributed) and ctx.all_true(need <= cache_bytes)
    t_pool = 0.0
    from_ranks = f", gathered from {ctx.world_size} ranks" if distributed else ""
    pool_source = "none" if not mixed else "given" if pool is not None else (
        f"same split (kept from the evaluation pass{from_ranks})" if two_phase
        else f"same split (build_background_pool{from_ranks})")
    if mixed and pool is None and not two_phase:
        from .pool import build_background_pool_sharded

        tp = time.perf_counter()
        pool = build_background_pool_sharded(sub, ctx, geometry=geom, backend=backend, device=dev,
                                             progress=progress, tiling=tiling)
        t_pool = time.perf_counter() - tp
    if pool is not None:
        pool = pool.to(dev)

    from .pipeline import create_loader

    loader = create_loader(sub, backend=backend, geometry=geom, batch_size=batch_size, device=dev,
                           shard_id=shard_id, num_shards=num_shards, prefetch=prefetch, tiling=tiling,
                           only_bg_t="only_bg_t" in names or two_phase)
    bar = _progress(progress, n_img * len(names), f"eval {len(names)} variants")
    chunks: dict[str, list[tuple]] = {v: [] for v in names}
    meta: list[tuple[torch.Tensor, torch.Tensor]] = []
    kept: list = []
    bgt_parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    first_pass = plain if two_phase else list(names)
    t_loop = time.perf_counter()
    n_seen = 0
    try:
        for batch in loader:
            if batch.device != dev:
                batch = batch.to(dev, non_blocking=True)
            meta.append((batch.image_ids, batch.labels))
            if first_pass:
                outs = _synthesize(batch, first_pass, pool, seed, predictor)
                for v in first_pass:
                    o = outs[v]
                    chunks[v].append((predictor.predict(o.images), o.valid, o.bg_ids, o.bg_labels))
            if two_phase:
                from .variants import synthesize

                kept.append(batch)
                bgt = synthesize(batch, ["only_bg_t"], pool=None, seed=seed)["only_bg_t"]
                bgt_parts.append((bgt.images, batch.labels, batch.image_ids, bgt.valid & batch.has_bgt))
            n_seen += len(batch)
            _advance(bar, len(batch) * len(first_pass), n_seen)
        if two_phase and (kept or distributed):  # every rank joins the gather, even one without images
            tp = time.perf_counter()
            pool = _pool_from_parts(bgt_parts, geom.crop, dev)
            if distributed:
                pool = gather_background_pool(pool, ctx)
            t_pool = time.perf_counter() - tp
            del bgt_parts
            for batch in kept:
                outs = _synthesize(batch, mixed, pool, seed, predictor)
                for v in mixed:
                    o = outs[v]
                    chunks[v].append((predictor.predict(o.images), o.valid, o.bg_ids, o.bg_labels))
                _advance(bar, len(batch) * len(mixed), None)
            kept = []
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    t_loop = time.perf_counter() - t_loop

    records = _collect(chunks, meta, names, seed)
    if len(np.unique(records.image_id)) * len(names) != len(records):
        raise ConfigError("evaluate: internal error: records do not cover every (image, variant) exactly once")
    rejects = list(getattr(loader, "rejects", []))
    forwards = int(predictor.forwards - forwards0)
    backoffs = int(predictor.oom_backoffs - backoffs0)
    rank_timing = [{"rank": int(ctx.rank), "images": int(len(np.unique(records.image_id))), "planned": int(n_img),
                    "forwards": forwards, "seconds": time.perf_counter() - t_start, "loop_seconds": t_loop,
                    "pool_seconds": t_pool}]
    if distributed:
        # every rank gets every rank's records: the merged records are the single-process records
        parts = ctx.all_gather_object((records, rejects, rank_timing[0], backoffs))
        records = EvalRecords.cat([p[0] for p in parts])
        order = {int(i): k for k, i in enumerate(all_ids)}
        by_path = {sub.record(i).path: int(i) for i in all_ids} if any(p[1] for p in parts) else {}
        rejects = sorted((r for p in parts for r in p[1]), key=lambda r: (order.get(by_path.get(r.get("path"), -1), -1),
                                                                          str(r.get("path")), str(r.get("reason"))))
        rank_timing = [p[2] for p in parts]
        forwards = sum(t["forwards"] for t in rank_timing)
        backoffs = sum(p[3] for p in parts)
        n_img = len(all_ids)
    metrics = metrics_from_records(records)
    seconds = time.perf_counter() - t_start

    examples = _pick_examples(records, int(examples_per_class))
    example_images = None
    if examples["image_ids"] and ctx.is_main:
        try:
            example_images = _example_composites(sub, examples["image_ids"], names, pool, seed, geom, backend, dev,
                                                 records, tiling)
        except Exception as e:  # noqa: BLE001 - examples are illustrative; never lose a finished run over them
            warnings.warn(f"could not render example composites for the report ({type(e).__name__}: {e})", stacklevel=2)

    done_ids = np.unique(records.image_id)
    n_done = int(len(done_ids))
    labels_all = sub.labels(done_ids.tolist())
    result = EvalResult(
        variants=list(names),
        metrics=metrics["variants"],
        bg_gap=metrics["bg_gap"],
        label_protocol=predictor.label_protocol,
        model=dict(predictor.loaded.provenance, predictor=predictor.describe()),
        config={
            "index": str(index.path.resolve()) if index.path is not None else None,
            "split": split if split is None or isinstance(split, str) else list(split),
            "per_class": per_class,
            "seed": int(seed),
            "geometry": geom.to_dict(),
            "geometry_source": geom_source,
            "tiling": tiling,
            "backend": getattr(loader, "name", backend),
            "device": str(dev),
            "batch_size": int(batch_size),
            "shard_id": 0 if distributed else int(shard_id),
            "num_shards": 1 if distributed else int(num_shards),
            "pool": {"size": int(len(pool)) if pool is not None else 0, "source": pool_source},
            "single_decode": bool(two_phase or not mixed),
            "world_size": int(ctx.world_size),
        },
        dataset={
            "images": n_done,
            "planned": int(n_img),
            "split_images": int(len(all_ids)),
            "per_class": np.bincount(labels_all, minlength=NUM_IN9)[:NUM_IN9].tolist() if n_done else [0] * NUM_IN9,
            "rejects": rejects,
        },
        timing={
            "seconds": seconds,
            "pool_seconds": t_pool,
            "loop_seconds": t_loop,
            "images": n_done,
            "composites": int(len(records)),
            "images_per_s": n_done / seconds if seconds > 0 else None,
            "composites_per_s": len(records) / seconds if seconds > 0 else None,
            "forwards": int(forwards),
            "oom_backoffs": int(backoffs),
            **({"ranks": rank_timing} if distributed else {}),
        },
        versions=_versions(),
        examples=examples,
        records=records if record_provenance else None,
        example_images=example_images,
    )
    return result


def _pool_from_parts(parts, crop: int, device: torch.device):
    """The Only-BG-T images kept during the evaluation pass as a pool sorted by id (empty without parts)."""
    from .types import BackgroundPool

    if not parts:  # a rank whose shard is empty (or fully rejected) still takes part in the gather
        z = torch.empty(0, dtype=torch.int64, device=device)
        return BackgroundPool(torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=device), z, z.clone())
    imgs = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    ids = torch.cat([p[2] for p in parts])
    ok = torch.cat([p[3] for p in parts])
    keep = ok.nonzero().flatten()
    imgs, labels, ids = imgs[keep], labels[keep], ids[keep]
    order = torch.argsort(ids)
    return BackgroundPool(imgs[order].contiguous(), labels[order].to(torch.int64), ids[order].to(torch.int64))


def _collect(chunks, meta, names, seed) -> EvalRecords:
    if not meta:  # every image was rejected by the decoder
        return EvalRecords.empty(names, seed)
    ids = torch.cat([m[0] for m in meta]).cpu().numpy().astype(np.int64)
    labels = torch.cat([m[1] for m in meta]).cpu().numpy().astype(np.int64)
    cols: dict[str, list] = {c: [] for c in RECORD_COLUMNS}
    for vi, v in enumerate(names):
        parts = chunks[v]
        pred = torch.cat([p[0] for p in parts]).cpu().numpy()
        valid = torch.cat([p[1] for p in parts]).cpu().numpy().astype(bool)
        bg_id = torch.cat([p[2] for p in parts]).cpu().numpy()
        bg_label = torch.cat([p[3] for p in parts]).cpu().numpy()
        if len(pred) != len(ids):
            raise ConfigError(f"evaluate: internal error: {len(pred)} predictions for {len(ids)} images in {v}")
        cols["image_id"].append(ids)
        cols["variant"].append(np.full(len(ids), vi, np.int64))
        cols["label"].append(labels)
        cols["pred"].append(pred)
        cols["bg_id"].append(bg_id)
        cols["bg_label"].append(bg_label)
        cols["valid"].append(valid)
    return EvalRecords(tuple(names), int(seed), *(np.concatenate(cols[c]) for c in RECORD_COLUMNS)).sorted()


def _example_composites(sub, ids, names, pool, seed, geom, backend, dev, records: EvalRecords, tiling) -> dict:
    """uint8 composites of a few images for the contact sheet, with their records (predictions)."""
    from .pipeline import create_loader
    from .variants import synthesize

    loader = create_loader(sub, backend=backend, geometry=geom, batch_size=max(1, len(ids)), device=dev,
                           ids=list(ids), prefetch=0, tiling=tiling)
    batches = list(loader)
    if not batches:
        return {}
    from .types import Batch

    batch = Batch.cat(batches) if len(batches) > 1 else batches[0]
    # rows in the order asked for (class order), not the loader's id order; images that failed to decode drop out
    pos = {int(i): r for r, i in enumerate(batch.image_ids.cpu().tolist())}
    order = [pos[int(i)] for i in ids if int(i) in pos]
    batch = batch.slice(torch.as_tensor(order, dtype=torch.int64, device=batch.device))
    outs = synthesize(batch, list(names), pool=pool, seed=seed)
    got = batch.image_ids.cpu().numpy()
    images = torch.stack([outs[v].images.cpu() for v in names], dim=1)  # [n, V, 3, C, C]
    key = {(int(i), int(v)): r for r, (i, v) in enumerate(zip(records.image_id, records.variant))}
    pred = np.full((len(got), len(names)), -1, np.int64)
    valid = np.zeros((len(got), len(names)), bool)
    for a, i in enumerate(got):
        for b in range(len(names)):
            r = key.get((int(i), b))
            if r is not None:
                pred[a, b] = records.pred[r]
                valid[a, b] = records.valid[r]
    return {
        "variants": list(names),
        "image_ids": got.tolist(),
        "labels": batch.labels.cpu().numpy().tolist(),
        "images": images if images.dtype == torch.uint8 else images.clamp(0, 255).round().to(torch.uint8),
        "pred": pred,
        "valid": valid,
    }


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="comp", unit_scale=False, dynamic_ncols=True, smoothing=0.1)


def _advance(bar, composites: int, images: int | None) -> None:
    if bar is None:
        return
    bar.update(composites)
    if images is not None:
        el = bar.format_dict.get("elapsed", 0.0) or 0.0
        if el > 0:
            bar.set_postfix_str(f"{images / el:.0f} img/s", refresh=False)


def evaluate_to_dir(
    index,
    model,
    out_dir: str | os.PathLike,
    provenance: bool = False,
    report: bool = True,
    name: str | None = None,
    **kwargs: Any,
) -> tuple[EvalResult, dict[str, pathlib.Path]]:
    """:func:`evaluate`, then write ``results.json``, ``results.csv``, optionally ``provenance.csv``, and the
    report (``report.md``, ``accuracy.png``, ``per_class.png``, ``bg_class.png``, ``examples.png``) into ``out_dir``.

    Args:
        index, model: as for :func:`evaluate`.
        out_dir: output folder (created).
        provenance: also write ``provenance.csv`` (one row per composite).
        report: also write the Markdown report and figures.
        name: display name of the model in tables (default: its arch or file stem).
        **kwargs: passed to :func:`evaluate`.

    Returns:
        ``(result, paths)`` with ``paths`` keyed ``json``, ``csv``, ``provenance``, ``report``.

    Under ``torchrun`` every rank calls it; every rank gets the merged result, rank 0 alone writes the files
    (``paths`` is empty on the other ranks).
    """
    from .distributed import current

    ctx = kwargs.get("dist") or current()
    result = evaluate(index, model, **kwargs)
    if name:
        result.model["name"] = str(name)
    paths: dict[str, pathlib.Path] = {}
    if ctx.is_main or kwargs.get("num_shards", 1) > 1:  # a manual shard writes its own folder
        paths = result.save(out_dir, provenance=provenance)
        if report:
            from .report import write_report

            paths["report"] = write_report(result, out_dir)
    if kwargs.get("num_shards", 1) == 1:
        ctx.barrier()  # every rank returns once the files are there
    return result, paths
