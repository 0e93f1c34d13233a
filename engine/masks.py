"""Foreground masks from boxes: the paper's IN-9 selection filters and GrabCut, as a resumable parallel step.

This is the ``prepare`` stage of the engine (DESIGN.md): it takes a dataset index whose images carry boxes, drops
the images the paper's generation script would drop (PAPER.md, "How an image enters the set"), and fills in a
foreground mask for every survivor with GrabCut seeded by the box. The selection filters apply to every image,
whatever its mask source (none, released, synthetic, external, grabcut), unless they are switched off explicitly
(:meth:`SelectionFilters.off`, or one filter at a time).

Three layers, each usable on its own:

* :func:`grabcut_mask`: one image, one box -> mask (or ``None``), with the paper's acceptance rule and retries.
* :class:`SelectionFilters` and :func:`check_selection` / :func:`check_selection_many`: the paper's selection
  filters, evaluated in the model's crop geometry (:class:`~bgsynth.geometry.CropGeometry`), cheap and batched.
* :func:`prepare`: the whole step over an index, in a process pool, journaled so that a killed run resumes and
  ends with exactly the index an uninterrupted run writes.

Determinism: GrabCut's only randomness is OpenCV's RNG (the k-means initialisation of its colour models). Every
image gets its own seed, a pure function of ``(seed, image id)`` (:func:`image_seed`), and attempt ``k`` uses
``image_seed + k``, so results do not depend on the number of workers or on the order in which they finish.

>>> import numpy as np
>>> img = np.full((60, 80, 3), 30, np.uint8); img[20:40, 25:55] = (220, 40, 40)
>>> mask, attempts = grabcut_mask(img, (20, 15, 59, 44))
>>> int(mask[30, 40]), int(mask[5, 5]), attempts
(1, 0, 1)
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .classes import IN9_CLASSES, NUM_IN9
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes
from .geometry import CropGeometry, nearest_map
from .index import DatasetIndex, Reject, rle_decode, rle_encode

__all__ = [
    "TILINGS",
    "FILTER_REASONS",
    "SelectionFilters",
    "check_selection",
    "check_selection_many",
    "grabcut_mask",
    "image_seed",
    "mask_iou",
    "prepare",
    "journal_path",
    "format_prepare_summary",
    "write_mask_sheet",
]

_JOURNAL_FORMAT = "bgsynth-prepare-journal"
_JOURNAL_VERSION = 1
_IOU_BINS = 10
_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)


# ==============================================================================================================
# Selection filters (the paper's rules 2-5 plus "Only-BG-T possible")
# ==============================================================================================================

#: How Only-BG-T is built, which decides when an image has none (the ``bgt_margin`` filter). ``"paper"``: the strip
#: rule on the stored image's full-resolution margins (PAPER.md; the engine's default); ``"crop"``: the strip rule on
#: the crop-space box inside the crop (the faster approximation).
TILINGS = ("paper", "crop")

#: Reject reasons that come from a selection filter (counted in ``info.prepare.filtered``); every other reject
#: reason of :func:`prepare` is an always-on sanity check or bad input.
FILTER_REASONS = (
    Reject.MULTIPLE_OBJECTS,
    Reject.BOX_TOO_LARGE,
    Reject.BOX_OUTSIDE_CROP,
    Reject.NO_BGT_MARGIN,
    Reject.MASK_TOO_SMALL,
    Reject.GRABCUT_FAILED,
)


@dataclasses.dataclass(frozen=True)
class SelectionFilters:
    """The paper's selection filters; each is on by default and can be switched off on its own.

    :func:`prepare` applies them to every image, whatever its mask source.

    Args:
        single_object: drop images with more than one box (:attr:`Reject.MULTIPLE_OBJECTS`). When off, the union
            of the boxes (the paper's B) is used for every later rule and as GrabCut's rectangle.
        box_size: drop images whose box covers more than ``max_box_fraction`` of the crop
            (:attr:`Reject.BOX_TOO_LARGE`).
        box_inside: drop images with less than ``min_inside_fraction`` of the (resized) box inside the crop
            (:attr:`Reject.BOX_OUTSIDE_CROP`).
        bgt_margin: drop images whose box leaves no margin, so that no Only-BG-T exists
            (:attr:`Reject.NO_BGT_MARGIN`). With ``tiling="paper"`` (default) the margin is measured on the stored
            image at full resolution (the inclusive union box must not cover the whole image); with
            ``tiling="crop"`` on the crop-space box inside the crop.
        mask_size: the paper's GrabCut rule, applied by :func:`prepare` (it needs the mask): a GrabCut mask is
            accepted only when it covers at least ``min_fraction`` (10%) of the box, retried with new seeds, else
            :attr:`Reject.GRABCUT_FAILED`; an existing mask (released, synthetic, external, grabcut) must cover
            at least that fraction of the union box with its pixels inside the box, else
            :attr:`Reject.MASK_TOO_SMALL`. When off, GrabCut accepts its first non-empty mask and existing masks
            are not measured.
        max_box_fraction: threshold of ``box_size`` ("at most 90% of the crop": exactly 0.9 passes).
        min_inside_fraction: threshold of ``box_inside`` ("at least 50% inside": exactly 0.5 passes).

    >>> SelectionFilters().enabled()
    ('single_object', 'box_size', 'box_inside', 'bgt_margin', 'mask_size')
    >>> SelectionFilters.off().enabled()
    ()
    """

    single_object: bool = True
    box_size: bool = True
    box_inside: bool = True
    bgt_margin: bool = True
    mask_size: bool = True
    max_box_fraction: float = 0.9
    min_inside_fraction: float = 0.5

    NAMES = ("single_object", "box_size", "box_inside", "bgt_margin", "mask_size")

    def __post_init__(self):
        for name in ("max_box_fraction", "min_inside_fraction"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"SelectionFilters.{name}: expected a fraction in [0, 1], got {v!r}")

    @classmethod
    def off(cls) -> "SelectionFilters":
        """All filters switched off (only the always-on sanity checks remain)."""
        return cls(**{n: False for n in cls.NAMES})

    def enabled(self) -> tuple[str, ...]:
        """Names of the filters that are on, in the order they are applied."""
        return tuple(n for n in self.NAMES if getattr(self, n))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip inclusive boxes to the image; a box with nothing inside the image becomes empty (x1 < x0)."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4).copy()
    b[:, 0] = np.maximum(b[:, 0], 0)
    b[:, 1] = np.maximum(b[:, 1], 0)
    b[:, 2] = np.minimum(b[:, 2], width - 1)
    b[:, 3] = np.minimum(b[:, 3], height - 1)
    return b


def _check_tiling(tiling: str, where: str) -> str:
    if tiling not in TILINGS:
        raise ConfigError(f"{where}: expected tiling in {TILINGS}, got {tiling!r}")
    return tiling


def _pre_checks(
    boxes: np.ndarray, height: int, width: int, geometry: CropGeometry, filters: SelectionFilters
) -> tuple[tuple[str, str] | None, tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]:
    """Every rule except the (batched) Only-BG-T one: ``(reject or None, union box, crop-space box or None)``."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) == 0:
        return (Reject.NO_OBJECT, "no bounding box"), None, None
    if height <= 0 or width <= 0:
        return (Reject.BAD_ANNOTATION, f"image size {width}x{height} is not positive"), None, None
    clipped = _clip_boxes(boxes, height, width)
    empty = (clipped[:, 2] < clipped[:, 0]) | (clipped[:, 3] < clipped[:, 1])
    if empty.any():
        j = int(np.flatnonzero(empty)[0])
        return (
            Reject.BOX_OUTSIDE_IMAGE,
            f"box {tuple(int(v) for v in boxes[j])} has no pixel inside the {width}x{height} image",
        ), None, None
    if filters.single_object and len(clipped) > 1:
        return (Reject.MULTIPLE_OBJECTS, f"{len(clipped)} boxes"), None, None
    box = (int(clipped[:, 0].min()), int(clipped[:, 1].min()), int(clipped[:, 2].max()), int(clipped[:, 3].max()))
    plan = geometry.plan(height, width)
    if filters.box_size:
        frac = plan.box_crop_fraction(box)
        if frac > filters.max_box_fraction:
            return (
                Reject.BOX_TOO_LARGE,
                f"box covers {frac:.1%} of the crop (at most {filters.max_box_fraction:.0%} allowed)",
            ), None, None
    if filters.box_inside:
        frac = plan.box_inside_fraction(box)
        if frac < filters.min_inside_fraction:
            return (
                Reject.BOX_OUTSIDE_CROP,
                f"{frac:.1%} of the box lies inside the crop (at least {filters.min_inside_fraction:.0%} needed)",
            ), None, None
    return None, box, plan.box_to_crop(box)


def check_selection_many(
    items: Sequence[tuple[np.ndarray, int, int]],
    geometry: CropGeometry = CropGeometry(),
    filters: SelectionFilters = SelectionFilters(),
    tiling: str = "paper",
) -> list[tuple[str, str] | None]:
    """Apply the box-based selection filters to many images at once (the Only-BG-T rule runs batched).

    Always-on checks come first: an image without boxes is :attr:`Reject.NO_OBJECT`, a box with no pixel inside
    the image :attr:`Reject.BOX_OUTSIDE_IMAGE` (boxes that stick out are clipped to the image). Then the enabled
    filters in this order: single object, box size, box inside, Only-BG-T margin; the first failing rule names the
    reason. (``filters.mask_size`` needs the mask and is applied by :func:`prepare`.)

    Args:
        items: ``(boxes, height, width)`` per image; ``boxes`` is ``int [K, 4]`` inclusive ``(x0, y0, x1, y1)`` in
            the stored image's pixels.
        geometry: the model's crop geometry the rules are evaluated in.
        filters: which filters are on and their thresholds.
        tiling: which Only-BG-T the margin rule checks (:data:`TILINGS`). ``"paper"`` (default): the strip rule
            (:func:`bgsynth.geometry.tile_strips`) on the clipped union box in the stored image at full
            resolution, i.e. the image is dropped only when the inclusive union box covers the whole image.
            ``"crop"``: the strip rule on the crop-space box in the crop (a box with no pixel in the crop leaves
            the whole crop as margin).

    Returns:
        One entry per image: ``None`` if it passes, else ``(reason, detail)`` with ``reason`` from
        :class:`~bgsynth.index.Reject`.
    """
    _check_tiling(tiling, "check_selection_many")
    out: list[tuple[str, str] | None] = []
    need_margin: list[int] = []
    margin_boxes: list[tuple[int, int, int, int]] = []
    sizes: list[tuple[int, int]] = []
    for i, (boxes, height, width) in enumerate(items):
        reject, box, crop_box = _pre_checks(boxes, int(height), int(width), geometry, filters)
        out.append(reject)
        if reject is not None or not filters.bgt_margin:
            continue
        if tiling == "paper":
            need_margin.append(i)
            margin_boxes.append(box)
            sizes.append((int(height), int(width)))
        elif crop_box is not None:
            # A box with no pixel in the crop leaves the whole crop as margin: Only-BG-T is the crop itself.
            need_margin.append(i)
            margin_boxes.append(crop_box)
            sizes.append((geometry.crop, geometry.crop))
    if need_margin:
        import torch

        from .geometry import tile_strips

        boxes_t = torch.as_tensor(margin_boxes, dtype=torch.int64)
        if tiling == "paper":  # each image's own stored size
            hw = torch.as_tensor(sizes, dtype=torch.int64)
            strips = tile_strips(boxes_t, hw[:, 0], hw[:, 1])
        else:
            strips = tile_strips(boxes_t, geometry.crop, geometry.crop)
        no_margin = (strips[:, 2] <= 0).tolist()
        for i, mb, (h, w), bad in zip(need_margin, margin_boxes, sizes, no_margin):
            if not bad:
                continue
            if tiling == "paper":
                out[i] = (
                    Reject.NO_BGT_MARGIN,
                    f"union box {mb} covers the whole {w}x{h} image: no margin for Only-BG-T (tiling='paper')",
                )
            else:
                out[i] = (
                    Reject.NO_BGT_MARGIN,
                    f"crop-space box {mb} leaves no margin in the {w}x{h} crop (tiling='crop')",
                )
    return out


def check_selection(
    boxes: np.ndarray | Sequence[Sequence[int]],
    height: int,
    width: int,
    geometry: CropGeometry = CropGeometry(),
    filters: SelectionFilters = SelectionFilters(),
    tiling: str = "paper",
) -> tuple[str, str] | None:
    """Apply the box-based selection filters to one image (see :func:`check_selection_many`).

    >>> check_selection([[0, 0, 499, 374]], 375, 500)[0]
    'box_too_large'
    >>> check_selection([[100, 80, 300, 250]], 375, 500) is None
    True
    """
    return check_selection_many([(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), height, width)], geometry,
                                filters, tiling)[0]


# ==============================================================================================================
# GrabCut
# ==============================================================================================================


def image_seed(seed: int, image_id: int) -> int:
    """GrabCut seed of one image: a pure function of ``(seed, image_id)`` in ``[0, 2**30)``.

    Attempt ``k`` of the image seeds OpenCV's RNG with ``image_seed(seed, image_id) + k``.
    """
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(image_id) & 0xFFFFFFFFFFFF]).generate_state(1)[0]
               & 0x3FFFFFFF)


def _scaled_interval(lo: int, hi: int, scale: float, size: int) -> tuple[int, int]:
    """Inclusive pixel interval ``lo..hi`` -> the pixels of a grid scaled by ``scale`` that it overlaps."""
    a = int(math.floor(lo * scale))
    b = int(math.ceil((hi + 1) * scale)) - 1
    a = min(max(a, 0), size - 1)
    b = min(max(b, a), size - 1)
    return a, b


def grabcut_mask(
    image_rgb: np.ndarray,
    box: Sequence[int],
    iterations: int = 5,
    attempts: int = 10,
    min_fraction: float = 0.10,
    max_side: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray | None, int]:
    """GrabCut foreground mask of the object in ``box``, with the paper's acceptance rule.

    ``cv2.grabCut`` is initialised with the box as its rectangle (``GC_INIT_WITH_RECT``) and run for
    ``iterations``; the mask is definite + probable foreground. It is accepted when it covers at least
    ``min_fraction`` of the box area; otherwise GrabCut is run again with the next seed, up to ``attempts`` times.

    Args:
        image_rgb: ``uint8 [H, W, 3]`` image (GrabCut's colour models do not depend on the channel order).
        box: inclusive ``(x0, y0, x1, y1)`` inside the image; OpenCV's rectangle is ``(x0, y0, x1-x0+1, y1-y0+1)``.
        iterations: GrabCut iterations per attempt (the paper: 5).
        attempts: how many seeds to try before giving up (the paper: 10).
        min_fraction: acceptance threshold on mask area / box area (the paper: 0.10).
        max_side: when set and the image's longer side exceeds it, GrabCut runs on a copy downscaled (area
            interpolation) so that the longer side is ``max_side``, with the box scaled to the pixels it overlaps;
            the mask is brought back with nearest neighbour (:func:`bgsynth.geometry.nearest_map`) and limited to the
            box, and the acceptance rule is applied at full size.
        seed: attempt ``k`` calls ``cv2.setRNGSeed(seed + k)``.

    Returns:
        ``(mask, attempts_used)``: ``uint8 [H, W]`` 0/1 mask, or ``None`` if no attempt was accepted (or OpenCV
        refused the input, e.g. a box so small or so large that one of its colour models has no samples).

    Raises:
        ConfigError: the image is not ``uint8 [H, W, 3]``, the box is not inside the image or is inverted, or an
            argument is out of range.

    .. note:: GrabCut is the cost of this step (roughly 0.1-0.2 s per ImageNet-sized image); ``max_side`` trades
       mask detail for speed (see ``benchmarks/bench_prepare.py``).
    """
    import cv2

    img = np.asarray(image_rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ConfigError(f"grabcut_mask: expected a uint8 [H, W, 3] image, got {img.dtype} {tuple(img.shape)}")
    height, width = img.shape[:2]
    if len(box) != 4:
        raise ConfigError(f"grabcut_mask: expected an inclusive box (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
        raise ConfigError(f"grabcut_mask: expected a box inside the {width}x{height} image, got {(x0, y0, x1, y1)}")
    if int(iterations) < 1 or int(attempts) < 1:
        raise ConfigError(f"grabcut_mask: expected iterations >= 1 and attempts >= 1, got {iterations}, {attempts}")
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ConfigError(f"grabcut_mask: expected min_fraction in [0, 1], got {min_fraction}")
    if max_side is not None and int(max_side) < 8:
        raise ConfigError(f"grabcut_mask: expected max_side >= 8 or None, got {max_side}")

    work, wbox = img, (x0, y0, x1, y1)
    scaled = max_side is not None and max(height, width) > int(max_side)
    if scaled:
        s = int(max_side) / float(max(height, width))
        sw, sh = max(1, int(round(width * s))), max(1, int(round(height * s)))
        work = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
        ax0, ax1 = _scaled_interval(x0, x1, sw / width, sw)
        ay0, ay1 = _scaled_interval(y0, y1, sh / height, sh)
        wbox = (ax0, ay0, ax1, ay1)
    work = np.ascontiguousarray(work)
    rect = (wbox[0], wbox[1], wbox[2] - wbox[0] + 1, wbox[3] - wbox[1] + 1)
    box_area = (x1 - x0 + 1) * (y1 - y0 + 1)
    need = float(min_fraction) * box_area

    for attempt in range(int(attempts)):
        cv2.setRNGSeed(int(seed) + attempt)
        gc = np.zeros(work.shape[:2], np.uint8)
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        try:
            out = cv2.grabCut(work, gc, rect, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_RECT)
        except cv2.error:
            # OpenCV refuses e.g. a rectangle that leaves no background or has fewer pixels than GMM components:
            # deterministic for the input, so another seed would not help.
            return None, attempt + 1
        gc = out[0] if isinstance(out, tuple) and out and isinstance(out[0], np.ndarray) else gc
        fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.uint8)
        if scaled:
            fg = fg[np.ix_(nearest_map(fg.shape[0], height), nearest_map(fg.shape[1], width))]
            limited = np.zeros_like(fg)
            limited[y0 : y1 + 1, x0 : x1 + 1] = fg[y0 : y1 + 1, x0 : x1 + 1]
            fg = limited
        if float(fg.sum()) >= need and fg.any():
            return np.ascontiguousarray(fg), attempt + 1
    return None, int(attempts)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks of the same shape (1.0 when both are empty)."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise ConfigError(f"mask_iou: expected masks of the same shape, got {a.shape} and {b.shape}")
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / float(union)


# ==============================================================================================================
# Worker: one image from disk to an RLE (runs in the process pool; only small dicts cross process boundaries)
# ==============================================================================================================


class _ImageReject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _read_rgb(path: str, width: int, height: int) -> np.ndarray:
    """Decode an image file to ``uint8 [H, W, 3]`` RGB at its stored size, or raise :class:`_ImageReject`.

    The file is classified by the decode pipeline's header probe (:func:`bgsynth.probe.probe_image`:
    zero-byte, truncated, unreadable), so prepare and decode reject the same files for the same reasons.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    from .probe import SampleError, probe_image

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
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = Reject.TRUNCATED if "truncated" in msg.lower() else Reject.DECODE_FAILED
        raise _ImageReject(reason, f"{path}: {msg}") from None
    if rgb.shape[:2] != (height, width):
        raise _ImageReject(
            Reject.SIZE_MISMATCH,
            f"{path}: index says {width}x{height}, PIL decoded {rgb.shape[1]}x{rgb.shape[0]}",
        )
    return np.ascontiguousarray(rgb)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core; OpenCV's own thread pool would only oversubscribe


def _grabcut_task(task: Mapping[str, Any]) -> dict:
    """Process one image: decode, GrabCut with retries, encode. Never raises for bad input."""
    image_id = int(task["id"])
    res: dict[str, Any] = {"id": image_id}
    try:
        img = _read_rgb(task["path"], int(task["width"]), int(task["height"]))
        mask, used = grabcut_mask(
            img,
            task["box"],
            iterations=task["iterations"],
            attempts=task["attempts"],
            min_fraction=task["min_fraction"],
            max_side=task["max_side"],
            seed=task["seed"],
        )
        del img
        res["attempts"] = int(used)
        if mask is None:
            res.update(status="reject", reason=Reject.GRABCUT_FAILED,
                       detail=f"image {image_id}: no GrabCut mask covered {task['min_fraction']:.0%} of the box "
                              f"in {used} attempt(s)")
            return res
        box_area = (task["box"][2] - task["box"][0] + 1) * (task["box"][3] - task["box"][1] + 1)
        res.update(status="mask", rle=rle_encode(mask), fraction=round(float(mask.sum()) / box_area, 6))
        if task.get("true_rle") is not None:
            true = rle_decode(task["true_rle"])
            res["iou"] = mask_iou(mask, true) if true.shape == mask.shape else None
    except _ImageReject as e:
        res.update(status="reject", reason=e.reason, detail=f"image {image_id}: {e.detail}")
    except Exception as e:  # noqa: BLE001 - one bad image must never end a long run; recorded with its message
        res.update(status="reject", reason=Reject.DECODE_FAILED,
                   detail=f"image {image_id}: {type(e).__name__}: {e}")
    return res


# ==============================================================================================================
# Journal (append-only JSONL next to the output index)
# ==============================================================================================================


def journal_path(out: str | os.PathLike) -> pathlib.Path:
    """The journal file of a prepare run writing ``out``: ``<out>.journal.jsonl`` in the same folder."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".journal.jsonl")


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

    def _load(self, header: dict) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a killed run: drop it so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        lines = data.splitlines()
        if not lines:
            raise CheckpointError(f"{self.path}: journal has no header line; delete it to start over")
        try:
            found = json.loads(lines[0])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: journal header is not JSON ({e}); delete it to start over") from e
        if found != header:
            diff = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
            raise CheckpointError(
                f"{self.path}: journal was written by a run with different settings or input (differs in {diff}); "
                f"run with the same arguments, or delete the journal to start over"
            )
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


# ==============================================================================================================
# prepare
# ==============================================================================================================


@dataclasses.dataclass
class _Item:
    """One image in processing order: kept as is, rejected by a filter, or a GrabCut task."""

    id: int
    label: int
    kind: str  # "keep" | "reject" | "grabcut"
    reject: tuple[str, str] | None = None
    task: dict | None = None


def _existing_mask_check(record, min_fraction: float) -> tuple[str, str] | None:
    """The mask-size rule for an image that keeps its existing mask: the mask's pixels inside the (clipped) union
    box must cover at least ``min_fraction`` of the box area (GrabCut's acceptance rule, PAPER.md rule 5)."""
    from .errors import IndexFormatError

    try:
        mask = record.mask()
    except IndexFormatError as e:
        return Reject.MASK_SHAPE, str(e)
    b = _clip_boxes(record.boxes, record.height, record.width)
    x0, y0, x1, y1 = int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    inside = int(np.count_nonzero(mask[y0 : y1 + 1, x0 : x1 + 1]))
    if inside == 0 or inside < min_fraction * area:
        return (
            Reject.MASK_TOO_SMALL,
            f"the existing {record.mask_source} mask covers {inside / area:.1%} of the box {(x0, y0, x1, y1)} "
            f"({inside} of {area} pixels; at least {min_fraction:.0%} needed)",
        )
    return None


def _fingerprint(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _pool_context():
    """Start method of the GrabCut pool.

    Not ``fork``: a process that has already used OpenCV's thread pool (any cv2 call in the parent) leaves its
    locks in an undefined state in a forked child, and the child hangs in its first parallel OpenCV call. The
    ``forkserver`` forks workers from a clean server process that has imported this module once (fast starts);
    ``spawn`` where there is no forkserver.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # effective only before the server starts; harmless after
        return ctx
    return multiprocessing.get_context("spawn")


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if int(workers) < 1:
        raise ConfigError(f"prepare: expected workers >= 1 or None (all cores), got {workers}")
    return int(workers)


def _quality(ious: Sequence[tuple[int, int, float]], failed_per_class: Mapping[int, int]) -> dict | None:
    """IoU summary over ``(image_id, label, iou)`` triples (sorted by id for a stable float sum)."""
    if not ious and not failed_per_class:
        return None
    ious = sorted(ious)
    v = np.asarray([t[2] for t in ious], np.float64)
    edges = np.linspace(0.0, 1.0, _IOU_BINS + 1)
    per_class = []
    for c in range(NUM_IN9):
        vc = np.asarray([t[2] for t in ious if t[1] == c], np.float64)
        per_class.append({
            "class": IN9_CLASSES[c],
            "n": int(len(vc)),
            "failed": int(failed_per_class.get(c, 0)),
            "mean": None if len(vc) == 0 else round(float(vc.mean()), 6),
            "median": None if len(vc) == 0 else round(float(np.median(vc)), 6),
            "min": None if len(vc) == 0 else round(float(vc.min()), 6),
        })
    return {
        "n": int(len(v)),
        "failed": int(sum(failed_per_class.values())),
        "mean": None if len(v) == 0 else round(float(v.mean()), 6),
        "quantiles": {} if len(v) == 0 else {
            f"p{int(round(q * 100)):02d}": round(float(np.quantile(v, q)), 6) for q in _QUANTILES
        },
        "below": {f"{t:.1f}": int((v < t).sum()) for t in (0.5, 0.7, 0.9)},
        "histogram": {
            "edges": [round(float(e), 2) for e in edges],
            "counts": np.histogram(v, bins=edges)[0].astype(int).tolist(),
        },
        "per_class": per_class,
    }


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


def _prepare_ranks(
    ctx,
    items: Mapping[int, "_Item"],
    queues: Mapping[int, collections.deque],
    cap: int | None,
    out: str | os.PathLike | None,
    header: dict,
    resume: bool,
    checkpoint_every: int,
    n_workers: int,
    progress: bool,
) -> tuple[dict[int, dict], set[int]]:
    """The GrabCut results a distributed :func:`prepare` needs, computed by the ranks together.

    Each rank runs GrabCut on its share (:func:`bgsynth.distributed.shard_ids`) of the images whose result is
    needed, journaling to its own file (:func:`_rank_journal_path`); the results are gathered on every rank.
    Without ``per_class`` that is every GrabCut item. With ``per_class`` (a cap per class) the work goes in waves:
    per class, the items of its queue that a single process would reach if every unknown result were a success
    (the minimal prefix with ``cap`` survivors); a wave computes them, and the next wave tops up the classes where
    some failed. The single-process loop then replays on the gathered results, so the index is identical.

    Returns:
        ``(results, resumed)``: image id -> worker result, and the ids whose result came from a journal.
    """
    journal = None
    if out is not None:
        journal = _Journal(_rank_journal_path(out, ctx.rank), header, resume, checkpoint_every)
    results: dict[int, dict] = {}
    resumed: set[int] = set()
    executor = None
    bar = None
    try:
        # what every rank already journaled; rank 0 also reads the journals of ranks beyond this world (a rerun
        # with fewer ranks loses nothing)
        mine = dict(journal.results) if journal is not None else {}
        if resume and out is not None and ctx.is_main:
            for extra in _orphan_journals(out, ctx.world_size):
                orphan = _Journal(extra, header, True, checkpoint_every)
                orphan.close()
                mine.update(orphan.results)
        for part in ctx.all_gather_object(mine):
            resumed.update(part)
            results.update(part)
        if n_workers > 1:
            executor = cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context(),
                                              initializer=_init_worker)
        if progress and ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"prepare ({ctx.world_size} ranks)", unit="img", dynamic_ncols=True, file=sys.stderr)

        def needed() -> list[int]:
            if cap is None:
                return sorted(i for i, it in items.items() if it.kind == "grabcut" and i not in results)
            want: list[int] = []
            for qu in queues.values():
                ok = 0
                unknown = 0
                for it in qu:
                    if ok + unknown >= cap:
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

        while True:
            want = needed()
            if not want:
                break
            mine = ctx.shard(want)
            fresh: dict[int, dict] = {}
            if executor is None:
                for i in mine:
                    fresh[i] = _grabcut_task(items[i].task)
                    if journal is not None:
                        journal.append(fresh[i])
                    if bar is not None:
                        bar.update(ctx.world_size)
            else:
                futures = {executor.submit(_grabcut_task, items[i].task): i for i in mine}
                try:
                    for fut in cf.as_completed(futures):
                        i = futures[fut]
                        try:
                            fresh[i] = fut.result()
                        except BrokenProcessPool as e:
                            raise CheckpointError(
                                f"prepare (rank {ctx.rank}): a worker process died while processing image {i} "
                                f"({items[i].task['path']}); finished images are journaled, rerun every rank with "
                                f"resume=True (--resume) to continue"
                            ) from e
                        if journal is not None:
                            journal.append(fresh[i])
                        if bar is not None:
                            bar.update(ctx.world_size)
                finally:
                    for fut in futures:
                        fut.cancel()
            if journal is not None:
                journal.sync()
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


def prepare(
    index: DatasetIndex | str | os.PathLike,
    out: str | os.PathLike | None = None,
    geometry: CropGeometry = CropGeometry(),
    filters: SelectionFilters = SelectionFilters(),
    recompute: bool = False,
    per_class: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    max_side: int | None = None,
    resume: bool = False,
    progress: bool = True,
    show: str | os.PathLike | None = None,
    *,
    split: str | Sequence[str] | None = None,
    iterations: int = 5,
    attempts: int = 10,
    min_fraction: float = 0.10,
    tiling: str = "paper",
    filter_existing: bool | None = None,
    checkpoint_every: int = 64,
    show_count: int = 8,
    dist=None,
) -> DatasetIndex:
    """Select images the way the paper did and give every survivor a GrabCut foreground mask.

    For every image of ``index`` (optionally restricted to ``split``):

    1. The selection filters run on **every** image, whatever its mask source (none, released, synthetic,
       external, grabcut), unless switched off in ``filters`` (:meth:`SelectionFilters.off` for all): the box
       rules (:func:`check_selection_many`, in the crop geometry, no decode; the Only-BG-T margin rule follows
       ``tiling``), then, for an image that keeps its existing mask, the mask-size rule (the mask's pixels inside
       the union box cover at least ``min_fraction`` of it, else :attr:`Reject.MASK_TOO_SMALL`).
    2. Surviving images that already carry a mask keep it, unless ``recompute`` (then their mask is replaced by
       GrabCut's, and on the built-in dataset the old one serves as ground truth for the quality report).
    3. The other survivors are decoded by the workers and run through :func:`grabcut_mask` with the seed
       :func:`image_seed` ``(seed, image id)``; an image that fails to decode, has the wrong size, or gets no
       accepted mask (the paper's 10% rule, part of ``filters.mask_size``) is rejected with its reason.

    With ``per_class=N`` the result is a balanced subset: the images of each class are visited in an order
    shuffled with ``(seed, class)`` and the first ``N`` that survive are kept, so a class ends with exactly ``N``
    images when it has enough; images after the ``N``-th survivor are neither processed nor listed as rejects
    (they are counted in ``info.skipped.not_selected``).

    Every dropped image is listed in the result's ``rejects`` (path, reason, detail) and counted per reason in
    ``info.prepare``: ``rejects`` (every reason), ``filtered`` (only the selection filters' reasons,
    :data:`FILTER_REASONS`) and ``filtered_by_mask_source`` (mask source before prepare, ``"none"`` without a
    mask -> reason -> count). ``info.prepare`` also holds the settings (``filters``, ``tiling``, ...), attempt
    counts, the mask-quality report (IoU against masks that were replaced, with ``recompute``) and, under
    ``timing``, the run's speed.

    Args:
        index: the input index (or the path of its JSON); it is not modified.
        out: where to write the resulting index. Needed for ``resume``: results are journaled to
            :func:`journal_path` ``(out)`` as they come in (flushed and fsynced every ``checkpoint_every``
            images), and the journal is deleted once the index is written.
        geometry: the model's crop geometry the filters are evaluated in.
        filters: which selection filters are on (all by default; they apply to every image).
        recompute: replace existing masks with GrabCut masks.
        per_class: keep at most N images per class (balanced subset, see above).
        seed: seed of GrabCut (per image, :func:`image_seed`) and of the per-class order.
        workers: processes for GrabCut; ``None`` uses every core, ``1`` runs in this process.
        max_side: GrabCut working resolution (see :func:`grabcut_mask`); ``None`` is full resolution.
        resume: continue an interrupted run from its journal (same input and settings required).
        progress: show a tqdm progress bar with ETA on stderr.
        show: write a contact sheet PNG of the worst and best masks there (:func:`write_mask_sheet`).
        split: only process images of this split (or these splits).
        iterations, attempts, min_fraction: GrabCut settings (the paper: 5, 10, 0.10); ``min_fraction`` is also
            the threshold of the mask-size rule for existing masks.
        tiling: the Only-BG-T construction the ``bgt_margin`` filter checks (:data:`TILINGS`): ``"paper"``
            (default; the union box must not cover the whole stored image) or ``"crop"`` (the crop-space box must
            leave a margin in the crop). Use the tiling the variants will be built with.
        filter_existing: removed. The filters now apply to images with existing masks by default;
            ``filter_existing=True`` only warns (:class:`FutureWarning`), ``False`` raises :class:`ConfigError`
            (switch filters off with ``filters`` instead).
        checkpoint_every: journal chunk size in images.
        show_count: rows of worst and of best masks on the contact sheet.
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`). Under
            ``torchrun`` every rank calls :func:`prepare` with the same arguments: each runs GrabCut on its share
            of the images (``workers`` defaults to its share of the node's cores) with its own journal
            (``<out>.journal.rank<R>.jsonl``; ``resume`` works when every rank restarts), the results are
            gathered, and every rank returns the same index, identical to a single-process run's; rank 0 alone
            writes ``out`` and ``show``.

    Returns:
        The resulting :class:`~bgsynth.index.DatasetIndex` (saved to ``out`` when given).

    Raises:
        ConfigError: an argument is out of range (e.g. ``resume`` without ``out``).
        CheckpointError: the journal to resume was written with other settings or another input, or a journal of
            an interrupted run exists and ``resume`` is False.

    .. note:: Worker processes are started with multiprocessing's ``forkserver`` (``spawn`` where there is none):
       a script that calls :func:`prepare` with ``workers > 1`` must do so under ``if __name__ == "__main__":``.
       ``fork`` is not used because a child forked after OpenCV's thread pool was used in the parent can hang.

    >>> idx = prepare("index.json", out="prepared.json", per_class=450, seed=0)  # doctest: +SKIP
    >>> idx.data["info"]["prepare"]["filtered"]                                # doctest: +SKIP
    {'box_too_large': 812, 'multiple_objects': 1403, ...}
    """
    t_start = time.perf_counter()
    if filter_existing is not None:
        if filter_existing:
            warnings.warn(
                "prepare(filter_existing=True) is deprecated and has no effect: the selection filters now apply to "
                "every image, existing masks included, by default",
                FutureWarning, stacklevel=2,
            )
        else:
            raise ConfigError(
                "prepare: filter_existing=False was removed: the selection filters apply to every image, existing "
                "masks included; to keep images they would drop, switch filters off with "
                "filters=SelectionFilters.off() (all) or SelectionFilters(<name>=False) (one)"
            )
    _check_tiling(tiling, "prepare")
    if not isinstance(index, DatasetIndex):
        index = DatasetIndex.load(index)
    if not isinstance(geometry, CropGeometry):
        raise ConfigError(f"prepare: expected a CropGeometry, got {type(geometry).__name__}")
    if not isinstance(filters, SelectionFilters):
        raise ConfigError(f"prepare: expected SelectionFilters, got {type(filters).__name__}")
    if per_class is not None and int(per_class) < 1:
        raise ConfigError(f"prepare: expected per_class >= 1 or None, got {per_class}")
    if max_side is not None and int(max_side) < 8:
        raise ConfigError(f"prepare: expected max_side >= 8 or None, got {max_side}")
    if int(iterations) < 1 or int(attempts) < 1:
        raise ConfigError(f"prepare: expected iterations >= 1 and attempts >= 1, got {iterations}, {attempts}")
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ConfigError(f"prepare: expected min_fraction in [0, 1], got {min_fraction}")
    if resume and out is None:
        raise ConfigError("prepare: resume=True needs out= (the journal lives next to the output index)")
    from .distributed import current

    ctx = current() if dist is None else dist
    n_workers = ctx.cpu_share() if (ctx.enabled and workers is None) else _resolve_workers(workers)
    max_side = None if max_side is None else int(max_side)

    base = index.select(split=split) if split is not None else index.copy()
    settings = {
        "geometry": geometry.to_dict(),
        "filters": filters.to_dict(),
        "tiling": tiling,
        "recompute": bool(recompute),
        "per_class": None if per_class is None else int(per_class),
        "seed": int(seed),
        "split": split if split is None or isinstance(split, str) else list(split),
        "iterations": int(iterations),
        "attempts": int(attempts),
        "min_fraction": float(min_fraction),
        "max_side": max_side,
    }

    # ---------------------------------------------------------------- plan: filters first (cheap, no decode)
    records = {i: base.record(i) for i in base.ids}
    source_of = {i: r.mask_source or "none" for i, r in records.items()}
    verdicts = dict(zip(
        records,
        check_selection_many([(r.boxes, r.height, r.width) for r in records.values()], geometry, filters, tiling),
    ))
    items: dict[int, _Item] = {}
    for i, r in records.items():
        verdict = verdicts[i]
        if verdict is None and r.mask_rle is not None and not recompute and filters.mask_size:
            verdict = _existing_mask_check(r, float(min_fraction))
        if verdict is not None:
            items[i] = _Item(i, r.label, "reject", reject=verdict)
        elif r.mask_rle is not None and not recompute:
            items[i] = _Item(i, r.label, "keep")
        else:
            clipped = _clip_boxes(r.boxes, r.height, r.width)
            box = [int(clipped[:, 0].min()), int(clipped[:, 1].min()), int(clipped[:, 2].max()),
                   int(clipped[:, 3].max())]
            items[i] = _Item(i, r.label, "grabcut", task={
                "id": i, "path": r.path, "width": r.width, "height": r.height, "box": box,
                "seed": image_seed(seed, i), "iterations": int(iterations), "attempts": int(attempts),
                # the mask-size filter switched off: GrabCut's first non-empty mask is accepted
                "min_fraction": float(min_fraction) if filters.mask_size else 0.0, "max_side": max_side,
                "true_rle": r.mask_rle if recompute else None,
            })

    # processing order: by id, or per class in a (seed, class)-shuffled order for a balanced subset
    queues: dict[int, collections.deque] = {}
    if per_class is None:
        queues[-1] = collections.deque(items[i] for i in sorted(items))
    else:
        by_class: dict[int, list[int]] = collections.defaultdict(list)
        for i in sorted(items):
            by_class[items[i].label].append(i)
        for c, members in sorted(by_class.items()):
            order = np.random.default_rng([int(seed), int(c)]).permutation(len(members))
            queues[c] = collections.deque(items[members[j]] for j in order)

    header = {
        "format": _JOURNAL_FORMAT,
        "version": _JOURNAL_VERSION,
        "settings": settings,
        "input": _fingerprint(
            (it.id, it.kind, it.task and {k: v for k, v in it.task.items() if k != "true_rle"},
             it.task and it.task["true_rle"] is not None)
            for it in (items[i] for i in sorted(items))
        ),
    }
    rank_resumed = None
    if ctx.enabled:
        # the ranks compute every result the loop below will ask for; the loop then only replays them
        cached, rank_resumed = _prepare_ranks(ctx, items, queues, None if per_class is None else int(per_class), out,
                                              header, resume, checkpoint_every, n_workers, progress)
        journal = None
        progress = False
    else:
        journal = _Journal(journal_path(out), header, resume, checkpoint_every) if out is not None else None
        cached = journal.results if journal is not None else {}
    n_resumed = 0

    # ---------------------------------------------------------------- run
    results: dict[int, dict] = {}  # image id -> worker result (grabcut items only)
    processed: list[_Item] = []
    accepted: collections.Counter = collections.Counter()
    pending: collections.Counter = collections.Counter()
    cap = None if per_class is None else int(per_class)
    window = max(4, 4 * n_workers)

    def can_take(q: int) -> bool:
        return cap is None or accepted[q] + pending[q] < cap

    est = sum(1 for it in items.values() if it.kind == "grabcut")
    if cap is not None:
        est = sum(min(cap, sum(1 for it in qu if it.kind != "reject")) for qu in queues.values())
    bar = None
    executor = None
    in_flight: dict[cf.Future, tuple[int, _Item]] = {}
    try:
        if n_workers > 1:
            executor = cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=_pool_context(),
                                              initializer=_init_worker)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=est, desc="prepare", unit="img", dynamic_ncols=True, file=sys.stderr)

        def resolve(q: int, item: _Item, res: dict, fresh: bool) -> None:
            results[item.id] = res
            pending[q] -= 1
            if res.get("status") == "mask":
                accepted[q] += 1
            if fresh and journal is not None:
                journal.append(res)
            if bar is not None:
                bar.update(1)

        while True:
            # fill the window, round-robin over the queues so every class progresses
            took = True
            while took and len(in_flight) < window:
                took = False
                for q, qu in queues.items():
                    if not qu or not can_take(q):
                        continue
                    item = qu.popleft()
                    took = True
                    processed.append(item)
                    if item.kind == "reject":
                        continue
                    if item.kind == "keep":
                        accepted[q] += 1
                        continue
                    pending[q] += 1
                    if item.id in cached:
                        n_resumed += 1
                        resolve(q, item, cached[item.id], fresh=False)
                    elif executor is None:
                        resolve(q, item, _grabcut_task(item.task), fresh=True)
                    else:
                        in_flight[executor.submit(_grabcut_task, item.task)] = (q, item)
                    if len(in_flight) >= window:
                        break
            if not in_flight:
                if not any(qu and can_take(q) for q, qu in queues.items()):
                    break
                continue
            done, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: in_flight[f][1].id):
                q, item = in_flight.pop(fut)
                try:
                    res = fut.result()
                except BrokenProcessPool as e:
                    raise CheckpointError(
                        f"prepare: a worker process died while processing image {item.id} ({item.task['path']}); "
                        f"finished images are journaled, rerun with resume=True (--resume) to continue. (Workers "
                        f"start with multiprocessing's forkserver: a script that calls prepare() must guard the "
                        f"call with `if __name__ == '__main__':`, or the workers fail on start.)"
                    ) from e
                resolve(q, item, res, fresh=True)
    finally:
        if bar is not None:
            bar.close()
        if executor is not None:
            for f in in_flight:
                f.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
        if journal is not None:
            journal.close()

    # ---------------------------------------------------------------- assemble the result (order-independent)
    result = base
    processed_ids = {it.id for it in processed}
    rejected: list[tuple[int, str, str]] = []
    ious: list[tuple[int, int, float]] = []
    failed_per_class: collections.Counter = collections.Counter()
    attempts_hist: collections.Counter = collections.Counter()
    kept_existing = 0
    gc_masks = 0
    for it in sorted(processed, key=lambda t: t.id):
        if it.kind == "reject":
            rejected.append((it.id, *it.reject))
        elif it.kind == "keep":
            kept_existing += 1
        else:
            res = results[it.id]
            if res.get("status") == "mask":
                result.set_mask(it.id, res["rle"], "grabcut")
                gc_masks += 1
                attempts_hist[int(res.get("attempts", 1))] += 1
                if res.get("iou") is not None:
                    ious.append((it.id, it.label, float(res["iou"])))
            else:
                rejected.append((it.id, res.get("reason", Reject.DECODE_FAILED), res.get("detail", "")))
                if res.get("reason") == Reject.GRABCUT_FAILED:
                    attempts_hist["failed"] += 1
                    if it.task.get("true_rle") is not None:
                        failed_per_class[it.label] += 1
    not_selected = [i for i in items if i not in processed_ids]
    for image_id, reason, detail in rejected:
        r = records[image_id]
        detail = detail if detail.startswith(f"image {image_id}") else f"image {image_id}: {detail}"
        result.add_reject(r.path, reason, detail)
    result.remove_images([t[0] for t in rejected] + not_selected)
    if not_selected:
        result.count_skipped("not_selected", len(not_selected))

    if rank_resumed is not None:  # only what came from the ranks' journals, not every gathered result
        n_resumed = sum(1 for it in processed if it.kind == "grabcut" and it.id in rank_resumed)
    reject_counts = collections.Counter(t[1] for t in rejected)
    filtered = collections.Counter(t[1] for t in rejected if t[1] in FILTER_REASONS)
    filtered_by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for image_id, reason, _detail in rejected:
        if reason in FILTER_REASONS:
            filtered_by_source[source_of[image_id]][reason] += 1
    quality = _quality(ious, failed_per_class)
    if quality is not None:
        # images whose true mask is known but that a selection filter dropped before GrabCut (not in the IoUs)
        quality["filtered"] = sum(1 for image_id, reason, _d in rejected
                                  if reason in FILTER_REASONS and reason != Reject.GRABCUT_FAILED
                                  and records[image_id].mask_rle is not None)
    elapsed = time.perf_counter() - t_start
    n_gc = sum(1 for it in processed if it.kind == "grabcut")
    report = {
        "settings": settings,
        "input_images": len(records),
        "processed": len(processed),
        "kept": len(result),
        "grabcut_masks": gc_masks,
        "kept_existing_masks": kept_existing,
        "not_selected": len(not_selected),
        "rejects": dict(sorted(reject_counts.items())),
        "filters_enabled": list(filters.enabled()),
        "filtered": dict(sorted(filtered.items())),
        "filtered_by_mask_source": {src: dict(sorted(c.items())) for src, c in sorted(filtered_by_source.items())},
        "per_class_kept": {IN9_CLASSES[c]: int(n) for c, n in
                           sorted(collections.Counter(result.labels()).items())},
        "attempts": {str(k): int(v) for k, v in sorted(attempts_hist.items(),
                                                        key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(4)))},
        "quality": quality,
        "timing": {
            "seconds": round(elapsed, 3),
            "workers": n_workers,
            "grabcut_images": n_gc,
            "resumed_from_journal": n_resumed,
            "images_per_second": round((n_gc - n_resumed) / elapsed, 3) if elapsed > 0 else None,
            "ranks": int(ctx.world_size),
        },
    }
    result.data["info"]["prepare"] = report

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
    if show is not None and ctx.is_main:
        write_mask_sheet(show, result, results, records, count=show_count)
    return result


# ==============================================================================================================
# Reporting
# ==============================================================================================================


def format_prepare_summary(report: Mapping[str, Any]) -> str:
    """A short human-readable summary of ``info['prepare']`` (counts per reason, IoU table, speed)."""
    lines = [
        f"images in: {report['input_images']}, kept: {report['kept']} "
        f"(GrabCut masks: {report['grabcut_masks']}, existing masks kept: {report['kept_existing_masks']})",
    ]
    if report.get("not_selected"):
        lines.append(f"not selected (beyond --per-class): {report['not_selected']}")
    settings = report.get("settings") or {}
    enabled = report.get("filters_enabled")
    if enabled is not None:
        tiling = settings.get("tiling")
        named = [f"bgt_margin (tiling={tiling})" if n == "bgt_margin" and tiling else n for n in enabled]
        lines.append("selection filters: " + (", ".join(named) + " (applied to every image, existing masks "
                                                "included)" if named else "off"))
    rej = report.get("rejects") or {}
    filtered = report.get("filtered")
    if filtered is None:  # a report written before the per-filter counts existed
        filtered = {}
    other = {k: v for k, v in rej.items() if k not in filtered}
    lines.append(f"rejected: {sum(rej.values())}")
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
    if report.get("per_class_kept"):
        lines.append("kept per class: " + ", ".join(f"{k} {v}" for k, v in report["per_class_kept"].items()))
    q = report.get("quality")
    if q and q.get("n"):
        qs = q["quantiles"]
        lines.append(
            f"GrabCut IoU vs previous masks: mean {q['mean']:.3f}, p05 {qs['p05']:.3f}, p25 {qs['p25']:.3f}, "
            f"median {qs['p50']:.3f}, p75 {qs['p75']:.3f}, p95 {qs['p95']:.3f} (n={q['n']}, failed {q['failed']}"
            + (f", dropped by the filters before GrabCut {q['filtered']}" if q.get("filtered") else "") + ")"
        )
        counts = q["histogram"]["counts"]
        peak = max(counts) or 1
        edges = q["histogram"]["edges"]
        for lo, hi, n in zip(edges[:-1], edges[1:], counts):
            lines.append(f"  [{lo:.1f}, {hi:.1f}) {n:6d} {'#' * int(round(30 * n / peak))}")
        lines.append(f"  {'class':<22s} {'n':>5s} {'mean':>6s} {'median':>6s} {'min':>6s} {'failed':>6s}")
        for row in q["per_class"]:
            if row["n"] == 0 and row["failed"] == 0:
                continue
            fmt = (lambda v: "   -  " if v is None else f"{v:6.3f}")
            lines.append(f"  {row['class']:<22s} {row['n']:5d} {fmt(row['mean'])} {fmt(row['median'])} "
                         f"{fmt(row['min'])} {row['failed']:6d}")
    t = report.get("timing") or {}
    if t:
        ips = t.get("images_per_second")
        lines.append(
            f"time: {t['seconds']:.1f} s with {t['workers']} worker(s)"
            + (f", {ips:.2f} GrabCut images/s" if ips else "")
            + (f", {t['resumed_from_journal']} results resumed from the journal" if t.get("resumed_from_journal")
               else "")
        )
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
    from PIL import Image, ImageDraw

    path = pathlib.Path(path)
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
    rows = [("worst", t) for t in worst] + [("best", t) for t in best]
    if not rows:
        warnings.warn(f"write_mask_sheet: no GrabCut masks to show; writing an empty sheet to {path}", stacklevel=2)
    header_h = 18
    width = 3 * cell + 4 * 4
    sheet = Image.new("RGB", (width, header_h + max(1, len(rows)) * (cell + header_h + 4) + 4), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(("image and box", "true mask (green)", "GrabCut mask (red)")):
        draw.text((4 + k * (cell + 4), 4), title, fill=(255, 220, 0))
    y = 4 + header_h
    for group, (image_id, res) in rows:
        rec = (records or {}).get(image_id) or index.record(image_id)
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
        value = res.get("iou") if res.get("iou") is not None else res.get("fraction", 0.0)
        draw.text((4, y), f"{group}: image {image_id} ({IN9_CLASSES[rec.label]}), {label} {value:.3f}",
                  fill=(230, 230, 230))
        for k, p in enumerate(panels):
            x = 4 + k * (cell + 4)
            if p is None:
                draw.text((x + 4, y + header_h + cell // 2), "no true mask", fill=(150, 150, 150))
                continue
            p = p.resize(size, Image.NEAREST)
            sheet.paste(p, (x, y + header_h))
            if k == 0 and len(rec.boxes):
                b = rec.union_box
                draw.rectangle([x + b[0] * s, y + header_h + b[1] * s, x + (b[2] + 1) * s - 1,
                                y + header_h + (b[3] + 1) * s - 1], outline=(255, 220, 0))
        y += cell + header_h + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
