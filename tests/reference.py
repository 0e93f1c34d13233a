"""A slow, obviously-correct reference of the paper's per-image variant procedure (PAPER.md), for tests.

One image at a time, NumPy only, written from PAPER.md's text and independent of the engine's code (it does not
import ``bgsynth.geometry`` or ``kernels``). Other test modules import it:

* :func:`reference_strip`: the Only-BG-T strip rule -> the tile rectangle, or ``None`` when the box leaves no
  margin.
* :func:`reference_variant`: any of the eight variants of one image.
* :func:`reference_background`: the Mixed-* background choice (splitmix64 with Python integers), the documented
  contract of :func:`bgsynth.variants.choose_backgrounds`.
* Decode and geometry, from the conventions of PAPER.md "Ours" and torchvision's ``Resize(int)`` +
  ``CenterCrop``: :func:`reference_decode` (PIL, ``convert("RGB")``, no EXIF transpose), :func:`reference_plan`,
  :func:`reference_resize_crop` (float64 antialiased bilinear with PIL's filter), :func:`reference_nearest_map`,
  :func:`reference_crop_box`, :func:`reference_crop_mask`.
* The two Only-BG-T constructions: :func:`reference_paper_only_bg_t` (tile at full resolution, then resize and
  crop: ``tiling="paper"``) and :func:`reference_crop_only_bg_t` (tile inside the crop: ``tiling="crop"``).
* :func:`reference_image` (one image's crop, crop mask, crop box and Only-BG-T in a tiling mode) and
  :func:`reference_all_variants` (its eight variants, given the Mixed-* background crops).

Conventions (PAPER.md): boxes are inclusive ``(x0, y0, x1, y1)`` = ``(xmin, ymin, xmax, ymax)``; images are
``H x W x 3`` uint8 arrays; masks ``H x W`` with non-zero = foreground.
"""

from __future__ import annotations

import dataclasses

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
    "reference_decode",
    "reference_plan",
    "reference_bilinear_weights",
    "reference_resize_crop",
    "reference_nearest_map",
    "reference_crop_box",
    "reference_crop_mask",
    "reference_paper_only_bg_t",
    "reference_crop_only_bg_t",
    "ReferenceImage",
    "reference_image",
    "reference_all_variants",
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
# the stable variant codes that enter the background hash (bgsynth.variants documents the same table)
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


def reference_tiled(image: np.ndarray, box, vectorised: bool = False):
    """Only-BG-T of one image: pixels inside the inclusive box take the strip tiled from the image origin.

    Returns ``None`` when the box leaves no margin (the image has no Only-BG-T). ``vectorised=True`` does the same
    with NumPy indexing instead of the obviously-correct per-pixel loop (for large images; a test checks they agree).
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
    ys = np.arange(max(ymin, 0), min(ymax, height - 1) + 1)
    xs = np.arange(max(xmin, 0), min(xmax, width - 1) + 1)
    if vectorised:
        out[np.ix_(ys, xs)] = tile[np.ix_(ys % th, xs % tw)]
        return out
    for y in ys:
        for x in xs:
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


def reference_background(image_id: int, label: int, variant: str, pool_ids, pool_labels, seed: int = 0,
                         num_classes: int = NUM_CLASSES):
    """The Mixed-* background of one image: ``(pool_row, bg_id, bg_label)`` or ``(-1, -1, -1)`` if none.

    Candidates, sorted by image id: Mixed-Same: pool entries of class ``label``; Mixed-Rand: every entry;
    Mixed-Next: entries of class ``(label + 1) % num_classes`` (the size of the label space, IN-9's 9 by
    default); the image itself is never a candidate, nor is any for a label outside ``0..num_classes-1``
    (Mixed-Same, Mixed-Next). The ``k``-th candidate is taken, ``k = (hash >> 1) % len(candidates)`` with
    :func:`background_hash`.
    """
    pool_ids = [int(v) for v in pool_ids]
    pool_labels = [int(v) for v in pool_labels]
    labelled = 0 <= label < num_classes
    if variant == "mixed_same":
        ok = lambda i: pool_labels[i] == label  # noqa: E731
    elif variant == "mixed_rand":
        ok = lambda i: True  # noqa: E731
    elif variant == "mixed_next":
        target = (label + 1) % num_classes if labelled else None
        ok = lambda i: target is not None and pool_labels[i] == target  # noqa: E731
    else:
        raise ValueError(f"{variant!r} has no background")
    if variant == "mixed_same" and not labelled:
        return -1, -1, -1
    cands = sorted((i for i in range(len(pool_ids)) if ok(i) and pool_ids[i] != int(image_id)), key=lambda i: pool_ids[i])
    if not cands:
        return -1, -1, -1
    k = (background_hash(seed, variant, image_id) >> 1) % len(cands)
    row = cands[k]
    return row, pool_ids[row], pool_labels[row]


# ----------------------------------------------------------------------------------------------- decode + geometry
# Written from PAPER.md "Ours" and the conventions of torchvision's Resize(int) + CenterCrop on a PIL image (which is
# PIL's Image.resize(..., BILINEAR) + crop), independent of bgsynth.geometry.


def reference_decode(path) -> np.ndarray:
    """Decode an image file the reference way: PIL, ``convert("RGB")``, **no** EXIF transpose -> ``H x W x 3`` uint8.

    Grey (``L``) and CMYK JPEGs become RGB through PIL's own conversion; the pixels are the stored ones, so boxes
    and masks in stored-pixel coordinates line up whatever the EXIF Orientation tag says.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    return np.array(rgb, dtype=np.uint8)


def reference_plan(height: int, width: int, resize: int, crop: int):
    """``((resized_height, resized_width), (top, left))`` of torchvision ``Resize(resize)`` + ``CenterCrop(crop)``.

    The shorter side becomes ``resize``, the longer ``int(resize * long / short)``; the crop offset on each axis is
    ``int(round((size - crop) / 2))`` (Python's round: half to even).
    """
    h, w = int(height), int(width)
    if h <= w:
        rh, rw = int(resize), int(resize * w / h)
    else:
        rh, rw = int(resize * h / w), int(resize)
    top = int(round((rh - crop) / 2.0))
    left = int(round((rw - crop) / 2.0))
    return (rh, rw), (top, left)


def _bilinear_taps(in_size: int, out_size: int):
    """PIL's BILINEAR taps per output index: ``[(first source index, float64 weights), ...]``."""
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 1.0 * fs
    taps = []
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        x = np.arange(lo, hi, dtype=np.float64)
        k = np.maximum(0.0, 1.0 - np.abs((x - centre + 0.5) / fs))
        total = k.sum()
        if total != 0.0:
            k = k / total
        taps.append((lo, k))
    return taps


def reference_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``float64 [out_size, in_size]`` resampling matrix of PIL's antialiased BILINEAR filter along one axis.

    For output index ``i``: ``centre = (i + 0.5) * scale`` with ``scale = in / out``; ``filterscale = max(scale,
    1)``; ``support = filterscale`` (the triangle's support 1, widened when downscaling: the antialiasing);
    taps ``x`` from ``int(centre - support + 0.5)`` to ``int(centre + support + 0.5)`` (exclusive), clipped to
    ``0..in``; weight ``max(0, 1 - |(x - centre + 0.5) / filterscale|)``, normalised to sum 1.
    """
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for i, (lo, k) in enumerate(_bilinear_taps(in_size, out_size)):
        w[i, lo : lo + len(k)] = k
    return w


def _apply_taps(x: np.ndarray, taps, axis: int) -> np.ndarray:
    """``W @ x`` along ``axis`` for the banded matrix ``W`` given by ``taps`` (float64; same as the dense product)."""
    x = np.moveaxis(x, axis, 0)
    n_out, kmax = len(taps), max(len(k) for _, k in taps)
    idx = np.zeros((n_out, kmax), dtype=np.int64)
    coef = np.zeros((n_out, kmax), dtype=np.float64)
    for i, (lo, k) in enumerate(taps):
        idx[i, : len(k)] = lo + np.arange(len(k))
        idx[i, len(k) :] = lo
        coef[i, : len(k)] = k
    extra = (1,) * (x.ndim - 1)
    out = np.zeros((n_out,) + x.shape[1:], dtype=np.float64)
    for j in range(kmax):
        out += coef[:, j].reshape((n_out,) + extra) * x[idx[:, j]]
    return np.moveaxis(out, 0, axis)


def reference_resize_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Resize (shorter side to ``resize``, antialiased bilinear) and centre-crop one image -> ``C x C x 3`` uint8.

    The resampling is PIL's BILINEAR filter (:func:`reference_bilinear_weights`) applied separably **in float64**
    as two (banded) weight-matrix products restricted to the crop's rows and columns, then rounded once (half up)
    and clipped to 0..255. PIL, torchvision and DALI resample in two passes and round to 8 bits (PIL: fixed-point
    coefficients) between them, so their result may differ from this one by 1 grey level; a larger difference is
    a bug. An axis whose size does not change is the identity (exactly: its weights are 1 and 0).
    A ``H x W`` grey input gives a ``C x C`` output.
    """
    x = np.asarray(image)
    grey = x.ndim == 2
    if grey:
        x = x[..., None]
    h, w = x.shape[:2]
    (rh, rw), (top, left) = reference_plan(h, w, resize, crop)
    ty = _bilinear_taps(h, rh)[top : top + crop]
    tx = _bilinear_taps(w, rw)[left : left + crop]
    out = _apply_taps(_apply_taps(x.astype(np.float64), ty, 0), tx, 1)
    out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out[..., 0] if grey else out


def reference_nearest_map(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output indices: ``floor((2 i + 1) * src / (2 dst))`` (exact integers).

    The source pixel whose area holds the output pixel's centre.
    """
    i = np.arange(int(dst), dtype=np.int64)
    return ((2 * i + 1) * int(src)) // (2 * int(dst))


def _crop_maps(height: int, width: int, resize: int, crop: int):
    (rh, rw), (top, left) = reference_plan(height, width, resize, crop)
    rows = reference_nearest_map(height, rh)[top : top + crop]
    cols = reference_nearest_map(width, rw)[left : left + crop]
    return rows, cols


def reference_crop_box(box, height: int, width: int, resize: int, crop: int):
    """An inclusive stored-pixel box carried into the crop: the crop pixels whose (nearest) source lies in it.

    Returns the inclusive crop box ``(x0, y0, x1, y1)``, or ``None`` when no crop pixel samples the box.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    rows, cols = _crop_maps(height, width, resize, crop)
    ys = np.flatnonzero((rows >= y0) & (rows <= y1))
    xs = np.flatnonzero((cols >= x0) & (cols <= x1))
    if len(ys) == 0 or len(xs) == 0:
        return None
    # the maps are monotone, so the hits are contiguous
    assert ys[-1] - ys[0] + 1 == len(ys) and xs[-1] - xs[0] + 1 == len(xs)
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def reference_crop_mask(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """An ``H x W`` mask carried into the crop with nearest neighbour -> ``C x C`` (same dtype)."""
    m = np.asarray(mask)
    rows, cols = _crop_maps(m.shape[0], m.shape[1], resize, crop)
    return m[np.ix_(rows, cols)]


# ----------------------------------------------------------------------------------------------- Only-BG-T, two ways
def reference_paper_only_bg_t(image_full: np.ndarray, box_full, resize: int, crop: int):
    """``tiling="paper"``: Only-BG-T built at the stored image's full resolution, then resized and cropped.

    The strip rule of PAPER.md on the full-resolution union box and image size, the strip tiled from the image
    origin into the box, then :func:`reference_resize_crop` like Original. ``None`` when the box leaves no
    full-resolution margin.
    """
    tiled = reference_tiled(image_full, box_full, vectorised=True)
    if tiled is None:
        return None
    return reference_resize_crop(tiled, resize, crop)


def reference_crop_only_bg_t(crop_image: np.ndarray, crop_box):
    """``tiling="crop"``: Only-BG-T inside the crop: the strip rule on the crop box, tiled from the crop's origin.

    ``None`` when the box is not in the crop or leaves no margin in it.
    """
    if crop_box is None:
        return None
    return reference_tiled(crop_image, crop_box, vectorised=True)


# ----------------------------------------------------------------------------------------------- eight variants
@dataclasses.dataclass
class ReferenceImage:
    """One image in the crop geometry, per the reference.

    Attributes:
        crop: ``C x C x 3`` uint8 Original.
        mask: ``C x C`` bool crop mask, or ``None`` without a mask.
        box: inclusive crop box, or ``None`` when no crop pixel samples the union box.
        only_bg_t: ``C x C x 3`` uint8 Only-BG-T in the chosen tiling mode, or ``None`` (no margin).
        strip_side: the strip side the mode's construction picks (``'left'`` ... or ``None``): on the full-resolution
            box and image in paper mode, on the crop box and crop in crop mode.
        tiling: ``"paper"`` or ``"crop"``.
    """

    crop: np.ndarray
    mask: np.ndarray | None
    box: tuple | None
    only_bg_t: np.ndarray | None
    strip_side: str | None
    tiling: str


def reference_image(image_full: np.ndarray, mask_full, box_full, resize: int, crop: int,
                    tiling: str = "paper") -> ReferenceImage:
    """The per-image pieces of the variants (PAPER.md "Ours") in one tiling mode.

    Args:
        image_full: the decoded ``H x W x 3`` uint8 image (stored orientation, :func:`reference_decode`).
        mask_full: ``H x W`` foreground mask (non-zero = foreground) or ``None``.
        box_full: inclusive union box in stored pixels, or ``None``.
        resize, crop: the geometry.
        tiling: ``"paper"`` (Only-BG-T at full resolution, then resize + crop) or ``"crop"`` (inside the crop).
    """
    if tiling not in ("paper", "crop"):
        raise ValueError(f"tiling must be 'paper' or 'crop', got {tiling!r}")
    image_full = np.asarray(image_full, dtype=np.uint8)
    h, w = image_full.shape[:2]
    crop_img = reference_resize_crop(image_full, resize, crop)
    cmask = None if mask_full is None else reference_crop_mask(np.asarray(mask_full) != 0, resize, crop)
    cbox = None if box_full is None else reference_crop_box(box_full, h, w, resize, crop)
    if tiling == "paper":
        bgt = None if box_full is None else reference_paper_only_bg_t(image_full, box_full, resize, crop)
        side = None if box_full is None else reference_strip_side(box_full, h, w)
    else:
        bgt = reference_crop_only_bg_t(crop_img, cbox)
        side = None if cbox is None else reference_strip_side(cbox, crop, crop)
    return ReferenceImage(crop_img, cmask, cbox, bgt, side, tiling)


def reference_all_variants(ref: ReferenceImage, backgrounds=None) -> dict:
    """The eight variants of one image: ``{name: C x C x 3 uint8, or None where the variant is not valid}``.

    Args:
        ref: the image's pieces (:func:`reference_image`).
        backgrounds: ``{mixed_variant: the chosen background's Only-BG-T crop (same tiling mode) or None}``; a
            missing entry or ``None`` means no candidate (the composite is not valid).

    Only-BG-B blacks the crop box (invalid when the box is not in the crop); No-FG/Only-FG black the crop mask /
    its complement (invalid without a mask); Mixed-* paste the crop's mask pixels over the background's crop
    (invalid without a mask or a background).
    """
    backgrounds = backgrounds or {}
    x, m, box = ref.crop, ref.mask, ref.box
    out = {"original": x.copy()}
    out["only_bg_b"] = None if box is None else reference_variant(x, None, box, "only_bg_b")
    out["only_bg_t"] = None if ref.only_bg_t is None else ref.only_bg_t.copy()
    for name in ("no_fg", "only_fg"):
        out[name] = None if m is None else reference_variant(x, m, box, name)
    for name in ("mixed_same", "mixed_rand", "mixed_next"):
        bg = backgrounds.get(name)
        out[name] = None if (m is None or bg is None) else reference_variant(x, m, box, name, bg_np=bg)
    return out
