"""Controlled spurious correlation: a composed dataset defined by a rule instead of by files.

Waterbirds-style sets (foregrounds of one source pasted on backgrounds of another at a chosen correlation) are
usually made by a script that writes every composite to disk. Here the set is a *rule*, a pure function of
``(seed, epoch, image id)`` on :mod:`bgsynth.rng` like every other draw of the engine:

* a :class:`Pairing` maps each foreground class to its **aligned** background classes (Waterbirds: land bird ->
  land, water bird -> water); the other background classes are its **conflicting** ones;
* a :class:`ComposeRule` (pairing, ``correlation``, ``seed``) gives each foreground image a background: with
  probability ``correlation`` an aligned class, otherwise a conflicting one (:func:`compose_backgrounds`), then
  one background image of that class from a :class:`~bgsynth.types.BackgroundPool`. Each step draws on its own
  stream: ``aligned = hash_uniform(id; seed, epoch, 16) < correlation``, the class is the
  ``hash_below(id; seed, epoch, 17)``-th of the candidate classes (ascending), the image the
  ``hash_below(id; seed, epoch, 18)``-th of the pool's images of that class (ascending id). The choice does not
  depend on the batch size, the order, the shard or the device, only on the pool's content;
* the group of a composite is ``(foreground class, background class)``; :func:`group_metrics` turns per-composite
  outcomes into per-group accuracies, the average and worst group, and the aligned-minus-conflicting gap.

This module is the functional floor: tensors in, tensors out. The online training iterator and the pool of scene
images are :mod:`bgsynth.compose_loader` (stateful); export, evaluation and the comparison of two training
correlations are :mod:`bgsynth.compose_jobs` (consumers).

>>> from bgsynth.classes import LabelSpace
>>> fg, bg = LabelSpace.from_names(["landbird", "waterbird"]), LabelSpace.from_names(["land", "water"])
>>> pairing = Pairing.from_mapping({"landbird": "land", "waterbird": ["water"]}, fg, bg)
>>> pairing.table.int().tolist(), pairing.to_dict()
([[1, 0], [0, 1]], {'landbird': ['land'], 'waterbird': ['water']})
>>> pool = BackgroundPool(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
...                       torch.tensor([10, 11, 12, 13]), num_classes=2)
>>> choice = compose_backgrounds(torch.arange(1000), torch.arange(1000) % 2, pool, ComposeRule(pairing, 0.9))
>>> 0.85 < choice.aligned.double().mean().item() < 0.95
True
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .classes import LabelSpace
from .errors import ConfigError
from .fileio import read_json
from .rng import hash_below, hash_bits, hash_uniform, srl
from .types import BackgroundPool

__all__ = ["Pairing", "ComposeRule", "ComposeSpec", "ComposeChoice", "compose_backgrounds", "backgrounds_of_class",
           "correlation_at", "check_correlation", "group_metrics", "group_weights", "weighted_accuracy", "group_ids",
           "COMPOSE_STREAMS"]

#: the streams of the counter-based generator the rule draws on (augmentation uses 1-8, see bgsynth.augment)
COMPOSE_STREAMS = {"aligned": 16, "class": 17, "image": 18}
_S_ALIGNED, _S_CLASS, _S_IMAGE = COMPOSE_STREAMS["aligned"], COMPOSE_STREAMS["class"], COMPOSE_STREAMS["image"]


# ==============================================================================================================
# The pairing
# ==============================================================================================================


def _class_id(space: LabelSpace, value: Any, where: str, role: str) -> int:
    """A class id from a name or an id (int or digit string) of ``space``."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit() and value not in space.classes):
        k = int(value)
        if not 0 <= k < space.num_classes:
            raise ConfigError(f"{where}: {role} class id {k} outside 0..{space.num_classes - 1} "
                              f"({space.name}: {list(space.classes)[:20]})")
        return k
    if isinstance(value, str) and value in space.classes:
        return space.classes.index(value)
    raise ConfigError(f"{where}: unknown {role} class {value!r}; expected a name or id of {space.name!r}: "
                      f"{list(space.classes)[:20]}")


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Which background classes are *aligned* with each foreground class (the others are *conflicting*).

    Args:
        fg_space, bg_space: the foreground and background label spaces.
        aligned: per foreground class (in ``fg_space`` order), the sorted ids of its aligned background classes;
            each must have at least one aligned and one conflicting class.

    Use :meth:`from_mapping` / :meth:`from_json` (names or ids) or :meth:`default`.
    """

    fg_space: LabelSpace
    bg_space: LabelSpace
    aligned: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        aligned = tuple(tuple(sorted({int(b) for b in row})) for row in self.aligned)
        if len(aligned) != self.fg_space.num_classes:
            raise ConfigError(f"Pairing: expected aligned classes for each of the {self.fg_space.num_classes} "
                              f"foreground classes, got {len(aligned)}")
        n_bg = self.bg_space.num_classes
        for f, row in enumerate(aligned):
            name = self.fg_space.classes[f]
            if not row:
                raise ConfigError(f"Pairing: foreground class {name!r} has no aligned background class; expected "
                                  f"one or more of {list(self.bg_space.classes)[:20]}")
            if any(not 0 <= b < n_bg for b in row):
                raise ConfigError(f"Pairing: foreground class {name!r}: background ids outside 0..{n_bg - 1}: {row}")
            if len(row) == n_bg:
                raise ConfigError(f"Pairing: every background class is aligned with foreground class {name!r}, so no "
                                  f"background can conflict with it; expected at most {n_bg - 1} aligned classes")
        object.__setattr__(self, "aligned", aligned)

    @classmethod
    def from_mapping(cls, mapping: Mapping, fg_space: LabelSpace, bg_space: LabelSpace,
                     where: str = "pairing") -> "Pairing":
        """A pairing from ``{fg class: bg class or [bg classes]}`` (class names or ids); every foreground class
        must be named.

        Raises:
            ConfigError: not a mapping, an unknown class, a foreground class missing, or a class aligned with
                nothing or with everything; the message names ``where`` (e.g. the JSON file).
        """
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: expected a JSON object {{foreground class: [background classes]}}, got "
                              f"{type(mapping).__name__}")
        rows: list[set[int] | None] = [None] * fg_space.num_classes
        for key, value in mapping.items():
            f = _class_id(fg_space, key, where, "foreground")
            values = value if isinstance(value, (list, tuple)) else [value]
            rows[f] = (rows[f] or set()) | {_class_id(bg_space, v, where, "background") for v in values}
        missing = [fg_space.classes[f] for f, r in enumerate(rows) if r is None]
        if missing:
            raise ConfigError(f"{where}: expected aligned background classes for every foreground class; missing "
                              f"{missing[:20]}")
        try:
            return cls(fg_space, bg_space, tuple(tuple(r) for r in rows))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike, fg_space: LabelSpace, bg_space: LabelSpace) -> "Pairing":
        """A pairing from a JSON file (see :meth:`from_mapping`); errors name the file."""
        return cls.from_mapping(read_json(path, "pairing JSON"), fg_space, bg_space, where=os.fspath(path))

    @classmethod
    def default(cls, fg_space: LabelSpace, bg_space: LabelSpace) -> "Pairing":
        """Each foreground class aligned with the background class of the same name, else of the same position.

        Raises:
            ConfigError: neither rule applies (different class counts and names): give a pairing.
        """
        if all(c in bg_space.classes for c in fg_space.classes):
            rows = tuple((bg_space.classes.index(c),) for c in fg_space.classes)
        elif fg_space.num_classes == bg_space.num_classes:
            rows = tuple((k,) for k in range(fg_space.num_classes))
        else:
            raise ConfigError(f"no default pairing of the {fg_space.num_classes} foreground classes "
                              f"{list(fg_space.classes)[:9]} with the {bg_space.num_classes} background classes "
                              f"{list(bg_space.classes)[:9]}; give one (--pairing PAIRING.json)")
        return cls(fg_space, bg_space, rows)

    @property
    def num_fg(self) -> int:
        return self.fg_space.num_classes

    @property
    def num_bg(self) -> int:
        return self.bg_space.num_classes

    @property
    def table(self) -> torch.Tensor:
        """``bool [num_fg, num_bg]``: True where the background class is aligned with the foreground class."""
        t = torch.zeros(self.num_fg, self.num_bg, dtype=torch.bool)
        for f, row in enumerate(self.aligned):
            t[f, list(row)] = True
        return t

    def is_aligned(self, fg: int, bg: int) -> bool:
        return int(bg) in self.aligned[int(fg)]

    def to_dict(self) -> dict[str, list[str]]:
        """``{fg class name: [aligned bg class names]}`` (what :meth:`from_mapping` reads)."""
        return {self.fg_space.classes[f]: [self.bg_space.classes[b] for b in row] for f, row in enumerate(self.aligned)}


# ==============================================================================================================
# The rule
# ==============================================================================================================


def check_correlation(value, where: str = "correlation") -> float:
    """``value`` as a float in [0, 1], or a :class:`ConfigError` "expected ... got ..." naming ``where``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a probability in [0, 1], got {value!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ConfigError(f"{where}: expected a probability in [0, 1], got {value!r}")
    return v


def correlation_at(correlation: float | Sequence[float] | Callable[[int], float], epoch: int) -> float:
    """The correlation of an epoch: a number (every epoch), a per-epoch sequence (its last value holds after its
    end) or a callable ``epoch -> correlation``.

    >>> correlation_at([0.95, 0.9, 0.5], 1), correlation_at([0.95, 0.5], 7), correlation_at(0.8, 3)
    (0.9, 0.5, 0.8)
    """
    if callable(correlation):
        return check_correlation(correlation(int(epoch)), f"correlation of epoch {epoch}")
    if isinstance(correlation, (list, tuple)):
        if not correlation:
            raise ConfigError("correlation: expected a number or a non-empty per-epoch list, got []")
        return check_correlation(correlation[min(int(epoch), len(correlation) - 1)], f"correlation of epoch {epoch}")
    return check_correlation(correlation)


@dataclasses.dataclass(frozen=True)
class ComposeRule:
    """A composed dataset: foreground images on backgrounds drawn by the rule of the module docstring.

    Attributes:
        pairing: the aligned background classes of each foreground class.
        correlation: probability that a sample's background class is aligned; a number, or a per-epoch sequence
            (its last value holds after its end) for online training (:func:`correlation_at`).
        seed: the seed of every draw.
    """

    pairing: Pairing
    correlation: float | tuple[float, ...] = 0.95
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.pairing, Pairing):
            raise ConfigError(f"ComposeRule: expected a Pairing, got {type(self.pairing).__name__}")
        if isinstance(self.correlation, (list, tuple)):
            if not self.correlation:
                raise ConfigError("ComposeRule: expected a correlation or a non-empty per-epoch list, got []")
            object.__setattr__(self, "correlation", tuple(check_correlation(c, "ComposeRule: correlation")
                                                          for c in self.correlation))
        else:
            object.__setattr__(self, "correlation", check_correlation(self.correlation, "ComposeRule: correlation"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"ComposeRule: expected an integer seed, got {self.seed!r}")

    def correlation_at(self, epoch: int) -> float:
        return correlation_at(self.correlation, epoch)

    def replace(self, **changes) -> "ComposeRule":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        corr = list(self.correlation) if isinstance(self.correlation, tuple) else self.correlation
        return {"pairing": self.pairing.to_dict(), "correlation": corr, "seed": self.seed,
                "fg_classes": list(self.pairing.fg_space.classes), "bg_classes": list(self.pairing.bg_space.classes)}


@dataclasses.dataclass(frozen=True)
class ComposeSpec:
    """A composed dataset as a job names it: where the backgrounds come from, the pairing and the correlation
    (the seed is the run's). :meth:`rule` makes the :class:`ComposeRule` once both label spaces are known.

    Attributes:
        backgrounds: a folder of scene images with one subfolder per background class (Places-style), or a
            dataset index JSON (its images' Only-BG-T, or whole images when they carry no boxes).
        pairing: a pairing JSON file, a mapping ``{fg class: [bg classes]}``, or ``None`` (:meth:`Pairing.default`).
        correlation: probability of an aligned background; a number or a per-epoch list.
        bg_split: of an index of backgrounds, the split to use (``None``: all).
        bg_per_class: at most this many backgrounds per class (``None``: all).
        fixed: training draws every epoch's backgrounds as epoch 0's (a fixed composed set, as an export), instead
            of a new draw per epoch.
    """

    backgrounds: str
    pairing: str | Mapping | None = None
    correlation: float | tuple[float, ...] = 0.95
    bg_split: str | None = None
    bg_per_class: int | None = None
    fixed: bool = False

    def __post_init__(self):
        if not isinstance(self.backgrounds, (str, os.PathLike)) or not str(self.backgrounds):
            raise ConfigError(f"ComposeSpec: expected backgrounds as a folder or index path, got {self.backgrounds!r}")
        object.__setattr__(self, "backgrounds", os.fspath(self.backgrounds))
        if isinstance(self.correlation, (list, tuple)):
            object.__setattr__(self, "correlation", tuple(check_correlation(c, "ComposeSpec: correlation")
                                                          for c in self.correlation))
        else:
            check_correlation(self.correlation, "ComposeSpec: correlation")
        if self.pairing is not None and not isinstance(self.pairing, (str, os.PathLike, Mapping)):
            raise ConfigError(f"ComposeSpec: expected pairing as a JSON path or a mapping, got {type(self.pairing).__name__}")

    def make_pairing(self, fg_space: LabelSpace, bg_space: LabelSpace) -> Pairing:
        if self.pairing is None:
            return Pairing.default(fg_space, bg_space)
        if isinstance(self.pairing, Mapping):
            return Pairing.from_mapping(self.pairing, fg_space, bg_space)
        return Pairing.from_json(self.pairing, fg_space, bg_space)

    def rule(self, fg_space: LabelSpace, bg_space: LabelSpace, seed: int = 0) -> ComposeRule:
        """The :class:`ComposeRule` of this spec between two label spaces."""
        return ComposeRule(self.make_pairing(fg_space, bg_space), self.correlation, int(seed))

    def to_dict(self) -> dict:
        """JSON-able settings (a pairing file by its path, a mapping as given)."""
        if isinstance(self.pairing, Mapping):
            pairing = {str(k): v for k, v in self.pairing.items()}
        else:
            pairing = None if self.pairing is None else os.fspath(self.pairing)
        corr = list(self.correlation) if isinstance(self.correlation, tuple) else self.correlation
        return {"backgrounds": self.backgrounds, "pairing": pairing, "correlation": corr, "bg_split": self.bg_split,
                "bg_per_class": self.bg_per_class, "fixed": bool(self.fixed)}


@dataclasses.dataclass
class ComposeChoice:
    """The backgrounds the rule chose for a batch of foregrounds.

    Shape:
        - rows: ``int64 [B]`` row of the pool (``-1`` where the chosen class has no image in the pool)
        - bg_ids, bg_labels: ``int64 [B]`` image id and class of the background (``-1`` likewise)
        - bg_class: ``int64 [B]`` the background class drawn (set even where the pool has none of it)
        - aligned: ``bool [B]`` the class is aligned with the foreground's
    """

    rows: torch.Tensor
    bg_ids: torch.Tensor
    bg_labels: torch.Tensor
    bg_class: torch.Tensor
    aligned: torch.Tensor

    def as_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, bg_ids, bg_labels)``, the form :meth:`bgsynth.augment.BackgroundSwap.apply_batch` takes."""
        return self.rows, self.bg_ids, self.bg_labels


def _check_pool(pool: BackgroundPool, pairing: Pairing, device: torch.device) -> None:
    if not isinstance(pool, BackgroundPool):
        raise ConfigError(f"compose: expected a BackgroundPool, got {type(pool).__name__}")
    if pool.num_classes != pairing.num_bg:
        raise ConfigError(f"compose: the pool has {pool.num_classes} background classes, the pairing "
                          f"{pairing.num_bg} ({list(pairing.bg_space.classes)[:9]}); build the pool in the "
                          f"pairing's background label space")
    if pool.device != device:
        raise ConfigError(f"compose: expected the pool on {device} (as the image ids), got {pool.device}")


def backgrounds_of_class(image_ids: torch.Tensor, bg_class: torch.Tensor, pool: BackgroundPool, seed: int,
                         epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One background image of a given class per foreground: the ``hash_below(id; seed, epoch, 18, class)``-th
    image of the class in the pool (ascending id): a pure function of the ids, classes, seed, epoch and the pool's
    content (not its row order).

    Args:
        image_ids: ``int64 [B]`` foreground ids.
        bg_class: ``int64 [B]`` the background class of each (``0..pool.num_classes-1``).
        pool: the backgrounds (labels are background classes), on the ids' device.
        seed, epoch: what the draw depends on besides the id and the class.

    Returns:
        ``(rows, bg_ids, bg_labels)``, each ``int64 [B]``; ``-1`` where the pool has no image of the class.
    """
    ids = image_ids.to(torch.int64)
    cls = bg_class.to(device=ids.device, dtype=torch.int64)
    none = torch.full_like(ids, -1)
    if len(pool) == 0 or ids.numel() == 0:
        return none, none.clone(), none.clone()
    n_cls = pool.num_classes
    p_ids, p_lab = pool.image_ids.to(torch.int64), pool.labels.to(torch.int64)
    bucket = torch.where((p_lab >= 0) & (p_lab < n_cls), p_lab, torch.full_like(p_lab, n_cls))
    by_id = torch.argsort(p_ids, stable=True)
    by_class = by_id[torch.argsort(bucket[by_id], stable=True)]
    counts = torch.bincount(bucket, minlength=n_cls + 1)
    starts = torch.cumsum(counts, 0) - counts
    safe = cls.clamp(0, n_cls)
    n = torch.where((cls >= 0) & (cls < n_cls), counts[safe], torch.zeros_like(cls))
    k = _below(ids, n, seed, epoch, cls)
    rows = torch.where(n > 0, by_class[(starts[safe] + k).clamp(0, len(pool) - 1)], none)
    ok = rows >= 0
    r = rows.clamp(min=0)
    return rows, torch.where(ok, p_ids[r], none), torch.where(ok, p_lab[r], none)


def _below(ids: torch.Tensor, n: torch.Tensor, seed: int, epoch: int, cls: torch.Tensor) -> torch.Tensor:
    """``hash(id; seed, epoch, 18, class)`` reduced to ``[0, n)`` (Lemire's multiply-shift, as :func:`hash_below`):
    the class is mixed into the draw, so an image's backgrounds of two classes are independent draws."""
    top32 = srl(hash_bits(ids, int(seed), int(epoch), _S_IMAGE, cls), 32)
    return (top32 * n.clamp(min=1)) >> 32


def compose_backgrounds(image_ids: torch.Tensor, labels: torch.Tensor, pool: BackgroundPool, rule: ComposeRule,
                        epoch: int = 0, correlation: float | None = None) -> ComposeChoice:
    """The background of every foreground under a :class:`ComposeRule` (see the module docstring).

    Args:
        image_ids: ``int64 [B]`` foreground image ids.
        labels: ``int64 [B]`` their classes (``0..pairing.num_fg-1``).
        pool: the backgrounds, labelled in the pairing's background space (``pool.num_classes == num_bg``), on
            the ids' device.
        rule: pairing, correlation and seed.
        epoch: the epoch the draw depends on (``0`` for a fixed composed set).
        correlation: override the rule's correlation of this epoch.

    Returns:
        A :class:`ComposeChoice`.

    Raises:
        ConfigError: a label outside the foreground classes, or a pool of another label space or device.
    """
    ids = image_ids.to(torch.int64)
    lab = labels.to(device=ids.device, dtype=torch.int64)
    if ids.ndim != 1 or lab.shape != ids.shape:
        raise ConfigError(f"compose_backgrounds: expected image_ids and labels of shape [B], got {tuple(ids.shape)} "
                          f"and {tuple(lab.shape)}")
    pairing = rule.pairing
    _check_pool(pool, pairing, ids.device)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= pairing.num_fg):
        raise ConfigError(f"compose_backgrounds: expected foreground labels in 0..{pairing.num_fg - 1} "
                          f"({pairing.fg_space.name}), got {sorted(set(lab.tolist()))[:10]}")
    corr = rule.correlation_at(epoch) if correlation is None else check_correlation(correlation)
    seed, epoch = rule.seed, int(epoch)
    aligned = hash_uniform(ids, seed, epoch, _S_ALIGNED) < corr
    table = pairing.table.to(ids.device)[lab]                              # [B, num_bg]
    cand = torch.where(aligned[:, None], table, ~table)
    n = cand.sum(dim=1)                                                     # >= 1 (a Pairing guarantees it)
    k = hash_below(ids, n, seed, epoch, _S_CLASS)
    bg_class = (cand.to(torch.int64).cumsum(dim=1) <= k[:, None]).sum(dim=1)  # the k-th candidate, ascending
    rows, bg_ids, bg_labels = backgrounds_of_class(ids, bg_class, pool, seed, epoch)
    return ComposeChoice(rows, bg_ids, bg_labels, bg_class, aligned)


# ==============================================================================================================
# Groups and their metrics
# ==============================================================================================================


def group_ids(fg_labels: np.ndarray | torch.Tensor, bg_labels, num_bg: int):
    """The group of each composite, ``fg * num_bg + bg`` (Waterbirds' ``y * 2 + place``); ``-1`` without a
    background."""
    if isinstance(fg_labels, torch.Tensor):
        bg = bg_labels.to(torch.int64)
        return torch.where(bg >= 0, fg_labels.to(torch.int64) * num_bg + bg, torch.full_like(bg, -1))
    fg, bg = np.asarray(fg_labels, np.int64), np.asarray(bg_labels, np.int64)
    return np.where(bg >= 0, fg * num_bg + bg, -1)


def _ratio(a: int, b: int) -> float | None:
    return None if b == 0 else float(a) / float(b)


def _mean(values: list[float]) -> float | None:
    return None if not values else float(sum(values) / len(values))


def group_metrics(label, pred, bg_label, valid, pairing: Pairing) -> dict:
    """Per-group accuracy of composites and what group-robustness work reports from it.

    Args:
        label, pred, bg_label: ``int [N]`` foreground class, predicted class (``-1``: unmapped) and background
            class of each composite (``-1``: none, such rows count as invalid).
        valid: ``bool [N]`` the composite exists (mask and background present).
        pairing: which groups are aligned.

    Returns:
        ``{"accuracy", "correct", "total", "invalid", "groups", "worst_group", "average_group", "aligned_gap",
        "aligned_accuracy", "conflicting_accuracy"}``: ``groups`` lists every (foreground class, background
        class) pair as ``{"fg_class", "bg_class", "fg_name", "bg_name", "aligned", "correct", "total",
        "accuracy"}`` (class ids, then names); ``worst_group`` is the lowest and ``average_group`` the unweighted
        mean of the group accuracies over the groups with composites; ``aligned_gap`` = mean accuracy of the
        aligned groups - mean accuracy of the conflicting groups (unweighted over groups); ``aligned_accuracy``
        and ``conflicting_accuracy`` are those two means. ``None`` where there is nothing to measure.

    >>> from bgsynth.classes import LabelSpace
    >>> sp = LabelSpace.from_names(["a", "b"])
    >>> m = group_metrics([0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0], [True] * 4, Pairing(sp, sp, ((0,), (1,))))
    >>> m["worst_group"], m["average_group"], m["aligned_gap"]
    (0.0, 0.75, 0.5)
    """
    label, pred, bg = (np.asarray(a, np.int64) for a in (label, pred, bg_label))
    valid = np.asarray(valid, bool) & (bg >= 0)
    ok = valid & (pred == label)
    nb = pairing.num_bg
    gid = np.where(valid, label * nb + bg, -1)
    n_groups = pairing.num_fg * nb
    total = np.bincount(gid[valid], minlength=n_groups)[:n_groups]
    correct = np.bincount(gid[ok], minlength=n_groups)[:n_groups]
    groups = []
    for g in range(n_groups):
        f, b = divmod(g, nb)
        groups.append({"fg_class": f, "bg_class": b, "fg_name": pairing.fg_space.classes[f],
                       "bg_name": pairing.bg_space.classes[b], "aligned": pairing.is_aligned(f, b),
                       "correct": int(correct[g]), "total": int(total[g]),
                       "accuracy": _ratio(int(correct[g]), int(total[g]))})
    present = [g for g in groups if g["total"] > 0]
    al = [g["accuracy"] for g in present if g["aligned"]]
    co = [g["accuracy"] for g in present if not g["aligned"]]
    a_mean, c_mean = _mean(al), _mean(co)
    return {
        "accuracy": _ratio(int(ok.sum()), int(valid.sum())),
        "correct": int(ok.sum()),
        "total": int(valid.sum()),
        "invalid": int((~valid).sum()),
        "groups": groups,
        "worst_group": min((g["accuracy"] for g in present), default=None),
        "average_group": _mean([g["accuracy"] for g in present]),
        "aligned_gap": None if a_mean is None or c_mean is None else a_mean - c_mean,
        "aligned_accuracy": a_mean,
        "conflicting_accuracy": c_mean,
    }


def group_weights(pairing: Pairing, correlation: float, fg_prior: Sequence[float] | None = None) -> np.ndarray:
    """The share of each group (foreground class x background class) in a set composed by the rule.

    A foreground of class ``f`` (share ``fg_prior[f]``) gets an aligned background class with probability
    ``correlation``, spread evenly over its aligned classes, and a conflicting one otherwise, spread evenly over
    its conflicting classes (the rule's class draw is uniform over the candidates).

    Args:
        pairing: which groups are aligned.
        correlation: the rule's correlation.
        fg_prior: the foreground classes' shares (default: uniform); normalised here.

    Returns:
        ``float64 [num_fg * num_bg]`` in group order (``fg * num_bg + bg``), summing to 1.

    >>> from bgsynth.classes import LabelSpace
    >>> sp = LabelSpace.from_names(["a", "b"])
    >>> group_weights(Pairing(sp, sp, ((0,), (1,))), 0.9).round(3).tolist()
    [0.45, 0.05, 0.05, 0.45]
    """
    corr = check_correlation(correlation, "group_weights: correlation")
    prior = np.full(pairing.num_fg, 1.0 / pairing.num_fg) if fg_prior is None else np.asarray(fg_prior, np.float64)
    if prior.shape != (pairing.num_fg,) or (prior < 0).any() or prior.sum() <= 0:
        raise ConfigError(f"group_weights: expected {pairing.num_fg} non-negative foreground class shares, got "
                          f"{np.asarray(fg_prior).tolist()}")
    prior = prior / prior.sum()
    table = pairing.table.numpy()
    n_al = table.sum(1, keepdims=True)
    share = np.where(table, corr / n_al, (1.0 - corr) / (pairing.num_bg - n_al))
    return (prior[:, None] * share).reshape(-1)


def weighted_accuracy(metrics: Mapping, pairing: Pairing, correlation: float,
                      fg_prior: Sequence[float] | None = None) -> float | None:
    """The accuracy a model would have on a set composed at ``correlation``, from its per-group accuracies
    (:func:`group_metrics`, e.g. measured on balanced groups): the group accuracies weighted by
    :func:`group_weights`. This is Waterbirds' "average accuracy" (the test groups reweighted to the training
    distribution), next to which the worst group is reported.

    Returns:
        The weighted accuracy, or ``None`` when a group of non-zero weight has no composites.

    >>> from bgsynth.classes import LabelSpace
    >>> sp = LabelSpace.from_names(["a", "b"])
    >>> m = group_metrics([0, 0, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0], [True] * 4, Pairing(sp, sp, ((0,), (1,))))
    >>> round(weighted_accuracy(m, Pairing(sp, sp, ((0,), (1,))), 0.9), 3)  # aligned right, conflicting wrong
    0.9
    """
    w = group_weights(pairing, correlation, fg_prior)
    acc = [g["accuracy"] for g in metrics["groups"]]
    if len(acc) != len(w):
        raise ConfigError(f"weighted_accuracy: expected {len(w)} groups, got {len(acc)}")
    if any(a is None and wk > 0 for a, wk in zip(acc, w)):
        return None
    return float(sum(wk * (a or 0.0) for a, wk in zip(acc, w)))
