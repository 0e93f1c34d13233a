"""The prepare job: the paper's selection filters and a GrabCut mask for every survivor, parallel and resumable.

It takes a dataset index whose images carry boxes, drops the images the paper's generation script would drop
(PAPER.md, "How an image enters the set") and fills in a foreground mask for every survivor with GrabCut seeded by
the box. The rules and GrabCut itself are the functional layer (:mod:`bgsynth.masks`); this module is the job:
a short pipeline of steps over a resolved :class:`~bgsynth.config.RunConfig` (crop geometry, Only-BG-T tiling,
seed, progress) and its own :class:`PrepareConfig`.

For every image of the index (optionally restricted to ``split``):

1. The selection filters run on **every** image, whatever its mask source (none, released, synthetic, external,
   grabcut), unless switched off (:meth:`~bgsynth.masks.SelectionFilters.off` for all): the box rules
   (:func:`~bgsynth.masks.check_selection_many`, in the crop geometry, no decode; the Only-BG-T margin rule
   follows the run's ``tiling``), then, for an image that keeps its existing mask, the mask-size rule
   (:func:`~bgsynth.masks.check_existing_mask`).
2. Surviving images that already carry a mask keep it, unless ``recompute`` (then their mask is replaced by
   GrabCut's, and on the built-in dataset the old one serves as ground truth for the quality report).
3. The other survivors are decoded by the workers and run through :func:`~bgsynth.masks.grabcut_mask` with the
   seed :func:`~bgsynth.masks.image_seed` ``(seed, image id)``; an image that fails to decode, has the wrong size,
   or gets no accepted mask (the paper's 10% rule, part of ``filters.mask_size``) is rejected with its reason.

With ``per_class=N`` the result is a balanced subset: the images of each class are visited in an order shuffled
with ``(seed, class)`` and the first ``N`` that survive are kept, so a class ends with exactly ``N`` images when it
has enough; images after the ``N``-th survivor are neither processed nor listed as rejects (they are counted in
``info.skipped.not_selected``).

Every dropped image is listed in the result's ``rejects`` (path, reason, detail) and counted per reason in
``info.prepare``: ``rejects`` (every reason), ``filtered`` (only the selection filters' reasons,
:data:`~bgsynth.masks.FILTER_REASONS`) and ``filtered_by_mask_source`` (mask source before prepare, ``"none"``
without a mask -> reason -> count). ``info.prepare`` also holds the ``settings`` (``geometry``, ``filters``,
``tiling``, ``seed``, ...), attempt counts, the mask-quality report (IoU against masks that were replaced, with
``recompute``) and, under ``timing``, the run's speed.

Resumable: with ``out``, every finished image is appended to :func:`journal_path` ``(out)`` (flushed and fsynced
every ``checkpoint_every`` images); a killed run continues with ``resume=True`` and ends with exactly the index an
uninterrupted run writes. Under ``torchrun`` every rank calls :func:`prepare` with the same arguments: each runs
GrabCut on its share of the images with its own journal (``<out>.journal.rank<R>.jsonl``), the results are
gathered, and every rank returns the same index, identical to a single-process run's; rank 0 alone writes ``out``
and ``show``.

.. note:: Worker processes are started with multiprocessing's ``forkserver`` (``spawn`` where there is none): a
   script that calls :func:`prepare` with ``workers > 1`` must do so under ``if __name__ == "__main__":``.
   ``fork`` is not used because a child forked after OpenCV's thread pool was used in the parent can hang.

>>> from bgsynth.index import DatasetIndex
>>> idx = prepare(DatasetIndex.load("index.json"), out="prepared.json", per_class=450, seed=0)  # doctest: +SKIP
>>> idx.data["info"]["prepare"]["filtered"]                                                    # doctest: +SKIP
{'box_too_large': 812, 'multiple_objects': 1403, ...}
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import sys
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .config import RunConfig, available_cores, resolve_options
from .distributed import DistContext, current
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes
from .index import DatasetIndex, ImageRecord, Reject, require_index, rle_decode, rle_encode
from .masks import (
    FILTER_REASONS,
    GrabCutCost,
    SelectionFilters,
    check_existing_mask,
    check_selection_many,
    grabcut_mask,
    image_seed,
    mask_iou,
    mask_quality,
    max_side_within,
    grabcut_cost,
    union_box,
)
from .probe import SampleError, probe_image
from .sources import pool_context, start_worker

__all__ = ["PrepareConfig", "prepare", "journal_path", "format_prepare_summary", "write_mask_sheet"]

_JOURNAL_FORMAT = "bgsynth-prepare-journal"
_JOURNAL_VERSION = 1


# ==============================================================================================================
# The job's configuration
# ==============================================================================================================


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """The prepare job's own settings (the crop geometry, Only-BG-T ``tiling``, ``seed`` and ``progress`` are run
    options of :class:`~bgsynth.config.RunConfig`).

    Attributes:
        filters: which selection filters are on (all by default; they apply to every image).
        recompute: replace existing masks with GrabCut masks.
        per_class: keep at most N images per class (balanced subset, see the module docstring).
        split: only process images of this split (or these splits).
        iterations, attempts, min_fraction: GrabCut settings (the paper: 5, 10, 0.10); ``min_fraction`` is also
            the threshold of the mask-size rule for existing masks.
        max_side: GrabCut working resolution (see :func:`~bgsynth.masks.grabcut_mask`); ``None``: full resolution.
        max_memory: memory budget in bytes for GrabCut in all workers at once (the resource guard, see
            :func:`prepare`): a run whose estimate exceeds it is refused before any work; ``None``: no budget.
        workers: processes for GrabCut; ``None`` uses every core (under torchrun: this rank's share of the node's
            cores), ``1`` runs in this process.
        resume: continue an interrupted run from its journal (same input and settings required; needs ``out``).
        checkpoint_every: journal chunk size in images.
        show: write a contact sheet PNG of the worst and best masks there (:func:`write_mask_sheet`).
        show_count: rows of worst and of best masks on the contact sheet.
        filter_existing: removed. The filters apply to images with existing masks by default;
            ``filter_existing=True`` only warns (:class:`FutureWarning`), ``False`` raises :class:`ConfigError`
            (switch filters off with ``filters`` instead).

    >>> PrepareConfig(per_class=450).per_class
    450
    """

    filters: SelectionFilters = SelectionFilters()
    recompute: bool = False
    per_class: int | None = None
    split: str | Sequence[str] | None = None
    iterations: int = 5
    attempts: int = 10
    min_fraction: float = 0.10
    max_side: int | None = None
    max_memory: int | None = None
    workers: int | None = None
    resume: bool = False
    checkpoint_every: int = 64
    show: str | os.PathLike | None = None
    show_count: int = 8
    filter_existing: bool | None = None

    def __post_init__(self):
        if not isinstance(self.filters, SelectionFilters):
            raise ConfigError(f"prepare: expected SelectionFilters, got {type(self.filters).__name__}")
        if self.per_class is not None and int(self.per_class) < 1:
            raise ConfigError(f"prepare: expected per_class >= 1 or None, got {self.per_class}")
        if self.max_side is not None and int(self.max_side) < 8:
            raise ConfigError(f"prepare: expected max_side >= 8 or None, got {self.max_side}")
        if int(self.iterations) < 1 or int(self.attempts) < 1:
            raise ConfigError(f"prepare: expected iterations >= 1 and attempts >= 1, got {self.iterations}, "
                              f"{self.attempts}")
        if not 0.0 <= float(self.min_fraction) <= 1.0:
            raise ConfigError(f"prepare: expected min_fraction in [0, 1], got {self.min_fraction}")
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or int(self.max_memory) < 1):
            raise ConfigError(f"prepare: expected max_memory > 0 bytes or None, got {self.max_memory!r}")
        if self.workers is not None and int(self.workers) < 1:
            raise ConfigError(f"prepare: expected workers >= 1 or None (all cores), got {self.workers}")
        if self.filter_existing is False:
            raise ConfigError(
                "prepare: filter_existing=False was removed: the selection filters apply to every image, existing "
                "masks included; to keep images they would drop, switch filters off with "
                "filters=SelectionFilters.off() (all) or SelectionFilters(<name>=False) (one)"
            )

    def settings(self, run: RunConfig) -> dict:
        """``info.prepare.settings``: what decides the result (the journal's header fingerprints it too)."""
        split = self.split
        return {
            "geometry": run.geometry.to_dict(),
            "filters": self.filters.to_dict(),
            "tiling": run.tiling,
            "recompute": bool(self.recompute),
            "per_class": None if self.per_class is None else int(self.per_class),
            "seed": int(run.seed),
            "split": split if split is None or isinstance(split, str) else list(split),
            "iterations": int(self.iterations),
            "attempts": int(self.attempts),
            "min_fraction": float(self.min_fraction),
            "max_side": None if self.max_side is None else int(self.max_side),
        }


# ==============================================================================================================
# Worker: one image from disk to an RLE (runs in the process pool; only small dicts cross process boundaries)
# ==============================================================================================================


class _ImageReject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _decode_rgb(data: bytes, path: str) -> np.ndarray:
    """PIL decode of the file's bytes to ``uint8 [H, W, 3]`` RGB, or :class:`_ImageReject`."""
    from PIL import Image, UnidentifiedImageError  # Pillow: only where images are decoded

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = Reject.TRUNCATED if "truncated" in msg.lower() else Reject.DECODE_FAILED
        raise _ImageReject(reason, f"{path}: {msg}") from None


def _read_rgb(path: str, width: int, height: int) -> np.ndarray:
    """Decode an image file to ``uint8 [H, W, 3]`` RGB at its stored size, or raise :class:`_ImageReject`.

    The file is classified by the one header probe (:func:`bgsynth.probe.probe_image`: zero-byte, truncated,
    unreadable), so prepare and decode reject the same files for the same reasons.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _ImageReject(Reject.MISSING_FILE, f"{path}: file not found") from None
    except OSError as e:
        raise _ImageReject(Reject.UNREADABLE, f"{path}: cannot read file ({e})") from None
    try:
        probe = probe_image(data)
    except SampleError as e:
        raise _ImageReject(e.reason, f"{path}: {e.detail}") from None
    if (probe.height, probe.width) != (height, width):
        raise _ImageReject(
            Reject.SIZE_MISMATCH,
            f"{path}: index says {width}x{height}, file holds {probe.width}x{probe.height} {probe.format}",
        )
    rgb = _decode_rgb(data, path)
    if rgb.shape[:2] != (height, width):
        raise _ImageReject(
            Reject.SIZE_MISMATCH,
            f"{path}: index says {width}x{height}, PIL decoded {rgb.shape[1]}x{rgb.shape[0]}",
        )
    return np.ascontiguousarray(rgb)


def _mask_result(res: dict, task: Mapping[str, Any], mask: np.ndarray | None, used: int) -> dict:
    """Fill a worker result from GrabCut's answer: the mask's RLE and box fraction (and IoU against the known
    mask), or a ``grabcut_failed`` reject."""
    res["attempts"] = int(used)
    if mask is None:
        res.update(status="reject", reason=Reject.GRABCUT_FAILED,
                   detail=f"image {res['id']}: no GrabCut mask covered {task['min_fraction']:.0%} of the box "
                          f"in {used} attempt(s)")
        return res
    box_area = (task["box"][2] - task["box"][0] + 1) * (task["box"][3] - task["box"][1] + 1)
    res.update(status="mask", rle=rle_encode(mask), fraction=round(float(mask.sum()) / box_area, 6))
    if task.get("true_rle") is not None:
        true = rle_decode(task["true_rle"])
        res["iou"] = mask_iou(mask, true) if true.shape == mask.shape else None
    return res


def _grabcut_task(task: Mapping[str, Any]) -> dict:
    """Process one image: decode, GrabCut with retries, encode. Never raises for bad input."""
    image_id = int(task["id"])
    res: dict[str, Any] = {"id": image_id}
    try:
        img = _read_rgb(task["path"], int(task["width"]), int(task["height"]))
        mask, used = grabcut_mask(img, task["box"], iterations=task["iterations"], attempts=task["attempts"],
                                  min_fraction=task["min_fraction"], max_side=task["max_side"], seed=task["seed"])
        del img
        return _mask_result(res, task, mask, used)
    except _ImageReject as e:
        res.update(status="reject", reason=e.reason, detail=f"image {image_id}: {e.detail}")
    except Exception as e:  # noqa: BLE001 - one bad image must never end a long run; recorded with its message
        res.update(status="reject", reason=Reject.DECODE_FAILED,
                   detail=f"image {image_id}: {type(e).__name__}: {e}")
    return res


def _executor(n_workers: int) -> cf.ProcessPoolExecutor | None:
    """The GrabCut process pool, or ``None`` to run in this process.

    Started like every pool of bgsynth (:func:`bgsynth.sources.pool_context`): not ``fork`` (a child forked after
    OpenCV's thread pool was used in the parent can hang in its first parallel OpenCV call) but ``forkserver``,
    whose server has imported this module once; ``spawn`` where there is none. Each worker runs OpenCV on one
    thread (one process per core: OpenCV's own threads only oversubscribe the cores, see
    ``benchmarks/bench_prepare.py``) and dies with this process, even on SIGKILL (:func:`bgsynth.sources.watch_parent`).
    """
    if n_workers <= 1:
        return None
    return cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=pool_context((__name__,)),
                                  initializer=start_worker, initargs=(os.getpid(), None))


def _resolve_workers(workers: int | None) -> int:
    return available_cores() if workers is None else int(workers)


def _progress_bar(desc: str, total: int | None = None):
    from tqdm.auto import tqdm  # only when a bar is shown

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


# ==============================================================================================================
# Journal (append-only JSONL next to the output index)
# ==============================================================================================================


def journal_path(out: str | os.PathLike) -> pathlib.Path:
    """The journal file of a prepare run writing ``out``: ``<out>.journal.jsonl`` in the same folder."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".journal.jsonl")


def _rank_journal_path(out: str | os.PathLike, rank: int) -> pathlib.Path:
    """The journal of one rank of a distributed prepare run: ``<out>.journal.rank<R>.jsonl``."""
    out = pathlib.Path(out)
    return out.with_name(f"{out.name}.journal.rank{int(rank)}.jsonl")


def _orphan_journals(out: str | os.PathLike, world_size: int) -> list[pathlib.Path]:
    """Journals of ranks ``>= world_size`` next to ``out`` (left by an earlier run with more ranks)."""
    out = pathlib.Path(out)
    found = []
    for path in out.parent.glob(f"{out.name}.journal.rank*.jsonl"):
        tail = path.name[len(out.name) + len(".journal.rank"):-len(".jsonl")]
        if tail.isdigit() and int(tail) >= world_size:
            found.append(path)
    return sorted(found)


class _Journal:
    """Append-only JSONL file: a header line (settings fingerprint), then one line per finished image.

    Lines are flushed and fsynced every ``every`` results or ``interval`` seconds, so a killed run loses at most
    one such chunk; a torn last line (killed mid-write) is cut off on resume.
    """

    def __init__(self, path: pathlib.Path, header: dict, resume: bool, every: int, interval: float = 10.0):
        self.path = path
        self.every = max(1, int(every))
        self.interval = float(interval)
        self.results: dict[int, dict] = {}
        self._pending = 0
        self._last = time.monotonic()
        if resume and path.exists():
            self._load(header)
            self._f = open(path, "ab")
        else:
            if path.exists() and not resume:
                raise CheckpointError(
                    f"{path}: a journal of an interrupted prepare run exists; pass resume=True (--resume) to "
                    f"continue it, or delete it to start over"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "wb")
            self._f.write((json.dumps(header, sort_keys=True) + "\n").encode("utf-8"))
            self.sync()

    def _read_lines(self) -> list[bytes]:
        """The journal's lines, a torn last line (from a killed run) cut off so appends start on a fresh line."""
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        lines = data.splitlines()
        if not lines:
            raise CheckpointError(f"{self.path}: journal has no header line; delete it to start over")
        return lines

    def _check_header(self, line: bytes, header: dict) -> None:
        try:
            found = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: journal header is not JSON ({e}); delete it to start over") from e
        if found != header:
            diff = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
            raise CheckpointError(
                f"{self.path}: journal was written by a run with different settings or input (differs in {diff}); "
                f"run with the same arguments, or delete the journal to start over"
            )

    def _load(self, header: dict) -> None:
        lines = self._read_lines()
        self._check_header(lines[0], header)
        for n, line in enumerate(lines[1:], start=2):
            try:
                r = json.loads(line)
                self.results[int(r["id"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: line {n} is not a journal record ({e})") from e

    def append(self, result: dict) -> None:
        self._f.write((json.dumps(result, sort_keys=True) + "\n").encode("utf-8"))
        self._pending += 1
        if self._pending >= self.every or time.monotonic() - self._last >= self.interval:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._pending = 0
        self._last = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


def _fingerprint(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ==============================================================================================================
# The plan: filters first (cheap, no decode), then the processing order
# ==============================================================================================================


@dataclasses.dataclass
class _Item:
    """One image in processing order: kept as is, rejected by a filter, or a GrabCut task."""

    id: int
    label: int
    kind: str  # "keep" | "reject" | "grabcut"
    reject: tuple[str, str] | None = None
    task: dict | None = None


@dataclasses.dataclass
class _Plan:
    """What a run does, decided before any decode.

    Attributes:
        base: the input (restricted to ``split``), copied; it becomes the result.
        records: its records by image id, as they were before the run.
        items: every image's :class:`_Item` by id.
        queues: processing order: one queue sorted by id, or (``per_class``) one shuffled queue per class.
        cap: ``per_class`` or ``None``.
        settings: ``info.prepare.settings``.
        header: the journal's header (settings and a fingerprint of the input).
    """

    base: DatasetIndex
    records: dict[int, ImageRecord]
    items: dict[int, _Item]
    queues: dict[int, collections.deque]
    cap: int | None
    settings: dict
    header: dict

    def estimate(self) -> int:
        """GrabCut images the run will likely process (the progress bar's total)."""
        if self.cap is None:
            return sum(1 for it in self.items.values() if it.kind == "grabcut")
        return sum(min(self.cap, sum(1 for it in qu if it.kind != "reject")) for qu in self.queues.values())


def _grabcut_spec(image_id: int, r: ImageRecord, run: RunConfig, config: PrepareConfig) -> dict:
    """The worker's task of one image (plain data: it crosses the process boundary and is fingerprinted)."""
    return {
        "id": image_id, "path": r.path, "width": r.width, "height": r.height,
        "box": list(union_box(r.boxes, r.height, r.width)),
        "seed": image_seed(run.seed, image_id), "iterations": int(config.iterations),
        "attempts": int(config.attempts),
        # the mask-size filter switched off: GrabCut's first non-empty mask is accepted
        "min_fraction": float(config.min_fraction) if config.filters.mask_size else 0.0,
        "max_side": None if config.max_side is None else int(config.max_side),
        "true_rle": r.mask_rle if config.recompute else None,
    }


def _plan_items(records: Mapping[int, ImageRecord], run: RunConfig, config: PrepareConfig) -> dict[int, _Item]:
    """Every image's fate as far as it is known without decoding: rejected, kept, or a GrabCut task."""
    verdicts = dict(zip(records, check_selection_many(
        [(r.boxes, r.height, r.width) for r in records.values()], run.geometry, config.filters, run.tiling)))
    items: dict[int, _Item] = {}
    for i, r in records.items():
        verdict = verdicts[i]
        keeps_mask = r.mask_rle is not None and not config.recompute
        if verdict is None and keeps_mask and config.filters.mask_size:
            verdict = check_existing_mask(r, float(config.min_fraction))
        if verdict is not None:
            items[i] = _Item(i, r.label, "reject", reject=verdict)
        elif keeps_mask:
            items[i] = _Item(i, r.label, "keep")
        else:
            items[i] = _Item(i, r.label, "grabcut", task=_grabcut_spec(i, r, run, config))
    return items


def _plan_queues(items: Mapping[int, _Item], per_class: int | None, seed: int) -> dict[int, collections.deque]:
    """Processing order: by id, or per class in a ``(seed, class)``-shuffled order for a balanced subset."""
    if per_class is None:
        return {-1: collections.deque(items[i] for i in sorted(items))}
    by_class: dict[int, list[int]] = collections.defaultdict(list)
    for i in sorted(items):
        by_class[items[i].label].append(i)
    queues: dict[int, collections.deque] = {}
    for c, members in sorted(by_class.items()):
        order = np.random.default_rng([int(seed), int(c)]).permutation(len(members))
        queues[c] = collections.deque(items[members[j]] for j in order)
    return queues


def _journal_header(settings: dict, items: Mapping[int, _Item]) -> dict:
    return {
        "format": _JOURNAL_FORMAT,
        "version": _JOURNAL_VERSION,
        "settings": settings,
        "input": _fingerprint(
            (it.id, it.kind, it.task and {k: v for k, v in it.task.items() if k != "true_rle"},
             it.task and it.task["true_rle"] is not None)
            for it in (items[i] for i in sorted(items))
        ),
    }


def _plan(index: DatasetIndex, run: RunConfig, config: PrepareConfig) -> _Plan:
    base = index.select(split=config.split) if config.split is not None else index.copy()
    index.require_images(base, "prepare", split=config.split)
    records = {i: base.record(i) for i in base.ids}
    items = _plan_items(records, run, config)
    settings = config.settings(run)
    cap = None if config.per_class is None else int(config.per_class)
    return _Plan(base, records, items, _plan_queues(items, cap, run.seed), cap, settings,
                 _journal_header(settings, items))


# ==============================================================================================================
# The resource guard: what GrabCut will cost, from the image sizes, before any work
# ==============================================================================================================

#: an image whose GrabCut is estimated above this much memory (bytes) or time (CPU seconds per attempt) is warned
#: about, with the ``max_side`` that would bound it
WARN_BYTES = 1 << 30
WARN_SECONDS = 60.0


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def _costs(plan: _Plan, config: PrepareConfig) -> list[tuple[GrabCutCost, str]]:
    """The estimated cost of every GrabCut task of the plan, largest first, with its image's path."""
    costs = [(grabcut_cost(it.task["height"], it.task["width"], config.iterations, config.max_side), it.task["path"])
             for it in plan.items.values() if it.kind == "grabcut"]
    return sorted(costs, key=lambda t: (-t[0].bytes, t[1]))


def _suggest(costs: list[tuple[GrabCutCost, str]], config: PrepareConfig, max_bytes: float,
             max_seconds: float | None) -> str:
    """`` (--max-side N bounds it)``: the largest working resolution under which every image fits, if one exists."""
    sides = [max_side_within(c.height, c.width, max_bytes, max_seconds, config.iterations) for c, _p in costs]
    sides = [s for s in sides if s is not None]
    if not sides:
        return ""
    side = min(sides) if config.max_side is None else min(min(sides), int(config.max_side))
    return f"; --max-side {side} (max_side={side}) bounds it"


def _check_resources(plan: _Plan, config: PrepareConfig, n_workers: int) -> dict | None:
    """Estimate GrabCut's memory and time from the pixel counts (:func:`bgsynth.masks.grabcut_cost`) before any
    work: refuse a run over ``config.max_memory`` (:class:`ConfigError`), warn about images over
    :data:`WARN_BYTES` / :data:`WARN_SECONDS`; returns the estimate for ``info.prepare.resources``."""
    costs = _costs(plan, config)
    if not costs:
        return None
    (largest, where), slowest = costs[0], max(c.seconds for c, _p in costs)
    concurrent = sum(c.bytes for c, _p in costs[: max(1, n_workers)])
    about = (f"the largest image, {where} ({largest.width}x{largest.height}, GrabCut at "
             f"{largest.work_width}x{largest.work_height}), needs about {_gib(largest.bytes)} and "
             f"{largest.seconds:.0f} s per attempt (up to {config.attempts})")
    if config.max_memory is not None and concurrent > int(config.max_memory):
        per_worker = int(config.max_memory) / max(1, min(n_workers, len(costs)))
        raise ConfigError(
            f"prepare: GrabCut would need about {_gib(concurrent)} at once with {n_workers} worker(s), more than "
            f"the --max-memory budget of {_gib(int(config.max_memory))}: {about}"
            f"{_suggest(costs, config, per_worker, None) or '; no working resolution fits'}, or give fewer --workers"
        )
    if largest.bytes > WARN_BYTES or slowest > WARN_SECONDS:
        warnings.warn(f"prepare: {about}; {sum(1 for c, _p in costs if c.bytes > WARN_BYTES or c.seconds > WARN_SECONDS)} "
                      f"image(s) exceed {_gib(WARN_BYTES)} or {WARN_SECONDS:.0f} s"
                      f"{_suggest(costs, config, WARN_BYTES, WARN_SECONDS)}", stacklevel=3)
    return {"largest_image_bytes": largest.bytes, "largest_image_seconds_per_attempt": round(largest.seconds, 3),
            "concurrent_bytes": concurrent, "total_seconds_per_attempt": round(sum(c.seconds for c, _p in costs), 3)}


# ==============================================================================================================
# Running the plan in one process (with its worker pool)
# ==============================================================================================================


class _Loop:
    """The single-process run: a window of GrabCut tasks filled round-robin over the queues (so every class
    progresses), a class stops taking items once ``cap`` of them are accepted or pending, and results are resolved
    as they come: from ``cached`` (a journal, or the ranks), in this process, or from the pool.

    Attributes:
        results: image id -> worker result (GrabCut items only).
        processed: the items taken from the queues (the others were not selected).
        n_resumed: results that came from ``cached``.
    """

    def __init__(self, plan: _Plan, cached: Mapping[int, dict], journal: _Journal | None, window: int):
        self.plan = plan
        self.cached = cached
        self.journal = journal
        self.window = window
        self.executor: cf.ProcessPoolExecutor | None = None
        self.bar = None
        self.results: dict[int, dict] = {}
        self.processed: list[_Item] = []
        self.n_resumed = 0
        self._accepted: collections.Counter = collections.Counter()
        self._pending: collections.Counter = collections.Counter()
        self._in_flight: dict[cf.Future, tuple[int, _Item]] = {}

    def _can_take(self, q: int) -> bool:
        return self.plan.cap is None or self._accepted[q] + self._pending[q] < self.plan.cap

    def _resolve(self, q: int, item: _Item, res: dict, fresh: bool) -> None:
        self.results[item.id] = res
        self._pending[q] -= 1
        if res.get("status") == "mask":
            self._accepted[q] += 1
        if fresh and self.journal is not None:
            self.journal.append(res)
        if self.bar is not None:
            self.bar.update(1)

    def _take(self, q: int, item: _Item) -> None:
        self.processed.append(item)
        if item.kind == "reject":
            return
        if item.kind == "keep":
            self._accepted[q] += 1
            return
        self._pending[q] += 1
        if item.id in self.cached:
            self.n_resumed += 1
            self._resolve(q, item, self.cached[item.id], fresh=False)
        elif self.executor is None:
            self._resolve(q, item, _grabcut_task(item.task), fresh=True)
        else:
            self._in_flight[self.executor.submit(_grabcut_task, item.task)] = (q, item)

    def _fill(self) -> None:
        took = True
        while took and len(self._in_flight) < self.window:
            took = False
            for q, qu in self.plan.queues.items():
                if not qu or not self._can_take(q):
                    continue
                self._take(q, qu.popleft())
                took = True
                if len(self._in_flight) >= self.window:
                    break

    def _collect(self) -> None:
        done, _ = cf.wait(list(self._in_flight), return_when=cf.FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: self._in_flight[f][1].id):
            q, item = self._in_flight.pop(fut)
            try:
                res = fut.result()
            except BrokenProcessPool as e:
                raise CheckpointError(
                    f"prepare: a worker process died while processing image {item.id} ({item.task['path']}); "
                    f"finished images are journaled, rerun with resume=True (--resume) to continue. (Workers "
                    f"start with multiprocessing's forkserver: a script that calls prepare() must guard the "
                    f"call with `if __name__ == '__main__':`, or the workers fail on start.)"
                ) from e
            self._resolve(q, item, res, fresh=True)

    def run(self) -> "_Loop":
        try:
            while True:
                self._fill()
                if not self._in_flight:
                    if not any(qu and self._can_take(q) for q, qu in self.plan.queues.items()):
                        return self
                    continue
                self._collect()
        finally:
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.executor is not None:
            for f in self._in_flight:
                f.cancel()
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()


# ==============================================================================================================
# Running the plan on the ranks of a torchrun job
# ==============================================================================================================


def _needed(plan: _Plan, results: Mapping[int, dict]) -> list[int]:
    """The GrabCut results the single-process loop will ask for that are still unknown.

    Without a cap that is every GrabCut item. With ``per_class``: per class, the items of its queue that a single
    process would reach if every unknown result were a success (the minimal prefix with ``cap`` survivors); once
    computed, the next wave tops up the classes where some failed.
    """
    if plan.cap is None:
        return sorted(i for i, it in plan.items.items() if it.kind == "grabcut" and i not in results)
    want: list[int] = []
    for qu in plan.queues.values():
        ok = unknown = 0
        for it in qu:
            if ok + unknown >= plan.cap:
                break
            if it.kind == "keep":
                ok += 1
            elif it.kind == "grabcut":
                r = results.get(it.id)
                if r is None:
                    unknown += 1
                    want.append(it.id)
                elif r.get("status") == "mask":
                    ok += 1
    return sorted(want)


def _gather_journaled(ctx: DistContext, plan: _Plan, journal: _Journal | None, out, config: PrepareConfig
                      ) -> tuple[dict[int, dict], set[int]]:
    """What every rank already journaled, gathered on every rank; rank 0 also reads the journals of ranks beyond
    this world (a rerun with fewer ranks loses nothing)."""
    mine = dict(journal.results) if journal is not None else {}
    if config.resume and out is not None and ctx.is_main:
        for extra in _orphan_journals(out, ctx.world_size):
            orphan = _Journal(extra, plan.header, True, config.checkpoint_every)
            orphan.close()
            mine.update(orphan.results)
    results: dict[int, dict] = {}
    resumed: set[int] = set()
    for part in ctx.all_gather_object(mine):
        resumed.update(part)
        results.update(part)
    return results, resumed


def _run_share(ctx: DistContext, ids: Sequence[int], plan: _Plan, executor, journal: _Journal | None, bar
               ) -> dict[int, dict]:
    """GrabCut on this rank's share of one wave (journaled as results come in)."""
    fresh: dict[int, dict] = {}

    def done(i: int, res: dict) -> None:
        fresh[i] = res
        if journal is not None:
            journal.append(res)
        if bar is not None:
            bar.update(ctx.world_size)

    if executor is None:
        for i in ids:
            done(i, _grabcut_task(plan.items[i].task))
    else:
        futures = {executor.submit(_grabcut_task, plan.items[i].task): i for i in ids}
        try:
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    res = fut.result()
                except BrokenProcessPool as e:
                    raise CheckpointError(
                        f"prepare (rank {ctx.rank}): a worker process died while processing image {i} "
                        f"({plan.items[i].task['path']}); finished images are journaled, rerun every rank with "
                        f"resume=True (--resume) to continue"
                    ) from e
                done(i, res)
        finally:
            for fut in futures:
                fut.cancel()
    if journal is not None:
        journal.sync()
    return fresh


def _prepare_ranks(ctx: DistContext, plan: _Plan, out, config: PrepareConfig, n_workers: int, progress: bool
                   ) -> tuple[dict[int, dict], set[int]]:
    """The GrabCut results a distributed :func:`prepare` needs, computed by the ranks together.

    Each rank runs GrabCut on its share (:func:`bgsynth.distributed.shard_ids`) of the images whose result is
    needed (:func:`_needed`, in waves), journaling to its own file (:func:`_rank_journal_path`); the results are
    gathered on every rank. The single-process loop then replays on them, so the index is identical.

    Returns:
        ``(results, resumed)``: image id -> worker result, and the ids whose result came from a journal.
    """
    journal = None
    if out is not None:
        journal = _Journal(_rank_journal_path(out, ctx.rank), plan.header, config.resume, config.checkpoint_every)
    executor = bar = None
    try:
        results, resumed = _gather_journaled(ctx, plan, journal, out, config)
        executor = _executor(n_workers)
        if progress and ctx.is_main:
            bar = _progress_bar(f"prepare ({ctx.world_size} ranks)")
        while want := _needed(plan, results):
            fresh = _run_share(ctx, ctx.shard(want), plan, executor, journal, bar)
            for part in ctx.all_gather_object(fresh):
                results.update(part)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if journal is not None:
            journal.close()
    return results, resumed


def _execute(plan: _Plan, ctx: DistContext, out, config: PrepareConfig, n_workers: int, progress: bool) -> _Loop:
    """Run the plan: under torchrun the ranks compute every result first and the loop only replays them."""
    if ctx.enabled:
        cached, rank_resumed = _prepare_ranks(ctx, plan, out, config, n_workers, progress)
        loop = _Loop(plan, cached, None, window=max(4, 4 * n_workers)).run()
        # only what came from the ranks' journals, not every gathered result
        loop.n_resumed = sum(1 for it in loop.processed if it.kind == "grabcut" and it.id in rank_resumed)
        return loop
    journal = None
    if out is not None:
        journal = _Journal(journal_path(out), plan.header, config.resume, config.checkpoint_every)
    loop = _Loop(plan, journal.results if journal is not None else {}, journal, window=max(4, 4 * n_workers))
    try:
        loop.executor = _executor(n_workers)
        if progress:
            loop.bar = _progress_bar("prepare", plan.estimate())
    except BaseException:
        loop._close()
        raise
    return loop.run()


# ==============================================================================================================
# The result: the index and its report (order-independent: everything is walked by image id)
# ==============================================================================================================


@dataclasses.dataclass
class _Tally:
    """What the processed items came to, by image id."""

    rejected: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    ious: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)
    failed_per_class: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    attempts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept_existing: int = 0
    grabcut_masks: int = 0
    not_selected: list[int] = dataclasses.field(default_factory=list)

    def add_grabcut(self, it: _Item, res: Mapping[str, Any]) -> bool:
        """Count one GrabCut result; ``True`` when it is a mask."""
        if res.get("status") == "mask":
            self.grabcut_masks += 1
            self.attempts[int(res.get("attempts", 1))] += 1
            if res.get("iou") is not None:
                self.ious.append((it.id, it.label, float(res["iou"])))
            return True
        self.rejected.append((it.id, res.get("reason", Reject.DECODE_FAILED), res.get("detail", "")))
        if res.get("reason") == Reject.GRABCUT_FAILED:
            self.attempts["failed"] += 1
            if it.task.get("true_rle") is not None:
                self.failed_per_class[it.label] += 1
        return False


def _tally(plan: _Plan, loop: _Loop) -> _Tally:
    """Put the GrabCut masks into the result and count everything else."""
    t = _Tally()
    for it in sorted(loop.processed, key=lambda x: x.id):
        if it.kind == "reject":
            t.rejected.append((it.id, *it.reject))
        elif it.kind == "keep":
            t.kept_existing += 1
        elif t.add_grabcut(it, loop.results[it.id]):
            plan.base.set_mask(it.id, loop.results[it.id]["rle"], "grabcut")
    processed_ids = {it.id for it in loop.processed}
    t.not_selected = [i for i in plan.items if i not in processed_ids]
    return t


def _apply_rejects(plan: _Plan, t: _Tally) -> None:
    """List every dropped image in the result's rejects and remove it (and the images never selected)."""
    result = plan.base
    for image_id, reason, detail in t.rejected:
        detail = detail if detail.startswith(f"image {image_id}") else f"image {image_id}: {detail}"
        result.add_reject(plan.records[image_id].path, reason, detail)
    result.remove_images([r[0] for r in t.rejected] + t.not_selected)
    if t.not_selected:
        result.count_skipped("not_selected", len(t.not_selected))


def _quality(plan: _Plan, t: _Tally) -> dict | None:
    quality = mask_quality(t.ious, t.failed_per_class, plan.base.label_space.classes)
    if quality is not None:
        # images whose true mask is known but that a selection filter dropped before GrabCut (not in the IoUs)
        quality["filtered"] = sum(1 for image_id, reason, _d in t.rejected
                                  if reason in FILTER_REASONS and reason != Reject.GRABCUT_FAILED
                                  and plan.records[image_id].mask_rle is not None)
    return quality


def _filter_counts(plan: _Plan, t: _Tally) -> dict:
    filtered = collections.Counter(r[1] for r in t.rejected if r[1] in FILTER_REASONS)
    by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for image_id, reason, _detail in t.rejected:
        if reason in FILTER_REASONS:
            by_source[plan.records[image_id].mask_source or "none"][reason] += 1
    return {
        "filtered": dict(sorted(filtered.items())),
        "filtered_by_mask_source": {src: dict(sorted(c.items())) for src, c in sorted(by_source.items())},
    }


def _timing(loop: _Loop, seconds: float, n_workers: int, ranks: int) -> dict:
    n_gc = sum(1 for it in loop.processed if it.kind == "grabcut")
    return {
        "seconds": round(seconds, 3),
        "workers": n_workers,
        "grabcut_images": n_gc,
        "resumed_from_journal": loop.n_resumed,
        "images_per_second": round((n_gc - loop.n_resumed) / seconds, 3) if seconds > 0 else None,
        "ranks": int(ranks),
    }


def _report(plan: _Plan, loop: _Loop, t: _Tally, filters: SelectionFilters, timing: dict) -> dict:
    """``info.prepare`` (its keys and their order are part of the written index)."""
    result = plan.base
    counts = _filter_counts(plan, t)
    attempts = sorted(t.attempts.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(4)))
    return {
        "settings": plan.settings,
        "input_images": len(plan.records),
        "processed": len(loop.processed),
        "kept": len(result),
        "grabcut_masks": t.grabcut_masks,
        "kept_existing_masks": t.kept_existing,
        "not_selected": len(t.not_selected),
        "rejects": dict(sorted(collections.Counter(r[1] for r in t.rejected).items())),
        "filters_enabled": list(filters.enabled()),
        "filtered": counts["filtered"],
        "filtered_by_mask_source": counts["filtered_by_mask_source"],
        "per_class_kept": {result.label_space.classes[c]: int(n)
                           for c, n in sorted(collections.Counter(result.labels()).items())},
        "attempts": {str(k): int(v) for k, v in attempts},
        "quality": _quality(plan, t),
        "timing": timing,
    }


def _write(result: DatasetIndex, plan: _Plan, loop: _Loop, ctx: DistContext, out, config: PrepareConfig) -> None:
    """Rank 0 writes the index (then every rank drops its journal) and the contact sheet."""
    if out is not None and ctx.is_main:
        result.save(out)
    ctx.barrier()  # the index is written before any rank drops its journal
    if out is not None:
        jp = _rank_journal_path(out, ctx.rank) if ctx.enabled else journal_path(out)
        if jp.exists():
            jp.unlink()
        if ctx.enabled and ctx.is_main:
            for extra in _orphan_journals(out, ctx.world_size):  # of a larger earlier world, now merged
                extra.unlink()
    if config.show is not None and ctx.is_main:
        write_mask_sheet(config.show, result, loop.results, plan.records, count=config.show_count)


# ==============================================================================================================
# prepare
# ==============================================================================================================


def _check_call(index, config: PrepareConfig, out) -> None:
    require_index(index, "prepare")
    if config.resume and out is None:
        raise ConfigError("prepare: resume=True needs out= (the journal lives next to the output index)")
    if config.filter_existing:
        warnings.warn(
            "prepare(filter_existing=True) is deprecated and has no effect: the selection filters now apply to "
            "every image, existing masks included, by default",
            FutureWarning, stacklevel=3,
        )


def prepare(
    index: DatasetIndex,
    run: RunConfig | None = None,
    config: PrepareConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    dist: DistContext | None = None,
    **options,
) -> DatasetIndex:
    """Select images the way the paper did and give every survivor a GrabCut foreground mask (module docstring).

    Args:
        index: the input index; it is not modified.
        run: the resolved run settings (crop ``geometry`` the filters are evaluated in, default 256 -> 224;
            ``tiling`` the Only-BG-T margin filter checks, default ``"paper"``: use the tiling the variants will
            be built with; ``seed`` of GrabCut and of the per-class order; ``progress``, default on).
        config: the job's settings (:class:`PrepareConfig`).
        out: where to write the resulting index; needed for ``resume`` (the journal lives beside it).
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`).
        **options: run options (``geometry=``, ``tiling=``, ``seed=``, ``progress=``, ...) and
            :class:`PrepareConfig` fields (``filters=``, ``per_class=``, ``workers=``, ...), overriding ``run`` and
            ``config``.

    Before any work, GrabCut's memory and time are estimated from the image sizes
    (:func:`bgsynth.masks.grabcut_cost`; ``info.prepare.timing.estimate``): a run above ``max_memory`` is refused,
    and images above :data:`WARN_BYTES` or :data:`WARN_SECONDS` per attempt are warned about, with the
    ``max_side`` that would bound them (a 5000x5000 image at full resolution needs about 5 GiB).

    Returns:
        The resulting :class:`~bgsynth.index.DatasetIndex` (saved to ``out`` when given); ``info.prepare`` holds
        the report.

    Raises:
        EmptyInputError: the index (or its ``split``) holds no image.
        ConfigError: an argument is out of range (e.g. ``resume`` without ``out``), ``index`` is not a
            :class:`~bgsynth.index.DatasetIndex`, or the GrabCut estimate exceeds ``max_memory``.
        CheckpointError: the journal to resume was written with other settings or another input, or a journal of
            an interrupted run exists and ``resume`` is False.
    """
    t_start = time.perf_counter()
    run, config = resolve_options("prepare", run, config, PrepareConfig, options, progress=True, device="cpu")
    _check_call(index, config, out)
    ctx = current() if dist is None else dist
    n_workers = ctx.cpu_share() if (ctx.enabled and config.workers is None) else _resolve_workers(config.workers)
    plan = _plan(index, run, config)
    estimate = _check_resources(plan, config, n_workers)
    loop = _execute(plan, ctx, out, config, n_workers, run.progress)
    tally = _tally(plan, loop)
    _apply_rejects(plan, tally)
    timing = _timing(loop, time.perf_counter() - t_start, n_workers, ctx.world_size)
    if estimate is not None:
        timing["estimate"] = estimate
    plan.base.data["info"]["prepare"] = _report(plan, loop, tally, config.filters, timing)
    _write(plan.base, plan, loop, ctx, out, config)
    return plan.base


# ==============================================================================================================
# Reporting
# ==============================================================================================================


def _filter_lines(report: Mapping[str, Any]) -> list[str]:
    settings = report.get("settings") or {}
    enabled = report.get("filters_enabled")
    if enabled is None:
        return []
    tiling = settings.get("tiling")
    named = [f"bgt_margin (tiling={tiling})" if n == "bgt_margin" and tiling else n for n in enabled]
    return ["selection filters: " + (", ".join(named) + " (applied to every image, existing masks "
                                     "included)" if named else "off")]


def _reject_lines(report: Mapping[str, Any]) -> list[str]:
    rej = report.get("rejects") or {}
    filtered = report.get("filtered") or {}  # None: a report written before the per-filter counts existed
    other = {k: v for k, v in rej.items() if k not in filtered}
    lines = [f"rejected: {sum(rej.values())}"]
    if filtered:
        lines.append(f"  by the selection filters: {sum(filtered.values())}")
        for reason, n in sorted(filtered.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<26s} {n}")
        by_src = report.get("filtered_by_mask_source") or {}
        if by_src:
            lines.append("    by mask source: " + ", ".join(f"{src} {sum(c.values())}" for src, c in by_src.items()))
    if other:
        lines.append(f"  {'other (input, decode)' if filtered else 'by reason'}: {sum(other.values())}")
        for reason, n in sorted(other.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<26s} {n}")
    return lines


def _quality_lines(q: Mapping[str, Any] | None) -> list[str]:
    if not q or not q.get("n"):
        return []
    qs = q["quantiles"]
    lines = [
        f"GrabCut IoU vs previous masks: mean {q['mean']:.3f}, p05 {qs['p05']:.3f}, p25 {qs['p25']:.3f}, "
        f"median {qs['p50']:.3f}, p75 {qs['p75']:.3f}, p95 {qs['p95']:.3f} (n={q['n']}, failed {q['failed']}"
        + (f", dropped by the filters before GrabCut {q['filtered']}" if q.get("filtered") else "") + ")"
    ]
    counts = q["histogram"]["counts"]
    peak = max(counts) or 1
    edges = q["histogram"]["edges"]
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  [{lo:.1f}, {hi:.1f}) {n:6d} {'#' * int(round(30 * n / peak))}")
    lines.append(f"  {'class':<22s} {'n':>5s} {'mean':>6s} {'median':>6s} {'min':>6s} {'failed':>6s}")

    def fmt(v):
        return "   -  " if v is None else f"{v:6.3f}"

    for row in q["per_class"]:
        if row["n"] == 0 and row["failed"] == 0:
            continue
        lines.append(f"  {row['class']:<22s} {row['n']:5d} {fmt(row['mean'])} {fmt(row['median'])} "
                     f"{fmt(row['min'])} {row['failed']:6d}")
    return lines


def _timing_lines(t: Mapping[str, Any] | None) -> list[str]:
    if not t:
        return []
    ips = t.get("images_per_second")
    return [
        f"time: {t['seconds']:.1f} s with {t['workers']} worker(s)"
        + (f", {ips:.2f} GrabCut images/s" if ips else "")
        + (f", {t['resumed_from_journal']} results resumed from the journal" if t.get("resumed_from_journal")
           else "")
    ]


def format_prepare_summary(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of ``info['prepare']`` (counts per reason, IoU table, speed)."""
    lines = [
        f"images in: {report['input_images']}, kept: {report['kept']} "
        f"(GrabCut masks: {report['grabcut_masks']}, existing masks kept: {report['kept_existing_masks']})",
    ]
    if report.get("not_selected"):
        lines.append(f"not selected (beyond --per-class): {report['not_selected']}")
    lines += _filter_lines(report) + _reject_lines(report)
    if report.get("per_class_kept"):
        lines.append("kept per class: " + ", ".join(f"{k} {v}" for k, v in report["per_class_kept"].items()))
    lines += _quality_lines(report.get("quality")) + _timing_lines(report.get("timing"))
    return "\n".join(lines)


def _overlay(rgb: np.ndarray, mask: np.ndarray | None, colour=(255, 40, 40)) -> np.ndarray:
    if mask is None:
        return rgb
    out = rgb.astype(np.float32)
    m = mask.astype(bool)
    out[m] = 0.45 * out[m] + 0.55 * np.asarray(colour, np.float32)
    # darken the background so the mask's extent reads at a glance
    out[~m] *= 0.6
    return out.clip(0, 255).astype(np.uint8)


def _sheet_rows(results: Mapping[int, Mapping[str, Any]], count: int) -> tuple[list, str]:
    """``([(group, (image id, result)), ...], value label)``: the worst and the best GrabCut masks."""
    ok = [(i, r) for i, r in results.items() if r.get("status") == "mask"]
    with_iou = [(i, r) for i, r in ok if r.get("iou") is not None]
    if with_iou:
        key, label = (lambda t: (t[1]["iou"], t[0])), "IoU"
        pool = with_iou
    else:
        key, label = (lambda t: (t[1].get("fraction", 0.0), t[0])), "mask/box"
        pool = ok
    pool = sorted(pool, key=key)
    worst = pool[:count]
    best = pool[::-1][:count] if len(pool) > count else []
    best = [b for b in best if b[0] not in {w[0] for w in worst}]
    return [("worst", t) for t in worst] + [("best", t) for t in best], label


def _draw_row(sheet, draw, y: int, cell: int, header_h: int, rec, res: Mapping[str, Any], title: str) -> None:
    """One row of the contact sheet: the image with its box, the true mask, the GrabCut mask."""
    from PIL import Image  # Pillow: only for the contact sheet

    try:
        rgb = _read_rgb(rec.path, rec.width, rec.height)
    except _ImageReject:
        rgb = np.zeros((rec.height, rec.width, 3), np.uint8)
    gc = rle_decode(res["rle"])
    true = rec.mask() if rec.mask_rle is not None and res.get("iou") is not None else None
    s = cell / float(max(rec.height, rec.width))
    size = (max(1, int(round(rec.width * s))), max(1, int(round(rec.height * s))))
    panels = [Image.fromarray(rgb), Image.fromarray(_overlay(rgb, true, (40, 220, 40))) if true is not None
              else None, Image.fromarray(_overlay(rgb, gc))]
    draw.text((4, y), title, fill=(230, 230, 230))
    for k, p in enumerate(panels):
        x = 4 + k * (cell + 4)
        if p is None:
            draw.text((x + 4, y + header_h + cell // 2), "no true mask", fill=(150, 150, 150))
            continue
        sheet.paste(p.resize(size, Image.NEAREST), (x, y + header_h))
        if k == 0 and len(rec.boxes):
            b = rec.union_box
            draw.rectangle([x + b[0] * s, y + header_h + b[1] * s, x + (b[2] + 1) * s - 1,
                            y + header_h + (b[3] + 1) * s - 1], outline=(255, 220, 0))


def write_mask_sheet(
    path: str | os.PathLike,
    index: DatasetIndex,
    results: Mapping[int, Mapping[str, Any]],
    records: Mapping[int, Any] | None = None,
    count: int = 8,
    cell: int = 160,
) -> pathlib.Path:
    """Contact sheet PNG of the worst and best GrabCut masks of a prepare run.

    Rows: the ``count`` masks with the lowest IoU against the previous (true) mask, then the ``count`` with the
    highest; columns: the image with its box, the true mask, the GrabCut mask. Without true masks the rows are
    the masks covering the smallest and the largest fraction of their box, and the true-mask column is blank.

    Args:
        path: PNG file to write.
        index: the prepared index (its image root locates the files).
        results: worker results by image id (``status``, ``rle``, ``iou``, ``fraction``).
        records: :class:`~bgsynth.index.ImageRecord` by id from before the run (for the true masks and boxes);
            defaults to ``index``'s own records.
        count: rows per group.
        cell: height of a cell in pixels.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw  # Pillow: only for the contact sheet

    path = pathlib.Path(path)
    rows, label = _sheet_rows(results, count)
    if not rows:
        warnings.warn(f"write_mask_sheet: no GrabCut masks to show; writing an empty sheet to {path}", stacklevel=2)
    header_h = 18
    sheet = Image.new("RGB", (3 * cell + 4 * 4, header_h + max(1, len(rows)) * (cell + header_h + 4) + 4),
                      (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("image and box", "true mask (green)", "GrabCut mask (red)")):
        draw.text((4 + k * (cell + 4), 4), title, fill=(255, 220, 0))
    y = 4 + header_h
    for group, (image_id, res) in rows:
        rec = (records or {}).get(image_id) or index.record(image_id)
        value = res.get("iou") if res.get("iou") is not None else res.get("fraction", 0.0)
        title = f"{group}: image {image_id} ({index.label_space.classes[rec.label]}), {label} {value:.3f}"
        _draw_row(sheet, draw, y, cell, header_h, rec, res, title)
        y += cell + header_h + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
