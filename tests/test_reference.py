"""Tests of the test reference itself (tests/reference.py): decode, geometry, resampling and the two Only-BG-T
constructions, against PIL and against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from reference import (
    reference_all_variants,
    reference_bilinear_weights,
    reference_crop_box,
    reference_crop_mask,
    reference_crop_only_bg_t,
    reference_decode,
    reference_image,
    reference_nearest_map,
    reference_paper_only_bg_t,
    reference_plan,
    reference_resize_crop,
    reference_strip_side,
    reference_tiled,
)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    return a[0] if isinstance(a, tuple) else a


def _pil_resize_crop(a: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """torchvision's ``Resize(resize) + CenterCrop(crop)`` on a PIL image, spelled out with PIL."""
    (rh, rw), (top, left) = reference_plan(a.shape[0], a.shape[1], resize, crop)
    im = Image.fromarray(a)
    if (rh, rw) != (a.shape[0], a.shape[1]):
        im = im.resize((rw, rh), Image.BILINEAR)
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


# ----------------------------------------------------------------------------------------------- geometry
def test_plan_follows_torchvision_resize_and_center_crop():
    assert reference_plan(375, 500, 256, 224) == ((256, 341), (16, 58))
    assert reference_plan(500, 375, 256, 224) == ((341, 256), (58, 16))
    assert reference_plan(300, 451, 256, 224) == ((256, 384), (16, 80))
    assert reference_plan(239, 480, 256, 224) == ((256, 514), (16, 145))  # upscaling: 514 - 224 = 290 -> 145
    assert reference_plan(64, 64, 64, 64) == ((64, 64), (0, 0))
    F = pytest.importorskip("torchvision.transforms.functional")

    for h, w in ((375, 500), (500, 375), (300, 451), (239, 480), (427, 640), (303, 384)):
        (rh, rw), (top, left) = reference_plan(h, w, 256, 224)
        im = Image.new("RGB", (w, h))
        assert F.resize(im, 256).size == (rw, rh)
        # CenterCrop's offsets: int(round((size - crop) / 2))
        assert (top, left) == (int(round((rh - 224) / 2.0)), int(round((rw - 224) / 2.0)))


def test_nearest_map_and_carried_boxes_by_hand():
    assert reference_nearest_map(5, 2).tolist() == [1, 3]  # floor(5/4), floor(15/4)
    assert reference_nearest_map(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert reference_nearest_map(7, 7).tolist() == list(range(7))
    # 4 x 8 image, resize 2 / crop 2: resized 2 x 4, crop columns 1..2 -> source columns 3, 5; rows 1, 3
    assert reference_crop_box((0, 0, 7, 3), 4, 8, 2, 2) == (0, 0, 1, 1)
    assert reference_crop_box((4, 0, 7, 1), 4, 8, 2, 2) == (1, 0, 1, 0)
    assert reference_crop_box((0, 0, 2, 3), 4, 8, 2, 2) is None  # only column 1 samples it, outside the crop
    m = np.arange(32).reshape(4, 8)
    assert reference_crop_mask(m, 2, 2).tolist() == [[11, 13], [27, 29]]


def test_bilinear_weights_by_hand():
    w = reference_bilinear_weights(4, 2)  # downscale by 2: support 2, triangle of half-width 2
    np.testing.assert_allclose(w, [[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]])
    up = reference_bilinear_weights(2, 4)  # upscale: plain linear interpolation, clamped at the borders
    np.testing.assert_allclose(up, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    for n_in, n_out in ((741, 379), (239, 256), (1411, 128), (100, 100)):
        w = reference_bilinear_weights(n_in, n_out)
        np.testing.assert_allclose(w.sum(1), 1.0)
        assert (w >= 0).all()
    np.testing.assert_array_equal(reference_bilinear_weights(9, 9), np.eye(9))


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "page", "coins", "colorwheel",
                                  "stereo_motorcycle"])
def test_resize_crop_agrees_with_pil_within_one_level(name):
    a = _skimage(name)
    worst = 0
    for resize, crop in ((256, 224), (128, 112), (72, 64), (600, 500), (300, 300)):  # down- and upscaling
        ref = reference_resize_crop(a, resize, crop)
        assert ref.shape == ((crop, crop, 3) if a.ndim == 3 else (crop, crop)) and ref.dtype == np.uint8
        d = np.abs(ref.astype(int) - _pil_resize_crop(a, resize, crop).astype(int))
        assert d.mean() < 0.3, (resize, crop, d.mean())
        worst = max(worst, int(d.max()))
    assert worst <= 1, f"{name}: reference vs PIL max |diff| {worst}"


def test_resize_crop_is_the_identity_at_the_stored_size():
    a = _skimage("chelsea")  # 300 x 451
    out = reference_resize_crop(a, 300, 300)
    (rh, rw), (top, left) = reference_plan(300, 451, 300, 300)
    assert (rh, rw) == (300, 451)
    np.testing.assert_array_equal(out, a[:, left : left + 300])
    np.testing.assert_array_equal(reference_resize_crop(a[:, :300], 300, 300), a[:, :300])


# ----------------------------------------------------------------------------------------------- Only-BG-T
def _ramp(h: int, w: int) -> np.ndarray:
    """``10 y + x`` in all three channels (the second and third offset by 100 and 200 % 256)."""
    v = (10 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype(np.uint8)
    return np.stack([v, v + 100, (v.astype(int) + 200) % 256], -1).astype(np.uint8)


def test_paper_only_bg_t_by_hand_no_resampling():
    """4 x 8 image, box (3, 0, 5, 3), geometry 4 -> 4 (no resampling: crop columns 2..5).

    Full resolution: left margin 3, right 8 - 5 = 3, top 0, bottom 4 - 3 = 1; 3 * 4 > 1 * 8, so left/right, and
    left == right picks the right strip: columns 5..7 (tile width 3), tiled from the origin: column x takes
    5 + x % 3, so box columns 3, 4, 5 take columns 5, 6, 7. In the crop (crop mode) the box is columns 1..3 of a
    4 x 4 crop: left 1, right 1, top 0, bottom 1: 1 * 4 > 1 * 4 fails, so the bottom strip (row 3) is tiled.
    """
    img = _ramp(4, 8)
    box = (3, 0, 5, 3)
    assert reference_strip_side(box, 4, 8) == "right"
    paper = reference_paper_only_bg_t(img, box, 4, 4)
    row = lambda y: [10 * y + c for c in (2, 5, 6, 7)]  # noqa: E731
    assert paper[..., 0].tolist() == [row(y) for y in range(4)]
    np.testing.assert_array_equal(paper[..., 1], paper[..., 0] + 100)

    crop = reference_resize_crop(img, 4, 4)
    np.testing.assert_array_equal(crop, img[:, 2:6])
    cbox = reference_crop_box(box, 4, 8, 4, 4)
    assert cbox == (1, 0, 3, 3) and reference_strip_side(cbox, 4, 4) == "bottom"
    cropm = reference_crop_only_bg_t(crop, cbox)
    assert cropm[..., 0].tolist() == [[10 * y + 2, 33, 34, 35] for y in range(4)]


def test_paper_only_bg_t_by_hand_with_downscaling():
    """Grey 50 everywhere but a bright object inside the box: tiling replaces the box with strip pixels, all 50
    (the strips are the margins plus the box's own last row/column, left at 50), so after the resize the
    paper's Only-BG-T is 50 everywhere, while the Original's crop still sees the object."""
    img = np.full((8, 12, 3), 50, np.uint8)
    box = (3, 2, 9, 5)
    img[2:5, 3:9] = 250
    out = reference_paper_only_bg_t(img, box, 4, 4)  # 8 x 12 -> 4 x 6 -> crop columns 1..4
    np.testing.assert_array_equal(out, np.full((4, 4, 3), 50, np.uint8))
    assert reference_resize_crop(img, 4, 4).max() > 100
    assert reference_paper_only_bg_t(img, (0, 0, 11, 7), 4, 4) is None  # no margin


def test_vectorised_tiling_equals_the_per_pixel_loop():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = int(rng.integers(2, 14)), int(rng.integers(2, 14))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, int(rng.integers(x0, w)), int(rng.integers(y0, h)))
        a, b = reference_tiled(img, box), reference_tiled(img, box, vectorised=True)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    img = _skimage("coffee")[:60, :90]
    box = (20, 5, 70, 40)
    np.testing.assert_array_equal(reference_tiled(img, box), reference_tiled(img, box, vectorised=True))


def test_all_variants_of_one_image():
    img = _ramp(8, 12)
    mask = np.zeros((8, 12), np.uint8)
    mask[3:5, 4:8] = 1
    ref = reference_image(img, mask, (3, 2, 8, 5), 8, 8, tiling="paper")
    bg = np.full((8, 8, 3), 7, np.uint8)
    v = reference_all_variants(ref, {"mixed_same": bg, "mixed_rand": None})
    assert v["mixed_rand"] is None and v["mixed_next"] is None  # no background: not valid
    np.testing.assert_array_equal(v["original"], img[:, 2:10])
    m = ref.mask
    assert m.sum() == 8
    np.testing.assert_array_equal(v["mixed_same"][m], v["original"][m])
    assert (v["mixed_same"][~m] == 7).all()
    assert (v["only_fg"][~m] == 0).all() and (v["no_fg"][m] == 0).all()
    x0, y0, x1, y1 = ref.box
    assert ref.box == (1, 2, 6, 5)
    assert (v["only_bg_b"][y0 : y1 + 1, x0 : x1 + 1] == 0).all()
    np.testing.assert_array_equal(v["only_bg_t"], reference_tiled(img, (3, 2, 8, 5))[:, 2:10])
    assert reference_image(img, None, (0, 0, 11, 7), 8, 8).only_bg_t is None
    crop_mode = reference_image(img, None, (3, 2, 8, 5), 8, 8, tiling="crop")
    np.testing.assert_array_equal(crop_mode.only_bg_t, reference_tiled(img[:, 2:10], (1, 2, 6, 5)))
    no_mask = reference_all_variants(crop_mode, {"mixed_same": bg})
    assert no_mask["no_fg"] is None and no_mask["only_fg"] is None and no_mask["mixed_same"] is None


# ----------------------------------------------------------------------------------------------- decode
def test_decode_keeps_stored_orientation_and_makes_rgb(photo_index):
    from bgsynth.index import DatasetIndex

    idx = DatasetIndex.load(photo_index)
    for rec in idx.records():
        img = reference_decode(rec.path)
        assert img.shape == (rec.height, rec.width, 3) and img.dtype == np.uint8, rec.file_name
        with Image.open(rec.path) as im:
            if im.mode == "L":
                assert (img[..., 0] == img[..., 2]).all()
            if im.getexif().get(0x0112) == 6:  # rotated 90 degrees when shown, but decoded as stored
                assert im.size == (rec.width, rec.height) and rec.width > rec.height
