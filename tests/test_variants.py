"""Tests of engine/variants.py against the slow per-image reference (tests/reference.py), written from PAPER.md."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch

from bgsynth.errors import ConfigError
from bgsynth.geometry import tile_strips
from bgsynth.types import BackgroundPool, Batch
from bgsynth.variants import (
    MIXED_VARIANTS,
    VARIANT_NAMES,
    VARIANTS,
    background_pool_from_batch,
    choose_backgrounds,
    display_name,
    resolve_variants,
    synthesize,
)
from bgsynth.rng import splitmix64
from reference import (
    reference_background,
    reference_strip,
    reference_strip_side,
    reference_tiled,
    reference_variant,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- random batches
def _blob_masks(g: torch.Generator, b: int, c: int) -> torch.Tensor:
    """Elliptic blobs plus speckle: masks with holes, several components and border contact."""
    yy, xx = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
    cy, cx = torch.rand(b, generator=g) * c, torch.rand(b, generator=g) * c
    ry, rx = 1 + torch.rand(b, generator=g) * c / 2, 1 + torch.rand(b, generator=g) * c / 2
    blob = ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2 + ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2 < 1
    speckle = torch.rand((b, c, c), generator=g) < 0.05
    return (blob ^ speckle).to(torch.uint8)[:, None]


def random_batch(seed: int, b: int = 12, c: int = 20, id_offset: int = 0) -> Batch:
    """A random :class:`Batch` with every corner case: empty boxes, full-crop boxes (no Only-BG-T), missing masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, c, c), generator=g, dtype=torch.uint8)
    x0 = torch.randint(0, c, (b,), generator=g)
    y0 = torch.randint(0, c, (b,), generator=g)
    x1 = torch.minimum(x0 + torch.randint(0, c, (b,), generator=g), torch.tensor(c - 1))
    y1 = torch.minimum(y0 + torch.randint(0, c, (b,), generator=g), torch.tensor(c - 1))
    boxes = torch.stack([x0, y0, x1, y1], -1)
    if b >= 3:
        boxes[0] = torch.tensor([0, 0, -1, -1])  # box outside the crop
        boxes[1] = torch.tensor([0, 0, c - 1, c - 1])  # no margin
    boxes = boxes.to(torch.int32)
    strips = tile_strips(boxes, c, c)
    has_mask = torch.rand(b, generator=g) < 0.8
    masks = _blob_masks(g, b, c) * has_mask[:, None, None, None].to(torch.uint8)
    labels = torch.randint(0, 9, (b,), generator=g)
    ids = id_offset + torch.randperm(10 * b + 10, generator=g)[:b] * 2 + 1
    return Batch(images, masks, boxes, strips, labels, ids.to(torch.int64), has_mask, strips[:, 2] > 0)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).cpu().numpy()


def reference_outputs(batch: Batch, variant: str, pool_src: Batch | None = None, seed: int = 0):
    """Per-image reference of one variant: (images [B,H,W,3] uint8, valid [B], bg_ids [B])."""
    pool_bgt, pool_ids, pool_labels = {}, [], []
    if pool_src is not None:
        for i in range(len(pool_src)):
            t = reference_tiled(_hwc(pool_src.images[i]), pool_src.boxes[i].tolist())
            if t is not None:
                pool_bgt[int(pool_src.image_ids[i])] = t
        pool_ids = sorted(pool_bgt)
        label_of = {int(pool_src.image_ids[i]): int(pool_src.labels[i]) for i in range(len(pool_src))}
        pool_labels = [label_of[i] for i in pool_ids]
    outs, valid, bg_ids = [], [], []
    for i in range(len(batch)):
        img = _hwc(batch.images[i])
        mask = batch.masks[i, 0].numpy()
        box = batch.boxes[i].tolist()
        bg, bg_id = None, -1
        if variant in MIXED_VARIANTS:
            _, bg_id, _ = reference_background(
                int(batch.image_ids[i]), int(batch.labels[i]), variant, pool_ids, pool_labels, seed
            )
            bg = pool_bgt.get(bg_id)
        out = reference_variant(img, mask, box, variant, bg_np=bg)
        ok = {
            "original": True,
            "only_bg_b": box[2] >= box[0] and box[3] >= box[1],
            "only_bg_t": out is not None,
            "no_fg": bool(batch.has_mask[i]),
            "only_fg": bool(batch.has_mask[i]),
        }.get(variant, bool(batch.has_mask[i]) and bg_id >= 0)
        outs.append(img if out is None else out)
        valid.append(ok)
        bg_ids.append(bg_id)
    return np.stack(outs), np.array(valid), np.array(bg_ids)


# ----------------------------------------------------------------------------------------------- registry
def test_registry_names_and_display():
    assert VARIANT_NAMES == (
        "original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next",
    )
    assert [VARIANTS[n].display for n in VARIANT_NAMES] == [
        "Original", "Only-BG-B", "Only-BG-T", "No-FG", "Only-FG", "Mixed-Same", "Mixed-Rand", "Mixed-Next",
    ]
    assert MIXED_VARIANTS == ("mixed_same", "mixed_rand", "mixed_next")
    assert [VARIANTS[n].code for n in VARIANT_NAMES] == list(range(8))  # part of the hash: never renumber
    assert display_name("no_fg") == "No-FG"
    assert resolve_variants("all") == list(VARIANT_NAMES)
    assert resolve_variants("Only-BG-T, original,ONLY_BG_T") == ["only_bg_t", "original"]
    assert resolve_variants(["Mixed-Rand"]) == ["mixed_rand"]
    with pytest.raises(ConfigError, match="unknown variant 'bogus'"):
        resolve_variants(["original", "bogus"])
    with pytest.raises(ConfigError, match="at least one"):
        resolve_variants([])


# ----------------------------------------------------------------------------------------------- strip rule
@pytest.mark.parametrize("h,w", [(5, 8), (8, 5), (6, 6), (1, 4), (3, 1)])
def test_strip_rule_exhaustive(h, w):
    """geometry.tile_strips == the reference strip rule for every possible box of small images."""
    boxes = [
        (x0, y0, x1, y1)
        for x0, x1 in itertools.combinations_with_replacement(range(w), 2)
        for y0, y1 in itertools.combinations_with_replacement(range(h), 2)
    ] + [(0, 0, -1, -1)]
    got = tile_strips(torch.tensor(boxes), h, w).tolist()
    for box, s in zip(boxes, got):
        want = reference_strip(box, h, w)
        assert s == (list(want) if want is not None else [0, 0, 0, 0]), f"box {box} in {h}x{w}"


def test_strip_rule_fixtures():
    """Hand-made boxes with known answers: each strip, both ties, no-margin exclusion (12 x 16 image)."""
    cases = {
        (9, 2, 12, 9): "left",  # 9*12 > 3*16; 9 > 4
        (2, 1, 3, 10): "right",  # 13*12 > 2*16; 2 < 13
        (1, 8, 14, 10): "top",  # 2*12 < 8*16; 8 > 2
        (2, 1, 13, 2): "bottom",  # 3*12 < 10*16; 1 < 10
        (4, 3, 12, 9): "bottom",  # tie across pairs (4*12 == 3*16) -> top/bottom; tie 3 == 3 -> bottom
        (5, 1, 11, 11): "right",  # tie within left/right (5 == 5) -> right
        (0, 0, 15, 11): None,  # the whole image: no margin, excluded
    }
    for box, side in cases.items():
        assert reference_strip_side(box, 12, 16) == side, box
    img = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    assert reference_tiled(img, (0, 0, 15, 11)) is None
    t = reference_tiled(img, (2, 1, 3, 10))  # right strip x >= 3 (width 13) tiles the box from the origin
    assert np.array_equal(t[5, 2], img[5, 3 + 2 % 13]) and np.array_equal(t[0], img[0])


# ----------------------------------------------------------------------------------------------- engine == reference
@pytest.mark.parametrize("seed", [0, 1])
def test_engine_matches_reference_all_variants(seed):
    batch = random_batch(seed, b=12, c=20)
    pool_src = random_batch(seed + 100, b=30, c=20, id_offset=1)  # odd ids: may collide with the batch's ids
    pool_src = Batch.cat([pool_src, batch.slice(slice(0, 6))])  # the batch's own images are in the pool too
    pool = background_pool_from_batch(pool_src)
    outs = synthesize(batch, "all", pool=pool, seed=seed)
    assert list(outs) == list(VARIANT_NAMES)
    for name, out in outs.items():
        want, valid, bg_ids = reference_outputs(batch, name, pool_src, seed)
        np.testing.assert_array_equal(out.valid.numpy(), valid, err_msg=f"{name}: valid")
        np.testing.assert_array_equal(out.bg_ids.numpy(), bg_ids, err_msg=f"{name}: bg_ids")
        got = out.images.permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{name}: images")
        assert out.images.dtype == torch.uint8 and out.valid.dtype == torch.bool
        assert out.bg_ids.dtype == torch.int64 and out.bg_labels.dtype == torch.int64


def test_background_pool_from_batch():
    batch = random_batch(3, b=10, c=16)
    pool = background_pool_from_batch(batch)
    keep = [i for i in range(10) if reference_strip(batch.boxes[i].tolist(), 16, 16) is not None]
    order = sorted(keep, key=lambda i: int(batch.image_ids[i]))
    assert pool.image_ids.tolist() == [int(batch.image_ids[i]) for i in order]
    assert pool.labels.tolist() == [int(batch.labels[i]) for i in order]
    for row, i in enumerate(order):
        want = reference_tiled(_hwc(batch.images[i]), batch.boxes[i].tolist())
        np.testing.assert_array_equal(_hwc(pool.images[row]), want)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_equals_torch_backend():
    batch = random_batch(5, b=6, c=20)
    pool = background_pool_from_batch(random_batch(6, b=10, c=20))
    a = synthesize(batch, "all", pool=pool, backend="torch")
    b = synthesize(batch, "all", pool=pool, backend="triton")
    for n in VARIANT_NAMES:
        assert torch.equal(a[n].images, b[n].images), n
        assert torch.equal(a[n].valid, b[n].valid) and torch.equal(a[n].bg_ids, b[n].bg_ids), n


@pytest.mark.parametrize(
    "dtype,channels_last,backend",
    [(torch.float32, False, "torch"), (torch.bfloat16, True, "torch"), (torch.float16, True, "triton"),
     (torch.bfloat16, True, "triton")],
)
def test_fused_path_equals_normalised_reference(dtype, channels_last, backend):
    batch = random_batch(7, b=6, c=20)
    pool_src = random_batch(8, b=10, c=20)
    pool = background_pool_from_batch(pool_src)
    outs = synthesize(batch, "all", pool=pool, seed=3, normalize=(MEAN, STD), dtype=dtype,
                      channels_last=channels_last, backend=backend)
    m = np.array(MEAN, np.float32)
    s = np.array(STD, np.float32)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, out in outs.items():
        assert out.images.dtype == dtype
        assert out.images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        want, _, _ = reference_outputs(batch, name, pool_src, seed=3)
        ref = ((want.astype(np.float32) / np.float32(255.0)) - m) / s
        got = out.images.float().permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=name)


def test_float_without_statistics_is_unit_range():
    batch = random_batch(9, b=3, c=8)
    out = synthesize(batch, ["original"], dtype=torch.float32)["original"].images
    assert torch.equal(out, batch.images.float() / 255)
    assert synthesize(batch, ["original"], mean=MEAN, std=STD)["original"].images.dtype == torch.float32


def test_inputs_not_modified_and_empty_batch():
    batch = random_batch(10, b=5, c=12)
    pool = background_pool_from_batch(random_batch(11, b=6, c=12))
    copy = {k: v.clone() for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    synthesize(batch, "all", pool=pool)
    for k, v in copy.items():
        assert torch.equal(getattr(batch, k), v), k
    empty = batch.slice(slice(0, 0))
    outs = synthesize(empty, "all", pool=pool, mean=MEAN, std=STD, dtype=torch.bfloat16, channels_last=True)
    for name, out in outs.items():
        assert out.images.shape == (0, 3, 12, 12) and out.valid.shape == (0,), name


def test_channels_last_batches_give_the_same_variants_and_pools():
    """The decoders' crops are channels_last in memory: the variants, in every output form, and the pool made from
    such a batch equal those of the same batch laid out contiguously (the pool keeps the batch's layout), and
    equal the per-image reference."""
    plain = random_batch(12, b=9, c=20)
    cl = dataclasses.replace(plain, images=plain.images.contiguous(memory_format=torch.channels_last))
    pool_plain, pool_cl = background_pool_from_batch(plain), background_pool_from_batch(cl)
    assert torch.equal(pool_plain.images, pool_cl.images) and pool_plain.images.is_contiguous()
    assert pool_cl.images.is_contiguous(memory_format=torch.channels_last)
    for kw in ({}, {"channels_last": True}, {"mean": MEAN, "std": STD}, {"mean": MEAN, "std": STD,
                                                                       "dtype": torch.bfloat16, "channels_last": True}):
        a = synthesize(plain, "all", pool=pool_plain, seed=4, **kw)
        b = synthesize(cl, "all", pool=pool_cl, seed=4, **kw)
        for name in a:
            assert torch.equal(a[name].images, b[name].images), (name, kw)
            assert torch.equal(a[name].bg_ids, b[name].bg_ids), (name, kw)
    for name in ("only_fg", "mixed_rand"):
        imgs, valid, _ = reference_outputs(cl, name, pool_src=cl, seed=4)
        got = synthesize(cl, [name], pool=pool_cl, seed=4)[name]
        for i in range(len(cl)):
            if valid[i]:
                np.testing.assert_array_equal(got.images[i].permute(1, 2, 0).numpy(), imgs[i], err_msg=f"{name} {i}")


# ----------------------------------------------------------------------------------------------- backgrounds
def _pool(ids, labels, c=2) -> BackgroundPool:
    n = len(ids)
    return BackgroundPool(torch.zeros(n, 3, c, c, dtype=torch.uint8), torch.tensor(labels), torch.tensor(ids))


def test_splitmix64_tensor_equals_python():
    xs = [0, 1, 2**31, 2**40 + 17, 2**63 - 1, -1, -(2**63)]
    t = splitmix64(torch.tensor(xs, dtype=torch.int64))
    for x, v in zip(xs, t.tolist()):
        assert v % 2**64 == splitmix64(x % 2**64)
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the published first output of SplitMix64 seeded with 0


@pytest.mark.parametrize("variant", MIXED_VARIANTS)
def test_choose_backgrounds_equals_reference(variant):
    g = np.random.default_rng(1)
    pool_ids = (g.permutation(400)[:90] * 3 + 2).tolist()
    pool_labels = g.integers(0, 9, 90).tolist()
    pool_labels[:3] = [-1, 9, 4]  # labels outside IN-9 never serve Mixed-Same/Next
    pool = _pool(pool_ids, pool_labels)
    ids = pool_ids[:40] + list(range(5000, 5030))  # images in the pool and outside it
    labels = pool_labels[:40] + g.integers(-1, 9, 30).tolist()
    for seed in (0, 1, 2**64 - 1):
        rows, bg_ids, bg_labels = choose_backgrounds(torch.tensor(ids), torch.tensor(labels), variant, pool, seed)
        for i, (iid, lab) in enumerate(zip(ids, labels)):
            want = reference_background(iid, lab, variant, pool_ids, pool_labels, seed)
            assert (int(rows[i]), int(bg_ids[i]), int(bg_labels[i])) == want, (variant, seed, iid)


def test_background_semantics():
    g = np.random.default_rng(2)
    pool_ids = list(range(100, 370))
    pool_labels = [i % 9 for i in range(270)]
    pool = _pool(pool_ids, pool_labels)
    ids = torch.tensor(pool_ids)
    labels = torch.tensor(pool_labels)
    same = choose_backgrounds(ids, labels, "mixed_same", pool, 0)
    assert torch.equal(same[2], labels) and bool((same[1] != ids).all())
    nxt = choose_backgrounds(ids, labels, "mixed_next", pool, 0)
    assert torch.equal(nxt[2], (labels + 1) % 9)
    rnd = choose_backgrounds(ids, labels, "mixed_rand", pool, 0)
    assert bool((rnd[1] != ids).all()) and bool((rnd[0] >= 0).all())
    assert len(set(rnd[2].tolist())) == 9  # any class
    frac_same = float((rnd[2] == labels).float().mean())
    assert 0.02 < frac_same < 0.3  # about 1/9 of random backgrounds share the class
    # the seed matters, the pool's row order does not
    other = choose_backgrounds(ids, labels, "mixed_same", pool, 1)
    assert not torch.equal(other[1], same[1])
    perm = torch.from_numpy(g.permutation(270))
    shuffled = pool.select(perm)
    again = choose_backgrounds(ids, labels, "mixed_same", shuffled, 0)
    assert torch.equal(again[1], same[1]) and torch.equal(shuffled.image_ids[again[0]], same[1])


def test_background_exclusion_and_no_candidate():
    pool = _pool([10, 11, 12], [0, 0, 1])
    rows, bg_ids, _ = choose_backgrounds(torch.tensor([10, 12, 13, 14]), torch.tensor([0, 1, 2, 8]), "mixed_same",
                                         pool, 0)
    assert bg_ids.tolist() == [11, -1, -1, -1]  # 12 is its class's only member: no candidate but itself
    assert rows.tolist() == [1, -1, -1, -1]
    _, nxt, _ = choose_backgrounds(torch.tensor([13, 14]), torch.tensor([8, 0]), "mixed_next", pool, 0)
    assert nxt[0].item() in (10, 11) and nxt[1].item() == 12  # class 0 follows 8; class 1 follows 0
    empty = choose_backgrounds(torch.tensor([1]), torch.tensor([0]), "mixed_rand", _pool([], []), 0)
    assert [t.tolist() for t in empty] == [[-1], [-1], [-1]]
    with pytest.raises(ConfigError, match="expected one of"):
        choose_backgrounds(torch.tensor([1]), torch.tensor([0]), "only_fg", pool, 0)


def test_determinism_across_batch_sizes_orders_and_shards():
    full = random_batch(12, b=24, c=10)
    pool = background_pool_from_batch(random_batch(13, b=40, c=10))
    whole = synthesize(full, MIXED_VARIANTS, pool=pool, seed=5)
    want = {n: dict(zip(full.image_ids.tolist(), o.bg_ids.tolist())) for n, o in whole.items()}
    img_of = {n: {int(i): o.images[k] for k, i in enumerate(full.image_ids)} for n, o in whole.items()}
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    splits = [
        [full.slice(slice(k, k + 5)) for k in range(0, 24, 5)],  # batch size 5
        [full.slice(perm)],  # shuffled
        [full.slice(slice(s, None, 3)) for s in range(3)],  # three shards
    ]
    for parts in splits:
        for part in parts:
            outs = synthesize(part, MIXED_VARIANTS, pool=pool, seed=5)
            for n, o in outs.items():
                for k, i in enumerate(part.image_ids.tolist()):
                    assert o.bg_ids[k].item() == want[n][i]
                    assert torch.equal(o.images[k], img_of[n][i])


# ----------------------------------------------------------------------------------------------- errors
def test_errors():
    batch = random_batch(14, b=3, c=8)
    with pytest.raises(ConfigError, match="need a BackgroundPool"):
        synthesize(batch, ["mixed_rand"])
    small = background_pool_from_batch(random_batch(15, b=4, c=6))
    with pytest.raises(ConfigError, match="same geometry"):
        synthesize(batch, ["mixed_same"], pool=small)
    with pytest.raises(ConfigError, match="not both"):
        synthesize(batch, ["original"], normalize=(MEAN, STD), mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match="expected a bgsynth.types.Batch"):
        synthesize(batch.images, ["original"])
    with pytest.raises(ConfigError, match="integer seed"):
        synthesize(batch, ["original"], seed=1.5)
    synthesize(batch, ["original", "only_fg"])  # no pool needed without Mixed-*


# ----------------------------------------------------------------------------------------------- built-in dataset
def _reference_crop(arr: np.ndarray, plan) -> np.ndarray:
    """Nearest-neighbour resize to the plan's resized size, then its centre crop, written independently of
    bgsynth.geometry: each output pixel takes the source pixel whose area [k, k+1) holds the output pixel's centre,
    computed with exact fractions. (PIL's NEAREST computes the same centres in floating point and differs where a
    centre falls exactly on a pixel border.)"""
    from fractions import Fraction

    rh, rw = plan.resized
    top, left = plan.offset
    h, w = arr.shape[:2]
    rows = [int((Fraction(2 * (top + i) + 1, 2) * h / rh)) for i in range(plan.crop)]
    cols = [int((Fraction(2 * (left + j) + 1, 2) * w / rw)) for j in range(plan.crop)]
    return arr[np.ix_(rows, cols)]


def test_builtin_dataset_parity(tiny_index, tiny_geometry):
    """On a slice of the built-in dataset: masks and boxes from the pil loader == an independent nearest
    resize + crop of the index's full-size masks and boxes; every variant == the per-image reference on the decoded crop."""
    from bgsynth.pipeline import create_loader

    index = tiny_index.select(split="val", per_class=2, seed=0)
    # the crop-space tiling (the paper's full-resolution tiling is checked on real photographs in test_photos.py)
    loader = create_loader(index, backend="pil", geometry=tiny_geometry, batch_size=9, prefetch=0, tiling="crop")
    batches = list(loader)
    batch = Batch.cat(batches)
    assert len(batch) == len(index)
    pool_src = Batch.cat(list(create_loader(tiny_index.select(split="val", per_class=3, seed=1), backend="pil",
                                            geometry=tiny_geometry, batch_size=32, prefetch=0, tiling="crop")))
    pool = background_pool_from_batch(pool_src)
    assert len(pool) > 9
    for i in range(len(batch)):
        rec = tiny_index.record(int(batch.image_ids[i]))
        plan = tiny_geometry.plan(rec.height, rec.width)
        mask = _reference_crop(rec.mask().astype(np.uint8), plan)
        np.testing.assert_array_equal(batch.masks[i, 0].numpy(), mask, err_msg=f"mask of {rec.file_name}")
        full_box = np.zeros((rec.height, rec.width), np.uint8)
        x0, y0, x1, y1 = rec.union_box
        full_box[y0 : y1 + 1, x0 : x1 + 1] = 1
        crop_box = _reference_crop(full_box, plan)
        ys, xs = np.nonzero(crop_box)
        want_box = [xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [0, 0, -1, -1]
        assert batch.boxes[i].tolist() == [int(v) for v in want_box], rec.file_name
        assert int(batch.labels[i]) == rec.label
    outs = synthesize(batch, "all", pool=pool, seed=0)
    for name, out in outs.items():
        want, valid, bg_ids = reference_outputs(batch, name, pool_src, seed=0)
        np.testing.assert_array_equal(out.images.permute(0, 2, 3, 1).numpy(), want, err_msg=name)
        np.testing.assert_array_equal(out.valid.numpy(), valid, err_msg=name)
        np.testing.assert_array_equal(out.bg_ids.numpy(), bg_ids, err_msg=name)
    # same backgrounds whatever the loader's batch size or sharding
    for kw in (dict(batch_size=4), dict(batch_size=32, num_shards=2, shard_id=1)):
        for part in create_loader(index, backend="pil", geometry=tiny_geometry, prefetch=0, **kw):
            o = synthesize(part, ["mixed_rand"], pool=pool, seed=0)["mixed_rand"]
            for k, iid in enumerate(part.image_ids.tolist()):
                j = batch.image_ids.tolist().index(iid)
                assert int(o.bg_ids[k]) == int(outs["mixed_rand"].bg_ids[j])
                assert torch.equal(o.images[k], outs["mixed_rand"].images[j])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    """The Triton path on CUDA gives the CPU reference's images, validity and backgrounds (fused path within tol)."""
    batch = random_batch(16, b=10, c=40)
    pool = background_pool_from_batch(random_batch(17, b=20, c=40))
    cpu = synthesize(batch, "all", pool=pool, seed=2)
    gpu = synthesize(batch.to("cuda"), "all", pool=pool.to("cuda"), seed=2)
    for n in VARIANT_NAMES:
        assert torch.equal(gpu[n].images.cpu(), cpu[n].images), n
        assert torch.equal(gpu[n].valid.cpu(), cpu[n].valid) and torch.equal(gpu[n].bg_ids.cpu(), cpu[n].bg_ids), n
    f_cpu = synthesize(batch, "all", pool=pool, seed=2, mean=MEAN, std=STD, dtype=torch.bfloat16, channels_last=True)
    f_gpu = synthesize(batch.to("cuda"), "all", pool=pool.to("cuda"), seed=2, mean=MEAN, std=STD,
                       dtype=torch.bfloat16, channels_last=True)
    for n in VARIANT_NAMES:
        assert f_gpu[n].images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(f_gpu[n].images.cpu().float(), f_cpu[n].images.float(), rtol=1.6e-2, atol=1e-2)
