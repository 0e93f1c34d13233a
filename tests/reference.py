"""A slow, obviously-correct reference of the paper's per-image variant procedure (PAPER.md), for tests.

One image at a time, NumPy only, written from PAPER.md's text and independent of the engine's code (it does not
import ``engine.geometry`` or ``kernels``). Other test modules import it:

* :func:`reference_strip`: the Only-BG-T strip rule -> the tile rectangle, or ``None`` when the box leaves no
  margin.
* :func:`reference_variant`: any of the eight variants of one image.
* :func:`reference_background`: the Mixed-* background choice (splitmix64 with Python integers), the documented
  contract of :func:`engine.variants.choose_backgrounds`.

Conventions (PAPER.md): boxes are inclusive ``(x0, y0, x1, y1)`` = ``(xmin, ymin, xmax, ymax)``; images are
``H x W x 3`` uint8 arrays; masks ``H x W`` with non-zero = foreground.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "VARIANT_NAMES",
    "VARIANT_CODES",
    "reference_strip",
    "reference_strip_side",
    "reference_tiled",
    "reference_variant",
    "reference_background",
    "splitmix64",
]

VARIANT_NAMES = (
    "original",
    "only_bg_b",
    "only_bg_t",
    "no_fg",
    "only_fg",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
# the stable variant codes that enter the background hash (engine.variants documents the same table)
VARIANT_CODES = {name: i for i, name in enumerate(VARIANT_NAMES)}
NUM_CLASSES = 9
_M64 = (1 << 64) - 1


def reference_strip_side(box, height: int, width: int) -> str | None:
    """Which margin the Only-BG-T rule picks: ``'left'``, ``'right'``, ``'top'``, ``'bottom'``, or ``None``.

    PAPER.md: the four margins are left (``x < xmin``, width ``xmin``), right (``x >= xmax``, width
    ``W - xmax``), top (``y < ymin``, height ``ymin``), bottom (``y >= ymax``, height ``H - ymax``), each spanning
    the full other dimension. Left/right when ``max(left, right) * H > max(top, bottom) * W`` strictly, else
    top/bottom; left (top) when strictly larger than right (bottom), else right (bottom). An image whose box
    leaves no margin at all (or an empty box) has no Only-BG-T: ``None``.
    """
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    if xmax < xmin or ymax < ymin:
        return None
    if xmin <= 0 and ymin <= 0 and xmax >= width - 1 and ymax >= height - 1:
        return None
    left_w, right_w = xmin, width - xmax
    top_h, bottom_h = ymin, height - ymax
    if max(left_w, right_w) * height > max(top_h, bottom_h) * width:
        return "left" if left_w > right_w else "right"
    return "top" if top_h > bottom_h else "bottom"


def reference_strip(box, height: int, width: int):
    """The Only-BG-T tile as ``(x_start, y_start, tile_width, tile_height)``, or ``None`` without a margin."""
    side = reference_strip_side(box, height, width)
    if side is None:
        return None
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    return {
        "left": (0, 0, xmin, height),
        "right": (xmax, 0, width - xmax, height),
        "top": (0, 0, width, ymin),
        "bottom": (0, ymax, width, height - ymax),
    }[side]


def reference_tiled(image: np.ndarray, box):
    """Only-BG-T of one image: pixels inside the inclusive box take the strip tiled from the image origin.

    Returns ``None`` when the box leaves no margin (the image has no Only-BG-T).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    strip = reference_strip(box, height, width)
    if strip is None:
        return None
    sx, sy, tw, th = strip
    tile = image[sy : sy + th, sx : sx + tw]
    out = image.copy()
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    for y in range(max(ymin, 0), min(ymax, height - 1) + 1):
        for x in range(max(xmin, 0), min(xmax, width - 1) + 1):
            out[y, x] = tile[y % th, x % tw]
    return out


def reference_variant(image_np, mask_np, box, variant: str, bg_np=None) -> np.ndarray | None:
    """One variant of one image, per PAPER.md's table.

    Args:
        image_np: ``H x W x 3`` uint8 image ``x``.
        mask_np: ``H x W`` foreground mask ``M`` (non-zero = foreground); unused by Original/Only-BG-*.
        box: inclusive union box ``(x0, y0, x1, y1)``; an empty box (``x1 < x0``) blacks/tiles nothing.
        variant: one of :data:`VARIANT_NAMES`.
        bg_np: for Mixed-*: the chosen background's Only-BG-T (``H x W x 3``), or ``None`` (black background).

    Returns:
        ``H x W x 3`` uint8, or ``None`` for Only-BG-T of an image without a margin.
    """
    x = np.asarray(image_np, dtype=np.uint8)
    h, w = x.shape[:2]
    m = None if mask_np is None else (np.asarray(mask_np) != 0)
    black = np.zeros(3, dtype=np.uint8)
    out = x.copy()
    if variant == "original":
        return out
    if variant == "only_bg_b":
        x0, y0, x1, y1 = (int(v) for v in box)
        for yy in range(h):
            for xx in range(w):
                if x0 <= xx <= x1 and y0 <= yy <= y1:
                    out[yy, xx] = black
        return out
    if variant == "only_bg_t":
        return reference_tiled(x, box)
    if variant == "no_fg":
        out[m] = black
        return out
    if variant == "only_fg":
        out[~m] = black
        return out
    if variant in ("mixed_same", "mixed_rand", "mixed_next"):
        background = np.zeros_like(x) if bg_np is None else np.asarray(bg_np, dtype=np.uint8)
        if background.shape != x.shape:
            raise ValueError(f"background of shape {background.shape} for an image of shape {x.shape}")
        out = background.copy()
        out[m] = x[m]
        return out
    raise ValueError(f"unknown variant {variant!r}")


# ----------------------------------------------------------------------------------------------- backgrounds
def splitmix64(x: int) -> int:
    """SplitMix64 (Steele, Lea, Flood 2014): ``mix(x + 0x9E3779B97F4A7C15)`` on 64-bit unsigned integers."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def background_hash(seed: int, variant: str, image_id: int) -> int:
    """``splitmix64(splitmix64(splitmix64(seed) ^ code) ^ image_id)`` as an unsigned 64-bit integer."""
    key = splitmix64(splitmix64(int(seed) & _M64) ^ VARIANT_CODES[variant])
    return splitmix64(key ^ (int(image_id) & _M64))


def reference_background(image_id: int, label: int, variant: str, pool_ids, pool_labels, seed: int = 0):
    """The Mixed-* background of one image: ``(pool_row, bg_id, bg_label)`` or ``(-1, -1, -1)`` if none.

    Candidates, sorted by image id: Mixed-Same: pool entries of class ``label``; Mixed-Rand: every entry;
    Mixed-Next: entries of class ``(label + 1) % 9``; the image itself is never a candidate. The ``k``-th
    candidate is taken, ``k = (hash >> 1) % len(candidates)`` with :func:`background_hash`.
    """
    pool_ids = [int(v) for v in pool_ids]
    pool_labels = [int(v) for v in pool_labels]
    if variant == "mixed_same":
        ok = lambda i: pool_labels[i] == label  # noqa: E731
    elif variant == "mixed_rand":
        ok = lambda i: True  # noqa: E731
    elif variant == "mixed_next":
        target = (label + 1) % NUM_CLASSES if 0 <= label < NUM_CLASSES else None
        ok = lambda i: target is not None and pool_labels[i] == target  # noqa: E731
    else:
        raise ValueError(f"{variant!r} has no background")
    if variant == "mixed_same" and not 0 <= label < NUM_CLASSES:
        return -1, -1, -1
    cands = sorted((i for i in range(len(pool_ids)) if ok(i) and pool_ids[i] != int(image_id)), key=lambda i: pool_ids[i])
    if not cands:
        return -1, -1, -1
    k = (background_hash(seed, variant, image_id) >> 1) % len(cands)
    row = cands[k]
    return row, pool_ids[row], pool_labels[row]
