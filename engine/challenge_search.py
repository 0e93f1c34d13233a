"""The search of the Backgrounds Challenge, as objects whose state is explicit.

* :class:`ChallengeConfig`: the job's own settings (frozen, validated once): which foregrounds and backgrounds,
  the order, the window of resident foregrounds, the full matrix, checkpoint and resume, sharding and the
  sharing of order statistics between ranks. The run's device, geometry, batch size (composites per forward),
  seed, tiling and backends are the resolved :class:`~bgsynth.config.RunConfig`.
* :class:`SearchState`: everything the schedule depends on, and nothing else: the decision per foreground
  (pending, active, vulnerable, robust, failed), how many backgrounds each has tried, the **active set** (the
  window's positions and which backgrounds each one has tried), the **order statistics** (pairs by background,
  foreground class and prediction), the fooling records and, for full-matrix runs, the matrices. Its two
  transitions are plain NumPy: :meth:`SearchState.next_pairs` (which pairs the next forward batch holds) and
  :meth:`SearchState.record` (what the model said). It is the **checkpoint**: written atomically between
  forward batches, read back by :meth:`ChallengeSearch.resume`.
* :class:`ForegroundWindow`: the pixels of the active foregrounds, decoded once in id order and resident on the
  device, one slot per active foreground.
* :class:`ChallengeSearch`: one shard's search: admits foregrounds into the window (:meth:`~ChallengeSearch.admit`),
  runs forward batches (:meth:`~ChallengeSearch.step`: composites made by :func:`bgsynth.variants.composite` over
  the resident :class:`~bgsynth.types.BackgroundPool`), sums the order statistics of the ranks
  (:meth:`~ChallengeSearch.exchange`), checkpoints (:meth:`~ChallengeSearch.save`) and resumes, and reports a
  :class:`~bgsynth.challenge_result.ChallengeResult` (:meth:`~ChallengeSearch.result`).

The semantics and the method are described in :mod:`bgsynth.challenge`; :func:`bgsynth.challenge.run_challenge`
is the pipeline that puts these pieces together.
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
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .challenge_result import NOT_FOOLED, ChallengeResult, ids_digest, pred_to_u8
from .classes import IN9, NUM_IN9, LabelSpace, in1k_to_in9
from .config import RunConfig, check_positive_int
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes
from .index import DatasetIndex
from .pipeline import create_loader
from .results import model_digest
from .types import BackgroundPool
from .variants import composite

__all__ = [
    "ORDERS",
    "ChallengeConfig",
    "SearchState",
    "ForegroundWindow",
    "ChallengeSearch",
    "class_orders",
    "background_push",
    "foreground_orders",
    "model_fingerprint",
    "output_table",
    "label_mass",
]

ORDERS = ("adaptive", "reference")
CKPT_FORMAT = "bgsynth-challenge-state"
CKPT_VERSION = 3  # 2: soft order statistics (float64 pair mass); 3: per-foreground log mass

# status codes of a foreground in the search state
PENDING, ACTIVE, VULNERABLE, ROBUST, FAILED = 0, 1, 2, 3, 4
# shrinkage (pseudo-counts) of the adaptive order's fooling-rate estimates
_M_CLASS, _M_OTHER, _M_CELL = 2.0, 2.0, 4.0
# the per-foreground order: probability floor of the log masses, shrinkage of a background's mean mass
_LOG_FLOOR, _M_PUSH = 1e-6, 2.0
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# The job's settings
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChallengeConfig:
    """The Backgrounds Challenge's own settings (see :mod:`bgsynth.challenge`); validated when made.

    Attributes:
        split: the split whose foregrounds and backgrounds are used (``None``: the whole index).
        fg_ids: restrict the foregrounds to these ids (default: every image of the split with a mask).
        bg_per_class: use at most this many backgrounds per class (a balanced subset chosen with the run's seed;
            the official challenge uses them all).
        fg_tile: foregrounds resident and searched at once (default ``4 x`` the run's batch size).
        order: ``'adaptive'`` (most fooling backgrounds for the foreground's class first) or ``'reference'``
            (the official loop's fixed order: the pool order, sorted background ids).
        full_matrix: evaluate every pair and keep the fooling matrix (implies ``order='reference'``).
        store_predictions: with ``full_matrix``, keep the prediction of every pair (``uint8 [F, N]``); ignored
            with a warning otherwise.
        checkpoint: path of the search-state checkpoint (``None``: no checkpoints). Not the model's file.
        checkpoint_every: seconds between checkpoints (``0``: after every forward batch).
        resume: continue from ``checkpoint`` if it exists (the checkpoint must belong to the same run: model
            weights, foregrounds, backgrounds and every setting the schedule depends on).
        shard_id, num_shards: search only the foregrounds ``sorted_ids[shard_id::num_shards]``
            (:func:`bgsynth.distributed.shard_ids`) against every background; merge the shards'
            results with :func:`bgsynth.challenge.merge_results`.
        gallery_k: backgrounds per class kept for the gallery of a ``full_matrix`` run.
        share_every: with several ranks and ``order='adaptive'``: every this many search steps the ranks sum their
            order statistics (0: never). The answer does not depend on it; the work and the fooling records do.

    >>> ChallengeConfig(full_matrix=True).order
    'reference'
    """

    split: str | Sequence[str] | None = "val"
    fg_ids: tuple[int, ...] | None = None
    bg_per_class: int | None = None
    fg_tile: int | None = None
    order: str = "adaptive"
    full_matrix: bool = False
    store_predictions: bool = False
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: float = 60.0
    resume: bool = False
    shard_id: int = 0
    num_shards: int = 1
    gallery_k: int = 8
    share_every: int = 8

    def __post_init__(self):
        owner = "ChallengeConfig"
        if self.order not in ORDERS:
            raise ConfigError(f"{owner}: expected order in {ORDERS}, got {self.order!r}")
        for name in ("bg_per_class", "fg_tile"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name, owner)
        check_positive_int(self.num_shards, "num_shards", owner)
        check_positive_int(self.shard_id, "shard_id", owner, minimum=0)
        if self.shard_id >= self.num_shards:
            raise ConfigError(f"{owner}: expected shard_id < num_shards ({self.num_shards}), got {self.shard_id}")
        check_positive_int(self.gallery_k, "gallery_k", owner, minimum=0)
        check_positive_int(self.share_every, "share_every", owner, minimum=0)
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0:
            raise ConfigError(f"{owner}: expected checkpoint_every >= 0 seconds, got {every!r}")
        if self.fg_ids is not None:
            object.__setattr__(self, "fg_ids", tuple(int(i) for i in self.fg_ids))
        if self.full_matrix:
            object.__setattr__(self, "order", "reference")  # every pair, in the fixed order
        if self.store_predictions and not self.full_matrix:
            warnings.warn("run_challenge: store_predictions only applies with full_matrix=True; ignored", stacklevel=3)
            object.__setattr__(self, "store_predictions", False)

    def tile(self, batch_size: int) -> int:
        """Foregrounds resident at once: ``fg_tile``, by default ``4 x batch_size``."""
        return 4 * batch_size if self.fg_tile is None else self.fg_tile


# --------------------------------------------------------------------------------------------------------------
# Search state (everything the schedule depends on; checkpointed between forward batches)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchState:
    """The state of one shard's search; the schedule is a deterministic function of it.

    Attributes:
        fg_ids, labels: ``int64 [F]`` this shard's foregrounds (sorted) and their class ids (``0..C-1`` in the
            index's label space of ``C`` classes).
        status: ``int8 [F]``: pending, active (in the window), vulnerable, robust, failed (undecodable).
        fool_idx: ``int64 [F]`` pool index of the recorded fooling background (``-1``).
        fool_pred: ``int64 [F]`` the prediction on that composite (:data:`NOT_FOOLED`).
        tried: ``int64 [F]`` backgrounds composited with each foreground.
        next_pos: foregrounds admitted to the window so far (positions below it are not pending).
        window: ``int64 [A]`` positions of the active foregrounds, ascending (the active set).
        window_tried: ``bool [A, N]`` which backgrounds each active foreground has tried.
        pair_counts: ``float64 [N, C, C + 1]`` the order statistics: per (background, foreground class), the
            model's probability mass on each class (``C`` = unmapped) summed over the pairs tried; one count per pair
            on its predicted class when the predictor gives no logits.
        forwards, steps: composites classified and forward batches run.
        fool_bits: ``uint8 [F, ceil(N / 8)]`` the fooling matrix so far (full matrix).
        preds: ``uint8 [F, N]`` every pair's prediction (full matrix with ``store_predictions``).
        first_fixed: ``int64 [F]`` first fooling background in the fixed order (full matrix).
        fg_logmass: ``float64 [F, C + 1]`` per foreground, the log of the model's probability of each class (and of
            no class) summed over the pairs it tried (the adaptive order's per-foreground statistics,
            :func:`foreground_orders`); zeros when the predictor gives no logits.
    """

    fg_ids: np.ndarray
    labels: np.ndarray
    status: np.ndarray
    fool_idx: np.ndarray
    fool_pred: np.ndarray
    tried: np.ndarray
    next_pos: int
    window: np.ndarray
    window_tried: np.ndarray
    pair_counts: np.ndarray
    forwards: int
    steps: int
    fool_bits: np.ndarray | None
    preds: np.ndarray | None
    first_fixed: np.ndarray | None
    fg_logmass: np.ndarray | None = None

    # size: the state's shape is fixed by these five (and the class count)
    @classmethod
    def new(cls, fg_ids: np.ndarray, labels: np.ndarray, n_bg: int, full_matrix: bool,
            store_predictions: bool, num_classes: int = NUM_IN9) -> "SearchState":
        """The state before the first forward: every foreground pending (``num_classes``: the label space's ``C``)."""
        f = len(fg_ids)
        c = int(num_classes)
        return cls(
            fg_ids=fg_ids.astype(np.int64), labels=labels.astype(np.int64),
            status=np.zeros(f, np.int8), fool_idx=np.full(f, -1, np.int64), fool_pred=np.full(f, NOT_FOOLED, np.int64),
            tried=np.zeros(f, np.int64), next_pos=0, window=np.zeros(0, np.int64),
            window_tried=np.zeros((0, n_bg), bool), pair_counts=np.zeros((n_bg, c, c + 1), np.float64),
            forwards=0, steps=0,
            fool_bits=np.zeros((f, (n_bg + 7) // 8), np.uint8) if full_matrix else None,
            preds=pred_to_u8(np.full((f, n_bg), -1), c) if (full_matrix and store_predictions) else None,
            first_fixed=np.full(f, -1, np.int64) if full_matrix else None,
            fg_logmass=np.zeros((f, c + 1), np.float64),
        )

    @property
    def num_backgrounds(self) -> int:
        return int(self.window_tried.shape[1])

    @property
    def num_classes(self) -> int:
        """``C``, the classes of the label space."""
        return int(self.pair_counts.shape[1])

    @property
    def complete(self) -> bool:
        return self.next_pos >= len(self.fg_ids) and len(self.window) == 0

    @property
    def decided(self) -> int:
        return int(((self.status == VULNERABLE) | (self.status == ROBUST)).sum())

    # ------------------------------------------------------------------------------------------ transitions
    def activate(self, positions: Sequence[int]) -> None:
        """Foregrounds (positions, ascending) enter the active set with no background tried."""
        if len(positions):
            new = np.asarray(positions, np.int64)
            self.status[new] = ACTIVE
            self.window = np.concatenate([self.window, new])
            self.window_tried = np.concatenate([self.window_tried, np.zeros((len(new), self.num_backgrounds), bool)])

    # size: the schedule of one forward batch, in one place (chunks, ramp-up, priority, spreading)
    def next_pairs(self, batch_size: int, orders: np.ndarray, full_matrix: bool,
                   spread: bool = False, row_orders=None) -> tuple[np.ndarray, np.ndarray]:
        """The pairs of the next forward batch: ``(rows, bgs)``, window rows and pool indices (``int64 [P]``).

        Each active foreground contributes a chunk of its next untried backgrounds in ``orders[its class]``; the
        chunk grows with the square root of what it has survived (1, 1, 1, 1, 2, 2, 2, 2, 2, 3, ...: a foreground
        fooled at its ``j``-th background costs at most about ``j + sqrt(j)`` forwards, a robust one exactly the
        number of backgrounds); the full matrix takes every remaining background. Early stop: the first batches
        ramp up (8, 16, 32, ... pairs) so the order has learnt something before many foregrounds are probed, and
        the foregrounds with the fewest backgrounds tried go first, so new foregrounds get their cheap probes before
        long robust walks; full matrix: in admission order, so foregrounds finish one after the other.

        ``spread`` (the adaptive order): the foregrounds of one class in one batch do not all take the same top
        backgrounds: each background the batch has already given to ``a`` foregrounds of the class moves ``a``
        places down that class's order for the next one (:func:`_spread_pairs`). A batch then tries several of
        the promising backgrounds at once instead of one, which is what the order learns from.

        ``row_orders`` (the adaptive order): ``callable(rows) -> int64 [len(rows), N]``, each window row's own
        background order (:func:`foreground_orders`), which replaces its class's order; spreading then counts
        positions in each row's own order.
        """
        win = self.window
        t = self.tried[win]
        remaining = self.num_backgrounds - t
        if full_matrix:
            k = remaining
        else:
            k = np.minimum(np.maximum(np.sqrt(t).astype(np.int64), 1), remaining)
            batch_size = min(batch_size, 8 << min(self.steps, 20))
        k = np.minimum(k, batch_size)
        prio = np.arange(len(win)) if full_matrix else np.lexsort((win, t))
        ks = k[prio]
        before = np.concatenate([[0], np.cumsum(ks)[:-1]])
        fits = before < batch_size
        sel = prio[fits]  # window rows, in priority order
        ks = np.minimum(ks[fits], batch_size - before[fits])
        sel_cls = self.labels[win[sel]]
        rank_parts, row_parts, bg_parts = [], [], []
        own = None if row_orders is None or not len(sel) else row_orders(sel)
        for c in np.unique(sel_cls):
            which = np.flatnonzero(sel_cls == c)  # indices into sel
            o = np.broadcast_to(orders[c], (len(which), self.num_backgrounds)) if own is None else own[which]
            untried = ~np.take_along_axis(self.window_tried[sel[which]], o, axis=1)
            if spread and len(which) > 1:
                take = _spread_pairs(untried, ks[which], o)
            else:
                take = untried & (np.cumsum(untried, axis=1) <= ks[which][:, None])
            r, col = np.nonzero(take)  # row-major: each foreground's pairs in its priority order
            rank_parts.append(which[r])
            row_parts.append(sel[which[r]])
            bg_parts.append(o[r, col])
        perm = np.argsort(np.concatenate(rank_parts), kind="stable")
        return np.concatenate(row_parts)[perm], np.concatenate(bg_parts)[perm].astype(np.int64)

    def record(self, rows: np.ndarray, bgs: np.ndarray, pred: np.ndarray, full_matrix: bool,
               mass: np.ndarray | None = None) -> np.ndarray:
        """Book the model's predictions ``pred`` (``int64 [P]``) on the pairs ``(rows, bgs)``, decide foregrounds
        and retire the decided ones from the window; returns the positions that left it.

        ``mass`` (``float [P, C + 1]``, rows summing to 1): the model's probability of each class (and of no class)
        on each pair, for the order statistics; without it each pair counts once for its predicted class.
        """
        win = self.window
        pos = win[rows]
        lab = self.labels[pos]
        fooled = pred != lab
        self.window_tried[rows, bgs] = True
        np.add.at(self.tried, pos, 1)
        c = self.num_classes
        if mass is None:
            code = np.where((pred < 0) | (pred >= c), c, pred)  # a prediction outside the label space: unmapped
            np.add.at(self.pair_counts, (bgs, lab, code), 1.0)
        else:
            mass = np.asarray(mass, np.float64)
            np.add.at(self.pair_counts, (bgs, lab), mass)
            if self.fg_logmass is not None:
                np.add.at(self.fg_logmass, pos, np.log(np.maximum(mass, _LOG_FLOOR)))
        self.forwards += len(pos)
        self.steps += 1
        if full_matrix:
            self._record_matrix(pos, bgs, pred, fooled)
        else:
            self._record_first(pos, bgs, pred, fooled)
        keep = self.status[win] == ACTIVE
        self.window = win[keep]
        self.window_tried = self.window_tried[keep]
        return win[~keep]

    def _record_first(self, pos, bgs, pred, fooled) -> None:
        """Early stop: the first fooling pair of each foreground (pairs are in its priority order) decides it."""
        f_idx = np.flatnonzero(fooled)
        uniq, first = np.unique(pos[f_idx], return_index=True)
        self.status[uniq] = VULNERABLE
        self.fool_idx[uniq] = bgs[f_idx[first]]
        self.fool_pred[uniq] = pred[f_idx[first]]
        win = self.window
        self.status[win[(self.tried[win] >= self.num_backgrounds) & (self.status[win] == ACTIVE)]] = ROBUST

    def _record_matrix(self, pos, bgs, pred, fooled) -> None:
        """Full matrix: every pair into the matrices; a foreground is decided when it has tried every background."""
        f_pos, f_bg = pos[fooled], bgs[fooled]
        np.bitwise_or.at(self.fool_bits, (f_pos, f_bg >> 3), (0x80 >> (f_bg & 7)).astype(np.uint8))
        if self.preds is not None:
            self.preds[pos, bgs] = pred_to_u8(pred, self.num_classes)
        # first fooling background of each row in the fixed order: the pairs of a row arrive in increasing pool
        # index (fixed order, contiguous chunks), so the first fooling pair of a row in this step is its minimum
        uniq, first = np.unique(f_pos, return_index=True)
        b_first = f_bg[first]
        upd = (self.first_fixed[uniq] < 0) | (b_first < self.first_fixed[uniq])
        u = uniq[upd]
        self.first_fixed[u] = b_first[upd]
        self.fool_idx[u] = b_first[upd]
        self.fool_pred[u] = pred[fooled][first][upd]
        win = self.window
        done = win[self.tried[win] >= self.num_backgrounds]
        self.status[done] = np.where(self.first_fixed[done] >= 0, VULNERABLE, ROBUST)

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_bytes(self, record: dict, bg_ids: np.ndarray) -> bytes:
        """The checkpoint: ``.npz`` of the arrays (tried bits packed) and a JSON ``meta`` with the run's record."""
        arrays = {
            "meta": np.frombuffer(json.dumps({
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "config": record, "next_pos": self.next_pos,
                "forwards": self.forwards, "steps": self.steps, "num_backgrounds": self.num_backgrounds,
            }, sort_keys=True).encode("utf-8"), np.uint8),
            "bg_ids": bg_ids.astype(np.int64),
            "fg_ids": self.fg_ids, "labels": self.labels, "status": self.status, "fool_idx": self.fool_idx,
            "fool_pred": self.fool_pred, "tried": self.tried, "window": self.window,
            "window_tried": np.packbits(self.window_tried, axis=1), "pair_counts": self.pair_counts,
        }
        for name in ("fool_bits", "preds", "first_fixed", "fg_logmass"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: pathlib.Path) -> tuple["SearchState", dict, np.ndarray]:
        """``(state, record, bg_ids)`` of a checkpoint written from :meth:`to_bytes`.

        Raises:
            CheckpointError: the file cannot be read, is not a challenge checkpoint, or is damaged (truncated,
                corrupt, inconsistent); the message names the file and says how to start over.
        """
        start_over = "delete it, or run without resume (--resume) to start the search over"
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the challenge checkpoint ({e.strerror or e})") from e
        if head[:2] != b"PK":  # .npz files are zip archives; anything else would reach NumPy's pickle branch
            raise CheckpointError(f"{path}: not a readable challenge checkpoint (expected the .npz archive bgsynth "
                                  f"writes, the file starts with {head!r}); {start_over}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT or meta.get("version") != CKPT_VERSION:
                    got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
                    raise CheckpointError(
                        f"{path}: expected a {CKPT_FORMAT} v{CKPT_VERSION} checkpoint, got {got[0]!r} v{got[1]!r} "
                        f"(written by another version of bgsynth?); {start_over}"
                    )
                get = {k: z[k] for k in z.files}
            state = cls._from_arrays(get, meta)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - zipfile, zlib, NumPy, JSON and shape errors: every way a file is damaged
            raise CheckpointError(f"{path}: not a readable challenge checkpoint (truncated or corrupt: "
                                  f"{type(e).__name__}: {e}); {start_over}") from e
        return state, meta["config"], get["bg_ids"]

    @classmethod
    def _from_arrays(cls, get: dict, meta: dict) -> "SearchState":
        """The state from a checkpoint's arrays, checked for consistency (a damaged file raises ``ValueError``)."""
        n_bg = int(meta["num_backgrounds"])
        state = cls(
            fg_ids=get["fg_ids"], labels=get["labels"], status=get["status"], fool_idx=get["fool_idx"],
            fool_pred=get["fool_pred"], tried=get["tried"], next_pos=int(meta["next_pos"]), window=get["window"],
            window_tried=np.unpackbits(get["window_tried"], axis=1, count=n_bg).astype(bool),
            pair_counts=get["pair_counts"], forwards=int(meta["forwards"]), steps=int(meta["steps"]),
            fool_bits=get.get("fool_bits"), preds=get.get("preds"), first_fixed=get.get("first_fixed"),
            fg_logmass=get.get("fg_logmass"),
        )
        f = len(state.fg_ids)
        per_fg = ("labels", "status", "fool_idx", "fool_pred", "tried")
        if any(getattr(state, k).shape != (f,) for k in per_fg) or state.window_tried.shape != (len(state.window), n_bg):
            raise ValueError("arrays of inconsistent sizes")
        if state.pair_counts.ndim != 3 or state.pair_counts.shape[0] != n_bg or len(get["bg_ids"]) != n_bg:
            raise ValueError("order statistics of inconsistent size")
        if state.fg_logmass is not None and state.fg_logmass.shape != (f, state.pair_counts.shape[2]):
            raise ValueError("per-foreground statistics of inconsistent size")
        if not 0 <= state.next_pos <= f or (len(state.window) and (state.window.min() < 0 or state.window.max() >= f)):
            raise ValueError("search positions out of range")
        return state


def _spread_pairs(untried: np.ndarray, ks: np.ndarray, orders: np.ndarray | None = None) -> np.ndarray:
    """Which backgrounds the foregrounds of one class take in one batch, spread over the class's order.

    Args:
        untried: ``bool [m, N]``: per foreground (priority order) which backgrounds it has not tried, columns in the
            class's order (best first).
        ks: ``int [m]`` the chunk of each foreground.
        orders: ``int [m, N]``: the background (pool index) in each row's columns (default: column ``j`` is
            background ``j`` for every row); a background taken by one row counts against it in every row.

    Returns:
        ``bool [m, N]``: the taken pairs. Foreground ``j`` takes its ``ks[j]`` untried columns of lowest
        ``position + a``, where ``a`` counts the foregrounds before it in this batch that took that column (ties
        to the better position), so one batch tries several promising backgrounds rather than the first one
        ``m`` times.

    >>> _spread_pairs(np.ones((4, 3), bool), np.array([1, 1, 1, 2])).astype(int).tolist()
    [[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]
    """
    m, n = untried.shape
    taken = np.zeros((m, n), bool)
    used = np.zeros(n, np.int64)  # by background
    pos = np.arange(n, dtype=np.int64)
    big = np.int64(4 * n + 4)
    for j in range(m):
        bg = pos if orders is None else orders[j]
        key = np.where(untried[j], (pos + used[bg]) * big + pos, np.iinfo(np.int64).max)
        k = int(min(ks[j], int(untried[j].sum())))
        if k <= 0:
            continue
        cols = np.argpartition(key, k - 1)[:k] if k < n else np.arange(n)
        taken[j, cols] = True
        used[bg[cols]] += 1
    return taken


# --------------------------------------------------------------------------------------------------------------
# Adaptive order
# --------------------------------------------------------------------------------------------------------------


def class_orders(counts: np.ndarray, tiebreak: np.ndarray, bg_labels: np.ndarray) -> np.ndarray:
    """Background order per foreground class from the order statistics: ``int64 [C, N]``, most promising first.

    ``counts[b, d, k]`` (``[N, C, C + 1]``): the model's probability mass on class ``k`` (``k = C``: no class of
    the label space) summed over the pairs of background ``b`` with a foreground of class ``d`` (with predictions
    only, the number of such pairs predicted as ``k``). For target class ``c`` the score of ``b`` is its (soft)
    fooling rate on class ``c``: the mass away from ``c`` per pair, shrunk towards ``prior_c(b)``, the rate at which
    ``b`` moved foregrounds of *other* classes to a class that is neither theirs nor ``c`` (evidence that ``b``
    pulls predictions away from ``c``), itself shrunk towards the fooling rate of the backgrounds of ``b``'s class
    on class ``c`` (backgrounds of one scene class act alike), itself shrunk towards the global rate. Among equal
    scores (e.g. backgrounds never tried), backgrounds of class ``c`` itself come last (they support the right
    answer), then the seeded ``tiebreak``. Exact float64 arithmetic on the statistics, so the order is a
    deterministic function of them.
    """
    C = counts.shape[1]
    T = counts.sum(axis=2).astype(np.float64)  # [N, C] pairs per fg class
    diag = counts[:, np.arange(C), np.arange(C)].astype(np.float64)  # mass on the right class
    Fo = T - diag  # (soft) fooled per fg class
    pred_to = counts[:, :, :C].sum(axis=1).astype(np.float64)  # [N, C] mass to class c
    X = (Fo.sum(axis=1, keepdims=True) - Fo) - (pred_to - diag)  # other-class pairs moved to a class != c
    Y = T.sum(axis=1, keepdims=True) - T
    p_glob = (Fo.sum() + 1.0) / (T.sum() + 2.0)
    group = np.where((bg_labels >= 0) & (bg_labels < C), bg_labels, C)  # background class (C: none)
    cell_fo, cell_t = np.zeros((C + 1, C)), np.zeros((C + 1, C))
    np.add.at(cell_fo, group, Fo)
    np.add.at(cell_t, group, T)
    cell = (cell_fo + _M_CELL * p_glob) / (cell_t + _M_CELL)  # [bg class, fg class]
    prior = (X + _M_OTHER * cell[group]) / (Y + _M_OTHER)
    score = (Fo + _M_CLASS * prior) / (T + _M_CLASS)
    return np.stack([np.lexsort((tiebreak, bg_labels == c, -score[:, c])) for c in range(C)])


def background_push(counts: np.ndarray, bg_labels: np.ndarray) -> np.ndarray:
    """``float64 [N, C + 1]``: how each background moves the model's output, as the log of its mean probability on
    each class (and on no class) over the pairs it was tried in, less the log of the mean over all pairs. A
    background tried in few pairs is shrunk towards the backgrounds of its own class, those towards all pairs.

    ``counts``: the order statistics ``[N, C, C + 1]`` (:attr:`SearchState.pair_counts`).
    """
    C = counts.shape[1]
    S = counts.sum(axis=1)  # [N, C + 1] mass per class over the pairs of b
    T = S.sum(axis=1, keepdims=True)  # [N, 1] pairs of b
    glob = (S.sum(axis=0) + 1.0 / (C + 1)) / (T.sum() + 1.0)
    group = np.where((bg_labels >= 0) & (bg_labels < C), bg_labels, C)
    cell_s, cell_t = np.zeros((C + 1, C + 1)), np.zeros((C + 1, 1))
    np.add.at(cell_s, group, S)
    np.add.at(cell_t, group, T)
    cell = (cell_s + _M_PUSH * glob) / (cell_t + _M_PUSH)
    mean = (S + _M_PUSH * cell[group]) / (T + _M_PUSH)
    return np.log(np.maximum(mean, _LOG_FLOOR)) - np.log(np.maximum(glob, _LOG_FLOOR))


# size: the statistics of the order (class order, push, per-foreground), the foregrounds and two constants
def foreground_orders(class_order: np.ndarray, push: np.ndarray, logmass: np.ndarray, tried: np.ndarray,
                      labels: np.ndarray, min_tried: int = 2, chunk: int = 64) -> np.ndarray:
    """Each foreground's own background order: ``int64 [R, N]``, most likely to fool it first.

    The model's log probabilities on a composite are taken as the foreground's part plus the background's
    (:func:`background_push`): the foreground's part is the mean, over the backgrounds it has tried, of its log
    probabilities less those backgrounds' push. The predicted margin of a background is then the true class's
    log probability less the best other's (no class counts as another). A background's place is its rank in the
    class's order (``class_order``) plus half its rank by margin (lowest first); ties go by the class's order. A
    foreground that has survived fewer than ``min_tried`` backgrounds keeps its class's order (one composite
    says too little about the foreground). The search stays exact whatever the order: it only decides what is
    tried first. Measured on the demo model and on the Mixed-Rand-trained model of ``bench_challenge.py``, this
    blend lowered the forwards of both; the margin alone, or from the first background on, raised the demo's.

    Args:
        class_order: ``int64 [C, N]`` the order per class (:func:`class_orders`).
        push: ``float64 [N, C + 1]`` (:func:`background_push`).
        logmass: ``float64 [R, C + 1]`` per foreground, its summed log probabilities
            (:attr:`SearchState.fg_logmass`).
        tried: ``bool [R, N]`` which backgrounds each foreground has tried.
        labels: ``int64 [R]`` the foregrounds' classes.
        min_tried: backgrounds a foreground must have tried before its own statistics count.
        chunk: foregrounds per vectorised block (bounds the ``chunk x N x (C + 1)`` temporary).
    """
    out = class_order[labels].copy()
    n = tried.sum(axis=1)
    rows = np.flatnonzero(n >= max(1, min_tried))
    n_bg = push.shape[0]
    for a in range(0, len(rows), chunk):
        r = rows[a : a + chunk]
        y = labels[r]
        part = (logmass[r] - tried[r].astype(np.float64) @ push) / n[r][:, None]  # [k, C + 1]
        pred = part[:, None, :] + push[None, :, :]  # [k, N, C + 1]
        true = np.take_along_axis(pred, y[:, None, None], axis=2)[..., 0]
        np.put_along_axis(pred, np.broadcast_to(y[:, None, None], (len(r), n_bg, 1)), -np.inf, axis=2)
        margin = true - pred.max(axis=2)
        places = np.arange(n_bg)[None, :].repeat(len(r), 0)
        rank = np.empty((len(r), n_bg), np.int64)  # place in the class's order
        np.put_along_axis(rank, out[r], places, axis=1)
        by_margin = np.empty((len(r), n_bg), np.int64)
        np.put_along_axis(by_margin, np.lexsort((rank, margin), axis=1), places, axis=1)
        out[r] = np.lexsort((rank, 2 * rank + by_margin), axis=1)
    return out


def output_table(predictor, num_classes: int) -> torch.Tensor | None:
    """``int64 [K]``: the class of each of the predictor's ``K`` outputs (``-1``: none), or ``None`` when unknown.

    From the predictor's :class:`~bgsynth.classes.OutputMap` (``predictor.output_map``) when it has one; else the
    identity for a model with one output per class, or the IN-1000 -> IN-9 map for an ``'in1k'`` model on IN-9.
    Predictors without ``logits``/``labels_from_logits`` (fakes, wrappers) give ``None``: the order then counts
    predictions.
    """
    if not (callable(getattr(predictor, "logits", None)) and callable(getattr(predictor, "labels_from_logits", None))):
        return None
    omap = getattr(predictor, "output_map", None)
    if omap is not None and hasattr(omap, "table"):
        k = getattr(predictor, "num_outputs", None)
        table = np.arange(num_classes) if omap.table is None else np.asarray(omap.table)
        if k is not None and len(table) != k:
            return None
    elif getattr(predictor, "output_space", None) == "in1k" and num_classes == NUM_IN9:
        table = in1k_to_in9()
    elif getattr(predictor, "num_outputs", None) == num_classes:
        table = np.arange(num_classes)
    else:
        return None
    if table.max(initial=-1) >= num_classes:
        return None
    return torch.as_tensor(table, dtype=torch.int64)


def label_mass(logits: torch.Tensor, table: torch.Tensor, num_classes: int, restricted: bool = False) -> np.ndarray:
    """``float64 [B, C + 1]``: the softmax probability of each class of the label space (the sum over the outputs
    that map to it) and, last, of the outputs that map to none (``0`` under the ``restricted`` protocol, which
    ignores them).

    >>> label_mass(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([0, 0, -1]), 2).round(3).tolist()
    [[0.667, 0.0, 0.333]]
    """
    x = logits.detach().to(torch.float64)
    t = table.to(x.device)
    if restricted:
        x = x.masked_fill((t < 0)[None, :], float("-inf"))
    p = torch.softmax(x, dim=1)
    idx = torch.where(t < 0, torch.full_like(t, num_classes), t)
    out = torch.zeros(p.shape[0], num_classes + 1, dtype=torch.float64, device=p.device)
    out.index_add_(1, idx, p)
    return out.cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# The active foregrounds' pixels (decoded once, in id order, into a device window)
# --------------------------------------------------------------------------------------------------------------


class _ForegroundFeed:
    """Decodes foregrounds in id order and hands them out one at a time (``(id, image, mask)`` on the device)."""

    def __init__(self, index: DatasetIndex, ids: Sequence[int], run: RunConfig, batch_size: int):
        self._iter: Iterator | None = None
        self._loader = None
        if len(ids):
            # foregrounds need no Only-BG-T of their own (only_bg_t=False spares the paper tiling's second resize)
            self._loader = create_loader(index, backend=run.backend, geometry=run.geometry, batch_size=batch_size,
                                         device=run.device, ids=list(ids), require_mask=True, only_bg_t=False,
                                         num_threads=run.num_threads)
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

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None


class ForegroundWindow:
    """The active foregrounds' images and masks, resident on the run's device: one slot of a preallocated buffer
    per active foreground (``uint8 [tile, 3, C, C]`` and ``[tile, 1, C, C]``).

    Foregrounds are decoded once, in id order (:func:`bgsynth.pipeline.create_loader`, masks required, no
    Only-BG-T), copied into the lowest free slot when admitted and release it when decided.

    Args:
        index: the dataset index.
        ids: the foregrounds that will be asked for, in increasing order.
        run: the run's geometry, device, decode backend and threads.
        tile: slots (the most foregrounds resident at once).
    """

    def __init__(self, index: DatasetIndex, ids: Sequence[int], run: RunConfig, tile: int):
        c = run.geometry.crop
        self.images = torch.empty((tile, 3, c, c), dtype=torch.uint8, device=run.device)
        self.masks = torch.empty((tile, 1, c, c), dtype=torch.uint8, device=run.device)
        self._slot_of: dict[int, int] = {}  # position -> slot
        self._free = list(range(tile - 1, -1, -1))  # pop() gives the smallest
        self._feed = _ForegroundFeed(index, ids, run, batch_size=min(max(tile, 1), 256))

    def load(self, pos: int, image_id: int) -> bool:
        """Decode foreground ``image_id`` (search position ``pos``) into a free slot; False if the loader skipped
        it (rejected)."""
        got = self._feed.take(image_id)
        if got is None:
            return False
        s = self._free.pop()
        self.images[s].copy_(got[0])
        self.masks[s].copy_(got[1])
        self._slot_of[int(pos)] = s
        return True

    def release(self, positions: Sequence[int]) -> None:
        """Free the slots of decided foregrounds."""
        for p in np.asarray(positions).tolist():
            self._free.append(self._slot_of.pop(int(p)))
        self._free.sort(reverse=True)

    def gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, masks)`` of the foregrounds at ``positions`` (one row per pair)."""
        slots = torch.as_tensor(np.asarray([self._slot_of[int(p)] for p in positions], np.int64),
                                device=self.images.device)
        return self.images.index_select(0, slots), self.masks.index_select(0, slots)

    def close(self) -> None:
        self._feed.close()


# --------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------


def model_fingerprint(predictor) -> str:
    """A hash of the predictor's weights (:func:`bgsynth.results.model_digest`) and settings (what it describes,
    but its device): a checkpoint only resumes with the same model."""
    h = hashlib.sha256(model_digest(predictor).encode())
    describe = getattr(predictor, "describe", None)
    if callable(describe):
        d = dict(describe())
        d.pop("device", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class ChallengeSearch:
    """One shard's search over its foregrounds against every background of the pool.

    The state is explicit: :attr:`state` (a :class:`SearchState`: decisions, the active set, the order statistics,
    the records; what a checkpoint holds), :attr:`window` (the active foregrounds' pixels), :attr:`peer_counts`
    (the other ranks' order statistics at the last exchange), :attr:`record` (the run's identity: settings,
    model, data; results and checkpoints carry it) and the counters of this process.

    >>> search = ChallengeSearch(index, predictor, pool, run, config, fg_ids=ids)   # doctest: +SKIP
    >>> if config.resume: search.resume(config.checkpoint)                          # doctest: +SKIP
    >>> search.run()                                                                # doctest: +SKIP
    >>> result = search.result(wall_s=time.monotonic() - t0)                         # doctest: +SKIP

    or a step at a time (what :meth:`run` does, without checkpoints and order sharing):

    >>> search.admit()                                                              # doctest: +SKIP
    >>> while len(search.state.window):                                             # doctest: +SKIP
    ...     search.step(); search.admit()
    >>> search.close()                                                              # doctest: +SKIP

    Args:
        index: the dataset index (the foregrounds are decoded from it).
        predictor: a :class:`bgsynth.models.Predictor` or any object with ``mean``, ``std``, ``input_dtype``,
            ``channels_last`` and ``predict(x) -> int64 [B]`` IN-9 ids (``-1`` = unmapped).
        pool: the backgrounds, resident on ``run.device`` (:func:`bgsynth.pool.build_background_pool`).
        run: the resolved run settings (device, geometry, batch size = composites per forward, seed, backends).
        config: the challenge's settings.
        fg_ids: this shard's foregrounds (sorted ids with a mask).
        dist: the :class:`~bgsynth.distributed.DistContext` whose ranks share order statistics, or ``None``.
    """

    def __init__(self, index: DatasetIndex, predictor, pool: BackgroundPool, run: RunConfig, config: ChallengeConfig,
                 *, fg_ids: Sequence[int], dist=None):
        self.index, self.predictor, self.pool, self.run_config, self.config, self.dist = (
            index, predictor, pool, run, config, dist)
        self.bg_ids = pool.image_ids.cpu().numpy().astype(np.int64)
        self.bg_labels = pool.labels.cpu().numpy().astype(np.int64)
        self.tile = config.tile(run.batch_size)
        self.sharing = bool(dist is not None and dist.enabled and config.order == "adaptive"
                            and not config.full_matrix and config.share_every > 0)
        self.label_space: LabelSpace = index.label_space
        fg = np.asarray(fg_ids, np.int64)
        labels = index.labels(fg.tolist()) if len(fg) else np.zeros(0, np.int64)
        self.state = SearchState.new(fg, labels, len(pool), config.full_matrix, config.store_predictions,
                                     num_classes=self.label_space.num_classes)
        self.record = self._record(fg)
        self.tiebreak = np.random.default_rng([int(run.seed), 0xC4A1]).permutation(len(pool))
        # the other ranks' pair statistics at the last exchange; a resumed rank relearns them at its first exchange
        self.peer_counts = np.zeros_like(self.state.pair_counts) if self.sharing else None
        self.window: ForegroundWindow | None = None
        # model input: statistics as device tensors once, not re-made by every composite
        self._dtype = predictor.input_dtype
        self._kdtype = self._dtype if self._dtype in _KERNEL_DTYPES else torch.float32
        self._mean = torch.tensor([float(v) for v in predictor.mean], dtype=torch.float32, device=run.device)
        self._std = torch.tensor([float(v) for v in predictor.std], dtype=torch.float32, device=run.device)
        # the adaptive order learns from the model's probabilities when the outputs map onto the label space
        self._table = output_table(predictor, self.label_space.num_classes) if config.order == "adaptive" else None
        self._restricted = getattr(predictor, "label_protocol", "official") == "restricted"
        # counters of this process
        self.resumed = False
        self.checkpoints_written = 0
        self.exchanges = 0
        self.forwards_at_start = 0
        self.model_forwards_at_start = int(getattr(predictor, "forwards", 0))
        self._iteration = 0
        self._last_checkpoint = time.monotonic()

    def _record(self, fg_ids: np.ndarray) -> dict:
        """The run's identity (JSON-able): every setting the schedule depends on, the model and the data. A result
        carries it as ``config``; a checkpoint resumes only into a search with the same record."""
        run, cfg, p = self.run_config, self.config, self.predictor
        return {
            "split": cfg.split, "geometry": run.geometry.to_dict(), "geometry_source": run.geometry_source,
            "tiling": run.tiling, "order": cfg.order, "full_matrix": bool(cfg.full_matrix),
            "store_predictions": bool(cfg.store_predictions), "batch_size": run.batch_size, "fg_tile": self.tile,
            "seed": int(run.seed), "bg_per_class": cfg.bg_per_class, "shard_id": int(cfg.shard_id),
            "num_shards": int(cfg.num_shards), "foregrounds_digest": ids_digest(fg_ids),
            "backgrounds_digest": ids_digest(self.bg_ids), "model": model_fingerprint(p),
            "input_dtype": str(p.input_dtype).replace("torch.", ""), "device_type": run.device.type,
            "mean": [float(v) for v in p.mean], "std": [float(v) for v in p.std], "decode_backend": run.backend,
            "order_sharing": int(cfg.share_every) if self.sharing else 0,
            **({} if self.label_space == IN9 else {"label_space": self.label_space.to_dict()}),
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write the search state to ``path`` atomically (:func:`bgsynth.fileio.atomic_write_bytes`)."""
        atomic_write_bytes(path, self.state.to_bytes(self.record, self.bg_ids))
        self.checkpoints_written += 1
        self._last_checkpoint = time.monotonic()

    def resume(self, path: str | os.PathLike) -> bool:
        """Continue from the checkpoint at ``path``; ``False`` (with a warning) when there is none yet.

        Raises:
            CheckpointError: an unreadable checkpoint, or one of another run (the settings that differ are named).
        """
        if self.window is not None:
            raise RuntimeError("ChallengeSearch.resume: the search has already started")
        path = pathlib.Path(path)
        if not path.exists():
            warnings.warn(f"run_challenge: no checkpoint at {path}; starting from the beginning", stacklevel=2)
            return False
        state, saved, saved_bg = SearchState.from_file(path)
        if saved != self.record or not np.array_equal(saved_bg, self.bg_ids):
            diff = sorted(k for k in set(saved) | set(self.record) if saved.get(k) != self.record.get(k))
            raise CheckpointError(
                f"{path}: the checkpoint belongs to another run (settings that differ: {diff or ['backgrounds']}); "
                f"use the same model, data and settings, or delete it to start over"
            )
        self.state, self.resumed, self.forwards_at_start = state, True, state.forwards
        return True

    def _open(self) -> None:
        """Start decoding the pending foregrounds and re-decode the window of a resumed state."""
        st = self.state
        pending = [int(st.fg_ids[p]) for p in st.window] + st.fg_ids[st.next_pos:].tolist()
        self.window = ForegroundWindow(self.index, pending, self.run_config, self.tile)
        for pos in st.window.tolist():
            if not self.window.load(pos, int(st.fg_ids[pos])):
                raise CheckpointError(
                    f"{self.config.checkpoint}: foreground {int(st.fg_ids[pos])} of the checkpoint's active window "
                    f"could not be decoded again; the data changed since the checkpoint was written"
                )

    # ------------------------------------------------------------------------------------------ the search
    def admit(self) -> int:
        """Fill the window with pending foregrounds (in id order); an undecodable one is left out with a warning.
        Returns the number admitted. The first call starts decoding (and re-decodes a resumed window)."""
        if self.window is None:
            self._open()
        st = self.state
        new = []
        while len(st.window) + len(new) < self.tile and st.next_pos < len(st.fg_ids):
            pos = st.next_pos
            st.next_pos += 1
            if self.window.load(pos, int(st.fg_ids[pos])):
                new.append(pos)
            else:
                st.status[pos] = FAILED
                warnings.warn(f"challenge: foreground {int(st.fg_ids[pos])} could not be decoded; left out",
                              stacklevel=3)
        st.activate(new)
        return len(new)

    def orders(self) -> np.ndarray:
        """``int64 [C, N]``: the background order per foreground class for the next forward batch."""
        n_bg = len(self.bg_ids)
        if self.config.order != "adaptive":
            return np.broadcast_to(np.arange(n_bg, dtype=np.int64), (self.state.num_classes, n_bg))
        counts = self.state.pair_counts
        if self.peer_counts is not None:
            counts = counts + self.peer_counts
        return class_orders(counts, self.tiebreak, self.bg_labels)

    def _row_orders(self, orders: np.ndarray):
        """The adaptive order's per-foreground orders (:func:`foreground_orders`) as ``callable(window rows)``, or
        ``None`` (the fixed order, the full matrix, or a predictor without logits)."""
        if self.config.order != "adaptive" or self.config.full_matrix or self._table is None:
            return None
        st = self.state
        counts = st.pair_counts if self.peer_counts is None else st.pair_counts + self.peer_counts
        push = background_push(counts, self.bg_labels)

        def per_row(rows: np.ndarray) -> np.ndarray:
            pos = st.window[rows]
            return foreground_orders(orders, push, st.fg_logmass[pos], st.window_tried[rows], st.labels[pos])

        return per_row

    def classify(self, positions: np.ndarray, bgs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's predictions (``int64 [P]``) on the composites of foregrounds ``positions`` over pool rows
        ``bgs`` (gathered, composited, normalised and cast on the device in one pass,
        :func:`bgsynth.variants.composite`), and the probability mass per class (``float64 [P, C + 1]``, for the
        order statistics; ``None`` when the predictor gives no logits or its outputs cannot be mapped)."""
        fg, keep = self.window.gather(positions)
        x = composite(fg, keep, self.pool.images, torch.as_tensor(bgs, device=fg.device), mean=self._mean,
                      std=self._std, dtype=self._kdtype, channels_last=bool(self.predictor.channels_last),
                      backend=self.run_config.kernel_backend)
        if self._kdtype != self._dtype:
            x = x.to(self._dtype)
        mass = None
        if self._table is not None:
            logits = self.predictor.logits(x)
            pred_t = self.predictor.labels_from_logits(logits)
            mass = label_mass(logits, self._table, self.state.num_classes, self._restricted)
        else:
            pred_t = self.predictor.predict(x)
        pred = pred_t.detach().to("cpu").numpy().astype(np.int64)
        if pred.shape != (len(positions),):
            raise ConfigError(f"run_challenge: predictor returned {pred.shape} predictions for {len(positions)} "
                              f"composites")
        return pred, mass

    def update(self, rows: np.ndarray, bgs: np.ndarray, pred: np.ndarray, mass: np.ndarray | None = None) -> None:
        """Book predictions on the pairs ``(rows, bgs)`` and free the slots of the foregrounds decided."""
        self.window.release(self.state.record(rows, bgs, pred, self.config.full_matrix, mass))

    def step(self) -> int:
        """One forward batch: choose the pairs, classify their composites, book the answers. Returns the forwards."""
        orders = self.orders()
        rows, bgs = self.state.next_pairs(self.run_config.batch_size, orders, self.config.full_matrix,
                                          spread=self.config.order == "adaptive", row_orders=self._row_orders(orders))
        pred, mass = self.classify(self.state.window[rows], bgs)
        self.update(rows, bgs, pred, mass)
        return len(rows)

    def exchange(self) -> int:
        """Sum the ranks' order statistics (a collective: every rank calls it at the same points); returns the
        number of ranks still searching."""
        total = torch.as_tensor(self.state.pair_counts).clone()
        active = torch.tensor([int(len(self.state.window) > 0)], dtype=torch.int64)
        self.dist.all_reduce(total, "sum")
        self.dist.all_reduce(active, "sum")
        self.peer_counts = total.numpy() - self.state.pair_counts
        self.exchanges += 1
        return int(active.item())

    def run(self) -> None:
        """Search until every foreground of this shard is decided (when sharing: of every rank), checkpointing every
        ``checkpoint_every`` seconds between forward batches and once at the end."""
        path = None if self.config.checkpoint is None else pathlib.Path(self.config.checkpoint)
        if path is not None:
            _remove_stale_temporaries(path)
        progress = _Progress(self) if self.run_config.progress else None
        try:
            self.admit()
            while self._turn(progress, path):
                pass
        finally:
            self.close()
            if progress is not None:
                progress.close()
        if path is not None:
            self.save(path)

    def close(self) -> None:
        """Stop decoding foregrounds (the state, the pool and the window's pixels stay)."""
        if self.window is not None:
            self.window.close()

    def _turn(self, progress: "_Progress | None", path: pathlib.Path | None) -> bool:
        """One iteration of the loop; False when the search is over. When sharing, every rank makes the same
        sequence of collectives, one exchange every ``share_every`` iterations, and a rank that has finished keeps
        iterating (without work) until every rank has."""
        st = self.state
        if len(st.window):
            self.step()
            self.admit()
            if progress is not None:
                progress.update()
            due = time.monotonic() - self._last_checkpoint >= self.config.checkpoint_every
            if path is not None and due and not st.complete:
                self.save(path)
        if not self.sharing:
            return bool(len(st.window))
        self._iteration += 1
        if self._iteration % self.config.share_every:
            return True
        return self.exchange() > 0

    # ------------------------------------------------------------------------------------------ the result
    def result(self, wall_s: float) -> ChallengeResult:
        """The :class:`ChallengeResult` of a finished search (``wall_s``: the run's wall time, for ``timing``)."""
        st = self.state
        ok = st.status != FAILED
        if (st.status[ok] < VULNERABLE).any():
            raise RuntimeError("run_challenge: internal error: the search ended with undecided foregrounds")
        vul = st.status[ok] == VULNERABLE
        done = st.forwards - self.forwards_at_start
        model_done = int(getattr(self.predictor, "forwards", 0)) - self.model_forwards_at_start
        result = ChallengeResult(
            fg_ids=st.fg_ids[ok].copy(),
            fg_labels=st.labels[ok].copy(),
            vulnerable=vul,
            fool_bg=np.where(vul, self.bg_ids[np.maximum(st.fool_idx[ok], 0)], -1).astype(np.int64),
            fool_pred=np.where(vul, st.fool_pred[ok], NOT_FOOLED).astype(np.int64),
            tried=st.tried[ok].copy(),
            bg_ids=self.bg_ids,
            bg_labels=self.bg_labels,
            forwards=int(st.forwards),
            first_fool_fixed=None if st.first_fixed is None else st.first_fixed[ok].copy(),
            fool_bits=None if st.fool_bits is None else st.fool_bits[ok].copy(),
            pred_matrix=None if st.preds is None else st.preds[ok].copy(),
            failed_ids=st.fg_ids[~ok].copy(),
            config=self.record,
            label_space=self.label_space,
            timing={
                "wall_s": wall_s,
                "forwards_this_process": int(done),
                "forwards_per_s": done / wall_s if wall_s > 0 else None,
                "model_forwards_this_process": model_done,
                "resumed": self.resumed,
                "checkpoints_written": self.checkpoints_written,
                "steps": int(st.steps),
                "order_exchanges": self.exchanges,
            },
        )
        if self.config.full_matrix and self.config.gallery_k > 0:
            result.gallery_images = self._gallery(result)
        return result

    def _gallery(self, result: ChallengeResult) -> dict[int, np.ndarray]:
        """``{bg_id: uint8 [C, C, 3]}`` of the most adversarial backgrounds per class (the gallery's images)."""
        keep = sorted({b for lst in result.most_adversarial(self.config.gallery_k).values() for b, _ in lst})
        rows = torch.as_tensor(np.searchsorted(self.bg_ids, keep), dtype=torch.long, device=self.pool.device)
        imgs = self.pool.images[rows].permute(0, 2, 3, 1).cpu().numpy()
        return {int(b): imgs[i] for i, b in enumerate(keep)}


def _remove_stale_temporaries(path: pathlib.Path) -> None:
    """Temporary files of a checkpoint write that was killed half-way (the target itself is never partial)."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass


class _Progress:
    """The progress bar of a search: foregrounds decided, vulnerable so far, forwards/s, estimated time left."""

    def __init__(self, search: ChallengeSearch):
        self.search = search
        st = search.state
        self.bar = tqdm(total=len(st.fg_ids), initial=st.decided, desc="challenge", unit="fg",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} fg [{elapsed}{postfix}]")
        self.start, self.last = time.monotonic(), 0.0

    def update(self) -> None:
        """Redraw at most twice a second (and when the window has emptied)."""
        st, now = self.search.state, time.monotonic()
        if now - self.last < 0.5 and len(st.window):
            return
        self.last = now
        rate = (st.forwards - self.search.forwards_at_start) / max(now - self.start, 1e-9)
        vul = int((st.status == VULNERABLE).sum())
        rob = int((st.status == ROBUST).sum())
        # forwards still to spend: undecided foregrounds are robust with the rate seen so far (then they need all
        # their untried backgrounds) or vulnerable (about one more forward)
        q = (rob + 1.0) / (vul + rob + 2.0)
        undecided = np.flatnonzero((st.status == ACTIVE) | (st.status == PENDING))
        left = float((st.num_backgrounds - st.tried[undecided]).sum()) * q + len(undecided) * (1 - q)
        eta = left / rate if rate > 0 else float("inf")
        self.bar.n = st.decided
        self.bar.set_postfix_str(f"vulnerable={vul}, fwd={st.forwards}, {rate:.0f} fwd/s, eta~{_fmt_s(eta)}",
                                 refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
