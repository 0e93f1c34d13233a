"""The Backgrounds Challenge: every foreground against every Only-BG-T background, with a fraction of the work.

Semantics (PAPER.md, "Metrics"; the official ``challenge_eval.py``): for every foreground of a split (an image
with a mask and a label) and every Only-BG-T background of the same split, the composite takes the foreground's
pixels (mask M) from the foreground image and every other pixel from the background's Only-BG-T, both in the
model's crop geometry. A foreground is **vulnerable** if at least one background makes the model predict a class
other than the foreground's label (an unmapped ImageNet prediction, ``-1``, is "other than" too, as in the
official script); challenge accuracy = 1 - vulnerable / total. A foreground's own Only-BG-T is one of the
backgrounds: the official script tries the whole ``only_bg_t`` folder, which holds it, and so does this module.

Whether a foreground is vulnerable does not depend on the order in which backgrounds are tried, so the search
here does far less work than the official loop for the identical answer:

* the backgrounds are decoded once (:func:`bgsynth.pipeline.build_background_pool`) and stay resident on the
  device; composites are made there by :func:`bgsynth.kernels.composite` (gather + select + normalise + cast into the
  model's dtype and memory format in one pass) and fed straight to the model;
* **active set**: a foreground leaves the search the moment one background fools it;
* **tiling**: every forward batch holds many (foreground, background) pairs; each active foreground contributes
  a chunk of its next untried backgrounds, whose size doubles with the number it has already survived (1, 1, 2,
  4, ...), so a foreground fooled at its ``j``-th background costs at most about ``2 j`` forwards while a
  robust one costs exactly the number of backgrounds;
* **adaptive order** (``order='adaptive'``): each foreground tries first the backgrounds with the highest
  estimated fooling rate *for its class* (target class): fooled / tried pairs of that class, shrunk towards
  the rate at which the background pushed foregrounds of the other classes to a third class (a background that
  pulls the model towards class ``c`` fools everything but ``c``), itself shrunk towards the global rate. Ties
  fall back to a seeded permutation. ``order='reference'`` uses the fixed order of the official loop (the pool
  order, i.e. sorted background ids) with the same tiling.

Everything the schedule depends on is the search state (which pairs were tried and what the model said), so a
run is deterministic for a given (model, data, settings), can be checkpointed between forward batches
(atomically, :func:`bgsynth.index.atomic_write_bytes`) and resumed after a kill to the byte-identical result.

Work is counted in images forwarded ("forwards"), reported next to: brute force (``F x N``), the oracle lower
bound of any exact method (every robust foreground needs all ``N``, every vulnerable one at least 1), and the
official loop's order (per foreground, backgrounds in fixed order in batches of 32, stopping after the first
batch with a fooling background). The latter is exact only when the first fooling index in the fixed order is
known, i.e. with ``full_matrix=True``; otherwise lower and upper bounds derived from what was observed are
reported (see :meth:`ChallengeResult.reference_forwards_bounds`).

>>> from bgsynth.challenge import run_challenge                                     # doctest: +SKIP
>>> res = run_challenge("index.json", predictor, split="val")                       # doctest: +SKIP
>>> print(f"{res.accuracy:.1%}  ({res.num_vulnerable}/{res.num_foregrounds} vulnerable)")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import time
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .classes import IN9_CLASSES, NUM_IN9
from .config import check_positive_int, default_batch_size, resolve_geometry
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes, atomic_write_json
from .geometry import CropGeometry
from .index import DatasetIndex
from .types import TILINGS

__all__ = [
    "ORDERS",
    "REFERENCE_BATCH",
    "NOT_FOOLED",
    "UNMAPPED_U8",
    "ChallengeResult",
    "run_challenge",
    "merge_results",
    "reference_cost",
    "challenge_foregrounds",
    "challenge_to_dir",
]

ORDERS = ("adaptive", "reference")
REFERENCE_BATCH = 32  # the official loop's background batch size
NOT_FOOLED = -2  # fool_pred of a robust foreground (-1 is a real prediction: an unmapped ImageNet class)
UNMAPPED_U8 = 255  # code of an unmapped (-1) prediction in uint8 prediction matrices
CKPT_FORMAT = "bgsynth-challenge-state"
CKPT_VERSION = 1

# status codes of a foreground in the search state
_PENDING, _ACTIVE, _VULNERABLE, _ROBUST, _FAILED = 0, 1, 2, 3, 4
# shrinkage (pseudo-counts) of the adaptive order's fooling-rate estimates
_M_CLASS, _M_OTHER = 2.0, 2.0
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# Cost model of the official loop
# --------------------------------------------------------------------------------------------------------------


def reference_cost(first_fool: np.ndarray, num_backgrounds: int, batch: int = REFERENCE_BATCH) -> np.ndarray:
    """Images the official loop forwards per foreground, from the first fooling index in its fixed order.

    The loop composites the foreground with backgrounds ``0..N-1`` in batches of ``batch`` and stops after the
    first batch that holds a fooling background; a robust foreground (``first_fool < 0``) costs ``N``.

    Args:
        first_fool: ``int [F]`` position (in the fixed background order) of the first fooling background, or
            ``-1`` for a robust foreground.
        num_backgrounds: ``N``.
        batch: the loop's batch size (32 in the official script).

    Returns:
        ``int64 [F]`` forwards per foreground.

    >>> reference_cost(np.array([-1, 0, 31, 32, 99]), 100).tolist()
    [100, 32, 32, 64, 100]
    """
    f = np.asarray(first_fool, dtype=np.int64)
    n = int(num_backgrounds)
    spent = np.minimum((f // batch + 1) * batch, n)
    return np.where(f < 0, n, spent).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------------------


def _pred_to_u8(pred: np.ndarray) -> np.ndarray:
    p = np.asarray(pred, dtype=np.int64)
    return np.where(p < 0, UNMAPPED_U8, p).astype(np.uint8)


def _u8_to_pred(code: np.ndarray) -> np.ndarray:
    c = np.asarray(code).astype(np.int64)
    return np.where(c == UNMAPPED_U8, -1, c)


@dataclasses.dataclass
class ChallengeResult:
    """Outcome of :func:`run_challenge` (or of :func:`merge_results` over shards).

    Foreground arrays are aligned and sorted by foreground id; background arrays are in the pool order (sorted
    background id), which is also the fixed order of the official loop.

    Attributes:
        fg_ids, fg_labels: ``int64 [F]`` the foregrounds and their IN-9 labels.
        vulnerable: ``bool [F]``.
        fool_bg: ``int64 [F]`` image id of the background that fooled the foreground (``-1`` if robust). With
            the adaptive order it is the first fooling background the search met; with ``full_matrix`` the
            first in the fixed order.
        fool_pred: ``int64 [F]`` the model's prediction on that composite (``-1`` = unmapped ImageNet class,
            :data:`NOT_FOOLED` if robust).
        tried: ``int64 [F]`` backgrounds composited with the foreground (``N`` for a robust one).
        bg_ids, bg_labels: ``int64 [N]`` the backgrounds.
        forwards: composites classified by the search (the unit of work).
        first_fool_fixed: ``int64 [F]`` position in the fixed order of the first fooling background (``-1`` if
            robust), known only with ``full_matrix``; else ``None``.
        fool_bits: ``uint8 [F, ceil(N / 8)]`` the fooling matrix, rows bit-packed with :func:`numpy.packbits`
            (``full_matrix`` only).
        pred_matrix: ``uint8 [F, N]`` prediction per pair (:data:`UNMAPPED_U8` for unmapped), only with
            ``full_matrix`` and ``store_predictions``.
        failed_ids: ``int64 [K]`` foregrounds that could not be decoded (not counted in the total).
        config: the settings of the run (JSON-able).
        timing: wall time, forwards per second and similar figures of the process(es) that ran it; the only
            part of a result that differs between an uninterrupted and a resumed run.
        gallery_images: for ``full_matrix`` runs, ``{bg_id: uint8 [C, C, 3]}`` of the most adversarial
            backgrounds per class (for :mod:`bgsynth.report.challenge_plots`); not saved.
    """

    fg_ids: np.ndarray
    fg_labels: np.ndarray
    vulnerable: np.ndarray
    fool_bg: np.ndarray
    fool_pred: np.ndarray
    tried: np.ndarray
    bg_ids: np.ndarray
    bg_labels: np.ndarray
    forwards: int
    first_fool_fixed: np.ndarray | None = None
    fool_bits: np.ndarray | None = None
    pred_matrix: np.ndarray | None = None
    failed_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    config: dict = dataclasses.field(default_factory=dict)
    timing: dict = dataclasses.field(default_factory=dict)
    gallery_images: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------------- counts
    @property
    def num_foregrounds(self) -> int:
        return int(len(self.fg_ids))

    @property
    def num_backgrounds(self) -> int:
        return int(len(self.bg_ids))

    @property
    def num_vulnerable(self) -> int:
        return int(self.vulnerable.sum())

    @property
    def num_robust(self) -> int:
        return self.num_foregrounds - self.num_vulnerable

    @property
    def accuracy(self) -> float:
        """Challenge accuracy: 1 - vulnerable / total (``nan`` without foregrounds)."""
        return float("nan") if self.num_foregrounds == 0 else 1.0 - self.num_vulnerable / self.num_foregrounds

    @property
    def vulnerable_ids(self) -> np.ndarray:
        return self.fg_ids[self.vulnerable]

    @property
    def has_matrix(self) -> bool:
        return self.fool_bits is not None

    # ---------------------------------------------------------------------------------------------- work
    @property
    def brute_force_forwards(self) -> int:
        """Every pair: ``F x N``."""
        return self.num_foregrounds * self.num_backgrounds

    @property
    def oracle_forwards(self) -> int:
        """Lower bound of any exact method: ``robust x N + vulnerable x 1``."""
        return self.num_robust * self.num_backgrounds + self.num_vulnerable

    @property
    def reference_forwards(self) -> int | None:
        """Exact cost of the official loop's order on this run (``full_matrix`` runs), else ``None``."""
        if self.first_fool_fixed is None:
            return None
        return int(reference_cost(self.first_fool_fixed, self.num_backgrounds).sum())

    def reference_forwards_bounds(self) -> tuple[int, int]:
        """Bounds of the official loop's cost on this run, derived from what the search observed.

        A robust foreground costs the loop exactly ``N``. For a vulnerable one, the first fooling background
        in the fixed order lies at or before the fooling background the search recorded, so the loop stops at
        that background's batch at the latest (upper bound), and cannot stop before its first batch of 32
        (lower bound). Both equal :attr:`reference_forwards` when the full matrix is known.
        """
        n = self.num_backgrounds
        if self.first_fool_fixed is not None:
            exact = self.reference_forwards
            return exact, exact
        pos = np.searchsorted(self.bg_ids, self.fool_bg)
        known = np.where(self.vulnerable, pos, -1)
        upper = int(reference_cost(known, n).sum())
        lower = self.num_robust * n + self.num_vulnerable * min(REFERENCE_BATCH, n)
        return lower, upper

    # ---------------------------------------------------------------------------------------------- views
    def per_class(self) -> list[dict]:
        """Per IN-9 class: foregrounds, vulnerable, robust and challenge accuracy."""
        out = []
        for c, name in enumerate(IN9_CLASSES):
            m = self.fg_labels == c
            n = int(m.sum())
            v = int((self.vulnerable & m).sum())
            out.append({
                "class": c, "name": name, "foregrounds": n, "vulnerable": v, "robust": n - v,
                "accuracy": (1.0 - v / n) if n else None,
            })
        return out

    def fooling_matrix(self) -> np.ndarray:
        """``bool [F, N]``: pair (foreground, background) fools the model (``full_matrix`` runs only)."""
        if self.fool_bits is None:
            raise ConfigError("fooling_matrix: this result has no fooling matrix; run with full_matrix=True")
        return np.unpackbits(self.fool_bits, axis=1, count=self.num_backgrounds).astype(bool)

    def predictions(self) -> np.ndarray:
        """``int64 [F, N]``: the model's prediction for every pair (``-1`` = unmapped ImageNet class); only for
        ``full_matrix`` runs with ``store_predictions``."""
        if self.pred_matrix is None:
            raise ConfigError("predictions: this result has no prediction matrix; run with full_matrix=True and "
                              "store_predictions=True")
        return _u8_to_pred(self.pred_matrix)

    def vulnerability_counts(self) -> np.ndarray:
        """``int64 [F]``: how many backgrounds fool each foreground (``full_matrix`` runs only)."""
        return self.fooling_matrix().sum(axis=1).astype(np.int64)

    def bg_fool_fraction(self) -> np.ndarray:
        """``float64 [N]``: fraction of the foregrounds of *other* classes that each background fools.

        This is the figure above each image in the paper's gallery of adversarial backgrounds ("the proportion
        of non-insect foregrounds that can be fooled by these backgrounds"). ``nan`` where no foreground of
        another class exists.
        """
        mat = self.fooling_matrix()
        other = self.fg_labels[:, None] != self.bg_labels[None, :]
        num = (mat & other).sum(axis=0)
        den = other.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    def most_adversarial(self, k: int = 8) -> dict[int, list[tuple[int, float]]]:
        """Per background class, the ``k`` backgrounds with the highest :meth:`bg_fool_fraction`.

        Returns:
            ``{class: [(bg_id, fraction), ...]}`` sorted by fraction (descending), ties by background id.
        """
        frac = self.bg_fool_fraction()
        out: dict[int, list[tuple[int, float]]] = {}
        for c in range(NUM_IN9):
            idx = np.flatnonzero((self.bg_labels == c) & ~np.isnan(frac))
            order = idx[np.lexsort((self.bg_ids[idx], -frac[idx]))][:k]
            out[c] = [(int(self.bg_ids[i]), float(frac[i])) for i in order]
        return out

    # ---------------------------------------------------------------------------------------------- summary
    def work(self) -> dict:
        """Forwards next to brute force, the oracle bound and the official loop's order (JSON-able)."""
        lo, hi = self.reference_forwards_bounds()
        exact = self.reference_forwards
        bound = self.oracle_forwards

        def ratio(a, b):
            return None if not b else a / b

        return {
            "forwards": int(self.forwards),
            "brute_force": self.brute_force_forwards,
            "oracle_bound": bound,
            "reference": exact,
            "reference_lower": lo,
            "reference_upper": hi,
            "reference_source": "exact (full matrix)" if exact is not None else "bounds derived from the search",
            "forwards_over_oracle": ratio(self.forwards, bound),
            "brute_force_over_forwards": ratio(self.brute_force_forwards, self.forwards),
            "reference_over_forwards": ratio(exact, self.forwards) if exact is not None else None,
            "reference_lower_over_forwards": ratio(lo, self.forwards),
        }

    def summary(self) -> dict:
        """The headline figures (JSON-able)."""
        return {
            "accuracy": None if self.num_foregrounds == 0 else self.accuracy,
            "vulnerable": self.num_vulnerable,
            "robust": self.num_robust,
            "total": self.num_foregrounds,
            "backgrounds": self.num_backgrounds,
            "failed_foregrounds": int(len(self.failed_ids)),
            "per_class": self.per_class(),
            "work": self.work(),
        }

    def format(self) -> str:
        """A short human-readable report: accuracy, vulnerable/total, per-class figures, work against the bounds."""
        lines = [
            f"Backgrounds Challenge: accuracy {self.accuracy:.1%} "
            f"({self.num_vulnerable} of {self.num_foregrounds} foregrounds vulnerable, "
            f"{self.num_backgrounds} backgrounds)",
        ]
        if len(self.failed_ids):
            lines.append(f"  ({len(self.failed_ids)} foreground(s) could not be decoded and are not counted)")
        lines.append(f"  {'class':<20} {'fg':>6} {'vulnerable':>10} {'accuracy':>9}")
        for row in self.per_class():
            if row["foregrounds"]:
                lines.append(f"  {row['name']:<20} {row['foregrounds']:>6} {row['vulnerable']:>10} {row['accuracy']:>9.1%}")
        w = self.work()
        fw = max(w["forwards"], 1)
        lines.append(f"  forwards: {w['forwards']:,} (oracle bound {w['oracle_bound']:,}: x{w['forwards'] / max(w['oracle_bound'], 1):.3f}; "
                     f"brute force {w['brute_force']:,}: /{w['brute_force'] / fw:.1f})")
        if w["reference"] is not None:
            lines.append(f"  official loop's order on this run (exact, from the full matrix): {w['reference']:,} "
                         f"forwards (/{w['reference'] / fw:.1f})")
        else:
            lines.append(f"  official loop's order on this run (derived bounds): {w['reference_lower']:,} .. "
                         f"{w['reference_upper']:,} forwards (/{w['reference_lower'] / fw:.1f} .. /{w['reference_upper'] / fw:.1f})")
        return "\n".join(lines)

    def to_dict(self, include_timing: bool = True) -> dict:
        """Everything but the matrices, JSON-able (what ``challenge.json`` holds)."""
        fg = []
        for i in range(self.num_foregrounds):
            v = bool(self.vulnerable[i])
            rec = {
                "id": int(self.fg_ids[i]),
                "label": int(self.fg_labels[i]),
                "vulnerable": v,
                "fool_bg": int(self.fool_bg[i]) if v else None,
                "fool_pred": int(self.fool_pred[i]) if v else None,
                "tried": int(self.tried[i]),
            }
            if self.first_fool_fixed is not None:
                rec["first_fool_fixed"] = int(self.first_fool_fixed[i])
            fg.append(rec)
        d: dict[str, Any] = {"format": "bgsynth-challenge", **self.summary(), "config": self.config}
        bg: dict[str, Any] = {"ids": self.bg_ids.tolist(), "labels": self.bg_labels.tolist()}
        if self.has_matrix:
            frac = self.bg_fool_fraction()
            bg["fool_fraction"] = [None if math.isnan(f) else float(f) for f in frac]
            d["most_adversarial"] = {
                IN9_CLASSES[c]: [{"bg": b, "fraction": f} for b, f in lst] for c, lst in self.most_adversarial().items()
            }
            d["vulnerability_histogram"] = np.bincount(self.vulnerability_counts(), minlength=self.num_backgrounds + 1).tolist()
        d["pool"] = bg
        d["foregrounds"] = fg
        d["failed_foregrounds_ids"] = self.failed_ids.tolist()
        if include_timing:
            d["timing"] = self.timing
        return d

    # ---------------------------------------------------------------------------------------------- files
    def save(self, out_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
        """Write ``challenge.json`` (and ``challenge_matrix.npz`` with the matrices) into ``out_dir``, atomically.

        Returns:
            ``{"json": path, "matrix": path}`` (``matrix`` only for ``full_matrix`` runs).
        """
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "challenge.json"}
        atomic_write_json(paths["json"], self.to_dict(), indent=1)
        if self.has_matrix:
            arrays = {
                "fg_ids": self.fg_ids, "fg_labels": self.fg_labels, "bg_ids": self.bg_ids, "bg_labels": self.bg_labels,
                "fool_bits": self.fool_bits, "num_backgrounds": np.int64(self.num_backgrounds),
            }
            if self.pred_matrix is not None:
                arrays["pred_matrix"] = self.pred_matrix
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            paths["matrix"] = out / "challenge_matrix.npz"
            atomic_write_bytes(paths["matrix"], buf.getvalue())
        return paths

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "ChallengeResult":
        """Read a result written by :meth:`save` (``out_dir`` or the path of its ``challenge.json``)."""
        p = pathlib.Path(out_dir)
        js = p if p.suffix == ".json" else p / "challenge.json"
        try:
            d = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{js}: not a readable challenge result ({e})") from e
        if d.get("format") != "bgsynth-challenge":
            raise CheckpointError(f"{js}: expected format 'bgsynth-challenge', got {d.get('format')!r}")
        fg = d["foregrounds"]
        vul = np.array([r["vulnerable"] for r in fg], bool)
        res = cls(
            fg_ids=np.array([r["id"] for r in fg], np.int64),
            fg_labels=np.array([r["label"] for r in fg], np.int64),
            vulnerable=vul,
            fool_bg=np.array([r["fool_bg"] if r["vulnerable"] else -1 for r in fg], np.int64),
            fool_pred=np.array([r["fool_pred"] if r["vulnerable"] else NOT_FOOLED for r in fg], np.int64),
            tried=np.array([r["tried"] for r in fg], np.int64),
            bg_ids=np.array(d["pool"]["ids"], np.int64),
            bg_labels=np.array(d["pool"]["labels"], np.int64),
            forwards=int(d["work"]["forwards"]),
            first_fool_fixed=(np.array([r["first_fool_fixed"] for r in fg], np.int64)
                              if fg and "first_fool_fixed" in fg[0] else None),
            failed_ids=np.array(d.get("failed_foregrounds_ids", []), np.int64),
            config=d.get("config", {}),
            timing=d.get("timing", {}),
        )
        mat = js.parent / "challenge_matrix.npz"
        if mat.is_file():
            with np.load(mat, allow_pickle=False) as z:
                res.fool_bits = z["fool_bits"]
                res.pred_matrix = z["pred_matrix"] if "pred_matrix" in z.files else None
        return res


def merge_results(results: Sequence[ChallengeResult]) -> ChallengeResult:
    """Merge the results of foreground shards of one challenge (e.g. gathered from every rank).

    The shards must share the backgrounds and every setting but the shard id; their foregrounds must be
    disjoint. The merged result is what a single run over all foregrounds reports (foreground arrays sorted by
    id, forwards summed); ``timing`` holds the slowest shard's wall time and the per-shard figures.

    Raises:
        ConfigError: no result, different backgrounds or settings, overlapping foregrounds.
    """
    results = list(results)
    if not results:
        raise ConfigError("merge_results: expected at least one ChallengeResult, got none")
    if len(results) == 1:
        return results[0]
    first = results[0]

    per_shard = ("shard_id", "shards", "foregrounds_digest")

    def comparable(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in per_shard}

    for k, r in enumerate(results[1:], 1):
        if not np.array_equal(r.bg_ids, first.bg_ids):
            raise ConfigError(f"merge_results: result {k} has other backgrounds than result 0")
        if comparable(r.config) != comparable(first.config):
            diff = sorted(key for key in set(r.config) | set(first.config)
                          if key not in per_shard and r.config.get(key) != first.config.get(key))
            raise ConfigError(f"merge_results: result {k} was run with other settings than result 0: {diff}")
        if (r.fool_bits is None) != (first.fool_bits is None) or (r.pred_matrix is None) != (first.pred_matrix is None):
            raise ConfigError(f"merge_results: result {k} and result 0 differ in which matrices they hold")
    ids = np.concatenate([r.fg_ids for r in results])
    if len(np.unique(ids)) != len(ids):
        raise ConfigError("merge_results: the shards overlap (a foreground id occurs in more than one result)")
    order = np.argsort(ids, kind="stable")

    def cat(name):
        parts = [getattr(r, name) for r in results]
        return None if parts[0] is None else np.concatenate(parts)[order]

    shards = sorted({s for r in results for s in r.config.get("shards", [r.config.get("shard_id", 0)])})
    cfg = dict(first.config)
    cfg.pop("shard_id", None)
    cfg["shards"] = shards
    cfg["foregrounds_digest"] = _ids_digest(ids[order])
    wall = [float(r.timing.get("wall_s", 0.0)) for r in results]
    gallery = {}
    for r in results:
        gallery.update(r.gallery_images or {})
    merged = ChallengeResult(
        fg_ids=ids[order],
        fg_labels=cat("fg_labels"),
        vulnerable=cat("vulnerable"),
        fool_bg=cat("fool_bg"),
        fool_pred=cat("fool_pred"),
        tried=cat("tried"),
        bg_ids=first.bg_ids,
        bg_labels=first.bg_labels,
        forwards=int(sum(r.forwards for r in results)),
        first_fool_fixed=cat("first_fool_fixed"),
        fool_bits=cat("fool_bits"),
        pred_matrix=cat("pred_matrix"),
        failed_ids=np.sort(np.concatenate([r.failed_ids for r in results])),
        config=cfg,
        timing={"wall_s": max(wall), "shards": [r.timing for r in results]},
    )
    if merged.has_matrix:
        keep = {b for lst in merged.most_adversarial().values() for b, _ in lst}
        merged.gallery_images = {b: im for b, im in gallery.items() if b in keep}
    return merged


# --------------------------------------------------------------------------------------------------------------
# Search state (everything the schedule depends on; checkpointed between forward batches)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    fg_ids: np.ndarray  # int64 [F] (this shard, sorted)
    labels: np.ndarray  # int64 [F]
    status: np.ndarray  # int8 [F]
    fool_idx: np.ndarray  # int64 [F] pool index of the recorded fooling background, -1
    fool_pred: np.ndarray  # int64 [F]
    tried: np.ndarray  # int64 [F]
    next_pos: int  # foregrounds admitted to the window so far (positions < next_pos are not pending)
    window: np.ndarray  # int64 [A] positions of the active foregrounds, ascending
    window_tried: np.ndarray  # bool [A, N]
    pair_counts: np.ndarray  # int64 [N, 9, 10]: pairs by (background, foreground class, prediction; 9 = unmapped)
    forwards: int
    steps: int
    fool_bits: np.ndarray | None  # uint8 [F, ceil(N/8)] (full matrix)
    preds: np.ndarray | None  # uint8 [F, N] (full matrix + store_predictions)
    first_fixed: np.ndarray | None  # int64 [F] (full matrix)

    @classmethod
    def new(cls, fg_ids: np.ndarray, labels: np.ndarray, n_bg: int, full_matrix: bool, store_predictions: bool):
        f = len(fg_ids)
        return cls(
            fg_ids=fg_ids.astype(np.int64), labels=labels.astype(np.int64),
            status=np.zeros(f, np.int8), fool_idx=np.full(f, -1, np.int64), fool_pred=np.full(f, NOT_FOOLED, np.int64),
            tried=np.zeros(f, np.int64), next_pos=0, window=np.zeros(0, np.int64),
            window_tried=np.zeros((0, n_bg), bool), pair_counts=np.zeros((n_bg, NUM_IN9, NUM_IN9 + 1), np.int64),
            forwards=0, steps=0,
            fool_bits=np.zeros((f, (n_bg + 7) // 8), np.uint8) if full_matrix else None,
            preds=np.full((f, n_bg), UNMAPPED_U8, np.uint8) if (full_matrix and store_predictions) else None,
            first_fixed=np.full(f, -1, np.int64) if full_matrix else None,
        )

    @property
    def complete(self) -> bool:
        return self.next_pos >= len(self.fg_ids) and len(self.window) == 0

    @property
    def decided(self) -> int:
        return int(((self.status == _VULNERABLE) | (self.status == _ROBUST)).sum())

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_bytes(self, config: dict, bg_ids: np.ndarray) -> bytes:
        n_bg = self.window_tried.shape[1]
        arrays = {
            "meta": np.frombuffer(json.dumps({
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "config": config, "next_pos": self.next_pos,
                "forwards": self.forwards, "steps": self.steps, "num_backgrounds": n_bg,
            }, sort_keys=True).encode("utf-8"), np.uint8),
            "bg_ids": bg_ids.astype(np.int64),
            "fg_ids": self.fg_ids, "labels": self.labels, "status": self.status, "fool_idx": self.fool_idx,
            "fool_pred": self.fool_pred, "tried": self.tried, "window": self.window,
            "window_tried": np.packbits(self.window_tried, axis=1), "pair_counts": self.pair_counts,
        }
        for name in ("fool_bits", "preds", "first_fixed"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: pathlib.Path) -> tuple["_State", dict, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                if meta.get("format") != CKPT_FORMAT or meta.get("version") != CKPT_VERSION:
                    raise CheckpointError(
                        f"{path}: expected a {CKPT_FORMAT} v{CKPT_VERSION} checkpoint, got "
                        f"{meta.get('format')!r} v{meta.get('version')!r}"
                    )
                n_bg = int(meta["num_backgrounds"])
                get = {k: z[k] for k in z.files}
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError, EOFError) as e:
            raise CheckpointError(f"{path}: not a readable challenge checkpoint ({type(e).__name__}: {e})") from e
        state = cls(
            fg_ids=get["fg_ids"], labels=get["labels"], status=get["status"], fool_idx=get["fool_idx"],
            fool_pred=get["fool_pred"], tried=get["tried"], next_pos=int(meta["next_pos"]), window=get["window"],
            window_tried=np.unpackbits(get["window_tried"], axis=1, count=n_bg).astype(bool),
            pair_counts=get["pair_counts"], forwards=int(meta["forwards"]), steps=int(meta["steps"]),
            fool_bits=get.get("fool_bits"), preds=get.get("preds"), first_fixed=get.get("first_fixed"),
        )
        return state, meta["config"], get["bg_ids"]


# --------------------------------------------------------------------------------------------------------------
# Adaptive order
# --------------------------------------------------------------------------------------------------------------


def _class_orders(counts: np.ndarray, tiebreak: np.ndarray, bg_labels: np.ndarray) -> np.ndarray:
    """Background order per foreground class from the pair counts: ``int64 [9, N]``, most promising first.

    ``counts[b, d, k]``: pairs of background ``b`` with a foreground of class ``d`` that the model classified
    as ``k`` (``k = 9``: unmapped). For target class ``c`` the score of ``b`` is its fooling rate on class ``c``
    (fooled / tried), shrunk towards ``prior_c(b)``: the rate at which ``b`` made foregrounds of *other* classes
    predicted as a class that is neither theirs nor ``c`` (evidence that ``b`` pulls predictions away from
    ``c``), itself shrunk towards the global fooling rate. Among equal scores (e.g. backgrounds never tried),
    backgrounds of class ``c`` itself come last (they support the right answer), then the seeded ``tiebreak``.
    Exact float64 arithmetic on integer counts, so the order is a deterministic function of the counts.
    """
    T = counts.sum(axis=2).astype(np.float64)  # [N, 9] tried per fg class
    diag = counts[:, np.arange(NUM_IN9), np.arange(NUM_IN9)].astype(np.float64)  # correct
    Fo = T - diag  # fooled per fg class
    pred_to = counts[:, :, :NUM_IN9].sum(axis=1).astype(np.float64)  # [N, 9] pairs predicted as class c
    X = (Fo.sum(axis=1, keepdims=True) - Fo) - (pred_to - diag)  # other-class pairs fooled to a class != c
    Y = T.sum(axis=1, keepdims=True) - T
    p_glob = (Fo.sum() + 1.0) / (T.sum() + 2.0)
    prior = (X + _M_OTHER * p_glob) / (Y + _M_OTHER)
    score = (Fo + _M_CLASS * prior) / (T + _M_CLASS)
    return np.stack([np.lexsort((tiebreak, bg_labels == c, -score[:, c])) for c in range(NUM_IN9)])


# --------------------------------------------------------------------------------------------------------------
# Foreground feed (decoded once, in id order, into a device window)
# --------------------------------------------------------------------------------------------------------------


class _ForegroundFeed:
    """Decodes foregrounds in id order and hands them out one at a time (``(id, image, mask)`` on the device)."""

    def __init__(self, index: DatasetIndex, ids: Sequence[int], geometry: CropGeometry, backend: str,
                 device: torch.device, batch_size: int):
        from .pipeline import create_loader

        self._iter: Iterator | None = None
        self._loader = None
        if len(ids):
            # foregrounds need no Only-BG-T of their own (only_bg_t=False spares the paper tiling's second resize)
            self._loader = create_loader(index, backend=backend, geometry=geometry, batch_size=batch_size,
                                         device=device, ids=list(ids), require_mask=True, only_bg_t=False)
            self._iter = iter(self._loader)
        self._batch = None
        self._ids: list[int] = []
        self._k = 0
        self._peek: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _next(self) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        while self._batch is None or self._k >= len(self._ids):
            if self._iter is None:
                return None
            try:
                self._batch = next(self._iter)
            except StopIteration:
                self._iter = None
                return None
            self._ids = self._batch.image_ids.tolist()
            self._k = 0
        k = self._k
        self._k += 1
        return self._ids[k], self._batch.images[k], self._batch.masks[k]

    def take(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoded ``(image, mask)`` of ``image_id`` (ids must be asked for in increasing order), or
        ``None`` if the loader skipped it (an undecodable file, recorded in the loader's rejects)."""
        while True:
            got = self._peek if self._peek is not None else self._next()
            self._peek = None
            if got is None:
                return None
            if got[0] == image_id:
                return got[1], got[2]
            if got[0] > image_id:
                self._peek = got
                return None
            # got[0] < image_id: an id that was skipped by the caller; drop it

    @property
    def rejects(self) -> list[dict]:
        return [] if self._loader is None else list(self._loader.rejects)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None


# --------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------


def _model_fingerprint(predictor) -> str:
    """A hash of the predictor's weights and settings (a checkpoint only resumes with the same model)."""
    h = hashlib.sha256()
    loaded = getattr(predictor, "loaded", None)
    module = getattr(loaded, "module", None) if loaded is not None else getattr(predictor, "module", None)
    if isinstance(module, torch.nn.Module):
        for k, v in sorted(module.state_dict().items()):
            h.update(k.encode())
            t = v.detach().cpu().contiguous()
            h.update(str(t.dtype).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(f"{type(predictor).__module__}.{type(predictor).__qualname__}".encode())
        fp = getattr(predictor, "fingerprint", None)
        if fp is not None:
            h.update(str(fp() if callable(fp) else fp).encode())
    describe = getattr(predictor, "describe", None)
    if callable(describe):
        d = dict(describe())
        d.pop("device", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:32]


def challenge_foregrounds(index: DatasetIndex, split: str | None = "val", fg_ids: Sequence[int] | None = None,
                          fg_per_class: int | None = None, seed: int = 0) -> list[int]:
    """The foreground ids of a challenge: images of ``split`` that carry a mask (sorted).

    Args:
        index: the dataset index.
        split: split name (``None``: all splits).
        fg_ids: restrict to these ids.
        fg_per_class: at most this many per class, chosen with ``seed`` (a balanced subset).
        seed: seed of that choice.
    """
    sub = index.select(split=split, ids=fg_ids, per_class=fg_per_class, seed=seed, require_mask=True)
    return sub.ids


def run_challenge(
    index: DatasetIndex | str | os.PathLike,
    predictor,
    split: str | None = "val",
    geometry: CropGeometry | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    fg_ids: Sequence[int] | None = None,
    bg_per_class: int | None = None,
    batch_size: int | None = None,
    fg_tile: int | None = None,
    order: str = "adaptive",
    full_matrix: bool = False,
    store_predictions: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    resume: bool = False,
    shard_id: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    kernel_backend: str = "auto",
    gallery_k: int = 8,
    dist=None,
    share_every: int = 8,
    tiling: str = "paper",
) -> ChallengeResult:
    """Run the Backgrounds Challenge for a model (see the module docstring for semantics and method).

    Args:
        index: dataset index (or its path).
        predictor: a :class:`bgsynth.models.Predictor` (or any object with ``mean``, ``std``, ``input_dtype``,
            ``channels_last`` and ``predict(x) -> int64 [B]`` IN-9 ids, ``-1`` = unmapped).
        split: the split whose foregrounds and backgrounds are used (``None``: the whole index).
        geometry: crop geometry; default: the one stored with the model's checkpoint, else 256 -> 224.
        backend: decode backend (:func:`bgsynth.pipeline.create_loader`).
        device: where composites are made and the pool lives (default: the predictor's device).
        seed: tie-break permutation of the adaptive order and the choice of ``bg_per_class`` subsets.
        fg_ids: restrict the foregrounds to these ids (default: every image of the split with a mask).
        bg_per_class: use at most this many backgrounds per class (a seeded balanced subset; the official
            challenge uses them all).
        batch_size: composites per forward (default 512 on CUDA, 64 on CPU).
        fg_tile: foregrounds resident and searched at once (default ``4 x batch_size``).
        order: ``'adaptive'`` or ``'reference'`` (fixed pool order, as the official loop).
        full_matrix: evaluate every pair and keep the fooling matrix (implies the fixed order).
        store_predictions: with ``full_matrix``, keep the prediction of every pair (``uint8 [F, N]``).
        checkpoint: path of the search-state checkpoint (``None``: no checkpoints).
        checkpoint_every: seconds between checkpoints (``0``: after every forward batch).
        resume: continue from ``checkpoint`` if it exists. Its settings must match: the same model weights,
            foregrounds, backgrounds, geometry, order, batch size, tile, seed, dtype and device type (the schedule
            depends on all of them); otherwise :class:`CheckpointError` names what differs.
        shard_id, num_shards: search only the foregrounds ``sorted_ids[shard_id::num_shards]``
            (:func:`bgsynth.distributed.shard_ids`); every shard uses every background. Merge with
            :func:`merge_results`.
        progress: show a tqdm bar (foregrounds decided, forwards/s, estimated time left).
        kernel_backend: :func:`bgsynth.kernels.composite` backend (``'auto'``, ``'torch'``, ``'triton'``).
        gallery_k: backgrounds per class kept for the gallery of a ``full_matrix`` run.
        dist: a :class:`~bgsynth.distributed.DistContext` with several ranks, every one of which calls
            :func:`run_challenge` (with its own ``shard_id``): the background pool is then decoded across the
            ranks and gathered (:func:`bgsynth.pool.build_background_pool_sharded`; a collective). ``None``:
            each call decodes the whole pool itself.
        share_every: with several ranks and ``order='adaptive'``: every this many search steps the ranks sum their
            pair statistics, so each rank orders its backgrounds by what all ranks have learnt (0: never). The
            answer does not depend on it; the work and the fooling records do.
        tiling: the backgrounds' Only-BG-T: ``"paper"`` (the authors' construction, tiled at full resolution)
            or ``"crop"`` (the crop-space approximation); recorded in ``config['tiling']``.

    Returns:
        A :class:`ChallengeResult`.

    Raises:
        ConfigError: bad arguments, no foreground or no background.
        CheckpointError: ``resume`` with a checkpoint of another run (other model, data or settings).
    """
    from .distributed import shard_ids as _shard

    t_start = time.monotonic()
    if not isinstance(index, DatasetIndex):
        index = DatasetIndex.load(index)
    if order not in ORDERS:
        raise ConfigError(f"run_challenge: expected order in {ORDERS}, got {order!r}")
    if tiling not in TILINGS:
        raise ConfigError(f"run_challenge: expected tiling in {TILINGS}, got {tiling!r}")
    if not isinstance(checkpoint_every, (int, float)) or checkpoint_every < 0:
        raise ConfigError(f"run_challenge: expected checkpoint_every >= 0 seconds, got {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ConfigError("run_challenge: resume=True needs a checkpoint path")
    if store_predictions and not full_matrix:
        warnings.warn("run_challenge: store_predictions only applies with full_matrix=True; ignored", stacklevel=2)
        store_predictions = False
    for name in ("mean", "std", "input_dtype", "channels_last", "predict"):
        if not hasattr(predictor, name):
            raise ConfigError(f"run_challenge: expected a Predictor-like object with .{name}, got {type(predictor).__name__}")
    if device is None:
        device = getattr(predictor, "device", "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bs = default_batch_size("challenge", device) if batch_size is None else check_positive_int(
        batch_size, "batch_size", "run_challenge")
    tile = 4 * bs if fg_tile is None else fg_tile
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ConfigError(f"run_challenge: expected fg_tile to be a positive integer, got {fg_tile!r}")
    loaded = getattr(predictor, "loaded", None)
    geometry, geometry_source = resolve_geometry(geometry, stored=getattr(loaded, "geometry", None),
                                                 checkpoint=(getattr(loaded, "provenance", None) or {}).get("file"))
    if full_matrix:
        order = "reference"

    # ----------------------------------------------------------------------------------- data
    from .pool import build_background_pool

    fg_all = challenge_foregrounds(index, split, fg_ids)
    fg_list = np.asarray(_shard(fg_all, shard_id, num_shards), np.int64)
    if len(fg_all) == 0:
        raise ConfigError(f"run_challenge: no foreground (image of split {split!r} with a mask) in {index!r}")
    if dist is not None and dist.enabled:  # each rank decodes a share of the backgrounds; all get the whole pool
        from .pool import build_background_pool_sharded

        pool = build_background_pool_sharded(index, dist, geometry=geometry, backend=backend, device=device,
                                             split=split, per_class=bg_per_class, seed=seed, progress=progress,
                                             tiling=tiling)
    else:
        pool = build_background_pool(index, geometry=geometry, backend=backend, device=device, split=split,
                                     per_class=bg_per_class, seed=seed, progress=progress, tiling=tiling)
    n_bg = len(pool)
    if n_bg == 0:
        raise ConfigError(f"run_challenge: no Only-BG-T background in split {split!r} of {index!r}")
    bg_ids = pool.image_ids.cpu().numpy().astype(np.int64)
    bg_labels = pool.labels.cpu().numpy().astype(np.int64)
    labels = index.labels(fg_list.tolist()) if len(fg_list) else np.zeros(0, np.int64)

    dtype = predictor.input_dtype
    kdtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
    if share_every < 0:
        raise ConfigError(f"run_challenge: expected share_every >= 0, got {share_every}")
    sharing = bool(dist is not None and dist.enabled and order == "adaptive" and not full_matrix and share_every > 0)
    config = {
        "split": split, "geometry": geometry.to_dict(), "geometry_source": geometry_source, "tiling": tiling,
        "order": order,
        "full_matrix": bool(full_matrix),
        "store_predictions": bool(store_predictions), "batch_size": bs, "fg_tile": tile, "seed": int(seed),
        "bg_per_class": bg_per_class, "shard_id": int(shard_id), "num_shards": int(num_shards),
        "foregrounds_digest": _ids_digest(fg_list), "backgrounds_digest": _ids_digest(bg_ids),
        "model": _model_fingerprint(predictor), "input_dtype": str(dtype).replace("torch.", ""),
        "device_type": device.type, "mean": [float(v) for v in predictor.mean],
        "std": [float(v) for v in predictor.std], "decode_backend": backend,
        "order_sharing": int(share_every) if sharing else 0,
    }

    # ----------------------------------------------------------------------------------- state
    ckpt_path = None if checkpoint is None else pathlib.Path(checkpoint)
    if ckpt_path is not None and ckpt_path.parent.is_dir():
        # temporary files of a write that was killed half-way (atomic_write_bytes never leaves a partial target)
        for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass
    state = None
    resumed = False
    if resume and ckpt_path is not None and ckpt_path.exists():
        state, saved_cfg, saved_bg = _State.from_file(ckpt_path)
        if saved_cfg != config or not np.array_equal(saved_bg, bg_ids):
            diff = sorted(k for k in set(saved_cfg) | set(config) if saved_cfg.get(k) != config.get(k))
            raise CheckpointError(
                f"{ckpt_path}: the checkpoint belongs to another run (settings that differ: {diff or ['backgrounds']}); "
                f"use the same model, data and settings, or delete it to start over"
            )
        resumed = True
    elif resume and ckpt_path is not None:
        warnings.warn(f"run_challenge: no checkpoint at {ckpt_path}; starting from the beginning", stacklevel=2)
    if state is None:
        state = _State.new(fg_list, labels, n_bg, full_matrix, store_predictions)
    forwards_at_start = state.forwards

    # ----------------------------------------------------------------------------------- the loop
    pending_ids = [int(state.fg_ids[p]) for p in state.window] + state.fg_ids[state.next_pos:].tolist()
    feed = _ForegroundFeed(index, pending_ids, geometry, backend, device, batch_size=min(max(tile, 1), 256))
    c = geometry.crop
    win_images = torch.empty((tile, 3, c, c), dtype=torch.uint8, device=device)
    win_masks = torch.empty((tile, 1, c, c), dtype=torch.uint8, device=device)
    slot_of: dict[int, int] = {}  # position -> window buffer slot
    free_slots = list(range(tile - 1, -1, -1))  # pop() gives the smallest
    tiebreak = np.random.default_rng([int(seed), 0xC4A1]).permutation(n_bg)
    fixed_orders = np.broadcast_to(np.arange(n_bg, dtype=np.int64), (NUM_IN9, n_bg))
    model_forwards_at_start = int(getattr(predictor, "forwards", 0))
    checkpoints_written = 0
    last_ckpt = time.monotonic()

    def load_slot(pos: int) -> bool:
        """Decode the foreground at ``pos`` into a free slot; False if the loader skipped it (rejected)."""
        got = feed.take(int(state.fg_ids[pos]))
        if got is None:
            return False
        s = free_slots.pop()
        win_images[s].copy_(got[0])
        win_masks[s].copy_(got[1])
        slot_of[pos] = s
        return True

    # re-decode the window of a resumed state
    for pos in state.window.tolist():
        if not load_slot(int(pos)):
            raise CheckpointError(
                f"{ckpt_path}: foreground {int(state.fg_ids[pos])} of the checkpoint's active window could not be "
                f"decoded again; the data changed since the checkpoint was written"
            )

    def admit() -> None:
        new = []
        while len(state.window) + len(new) < tile and state.next_pos < len(state.fg_ids):
            pos = state.next_pos
            state.next_pos += 1
            if load_slot(pos):
                state.status[pos] = _ACTIVE
                new.append(pos)
            else:
                state.status[pos] = _FAILED
                warnings.warn(f"challenge: foreground {int(state.fg_ids[pos])} could not be decoded; left out",
                              stacklevel=3)
        if new:
            state.window = np.concatenate([state.window, np.asarray(new, np.int64)])
            state.window_tried = np.concatenate([state.window_tried, np.zeros((len(new), n_bg), bool)])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(state.fg_ids), initial=state.decided, desc="challenge", unit="fg",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} fg [{elapsed}{postfix}]")

    def save_checkpoint() -> None:
        nonlocal checkpoints_written, last_ckpt
        if ckpt_path is not None:
            atomic_write_bytes(ckpt_path, state.to_bytes(config, bg_ids))
            checkpoints_written += 1
        last_ckpt = time.monotonic()

    # statistics as device tensors once, not re-made by every composite call
    mean = torch.tensor([float(v) for v in predictor.mean], dtype=torch.float32, device=device)
    std = torch.tensor([float(v) for v in predictor.std], dtype=torch.float32, device=device)
    from . import kernels

    last_bar = 0.0
    # pair statistics of the other ranks at the last exchange (order sharing); a resumed rank relearns them at its
    # first exchange
    peer_counts = np.zeros_like(state.pair_counts) if sharing else None
    syncs = 0
    iteration = 0
    try:
        admit()
        while True:
            if len(state.window):
                _step(state, predictor, pool, win_images, win_masks, slot_of, free_slots, bs, n_bg,
                      full_matrix, order, tiebreak, bg_labels, fixed_orders, mean, std, kdtype, dtype, kernels,
                      kernel_backend, peer_counts)
                admit()
                if bar is not None and (time.monotonic() - last_bar >= 0.5 or not len(state.window)):
                    last_bar = time.monotonic()
                    _update_bar(bar, state, n_bg, last_bar - t_start, state.forwards - forwards_at_start)
                if ckpt_path is not None and time.monotonic() - last_ckpt >= checkpoint_every and not state.complete:
                    save_checkpoint()
            if not sharing:
                if not len(state.window):
                    break
                continue
            # every rank makes the same sequence of collectives: one exchange every `share_every` iterations; a
            # rank that has finished keeps iterating (without work) until every rank has
            iteration += 1
            if iteration % share_every:
                continue
            total = torch.as_tensor(state.pair_counts).clone()
            active = torch.tensor([int(len(state.window) > 0)], dtype=torch.int64)
            dist.all_reduce(total, "sum")
            dist.all_reduce(active, "sum")
            peer_counts = total.numpy() - state.pair_counts
            syncs += 1
            if int(active.item()) == 0:
                break
    finally:
        feed.close()
        if bar is not None:
            bar.close()
    if ckpt_path is not None:
        save_checkpoint()

    # ----------------------------------------------------------------------------------- result
    ok = state.status != _FAILED
    if (state.status[ok] < _VULNERABLE).any():
        raise RuntimeError("run_challenge: internal error: the search ended with undecided foregrounds")
    vul = state.status[ok] == _VULNERABLE
    fool_idx = state.fool_idx[ok]
    wall = time.monotonic() - t_start
    done = state.forwards - forwards_at_start
    result = ChallengeResult(
        fg_ids=state.fg_ids[ok].copy(),
        fg_labels=state.labels[ok].copy(),
        vulnerable=vul,
        fool_bg=np.where(vul, bg_ids[np.maximum(fool_idx, 0)], -1).astype(np.int64),
        fool_pred=np.where(vul, state.fool_pred[ok], NOT_FOOLED).astype(np.int64),
        tried=state.tried[ok].copy(),
        bg_ids=bg_ids,
        bg_labels=bg_labels,
        forwards=int(state.forwards),
        first_fool_fixed=None if state.first_fixed is None else state.first_fixed[ok].copy(),
        fool_bits=None if state.fool_bits is None else state.fool_bits[ok].copy(),
        pred_matrix=None if state.preds is None else state.preds[ok].copy(),
        failed_ids=state.fg_ids[~ok].copy(),
        config=config,
        timing={
            "wall_s": wall,
            "forwards_this_process": int(done),
            "forwards_per_s": done / wall if wall > 0 else None,
            "model_forwards_this_process": int(getattr(predictor, "forwards", 0)) - model_forwards_at_start,
            "resumed": resumed,
            "checkpoints_written": checkpoints_written,
            "steps": int(state.steps),
            "order_exchanges": syncs,
        },
    )
    if full_matrix and gallery_k > 0:
        keep = sorted({b for lst in result.most_adversarial(gallery_k).values() for b, _ in lst})
        rows = np.searchsorted(bg_ids, keep)
        imgs = pool.images[torch.as_tensor(rows, dtype=torch.long, device=pool.device)].permute(0, 2, 3, 1).cpu().numpy()
        result.gallery_images = {int(b): imgs[i] for i, b in enumerate(keep)}
    return result


def _update_bar(bar, state: _State, n_bg: int, elapsed: float, forwards_here: int) -> None:
    decided = state.decided
    bar.n = decided
    rate = forwards_here / elapsed if elapsed > 0 else 0.0
    vul = int((state.status == _VULNERABLE).sum())
    rob = int((state.status == _ROBUST).sum())
    # forwards still to spend: undecided foregrounds are robust with the rate seen so far (then they need all
    # their untried backgrounds) or vulnerable (about one more forward)
    q = (rob + 1.0) / (vul + rob + 2.0)
    undecided = np.flatnonzero((state.status == _ACTIVE) | (state.status == _PENDING))
    left = float((n_bg - state.tried[undecided]).sum()) * q + len(undecided) * (1 - q)
    eta = left / rate if rate > 0 else float("inf")
    bar.set_postfix_str(
        f"vulnerable={vul}, fwd={state.forwards}, {rate:.0f} fwd/s, eta~{_fmt_s(eta)}", refresh=False
    )
    bar.refresh()


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _step(state: _State, predictor, pool, win_images, win_masks, slot_of, free_slots, bs: int, n_bg: int,
          full_matrix: bool, order: str, tiebreak, bg_labels, fixed_orders, mean, std, kdtype, dtype, kernels,
          kernel_backend, peer_counts=None):
    """One forward batch: choose pairs, composite them on the device, classify, update the state."""
    win = state.window
    t = state.tried[win]
    remaining = n_bg - t
    if full_matrix:
        k = remaining
    else:
        k = np.minimum(np.maximum(t // 2, 1), remaining)  # chunks grow by half of what was survived: 1, 1, 1, 2, 3, ...
    # early stop: the first batches ramp up (8, 16, 32, ... pairs) so the order has learnt something before
    # many foregrounds are probed; it costs a few small batches at the start of a run, no forwards
    if not full_matrix:
        bs = min(bs, 8 << min(state.steps, 20))
    k = np.minimum(k, bs)
    # early stop: fewest backgrounds tried first, so new foregrounds get their cheap probes before long robust
    # walks; full matrix: in admission order, so foregrounds finish one after the other
    prio = np.arange(len(win)) if full_matrix else np.lexsort((win, t))
    ks = k[prio]
    before = np.concatenate([[0], np.cumsum(ks)[:-1]])
    fits = before < bs
    sel = prio[fits]  # window rows, in priority order
    ks = np.minimum(ks[fits], bs - before[fits])

    if order == "adaptive":
        counts = state.pair_counts if peer_counts is None else state.pair_counts + peer_counts
        orders = _class_orders(counts, tiebreak, bg_labels)
    else:
        orders = fixed_orders
    sel_cls = state.labels[win[sel]]
    rank_parts, row_parts, bg_parts = [], [], []
    for c in np.unique(sel_cls):
        which = np.flatnonzero(sel_cls == c)  # indices into sel
        o = orders[c]
        untried = ~state.window_tried[sel[which]][:, o]
        take = untried & (np.cumsum(untried, axis=1) <= ks[which][:, None])
        r, col = np.nonzero(take)  # row-major: each foreground's pairs in its priority order
        rank_parts.append(which[r])
        row_parts.append(sel[which[r]])
        bg_parts.append(o[col])
    rank = np.concatenate(rank_parts)
    perm = np.argsort(rank, kind="stable")
    rows = np.concatenate(row_parts)[perm]  # window rows
    bgs = np.concatenate(bg_parts)[perm].astype(np.int64)  # pool indices
    pos = win[rows]

    # pixels: gather the foregrounds of the pairs, composite over their backgrounds, normalise and cast
    dev = win_images.device
    slots = torch.as_tensor(np.asarray([slot_of[int(p)] for p in pos], np.int64), device=dev)
    bg_t = torch.as_tensor(bgs, device=dev)
    fg = win_images.index_select(0, slots)
    keep = win_masks.index_select(0, slots)
    x = kernels.composite(fg, keep, pool.images, bg_t, mean=mean, std=std, dtype=kdtype,
                          channels_last=bool(predictor.channels_last), backend=kernel_backend)
    if kdtype != dtype:
        x = x.to(dtype)
    pred = predictor.predict(x)
    pred = pred.detach().to("cpu").numpy().astype(np.int64)
    if pred.shape != (len(pos),):
        raise ConfigError(f"run_challenge: predictor returned {pred.shape} predictions for {len(pos)} composites")

    # bookkeeping
    lab = state.labels[pos]
    fooled = pred != lab
    state.window_tried[rows, bgs] = True
    np.add.at(state.tried, pos, 1)
    code = np.where(pred < 0, NUM_IN9, pred)
    np.add.at(state.pair_counts, (bgs, lab, code), 1)
    state.forwards += len(pos)
    state.steps += 1
    if full_matrix:
        f_pos, f_bg = pos[fooled], bgs[fooled]
        np.bitwise_or.at(state.fool_bits, (f_pos, f_bg >> 3), (0x80 >> (f_bg & 7)).astype(np.uint8))
        if state.preds is not None:
            state.preds[pos, bgs] = _pred_to_u8(pred)
        # first fooling background of each row in the fixed order: the pairs of a row arrive in increasing pool
        # index (fixed order, contiguous chunks), so the first fooling pair of a row in this step is its minimum
        uniq, first = np.unique(f_pos, return_index=True)
        b_first = f_bg[first]
        upd = (state.first_fixed[uniq] < 0) | (b_first < state.first_fixed[uniq])
        u = uniq[upd]
        state.first_fixed[u] = b_first[upd]
        state.fool_idx[u] = b_first[upd]
        state.fool_pred[u] = pred[fooled][first][upd]
        done_rows = np.flatnonzero(state.tried[win] >= n_bg)
        for r in done_rows.tolist():
            p = int(win[r])
            state.status[p] = _VULNERABLE if state.first_fixed[p] >= 0 else _ROBUST
    else:
        # the first fooling pair of each foreground (pairs are in the foreground's priority order)
        f_idx = np.flatnonzero(fooled)
        f_pos = pos[f_idx]
        uniq, first = np.unique(f_pos, return_index=True)
        state.status[uniq] = _VULNERABLE
        state.fool_idx[uniq] = bgs[f_idx[first]]
        state.fool_pred[uniq] = pred[f_idx[first]]
        rob = win[(state.tried[win] >= n_bg) & (state.status[win] == _ACTIVE)]
        state.status[rob] = _ROBUST
    # retire decided foregrounds from the window
    keep_rows = state.status[win] == _ACTIVE
    for p in win[~keep_rows].tolist():
        free_slots.append(slot_of.pop(int(p)))
    free_slots.sort(reverse=True)
    state.window = win[keep_rows]
    state.window_tried = state.window_tried[keep_rows]


# --------------------------------------------------------------------------------------------------------------
# Run to a folder (the CLI's entry point; distributed-aware)
# --------------------------------------------------------------------------------------------------------------


def challenge_to_dir(
    index: DatasetIndex | str | os.PathLike,
    predictor,
    out_dir: str | os.PathLike,
    resume: bool = False,
    checkpoint_every: float = 60.0,
    plots: bool = True,
    **kwargs,
) -> tuple[ChallengeResult, dict[str, pathlib.Path]]:
    """Run :func:`run_challenge` with its checkpoint in ``out_dir`` and write the result (and plots) there.

    Under ``torchrun`` (:func:`bgsynth.distributed.current` with several ranks) each rank searches its shard of
    the foregrounds (with its own checkpoint, ``challenge.ckpt.rank<R>.npz``), the results are gathered and
    merged with :func:`merge_results`, and rank 0 writes the files; every rank returns the merged result.

    Args:
        index: dataset index (or its path).
        predictor: see :func:`run_challenge`.
        out_dir: output folder: ``challenge.json``, the checkpoint, ``challenge_class_accuracy.png``, and for
            ``full_matrix`` runs ``challenge_matrix.npz``, ``challenge_gallery.png`` and
            ``challenge_vulnerability.png``.
        resume: continue from the checkpoint in ``out_dir``.
        checkpoint_every: seconds between checkpoints.
        plots: write the plots (:func:`bgsynth.report.challenge_plots.challenge_plots`).
        **kwargs: the other arguments of :func:`run_challenge` (not ``checkpoint``, ``shard_id``, ``num_shards``
            under torchrun).

    Returns:
        ``(result, paths)``; ``paths`` is empty on ranks other than 0.
    """
    from .distributed import current

    ctx = current()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.world_size > 1:
        kwargs["shard_id"], kwargs["num_shards"] = ctx.rank, ctx.world_size
        kwargs["dist"] = ctx
        ckpt = out / f"challenge.ckpt.rank{ctx.rank}.npz"
    else:
        ckpt = out / "challenge.ckpt.npz"
    result = run_challenge(index, predictor, checkpoint=ckpt, checkpoint_every=checkpoint_every, resume=resume,
                           **kwargs)
    if ctx.world_size > 1:
        result = merge_results(ctx.all_gather_object(result))
    paths: dict[str, pathlib.Path] = {}
    if ctx.is_main:
        paths.update(result.save(out))
        if plots:
            from .report.challenge_plots import challenge_plots

            paths.update(challenge_plots(result, out, k=kwargs.get("gallery_k", 8)))
    ctx.barrier()
    return result, paths
