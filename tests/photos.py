"""A small index of real photographs (``skimage.data``, offline) for parity tests of the variants.

:func:`build_photo_index` writes 14 JPEG files cut or resized from the photographs that ship with scikit-image and
a COCO-format index (:class:`bgsynth.index.DatasetIndex`) of them, all in split ``"val"``. Every image is there for
a reason (see :data:`PHOTOS`): ImageNet-like non-square sizes (portrait and landscape, 239..741 px sides, one
whose shorter side is below 256 so the paper's geometry upscales it), a greyscale JPEG (1 component), a CMYK JPEG,
a JPEG with EXIF Orientation=6 (boxes and masks stay in stored-pixel coordinates: nobody applies EXIF orientation),
boxes touching image borders, exact ties of the Only-BG-T strip rule at full resolution, a box covering the whole
image (no Only-BG-T), images whose strip side differs between tiling at full resolution (``tiling="paper"``) and
inside the 256 -> 224 crop (``tiling="crop"``), an image with two boxes (union box), an image whose box covers
the whole 224 crop but not the whole image (Only-BG-T in paper mode only), and classes with two members (Mixed-Same
candidates), one with none after the pool is built (Mixed-Same without a candidate) and an empty class (3,
Mixed-Next of class 2 without a candidate).

Boxes are hard-coded in stored-pixel coordinates (inclusive ``(x0, y0, x1, y1)``); masks are plausible object
masks inside the boxes (the horse silhouette, thresholded regions or inscribed ellipses). Claims about strip sides
and ties are *not* trusted from this table: ``tests/test_photos.py`` recomputes them with ``tests/reference.py``.

Deterministic (same bytes on every run with the same Pillow/scikit-image) and fast (about 1 s, most of it the first
``skimage.data`` call).

>>> import pathlib, tempfile                                          # doctest: +SKIP
>>> path = build_photo_index(pathlib.Path(tempfile.mkdtemp()))        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["PhotoSpec", "PHOTOS", "build_photo_index", "photo_arrays", "ellipse_mask"]

JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class PhotoSpec:
    """One fixture image.

    Attributes:
        name: file stem (``<id>_<name>.JPEG``).
        source: the ``skimage.data`` photograph(s) it is made from and how.
        width, height: stored pixel size.
        mode: PIL mode written to the JPEG (``"RGB"``, ``"L"`` = 1 component, ``"CMYK"`` = 4 components).
        label: IN-9 class id.
        boxes: inclusive ``(x0, y0, x1, y1)`` boxes in stored-pixel coordinates (one annotation each).
        covers: the edge case(s) this image is there for.
        exif_orientation: EXIF Orientation tag written into the file (``None``: no EXIF).
    """

    name: str
    source: str
    width: int
    height: int
    mode: str
    label: int
    boxes: tuple[tuple[int, int, int, int], ...]
    covers: str
    exif_orientation: int | None = None

    @property
    def union_box(self) -> tuple[int, int, int, int]:
        b = np.asarray(self.boxes)
        return int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())


# Image id = position in this table. Sides named in ``covers`` are what the strip rule gives; the tests recompute
# them with the reference and fail if this table is wrong.
PHOTOS: tuple[PhotoSpec, ...] = (
    PhotoSpec("astronaut", "astronaut, columns 16..399", 384, 512, "RGB", 7,
              ((134, 15, 289, 190), (259, 340, 383, 511)),
              "portrait; two boxes (face, helmet): union box; union box touches the right and bottom borders"),
    PhotoSpec("coffee", "coffee", 600, 400, "RGB", 6, ((170, 15, 410, 300),),
              "paper mode picks the right strip, the 256->224 crop the bottom one (the crop cuts the side margins)"),
    PhotoSpec("chelsea", "chelsea", 451, 300, "RGB", 4, ((40, 0, 390, 299),),
              "EXIF Orientation=6 (stored pixels used as stored); box touches top and bottom borders; the box "
              "covers the whole centre crop: Only-BG-T in paper mode only (not in the crop-mode pool)",
              exif_orientation=6),
    PhotoSpec("rocket", "rocket", 640, 427, "CMYK", 2, ((300, 125, 345, 407),),
              "CMYK JPEG (4 components, PIL fallback in every backend); left strip by 300 > 295"),
    PhotoSpec("motorcycle", "stereo_motorcycle, left image", 741, 500, "RGB", 2, ((90, 75, 685, 450),),
              "widest landscape; top/bottom pair, top strip"),
    PhotoSpec("coins", "coins (greyscale)", 384, 303, "L", 8, ((0, 25, 80, 290),),
              "greyscale JPEG (1 component); box touches the left border (x0 = 0); thresholded coin mask"),
    PhotoSpec("camera", "camera rows 32..511, saved as RGB", 512, 480, "RGB", 7, ((0, 30, 340, 479),),
              "box touches the left border (x0 = 0) and the bottom border (y1 = H - 1); grey content in 3 components"),
    PhotoSpec("hubble", "hubble_deep_field rows 0..599, columns 0..399", 400, 600, "RGB", 5, ((100, 120, 300, 500),),
              "portrait; left == right margin (100): the right strip must be chosen"),
    PhotoSpec("ihc", "immunohistochemistry rows 150..449", 512, 300, "RGB", 5, ((90, 60, 430, 240),),
              "top == bottom margin (60): the bottom strip must be chosen; thresholded stain mask"),
    PhotoSpec("retina", "retina rows 100..1299, columns 250..1149, resized to 375x500", 375, 500, "RGB", 8,
              ((75, 100, 315, 450),),
              "exact tie max(left, right) * H == max(top, bottom) * W (75*500 == 100*375): top/bottom, top strip; "
              "the 256->224 crop picks the left strip instead"),
    PhotoSpec("clock", "clock (greyscale), saved as RGB", 400, 300, "RGB", 6, ((0, 0, 399, 299),),
              "box covers the whole image: no Only-BG-T in either mode (valid=False, not in the pool)"),
    PhotoSpec("horse", "horse silhouette (at x+50, y+30) over grass, filled with a gravel-textured brown", 500, 375,
              "RGB", 4, ((68, 39, 438, 342),),
              "the mask is the horse silhouette (not a box or ellipse), box = its extent; paper mode picks the left "
              "strip, the 256->224 crop the top one"),
    PhotoSpec("page", "page, resized to 480x239", 480, 239, "RGB", 0, ((200, 20, 479, 220),),
              "shorter side 239 < 256: the paper's geometry upscales; box touches the right border (x1 = W - 1)"),
    PhotoSpec("colorwheel", "colorwheel rows 55..314", 371, 260, "RGB", 1, ((90, 0, 300, 259),),
              "saturated colours; box touches top and bottom borders, and the crop's right border"),
)


# ------------------------------------------------------------------------------------------------ pixels
def _data(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    return a[0] if isinstance(a, tuple) else a


def _grey_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1)


def _resized(a: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((width, height), Image.LANCZOS))


HORSE_SIZE = (375, 500)  # (H, W) of the canvas
HORSE_OFFSET = (30, 50)  # (y, x) of skimage's 328 x 400 silhouette on it


def _horse_silhouette() -> np.ndarray:
    """``bool [375, 500]``: skimage's horse silhouette (True = horse) placed at :data:`HORSE_OFFSET`."""
    sil = ~_data("horse")  # skimage's silhouette: True = background
    out = np.zeros(HORSE_SIZE, bool)
    y, x = HORSE_OFFSET
    out[y : y + sil.shape[0], x : x + sil.shape[1]] = sil
    return out


def _horse() -> np.ndarray:
    sil = _horse_silhouette()
    h, w = sil.shape
    grass = _data("grass")[:h, :w].astype(np.float64) / 255.0
    gravel = _data("gravel")[:h, :w].astype(np.float64) / 255.0
    bg = np.stack([0.45 * grass, 0.80 * grass, 0.35 * grass], -1) * 255.0
    fg = np.asarray([150.0, 95.0, 55.0]) * (0.55 + 0.45 * gravel)[..., None]
    return np.where(sil[..., None], fg, bg).round().clip(0, 255).astype(np.uint8)


_MAKERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": lambda: _data("astronaut")[:, 16:400],
    "coffee": lambda: _data("coffee"),
    "chelsea": lambda: _data("chelsea"),
    "rocket": lambda: _data("rocket"),
    "motorcycle": lambda: _data("stereo_motorcycle"),
    "coins": lambda: _data("coins"),
    "camera": lambda: _grey_rgb(_data("camera")[32:512]),
    "hubble": lambda: _data("hubble_deep_field")[0:600, 0:400],
    "ihc": lambda: _data("immunohistochemistry")[150:450],
    "retina": lambda: _resized(_data("retina")[100:1300, 250:1150], 375, 500),
    "clock": lambda: _grey_rgb(_data("clock")),
    "horse": _horse,
    "page": lambda: _resized(_data("page"), 480, 239),
    "colorwheel": lambda: _data("colorwheel")[55:315],
}


# ------------------------------------------------------------------------------------------------ masks
def ellipse_mask(height: int, width: int, box) -> np.ndarray:
    """``uint8 [H, W]`` 0/1 ellipse inscribed in the inclusive box."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    rx, ry = (x1 - x0 + 1) / 2.0, (y1 - y0 + 1) / 2.0
    return ((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= 1.0).astype(np.uint8)


def _in_box(cond: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros(cond.shape, np.uint8)
    m[y0 : y1 + 1, x0 : x1 + 1] = cond[y0 : y1 + 1, x0 : x1 + 1]
    return m


def _luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _masks(spec: PhotoSpec, pixels: np.ndarray) -> list[np.ndarray]:
    """One 0/1 mask per box of ``spec``, inside its box."""
    h, w = spec.height, spec.width
    rgb = _grey_rgb(pixels) if pixels.ndim == 2 else pixels
    out = []
    for box in spec.boxes:
        if spec.name == "horse":
            m = _in_box(_horse_silhouette(), box)
        elif spec.name == "rocket":
            m = _in_box(_luma(rgb) > 150, box)
        elif spec.name == "coins":
            m = _in_box(_luma(rgb) > 110, box)
        elif spec.name == "camera":
            m = _in_box(_luma(rgb) < 70, box)
        elif spec.name == "ihc":
            m = _in_box(rgb[..., 0].astype(np.int16) - rgb[..., 2].astype(np.int16) > 40, box)
        elif spec.name == "page":
            m = _in_box(_luma(rgb) < 110, box)
        else:
            m = ellipse_mask(h, w, box)
        if not m.any():
            raise AssertionError(f"photo fixture {spec.name}: empty mask for box {box}")
        out.append(m)
    return out


def photo_arrays(spec: PhotoSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """The stored pixels (``H x W`` for mode L, else ``H x W x 3``, before JPEG) and the masks of one image."""
    pixels = np.ascontiguousarray(_MAKERS[spec.name]())
    if pixels.shape[:2] != (spec.height, spec.width):
        raise AssertionError(
            f"photo fixture {spec.name}: made {pixels.shape[:2]}, table says {(spec.height, spec.width)}")
    return pixels, _masks(spec, pixels)


# ------------------------------------------------------------------------------------------------ files
def _write_jpeg(path: pathlib.Path, pixels: np.ndarray, spec: PhotoSpec) -> None:
    im = Image.fromarray(pixels)
    if spec.mode == "L" and im.mode != "L":
        im = im.convert("L")
    elif spec.mode != "L" and im.mode != spec.mode:
        im = im.convert("RGB").convert(spec.mode)
    kw = {"quality": JPEG_QUALITY}
    if spec.exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = int(spec.exif_orientation)
        kw["exif"] = exif.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", **kw)


def build_photo_index(root: pathlib.Path) -> pathlib.Path:
    """Write the photo fixture under ``root`` and return the path of its index JSON.

    Layout: ``root/images/val/<id>_<name>.JPEG`` and ``root/index.json`` (image root ``images``, relative to the
    index). Image ids are the positions in :data:`PHOTOS`; every image is in split ``"val"`` and carries one
    annotation per box with its mask as compressed RLE (``mask_source="synthetic"``).
    """
    from bgsynth.index import DatasetIndex, inclusive_to_bbox, rle_encode

    root = pathlib.Path(root)
    idx = DatasetIndex.empty(image_root="images",
                             description="photo fixture (tests/photos.py): skimage.data photographs")
    for image_id, spec in enumerate(PHOTOS):
        pixels, masks = photo_arrays(spec)
        rel = f"val/{image_id:02d}_{spec.name}.JPEG"
        _write_jpeg(root / "images" / rel, pixels, spec)
        anns = []
        for box, m in zip(spec.boxes, masks):
            anns.append({"bbox": inclusive_to_bbox(box), "segmentation": rle_encode(m), "mask_source": "synthetic",
                         "area": float(m.sum())})
        entry = {"id": image_id, "file_name": rel, "width": spec.width, "height": spec.height, "label": spec.label,
                 "split": "val", "in1k_class": None, "wnid": None, "format": "JPEG", "mode": spec.mode,
                 "source": f"skimage.data: {spec.source}"}
        idx.add_image(entry, anns)
    return idx.save(root / "index.json")
