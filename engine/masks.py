"""Foreground masks from boxes: the paper's IN-9 selection filters, GrabCut on one image, mask quality.

The functional layer of the ``prepare`` stage (DESIGN.md; the job itself, with its process pool, journal and
ranks, is :func:`bgsynth.prepare.prepare`). Everything here is a pure function of arrays and index records:

* :class:`SelectionFilters` and :func:`check_selection` / :func:`check_selection_many`: the paper's selection
  filters (PAPER.md, "How an image enters the set"), evaluated in the model's crop geometry
  (:class:`~bgsynth.geometry.CropGeometry`), cheap and batched; :func:`check_existing_mask`: the mask-size rule
  for an image that keeps the mask it already carries.
* :func:`grabcut_mask`: one image, one box -> mask (or ``None``), with the paper's acceptance rule and retries;
  :func:`image_seed`: the seed of one image; :func:`grabcut_cost`: its memory and time from the pixel count,
  before any work (the prepare job's resource guard), and :func:`max_side_within` the working resolution that
  bounds them.
* :func:`mask_iou` and :func:`mask_quality`: how close GrabCut's masks come to known ones.

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

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import torch

from .classes import IN9_CLASSES
from .errors import ConfigError, IndexFormatError
from .geometry import CropGeometry, nearest_map, tile_strips
from .index import ImageRecord, Reject
from .types import TILINGS

__all__ = [
    "TILINGS",
    "FILTER_REASONS",
    "SelectionFilters",
    "check_selection",
    "check_selection_many",
    "check_existing_mask",
    "clip_boxes",
    "union_box",
    "grabcut_mask",
    "image_seed",
    "GrabCutCost",
    "grabcut_cost",
    "working_size",
    "max_side_within",
    "mask_iou",
    "mask_quality",
]

_IOU_BINS = 10
_QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)


# ==============================================================================================================
# Selection filters (the paper's rules 2-5 plus "Only-BG-T possible")
# ==============================================================================================================

#: Reject reasons that come from a selection filter (counted in ``info.prepare.filtered``); every other reject
#: reason of :func:`bgsynth.prepare.prepare` is an always-on sanity check or bad input. (:data:`TILINGS`: how
#: Only-BG-T is built, which decides when an image has none, the ``bgt_margin`` filter. ``"paper"``: the strip
#: rule on the stored image's full-resolution margins, PAPER.md, the engine's default; ``"crop"``: the strip rule
#: on the crop-space box inside the crop, the faster approximation.)
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

    :func:`bgsynth.prepare.prepare` applies them to every image, whatever its mask source.

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
        mask_size: the paper's GrabCut rule, applied by the prepare job (it needs the mask): a GrabCut mask is
            accepted only when it covers at least ``min_fraction`` (10%) of the box, retried with new seeds, else
            :attr:`Reject.GRABCUT_FAILED`; an existing mask (released, synthetic, external, grabcut) must cover
            at least that fraction of the union box with its pixels inside the box, else
            :attr:`Reject.MASK_TOO_SMALL` (:func:`check_existing_mask`). When off, GrabCut accepts its first
            non-empty mask and existing masks are not measured.
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


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip inclusive boxes to the image; a box with nothing inside the image becomes empty (x1 < x0).

    >>> clip_boxes(np.array([[-5, 2, 90, 30]]), 40, 80).tolist()
    [[0, 2, 79, 30]]
    """
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4).copy()
    b[:, 0] = np.maximum(b[:, 0], 0)
    b[:, 1] = np.maximum(b[:, 1], 0)
    b[:, 2] = np.minimum(b[:, 2], width - 1)
    b[:, 3] = np.minimum(b[:, 3], height - 1)
    return b


def union_box(boxes: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """The inclusive union of the boxes clipped to the image (the paper's B, GrabCut's rectangle).

    >>> union_box(np.array([[10, 5, 20, 15], [30, 0, 99, 8]]), 40, 80)
    (10, 0, 79, 15)
    """
    c = clip_boxes(boxes, height, width)
    return int(c[:, 0].min()), int(c[:, 1].min()), int(c[:, 2].max()), int(c[:, 3].max())


def _check_tiling(tiling: str, where: str) -> str:
    if tiling not in TILINGS:
        raise ConfigError(f"{where}: expected tiling in {TILINGS}, got {tiling!r}")
    return tiling


def _sanity_reject(boxes: np.ndarray, height: int, width: int) -> tuple[str, str] | None:
    """The always-on checks: no box, a non-positive image size, a box with no pixel inside the image."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) == 0:
        return Reject.NO_OBJECT, "no bounding box"
    if height <= 0 or width <= 0:
        return Reject.BAD_ANNOTATION, f"image size {width}x{height} is not positive"
    clipped = clip_boxes(boxes, height, width)
    empty = (clipped[:, 2] < clipped[:, 0]) | (clipped[:, 3] < clipped[:, 1])
    if empty.any():
        j = int(np.flatnonzero(empty)[0])
        return (Reject.BOX_OUTSIDE_IMAGE,
                f"box {tuple(int(v) for v in boxes[j])} has no pixel inside the {width}x{height} image")
    return None


def _box_rejects(box: tuple[int, int, int, int], plan, filters: SelectionFilters) -> tuple[str, str] | None:
    """The box size and box inside filters on the union box, in the crop plan of its image."""
    if filters.box_size:
        frac = plan.box_crop_fraction(box)
        if frac > filters.max_box_fraction:
            return (Reject.BOX_TOO_LARGE,
                    f"box covers {frac:.1%} of the crop (at most {filters.max_box_fraction:.0%} allowed)")
    if filters.box_inside:
        frac = plan.box_inside_fraction(box)
        if frac < filters.min_inside_fraction:
            return (Reject.BOX_OUTSIDE_CROP,
                    f"{frac:.1%} of the box lies inside the crop (at least {filters.min_inside_fraction:.0%} needed)")
    return None


def _pre_checks(
    boxes: np.ndarray, height: int, width: int, geometry: CropGeometry, filters: SelectionFilters
) -> tuple[tuple[str, str] | None, tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]:
    """Every rule except the (batched) Only-BG-T one: ``(reject or None, union box, crop-space box or None)``."""
    boxes = np.asarray(boxes)
    reject = _sanity_reject(boxes, height, width)
    if reject is None and filters.single_object and len(boxes) > 1:
        reject = (Reject.MULTIPLE_OBJECTS, f"{len(boxes)} boxes")
    if reject is not None:
        return reject, None, None
    box = union_box(boxes, height, width)
    plan = geometry.plan(height, width)
    reject = _box_rejects(box, plan, filters)
    if reject is not None:
        return reject, None, None
    return None, box, plan.box_to_crop(box)


def _margin_rejects(boxes: list, sizes: list[tuple[int, int]], geometry: CropGeometry,
                    tiling: str) -> list[tuple[str, str] | None]:
    """The Only-BG-T margin rule (:func:`bgsynth.geometry.tile_strips`, batched) for boxes that passed the rest."""
    boxes_t = torch.as_tensor(boxes, dtype=torch.int64)
    if tiling == "paper":  # each image's own stored size
        hw = torch.as_tensor(sizes, dtype=torch.int64)
        strips = tile_strips(boxes_t, hw[:, 0], hw[:, 1])
    else:
        strips = tile_strips(boxes_t, geometry.crop, geometry.crop)
    out: list[tuple[str, str] | None] = []
    for mb, (h, w), bad in zip(boxes, sizes, (strips[:, 2] <= 0).tolist()):
        if not bad:
            out.append(None)
        elif tiling == "paper":
            out.append((Reject.NO_BGT_MARGIN,
                        f"union box {mb} covers the whole {w}x{h} image: no margin for Only-BG-T (tiling='paper')"))
        else:
            out.append((Reject.NO_BGT_MARGIN,
                        f"crop-space box {mb} leaves no margin in the {w}x{h} crop (tiling='crop')"))
    return out


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
    reason. (``filters.mask_size`` needs the mask: :func:`check_existing_mask`, or GrabCut's acceptance rule.)

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
        for i, reject in zip(need_margin, _margin_rejects(margin_boxes, sizes, geometry, tiling)):
            out[i] = reject
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


def check_existing_mask(record: ImageRecord, min_fraction: float) -> tuple[str, str] | None:
    """The mask-size rule for an image that keeps its existing mask (PAPER.md rule 5, GrabCut's acceptance rule).

    The mask's pixels inside the (clipped) union box must cover at least ``min_fraction`` of the box area.

    Returns:
        ``None`` when it passes, else ``(reason, detail)``: :attr:`Reject.MASK_TOO_SMALL`, or
        :attr:`Reject.MASK_SHAPE` when the stored mask does not fit the image.
    """
    try:
        mask = record.mask()
    except IndexFormatError as e:
        return Reject.MASK_SHAPE, str(e)
    x0, y0, x1, y1 = union_box(record.boxes, record.height, record.width)
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    inside = int(np.count_nonzero(mask[y0 : y1 + 1, x0 : x1 + 1]))
    if inside == 0 or inside < min_fraction * area:
        return (
            Reject.MASK_TOO_SMALL,
            f"the existing {record.mask_source} mask covers {inside / area:.1%} of the box {(x0, y0, x1, y1)} "
            f"({inside} of {area} pixels; at least {min_fraction:.0%} needed)",
        )
    return None


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


def _check_grabcut_args(img: np.ndarray, box: Sequence[int], iterations: int, attempts: int, min_fraction: float,
                        max_side: int | None) -> tuple[int, int, int, int]:
    """Validate :func:`grabcut_mask`'s arguments; returns the box as ints."""
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
    return x0, y0, x1, y1


def working_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """``(height, width)`` GrabCut works at: the image's, or scaled so that its longer side is ``max_side``.

    >>> working_size(375, 500, None), working_size(375, 500, 256), working_size(100, 80, 256)
    ((375, 500), (192, 256), (100, 80))
    """
    if max_side is None or max(height, width) <= int(max_side):
        return int(height), int(width)
    s = int(max_side) / float(max(height, width))
    return max(1, int(round(height * s))), max(1, int(round(width * s)))


def _working_copy(img: np.ndarray, box: tuple[int, int, int, int],
                  max_side: int | None) -> tuple[np.ndarray, tuple[int, int, int, int], bool]:
    """GrabCut's input: the image (downscaled so its longer side is ``max_side``, area interpolation) and the box
    scaled to the pixels it overlaps; ``(image, box, scaled)``."""
    import cv2  # OpenCV: only where GrabCut runs

    height, width = img.shape[:2]
    sh, sw = working_size(height, width, max_side)
    if (sh, sw) == (height, width):
        return np.ascontiguousarray(img), box, False
    x0, y0, x1, y1 = box
    work = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)
    ax0, ax1 = _scaled_interval(x0, x1, sw / width, sw)
    ay0, ay1 = _scaled_interval(y0, y1, sh / height, sh)
    return np.ascontiguousarray(work), (ax0, ay0, ax1, ay1), True


def _full_size_mask(fg: np.ndarray, height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A mask of the downscaled working copy back at full size (nearest neighbour), limited to the box."""
    x0, y0, x1, y1 = box
    fg = fg[np.ix_(nearest_map(fg.shape[0], height), nearest_map(fg.shape[1], width))]
    limited = np.zeros_like(fg)
    limited[y0 : y1 + 1, x0 : x1 + 1] = fg[y0 : y1 + 1, x0 : x1 + 1]
    return limited


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
    import cv2  # OpenCV: only where GrabCut runs

    img = np.asarray(image_rgb)
    x0, y0, x1, y1 = _check_grabcut_args(img, box, iterations, attempts, min_fraction, max_side)
    height, width = img.shape[:2]
    work, wbox, scaled = _working_copy(img, (x0, y0, x1, y1), max_side)
    rect = (wbox[0], wbox[1], wbox[2] - wbox[0] + 1, wbox[3] - wbox[1] + 1)
    need = float(min_fraction) * ((x1 - x0 + 1) * (y1 - y0 + 1))
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
            fg = _full_size_mask(fg, height, width, (x0, y0, x1, y1))
        if float(fg.sum()) >= need and fg.any():
            return np.ascontiguousarray(fg), attempt + 1
    return None, int(attempts)


# ==============================================================================================================
# What GrabCut costs (the resource guard's estimate)
# ==============================================================================================================

#: Peak memory of one image's GrabCut on top of a worker's baseline, per pixel of the working image: OpenCV's graph
#: (a vertex and four 8-neighbour edge pairs per pixel), its edge weights and GMM component maps, and the masks.
#: Measured with ``VmHWM`` on this machine (OpenCV 5.0, ``benchmarks/bench_prepare.py --calibrate``): 207-212 bytes
#: per pixel for 0.19 to 6.75 megapixels, whatever the iterations; a whole prepare task (decode included) 210-217.
#: The decode at full resolution adds :data:`IMAGE_BYTES_PER_PIXEL` of the stored image (a 3000x2250 JPEG at
#: ``max_side`` 1000 and 500 peaked at 195 and 70 MB).
GRABCUT_BYTES_PER_PIXEL = 210
IMAGE_BYTES_PER_PIXEL = 6
#: CPU seconds of one GrabCut attempt per working pixel: a fixed part (the colour models' k-means, building the
#: graph) plus a part per iteration, fitted to 1, 5 and 10 iterations on 0.19-6.75 megapixels (0.84-1.16, 2.24-2.95
#: and 4.03-5.78 microseconds per pixel measured, on a loaded machine).
GRABCUT_SECONDS_PER_PIXEL = 0.55e-6
GRABCUT_SECONDS_PER_PIXEL_ITERATION = 0.43e-6
#: CPU seconds per stored pixel of decoding the image
DECODE_SECONDS_PER_PIXEL = 0.04e-6


@dataclasses.dataclass(frozen=True)
class GrabCutCost:
    """What GrabCut on one image will cost, estimated from its size before any work (:func:`grabcut_cost`).

    Attributes:
        height, width: the stored image's size (decoded at full resolution).
        work_height, work_width: the size GrabCut runs at (``max_side``).
        bytes: peak memory on top of a worker's baseline.
        seconds: CPU seconds of one attempt on one core (an image may take up to ``attempts`` of them).
    """

    height: int
    width: int
    work_height: int
    work_width: int
    bytes: int
    seconds: float

    @property
    def megapixels(self) -> float:
        return self.height * self.width / 1e6


def grabcut_cost(height: int, width: int, iterations: int = 5, max_side: int | None = None) -> GrabCutCost:
    """Estimate the peak memory and the time of :func:`grabcut_mask` on one image from its pixel count.

    Linear in the pixels (the constants above, measured on this machine): the estimate grows with the image
    and with ``iterations``, and a smaller ``max_side`` never raises it.

    >>> c = grabcut_cost(5000, 5000)
    >>> round(c.bytes / 2**30, 1), round(c.seconds)
    (5.0, 69)
    >>> round(grabcut_cost(5000, 5000, max_side=1000).bytes / 2**20)
    343
    """
    wh, ww = working_size(height, width, max_side)
    full, work = int(height) * int(width), wh * ww
    nbytes = GRABCUT_BYTES_PER_PIXEL * work + IMAGE_BYTES_PER_PIXEL * full
    seconds = work * (GRABCUT_SECONDS_PER_PIXEL + GRABCUT_SECONDS_PER_PIXEL_ITERATION * int(iterations))
    return GrabCutCost(int(height), int(width), wh, ww, int(nbytes), seconds + DECODE_SECONDS_PER_PIXEL * full)


def max_side_within(height: int, width: int, max_bytes: float | None = None, max_seconds: float | None = None,
                    iterations: int = 5) -> int | None:
    """The largest ``max_side`` (>= 8) at which GrabCut on this image stays within ``max_bytes`` and ``max_seconds``
    per attempt; ``None`` when the full resolution already does, or when no working resolution can (the decode
    alone is over the budget).

    >>> max_side_within(5000, 5000, max_bytes=2**30), max_side_within(375, 500, max_bytes=2**30)
    (2097, None)
    """
    def fits(side):
        c = grabcut_cost(height, width, iterations, side)
        return (max_bytes is None or c.bytes <= max_bytes) and (max_seconds is None or c.seconds <= max_seconds)

    if fits(None):
        return None
    lo, hi = 8, max(int(height), int(width))
    if not fits(lo):
        return None
    while lo < hi:  # the cost grows with the side: the largest side that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# ==============================================================================================================
# Mask quality
# ==============================================================================================================


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks of the same shape (1.0 when both are empty).

    >>> mask_iou(np.array([[1, 1, 0]]), np.array([[0, 1, 1]]))
    0.3333333333333333
    """
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise ConfigError(f"mask_iou: expected masks of the same shape, got {a.shape} and {b.shape}")
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / float(union)


def _class_row(c: int, name: str, ious: Sequence[tuple[int, int, float]], failed: int) -> dict:
    vc = np.asarray([t[2] for t in ious if t[1] == c], np.float64)
    return {
        "class": name,
        "n": int(len(vc)),
        "failed": int(failed),
        "mean": None if len(vc) == 0 else round(float(vc.mean()), 6),
        "median": None if len(vc) == 0 else round(float(np.median(vc)), 6),
        "min": None if len(vc) == 0 else round(float(vc.min()), 6),
    }


def mask_quality(ious: Sequence[tuple[int, int, float]], failed_per_class: Mapping[int, int],
                 class_names: Sequence[str] = IN9_CLASSES) -> dict | None:
    """IoU summary of GrabCut masks against known ones (``info.prepare.quality``).

    Args:
        ious: ``(image_id, label, iou)`` per GrabCut mask whose image had a known mask (sorted by id here, for a
            stable float sum).
        failed_per_class: label -> number of images with a known mask on which GrabCut failed.
        class_names: the label space's classes (IN-9's by default).

    Returns:
        ``None`` when there is nothing to report, else ``n``, ``failed``, ``mean``, ``quantiles`` (p05..p95),
        ``below`` (counts under 0.5/0.7/0.9), a 10-bin ``histogram`` and one ``per_class`` row per class.
    """
    if not ious and not failed_per_class:
        return None
    ious = sorted(ious)
    v = np.asarray([t[2] for t in ious], np.float64)
    edges = np.linspace(0.0, 1.0, _IOU_BINS + 1)
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
        "per_class": [_class_row(c, name, ious, failed_per_class.get(c, 0)) for c, name in enumerate(class_names)],
    }
