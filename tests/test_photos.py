"""Parity of the whole pipeline with the paper's construction on real photographs (tests/photos.py).

For every installed decode backend, both tiling modes (``"paper"``: Only-BG-T tiled at full resolution, then
resized and cropped; ``"crop"``: tiled inside the crop) and two geometries (the paper's 256 -> 224 and 128 -> 112),
the fixture is decoded, a background pool is built from its val split, all eight variants are synthesised, and
every valid image is compared with the slow float64 reference (tests/reference.py, independent of the engine):
at most 1 grey level apart (the decoders round between their two resampling passes, the reference does not).
Validity flags, masks, boxes, pool membership and the Mixed-* background ids are compared exactly.

The fixture's own claims (strip-rule ties, the whole-image box, which images the two modes tile differently) are
recomputed here with the reference rather than trusted.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from bgsynth.geometry import CropGeometry
from bgsynth.index import DatasetIndex
from bgsynth.pipeline import available_backends, create_loader
from bgsynth.pool import build_background_pool
from bgsynth.types import Batch
from bgsynth.variants import synthesize
from photos import PHOTOS
from fixtures import calibrate_batchnorm
from reference import (
    VARIANT_NAMES,
    reference_all_variants,
    reference_background,
    reference_decode,
    reference_image,
    reference_strip_side,
)

MIXED = ("mixed_same", "mixed_rand", "mixed_next")
GEOMETRIES = ((256, 224), (128, 112))
TILINGS = ("paper", "crop")
BACKENDS = tuple(available_backends())
MAX_DIFF = 1  # grey levels: the backends round between resampling passes, the reference once at the end
SEED = 0
BATCH = 8  # two batches over the 14 images: the background choice must not depend on the batching


def _build_pool(index, **kw):
    return build_background_pool(index, **kw)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).cpu().numpy()


# ----------------------------------------------------------------------------------------------- the reference side
@functools.lru_cache(maxsize=None)
def _decoded(index_path: str):
    """``[(record, image HxWx3, mask HxW or None)]`` of the fixture, decoded the reference way, sorted by id."""
    idx = DatasetIndex.load(index_path)
    return tuple((rec, reference_decode(rec.path), rec.mask()) for rec in idx.records())


@functools.lru_cache(maxsize=None)
def _reference(index_path: str, resize: int, crop: int, tiling: str):
    """The reference of the whole fixture in one geometry and tiling mode.

    Returns ``{image_id: (ReferenceImage, {variant: array or None}, {mixed variant: (bg_id, bg_label)})}`` and the
    reference pool ids (sorted), i.e. every val image with an Only-BG-T under this tiling.
    """
    items = _decoded(index_path)
    refs = {rec.id: reference_image(img, mask, rec.union_box, resize, crop, tiling) for rec, img, mask in items}
    labels = {rec.id: rec.label for rec, _, _ in items}
    pool_ids = sorted(i for i, r in refs.items() if r.only_bg_t is not None)
    pool_labels = [labels[i] for i in pool_ids]
    out = {}
    for i, ref in refs.items():
        bgs, chosen = {}, {}
        for v in MIXED:
            _row, bg_id, bg_label = reference_background(i, labels[i], v, pool_ids, pool_labels, seed=SEED)
            bgs[v] = refs[bg_id].only_bg_t if bg_id >= 0 else None
            chosen[v] = (bg_id, bg_label)
        out[i] = (ref, reference_all_variants(ref, bgs), chosen)
    return out, pool_ids


# ----------------------------------------------------------------------------------------------- the engine side
@functools.lru_cache(maxsize=None)
def _engine(index_path: str, backend: str, resize: int, crop: int, tiling: str):
    """Decode the fixture, build its val pool and synthesise all variants (CPU).

    Returns ``(batches, {variant: VariantOutput-like dict of concatenated tensors}, pool)``.
    """
    geom = CropGeometry(resize, crop)
    pool = _build_pool(index_path, geometry=geom, backend=backend, device="cpu", split="val", tiling=tiling)
    loader = create_loader(DatasetIndex.load(index_path), backend=backend, geometry=geom, batch_size=BATCH, device="cpu",
                           tiling=tiling, num_threads=2)
    batches, outs = [], []
    try:
        for batch in loader:
            batches.append(batch)
            outs.append(synthesize(batch, "all", pool=pool, seed=SEED))
    finally:
        loader.close()
    merged = {
        v: {f: torch.cat([getattr(o[v], f) for o in outs]) for f in ("images", "valid", "bg_ids", "bg_labels")}
        for v in VARIANT_NAMES
    }
    return tuple(batches), merged, pool


def _max_diffs(index_path, backend, resize, crop, tiling):
    """``{variant: max |engine - reference| over the valid images}`` plus the checks of flags and ids (asserts)."""
    ref, pool_ids = _reference(index_path, resize, crop, tiling)
    batches, out, pool = _engine(index_path, backend, resize, crop, tiling)
    ids = torch.cat([b.image_ids for b in batches]).tolist()
    assert ids == sorted(ref), f"decoded ids {ids}, expected every fixture image {sorted(ref)}"
    assert pool.image_ids.tolist() == pool_ids, f"{tiling}: pool ids {pool.image_ids.tolist()} != reference {pool_ids}"
    worst = {v: 0 for v in VARIANT_NAMES}
    worst["pool"] = 0
    for k, i in enumerate(pool.image_ids.tolist()):
        d = np.abs(_hwc(pool.images[k]).astype(int) - ref[i][0].only_bg_t.astype(int)).max()
        worst["pool"] = max(worst["pool"], int(d))
    for v in VARIANT_NAMES:
        o = out[v]
        for row, i in enumerate(ids):
            r_img, r_vars, r_chosen = ref[i]
            expected = r_vars[v]
            valid = bool(o["valid"][row])
            assert valid == (expected is not None), (
                f"{backend}/{tiling}/{resize}->{crop}: {v} of image {i} ({PHOTOS[i].name}): valid={valid}, "
                f"reference {'has' if expected is not None else 'has no'} such image"
            )
            if v in MIXED:
                bg_id, bg_label = r_chosen[v]
                got = (int(o["bg_ids"][row]), int(o["bg_labels"][row]))
                assert got == (bg_id, bg_label), f"{v} of image {i}: background {got}, reference {(bg_id, bg_label)}"
            if expected is None:
                continue
            d = int(np.abs(_hwc(o["images"][row]).astype(int) - expected.astype(int)).max())
            worst[v] = max(worst[v], d)
    return worst


@pytest.fixture(scope="module")
def photo_path(photo_index):
    return str(photo_index)


# ----------------------------------------------------------------------------------------------- the fixture's facts
def test_fixture_covers_the_edge_cases(photo_path):
    from PIL import Image

    items = _decoded(photo_path)
    assert len(items) >= 12
    modes, exif = set(), {}
    for rec, img, mask in items:
        assert rec.width != rec.height and 239 <= min(rec.width, rec.height) and max(rec.width, rec.height) <= 741
        assert img.shape == (rec.height, rec.width, 3), f"{rec.file_name}: decoded {img.shape} (EXIF applied?)"
        with Image.open(rec.path) as im:
            modes.add(im.mode)
            exif[rec.id] = im.getexif().get(0x0112)
        x0, y0, x1, y1 = rec.union_box
        assert mask is not None and mask.any()
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1, rec.file_name
    assert {"L", "CMYK", "RGB"} <= modes
    assert 6 in exif.values()
    grey = [img for rec, img, _ in items if PHOTOS[rec.id].mode == "L"]
    assert grey and all((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all() for img in grey)
    boxes = {rec.id: (rec.union_box, rec.height, rec.width) for rec, _, _ in items}
    assert any(b[0] == 0 for b, h, w in boxes.values() if b != (0, 0, w - 1, h - 1))
    assert any(b[3] == h - 1 for b, h, w in boxes.values() if b != (0, 0, w - 1, h - 1))
    assert any(b[2] == w - 1 for b, h, w in boxes.values() if b != (0, 0, w - 1, h - 1))
    assert any(len(rec.boxes) >= 2 for rec, _, _ in items)
    assert any(min(rec.width, rec.height) < 256 for rec, _, _ in items)  # upscaled by the paper's geometry
    # a whole-image box: no Only-BG-T
    assert any(reference_strip_side(b, h, w) is None for b, h, w in boxes.values())
    # exact ties of the strip rule at full resolution, and the side the rule must then pick
    ties = {"lr_tb": [], "left_right": [], "top_bottom": []}
    for i, ((x0, y0, x1, y1), h, w) in boxes.items():
        lr, tb = max(x0, w - x1), max(y0, h - y1)
        side = reference_strip_side((x0, y0, x1, y1), h, w)
        if side is None:
            continue
        if lr * h == tb * w:
            ties["lr_tb"].append(i)
            assert side in ("top", "bottom")
        if side in ("left", "right") and x0 == w - x1:
            ties["left_right"].append(i)
            assert side == "right"
        if side in ("top", "bottom") and y0 == h - y1:
            ties["top_bottom"].append(i)
            assert side == "bottom"
    assert all(ties.values()), ties
    labels = [rec.label for rec, _, _ in items]
    assert len(set(labels)) >= 6 and max(labels.count(c) for c in set(labels)) >= 2


def test_fixture_is_deterministic(photo_path, tmp_path):
    import pathlib

    from photos import build_photo_index

    again = build_photo_index(tmp_path)
    first = pathlib.Path(photo_path)
    a, b = DatasetIndex.load(first), DatasetIndex.load(again)
    assert a.data["images"] == b.data["images"] and a.data["annotations"] == b.data["annotations"]
    for rec in a.records():
        assert pathlib.Path(rec.path).read_bytes() == (b.image_root / rec.file_name).read_bytes(), rec.file_name


@pytest.mark.parametrize("resize,crop", [GEOMETRIES[0]])
def test_paper_and_crop_tiling_really_differ_on_the_fixture(photo_path, resize, crop):
    """The two modes are different constructions here: other strip sides, and other pixels inside the box."""
    paper, _ = _reference(photo_path, resize, crop, "paper")
    cropm, _ = _reference(photo_path, resize, crop, "crop")
    other_side, big = [], []
    for i in paper:
        p, c = paper[i][0], cropm[i][0]
        if p.strip_side is not None and c.strip_side is not None and p.strip_side != c.strip_side:
            other_side.append(i)
        if p.only_bg_t is not None and c.only_bg_t is not None:
            x0, y0, x1, y1 = c.box
            inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            mad = np.abs(p.only_bg_t[inside].astype(float) - c.only_bg_t[inside].astype(float)).mean()
            if mad > 8.0:
                big.append(i)
    assert len(other_side) >= 2, f"only images {other_side} pick another strip side in the two modes"
    assert len(big) >= 3, f"only images {big} differ by more than 8 grey levels inside the box"
    # and the mode matters for the pool: an image whose box covers the whole crop has an Only-BG-T in paper mode only
    assert any(paper[i][0].only_bg_t is not None and cropm[i][0].only_bg_t is None for i in paper)


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("resize,crop", GEOMETRIES, ids=lambda v: str(v))
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_match_the_reference(photo_path, backend, tiling, resize, crop):
    ref, _pool_ids = _reference(photo_path, resize, crop, tiling)
    batches, _out, _pool = _engine(photo_path, backend, resize, crop, tiling)
    # the crop-space pieces are exact
    for b in batches:
        assert b.tiling == tiling
        assert (b.bgt is not None) == (tiling == "paper")
        for row, i in enumerate(b.image_ids.tolist()):
            r = ref[i][0]
            box = tuple(b.boxes[row].tolist())
            assert box == (r.box if r.box is not None else (0, 0, -1, -1)), f"image {i}: box {box} vs {r.box}"
            assert (b.masks[row, 0].numpy() != 0).tolist() == r.mask.tolist(), f"image {i}: crop mask differs"
            assert bool(b.has_bgt[row]) == (r.only_bg_t is not None), f"image {i}: has_bgt"
    worst = _max_diffs(photo_path, backend, resize, crop, tiling)
    bad = {v: d for v, d in worst.items() if d > MAX_DIFF}
    assert not bad, f"{backend}/{tiling}/{resize}->{crop}: max |diff| per variant {worst}"


TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by conftest without a GPU)")
@pytest.mark.parametrize("tiling", TILINGS)
def test_triton_kernels_match_torch_on_photos(photo_path, tiling):
    """Only-BG-T and Mixed-* through the Triton kernels (the interpreter on CPU) equal the torch reference."""
    pytest.importorskip("triton")
    resize, crop = GEOMETRIES[1]
    backend = "pil" if "pil" in BACKENDS else BACKENDS[0]
    batches, _out, pool = _engine(photo_path, backend, resize, crop, tiling)
    # the interpreter is slow: a few rows that cover the cases (Only-BG-T in paper mode only / in neither mode,
    # a Mixed-Same and a Mixed-Next without a candidate)
    cases = ("coffee", "chelsea", "rocket", "clock")
    wanted = {k for k, p in enumerate(PHOTOS) if p.name in cases}
    rows = [b.slice(torch.tensor([k for k, i in enumerate(b.image_ids.tolist()) if i in wanted], dtype=torch.long))
            for b in batches]
    b = Batch.cat([r for r in rows if len(r)])
    assert sorted(b.image_ids.tolist()) == sorted(wanted)
    names = ["only_bg_t", *MIXED]
    a = synthesize(b, names, pool=pool, seed=SEED, backend="torch")
    t = synthesize(b, names, pool=pool, seed=SEED, backend="triton")
    for v in names:
        assert torch.equal(a[v].images, t[v].images), f"{tiling}: {v} differs between torch and triton"
        assert torch.equal(a[v].valid, t[v].valid) and torch.equal(a[v].bg_ids, t[v].bg_ids)


# ----------------------------------------------------------------------------------------------- lossless export
def _calibrated_net(index, geometry):
    """A random bgsynth_cnn whose BatchNorm statistics are set on the fixture (predictions spread over classes)."""
    from bgsynth.models import create_model

    torch.manual_seed(0)
    net = create_model("bgsynth_cnn", 9)
    batch = Batch.cat(list(create_loader(index, backend="pil", geometry=geometry, tiling="crop")))
    return calibrate_batchnorm(net, batch.images.float() / 255)


@pytest.mark.parametrize("tiling", TILINGS)
def test_png_export_read_the_official_way_gives_the_eval_predictions(photo_path, tmp_path, tiling):
    """``bgsynth export --format png`` read back the way the official ``in9_eval.py`` reads the release
    (torchvision ImageFolder + ToTensor, the model behind its mean/std normaliser, batches of 32) gives the same
    prediction as ``evaluate`` in memory for every exported composite of every variant."""
    from torchvision import datasets, transforms

    from bgsynth.evaluate import evaluate
    from bgsynth.export import export, release_paths
    from bgsynth.models import LoadedModel

    index = DatasetIndex.load(photo_path)
    geometry = CropGeometry(128, 112)
    net = _calibrated_net(index, geometry)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loaded = LoadedModel(net, 9, "in9", mean, std, arch="bgsynth_cnn", provenance={"spec": "test"})
    res = evaluate(index, loaded, variants="all", split="val", seed=SEED, geometry=geometry, backend="pil",
                   batch_size=5, progress=False, tiling=tiling, examples_per_class=0)
    out = tmp_path / "release"
    export(index, out, variants="all", seed=SEED, geometry=geometry, backend="pil", split="val", progress=False,
           image_format="png", consistent=False, masks=False, tiling=tiling)
    stem_to_id = {stem: i for i, (_s, _c, stem) in release_paths(index, index.ids).items()}
    recs = res.records
    ours = {(int(recs.image_id[k]), recs.variants[int(recs.variant[k])]): (int(recs.pred[k]), bool(recs.valid[k]))
            for k in range(len(recs))}
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    compared, preds = 0, set()
    for variant in VARIANT_NAMES:
        folder = datasets.ImageFolder(str(out / variant / "val"), transform=transforms.ToTensor())
        loader = torch.utils.data.DataLoader(folder, batch_size=32, shuffle=False, num_workers=0)
        files = [p for p, _ in folder.samples]
        got = []
        with torch.no_grad():
            for x, _ in loader:
                got += net((x - m) / s).argmax(1).tolist()
        valid_ids = {i for (i, v), (_p, ok) in ours.items() if v == variant and ok}
        assert {stem_to_id[os.path.splitext(os.path.basename(f))[0]] for f in files} == valid_ids, variant
        for f, p in zip(files, got):
            image_id = stem_to_id[os.path.splitext(os.path.basename(f))[0]]
            assert p == ours[(image_id, variant)][0], (variant, f)
            preds.add(p)
            compared += 1
    assert compared >= 8 * 10 and len(preds) >= 3  # most composites of the fixture, not one class everywhere
