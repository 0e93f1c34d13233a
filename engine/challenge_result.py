"""The outcome of a Backgrounds Challenge run: :class:`ChallengeResult`, :func:`merge_results` of shards, and the
cost model of the official loop (:func:`reference_cost`).

A result is plain NumPy (no tensor, no device): it is what :func:`bgsynth.challenge.run_challenge` returns, what
``challenge.json`` / ``challenge_matrix.npz`` hold and what :mod:`bgsynth.report.challenge_plots` draws. The
search that produces it lives in :mod:`bgsynth.challenge_search`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from .classes import IN9, LabelSpace
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes, atomic_write_json, read_json

__all__ = [
    "REFERENCE_BATCH",
    "NOT_FOOLED",
    "UNMAPPED_U8",
    "ChallengeResult",
    "merge_results",
    "reference_cost",
]

REFERENCE_BATCH = 32  # the official loop's background batch size
NOT_FOOLED = -2  # fool_pred of a robust foreground (-1 is a real prediction: an unmapped ImageNet class)
UNMAPPED_U8 = 255  # code of an unmapped (-1) prediction in uint8 prediction matrices


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


def pred_to_u8(pred: np.ndarray, num_classes: int = 9) -> np.ndarray:
    """Predictions (``-1`` = unmapped) as the codes of prediction matrices: ``uint8`` with :data:`UNMAPPED_U8` for
    an unmapped prediction while the label space has fewer than 255 classes, else ``int32`` holding ``-1`` itself.

    >>> pred_to_u8(np.array([3, -1])).tolist(), pred_to_u8(np.array([300, -1]), 1000).dtype.name
    ([3, 255], 'int32')
    """
    p = np.asarray(pred, dtype=np.int64)
    if num_classes >= UNMAPPED_U8:
        return p.astype(np.int32)
    return np.where((p < 0) | (p >= num_classes), UNMAPPED_U8, p).astype(np.uint8)


def _u8_to_pred(code: np.ndarray) -> np.ndarray:
    c = np.asarray(code)
    if c.dtype != np.uint8:
        return c.astype(np.int64)
    c = c.astype(np.int64)
    return np.where(c == UNMAPPED_U8, -1, c)


@dataclasses.dataclass
class ChallengeResult:
    """Outcome of :func:`run_challenge` (or of :func:`merge_results` over shards).

    Foreground arrays are aligned and sorted by foreground id; background arrays are in the pool order (sorted
    background id), which is also the fixed order of the official loop.

    Attributes:
        fg_ids, fg_labels: ``int64 [F]`` the foregrounds and their class ids (in :attr:`label_space`).
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
        pred_matrix: ``uint8 [F, N]`` prediction per pair (:data:`UNMAPPED_U8` for unmapped; ``int32`` with
            ``-1`` for label spaces of 255 classes or more), only with ``full_matrix`` and ``store_predictions``.
        failed_ids: ``int64 [K]`` foregrounds that could not be decoded (not counted in the total).
        config: the settings of the run (JSON-able).
        timing: wall time, forwards per second and similar figures of the process(es) that ran it; the only
            part of a result that differs between an uninterrupted and a resumed run.
        gallery_images: for ``full_matrix`` runs, ``{bg_id: uint8 [C, C, 3]}`` of the most adversarial
            backgrounds per class (for :mod:`bgsynth.report.challenge_plots`); not saved.
        label_space: the classes of the foregrounds and backgrounds (the index's; IN-9 by default): the per-class
            figures are over its classes and named by it.
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
    label_space: LabelSpace = IN9

    def __post_init__(self):
        if isinstance(self.label_space, dict):
            self.label_space = LabelSpace.from_dict(self.label_space)
        if not isinstance(self.label_space, LabelSpace):
            raise ConfigError(f"ChallengeResult: expected a LabelSpace, got {type(self.label_space).__name__}")

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
        """Per class of the label space: foregrounds, vulnerable, robust and challenge accuracy."""
        out = []
        for c, name in enumerate(self.label_space.classes):
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
        for c in range(self.label_space.num_classes):
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
        d: dict[str, Any] = {"format": "bgsynth-challenge", **self.summary(), "config": self.config,
                             "label_space": self.label_space.to_dict()}
        bg: dict[str, Any] = {"ids": self.bg_ids.tolist(), "labels": self.bg_labels.tolist()}
        if self.has_matrix:
            frac = self.bg_fool_fraction()
            bg["fool_fraction"] = [None if math.isnan(f) else float(f) for f in frac]
            d["most_adversarial"] = {
                self.label_space.classes[c]: [{"bg": b, "fraction": f} for b, f in lst]
                for c, lst in self.most_adversarial().items()
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
        d = read_json(js, "challenge result", CheckpointError)
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
            label_space=LabelSpace.from_dict(d["label_space"]) if d.get("label_space") else IN9,
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
        if r.label_space != first.label_space:
            raise ConfigError(f"merge_results: result {k} is in another label space than result 0")
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
    cfg["foregrounds_digest"] = ids_digest(ids[order])
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
        label_space=first.label_space,
    )
    if merged.has_matrix:
        keep = {b for lst in merged.most_adversarial().values() for b, _ in lst}
        merged.gallery_images = {b: im for b, im in gallery.items() if b in keep}
    return merged



def ids_digest(ids: np.ndarray) -> str:
    """A short hash of a list of image ids (results and checkpoints record which foregrounds and backgrounds)."""
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:32]
