"""Tests of bgsynth.augment (the background-swap transform, also as a kornia augmentation) and of
bgsynth.trainloader (the training iterator).

Independent references used here:

* random resized crop + flip of images: plain slicing, ``F.interpolate(..., align_corners=False)`` and
  ``torch.flip``, one sample at a time;
* of masks: plain integer indexing with :func:`bgsynth.geometry.nearest_map` and ``torch.flip``;
* Only-BG-T of an in-batch partner: :func:`kernels.tile_fill_torch`;
* the crop-box rule: a per-sample Python transcription of torchvision's ``RandomResizedCrop.get_params``;
* probabilities: Hoeffding's bound ``P(|k/n - p| >= t) <= 2 exp(-2 n t^2)`` at a failure probability of 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from bgsynth.augment import (
    AUGMENT_VARIANTS,
    AugmentParams,
    BackgroundSwap,
    SwapConfig,
    parse_probs,
    resized_crop_flip,
    sample_params,
    sample_resized_crops,
)
from bgsynth.errors import ConfigError
from bgsynth.geometry import nearest_map, tile_strips
from bgsynth.kernels import tile_fill_torch
from bgsynth.rng import hash_bits, hash_uniform
from bgsynth.trainloader import LoaderConfig, TrainIterator
from bgsynth.types import BackgroundPool
from bgsynth.variants import VARIANTS

from conftest import cpu_and_cuda

CODE = {n: VARIANTS[n].code for n in AUGMENT_VARIANTS}  # the registry's codes
ALL5 = {"original": 0.2, "mixed_rand": 0.3, "mixed_same": 0.2, "only_fg": 0.15, "no_fg": 0.15}


# ------------------------------------------------------------------------------------------------ references
def ref_bilinear(img: torch.Tensor, crop, flip: bool, size: int) -> torch.Tensor:
    """One image ``[C, H, W]`` (float) -> slice, ``F.interpolate`` (half-pixel centres), ``torch.flip``."""
    x0, y0, w, h = (int(v) for v in crop)
    out = torch.nn.functional.interpolate(img[None, :, y0 : y0 + h, x0 : x0 + w].float(), size=(size, size),
                                          mode="bilinear", align_corners=False)
    return torch.flip(out[0], dims=[-1]) if flip else out[0]


def ref_nearest(mask: torch.Tensor, crop, flip: bool, size: int) -> torch.Tensor:
    """One mask ``[1, H, W]`` -> crop + nearest resize with plain integer indexing + flip."""
    x0, y0, w, h = (int(v) for v in crop)
    rows = torch.from_numpy(y0 + nearest_map(h, size))
    cols = torch.from_numpy(x0 + nearest_map(w, size))
    out = mask[:, rows][:, :, cols]
    return torch.flip(out, dims=[-1]) if flip else out


def ref_get_params(u: list[float], height: int, width: int, scale, ratio):
    """torchvision's RandomResizedCrop.get_params with the uniforms ``u`` instead of torch's RNG."""
    area = height * width
    attempts = (len(u) - 2) // 2
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(attempts):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[2 * k])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[2 * k + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(u[-2] * (height - h + 1)))
            j = int(math.floor(u[-1] * (width - w + 1)))
            return j, i, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def hoeffding(n: int, delta: float = 1e-6) -> float:
    return math.sqrt(math.log(2.0 / delta) / (2.0 * n))


def make_scene(n: int, size: int = 16, seed: int = 0, device="cpu", labels=None):
    """Random noise images with a random rectangular-ish blob mask and its box (leaving margins)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    for i in range(n):
        x0, y0 = (int(v) for v in torch.randint(1, size // 2, (2,), generator=g))
        x1 = x0 + int(torch.randint(2, size // 2 - 1, (1,), generator=g))
        y1 = y0 + int(torch.randint(2, size // 2 - 1, (1,), generator=g))
        blob = torch.rand(y1 - y0 + 1, x1 - x0 + 1, generator=g) < 0.7
        blob[0, 0] = blob[-1, -1] = True
        masks[i, 0, y0 : y1 + 1, x0 : x1 + 1] = blob.to(torch.uint8)
        boxes[i] = torch.tensor([x0, y0, x1, y1])
    if labels is None:
        labels = torch.randint(0, 9, (n,), generator=g)
    ids = torch.arange(100, 100 + n, dtype=torch.int64) * 7
    return images.to(device), masks.to(device), boxes.to(device), labels.to(device), ids.to(device)


def make_pool(n: int, size: int = 16, seed: int = 1, device="cpu") -> BackgroundPool:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 9
    ids = torch.arange(n, dtype=torch.int64) * 3 + 5000
    return BackgroundPool(images, labels, ids).to(device)


# ------------------------------------------------------------------------------------------------ probabilities
def test_parse_probs_forms_and_errors():
    assert parse_probs(None)["original"] == 1.0
    p = parse_probs("mixed_rand=0.25, only_fg=0.25")
    assert p == {"original": 0.5, "mixed_rand": 0.25, "mixed_same": 0.0, "only_fg": 0.25, "no_fg": 0.0}
    assert parse_probs({"Mixed-Rand": 1.0})["mixed_rand"] == 1.0
    assert parse_probs("mixed_rand=1.0,original=0")["original"] == 0.0
    for bad in ("mixed_next=1", "mixed_rand=-0.1", "mixed_rand=0.7,original=0.7", "mixed_rand", "mixed_rand=x",
                {"original": float("nan")}):
        with pytest.raises(ConfigError):
            parse_probs(bad)


def test_variant_probabilities_within_binomial_bounds():
    n = 40000
    ids = torch.arange(n, dtype=torch.int64) * 13 + 7
    params = sample_params(ids, 32, ALL5, seed=3, epoch=1, random_resized_crop=False)
    counts = torch.bincount(params.variant, minlength=len(VARIANTS)).tolist()
    t = hoeffding(n)
    for name in AUGMENT_VARIANTS:
        k = counts[CODE[name]]
        assert abs(k / n - ALL5[name]) < t, (name, k / n, ALL5[name], t)
    assert sum(counts[CODE[name]] for name in AUGMENT_VARIANTS) == n
    assert abs(float(params.flip.double().mean()) - 0.5) < t
    # zero-probability variants are never drawn, even at the end of the cumulative order
    only = sample_params(ids, 32, {"mixed_rand": 0.6, "original": 0.4}, seed=3, random_resized_crop=False).variant
    assert set(torch.unique(only).tolist()) == {CODE["original"], CODE["mixed_rand"]}
    # flip_p is respected as well
    fl = sample_params(ids, 32, None, seed=4, flip_p=0.2, random_resized_crop=False).flip.double().mean()
    assert abs(float(fl) - 0.2) < t


def test_augment_variants_are_the_registrys():
    """One registry: the augmentation's variants are registry names, its codes the registry's codes."""
    assert set(AUGMENT_VARIANTS) <= set(VARIANTS)
    ids = torch.arange(4000, dtype=torch.int64)
    p = sample_params(ids, 16, ALL5, seed=1, random_resized_crop=False)
    assert set(p.variant.unique().tolist()) == {VARIANTS[n].code for n in AUGMENT_VARIANTS}
    assert parse_probs({"Mixed-Same": 1.0})["mixed_same"] == 1.0  # the paper's names, as everywhere
    images, masks, boxes, labels, ids = make_scene(6, 16)
    out = BackgroundSwap({"no_fg": 1.0}, bg_source="batch")(images, masks, labels, ids, boxes=boxes)
    assert out.variant_names() == ["no_fg"] * 6 and out.variant.tolist() == [VARIANTS["no_fg"].code] * 6


def test_swap_config_is_the_one_configuration():
    cfg = SwapConfig(probs="mixed_rand=0.5", bg_source="batch", seed=4, flip=False)
    a = BackgroundSwap(config=cfg)
    b = BackgroundSwap("mixed_rand=0.5", bg_source="batch", seed=4, flip=False)
    assert a.config == b.config and a.probs["mixed_rand"] == 0.5 and a.seed == 4
    c = BackgroundSwap(config=cfg, seed=5)
    assert c.config.seed == 5 and c.config.flip is False and c.config.bg_source == "batch"
    ids = torch.arange(50)
    assert torch.equal(sample_params(ids, 16, config=cfg).variant,
                       sample_params(ids, 16, "mixed_rand=0.5", seed=4, flip=False).variant)
    with pytest.raises(ConfigError, match="unknown option"):
        BackgroundSwap(None, flipp=True)
    for bad in (dict(bg_transform="other"), dict(flip_p=2.0), dict(mean=(0.5,) * 3, std=None), dict(seed=1.5)):
        with pytest.raises(ConfigError):
            SwapConfig(**bad)


def test_random_resized_crop_rule_matches_torchvision_transcription():
    n, size, scale, ratio = 400, 37, (0.08, 1.0), (3 / 4, 4 / 3)
    u = hash_uniform(torch.arange(n)[:, None], 9, 0, 2, torch.arange(22)[None])
    # force some rows through the central fallback: every attempt's area too large for the aspect ratio
    u[:7, 0:20:2] = 0.999
    u[:7, 1:20:2] = 0.999
    crops = sample_resized_crops(u, size, size, scale, ratio)
    for i in range(n):
        assert tuple(crops[i].tolist()) == ref_get_params(u[i].tolist(), size, size, scale, ratio)
    x0, y0, w, h = crops.unbind(1)
    assert bool(((x0 >= 0) & (y0 >= 0) & (x0 + w <= size) & (y0 + h <= size) & (w > 0) & (h > 0)).all())


def test_hash_is_a_pure_function_of_its_words():
    ids = torch.tensor([5, 9, 1, 42])
    a = hash_bits(ids, 1, 2, 3)
    b = hash_bits(ids.flip(0), 1, 2, 3).flip(0)
    assert torch.equal(a, b)
    assert not torch.equal(a, hash_bits(ids, 1, 3, 3))
    assert torch.equal(hash_bits(ids[:2], 1, 2, 3), a[:2])
    with pytest.raises(ConfigError):
        hash_bits(ids, torch.tensor(1), 2)


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_resized_crop_flip_matches_interpolate_and_plain_indexing(device):
    n, size, out = 40, 23, 19
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    m = (torch.rand(n, 1, size, size, generator=g) < 0.4).to(torch.uint8)
    u = hash_uniform(torch.arange(n)[:, None], 1, 0, 2, torch.arange(22)[None])
    crops = sample_resized_crops(u, size, size, (0.08, 1.0), (3 / 4, 4 / 3))
    flips = torch.arange(n) % 2 == 0
    dev = torch.device(device)
    got_f = resized_crop_flip(x.float().to(dev), crops.to(dev), flips.to(dev), out, "bilinear").cpu()
    got_u8 = resized_crop_flip(x.to(dev), crops.to(dev), flips.to(dev), out, "bilinear").cpu()
    got_m = resized_crop_flip(m.to(dev), crops.to(dev), flips.to(dev), out, "nearest").cpu()
    assert got_u8.dtype == torch.uint8 and got_m.dtype == torch.uint8
    for i in range(n):
        ref = ref_bilinear(x[i], crops[i], bool(flips[i]), out)
        torch.testing.assert_close(got_f[i], ref, atol=1e-3, rtol=0)
        assert int((got_u8[i].int() - ref.round().int()).abs().max()) <= 1
        assert torch.equal(got_m[i], ref_nearest(m[i], crops[i], bool(flips[i]), out))
    # gathering rows of a pool through ``index`` is the same as indexing first
    idx = torch.tensor([3, 3, 0, 7, 1] * 8)
    a = resized_crop_flip(x, crops, flips, out, index=idx)
    assert torch.equal(a, resized_crop_flip(x[idx], crops, flips, out))
    # identity crop without flip is the identity, and a new tensor; crops=None (no resized crop) is the same
    full = torch.tensor([[0, 0, size, size]] * n)
    same = resized_crop_flip(x, full, torch.zeros(n, dtype=torch.bool), size)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    none = resized_crop_flip(x.to(dev), None, flips.to(dev))
    assert torch.equal(none.cpu(), torch.where(flips[:, None, None, None], x.flip(-1), x))
    assert torch.equal(resized_crop_flip(m.to(dev), None, flips.to(dev), mode="nearest").cpu(),
                       torch.where(flips[:, None, None, None], m.flip(-1), m))
    with pytest.raises(ConfigError, match="crops=None"):
        resized_crop_flip(x, None, flips, out)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_composite_foreground_is_exactly_the_augmented_foreground(device):
    """Mixed-Rand from a pool, with crop + flip: fg pixels from the augmented image, the rest from the augmented bg."""
    n, size = 24, 16
    images, masks, boxes, labels, ids = make_scene(n, size, seed=2, device=device)
    pool = make_pool(30, size, device=device)
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="pool", pool=pool, seed=5, scale=(0.2, 1.0),
                          mean=None, std=None, dtype=torch.uint8, return_masks=True, bg_transform="independent")
    out = swap(images, masks, labels, ids, boxes=boxes, epoch=3)
    assert out.variant.tolist() == [CODE["mixed_rand"]] * n
    assert bool((out.bg_ids >= 0).all()) and not bool((out.bg_ids == ids).any())
    p = out.params
    imgs, msk, pimg = images.cpu(), masks.cpu(), pool.images.cpu()
    pool_ids = pool.image_ids.cpu().tolist()
    for i in range(n):
        m_ref = ref_nearest(msk[i], p.crop[i].cpu(), bool(p.flip[i]), size)
        assert torch.equal(out.masks[i].cpu(), m_ref)
        fg_ref = ref_bilinear(imgs[i], p.crop[i].cpu(), bool(p.flip[i]), size).round()
        row = pool_ids.index(int(out.bg_ids[i]))
        bg_ref = ref_bilinear(pimg[row], p.bg_crop[i].cpu(), bool(p.bg_flip[i]), size).round()
        expect = torch.where(m_ref.bool(), fg_ref, bg_ref)
        got = out.images[i].cpu().float()
        assert float((got - expect).abs().max()) <= 1.0
        # exactly: the composite's foreground pixels are the augmented foreground's pixels
        fg_ours = resized_crop_flip(images[i : i + 1], p.crop[i : i + 1], p.flip[i : i + 1], size).cpu()[0]
        sel = m_ref.bool().expand(3, -1, -1)
        assert torch.equal(out.images[i].cpu()[sel], fg_ours[sel])
        assert int(out.bg_labels[i]) == int(pool.labels[row])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_caller_chosen_backgrounds_replace_the_swaps_choice(device):
    """``apply_batch(backgrounds=(rows, ids, labels))``: the given pool rows are the backgrounds (crop, flip and
    compositing unchanged); a row of -1 falls back to Original; a bad shape is an error naming the argument."""
    from bgsynth.types import Batch

    n, size = 10, 16
    images, masks, boxes, labels, ids = make_scene(n, size, seed=4, device=device)
    pool = make_pool(12, size, device=device)
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="pool", pool=pool, seed=1, mean=None, std=None,
                          dtype=torch.uint8, random_resized_crop=False, bg_transform="same")
    batch = Batch(images=images, masks=masks, boxes=boxes.to(torch.int32), strips=tile_strips(boxes, size, size),
                  labels=labels, image_ids=ids, has_mask=torch.ones(n, dtype=torch.bool, device=device),
                  has_bgt=torch.ones(n, dtype=torch.bool, device=device))
    rows = torch.tensor([3, 3, 0, 11, -1, 5, 7, 2, 9, 1], device=device)
    given = (rows, torch.where(rows >= 0, pool.image_ids[rows.clamp(min=0)], -1),
             torch.where(rows >= 0, pool.labels[rows.clamp(min=0)], -1))
    out = swap.apply_batch(batch, epoch=2, backgrounds=given)
    p = out.params
    for i in range(n):
        fl = bool(p.flip[i])
        img, m = images[i].cpu(), masks[i].cpu()
        if fl:
            img, m = torch.flip(img, dims=[-1]), torch.flip(m, dims=[-1])
        if int(rows[i]) < 0:
            assert int(out.variant[i]) == CODE["original"] and int(out.bg_ids[i]) == -1
            assert torch.equal(out.images[i].cpu(), img)
            continue
        bg = pool.images[int(rows[i])].cpu()
        bg = torch.flip(bg, dims=[-1]) if fl else bg
        assert torch.equal(out.images[i].cpu(), torch.where(m.bool(), img, bg))
        assert int(out.bg_ids[i]) == int(given[1][i]) and int(out.bg_labels[i]) == int(given[2][i])
    assert swap.stats()["mixed_rand"] == {"drawn": n, "fell_back": 1}
    with pytest.raises(ConfigError, match="backgrounds rows of shape"):
        swap.apply_batch(batch, backgrounds=(rows[:3], given[1], given[2]))
    with pytest.raises(ConfigError, match="bg_source='pool'"):
        BackgroundSwap({"mixed_rand": 1.0}, bg_source="batch").apply_batch(batch, backgrounds=given)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_only_fg_no_fg_original_definitions(device):
    n, size = 12, 16
    images, masks, boxes, labels, ids = make_scene(n, size, seed=4, device=device)
    for name in ("original", "only_fg", "no_fg"):
        swap = BackgroundSwap({name: 1.0}, bg_source="batch", seed=1, mean=None, std=None, dtype=torch.uint8,
                              return_masks=True)
        out = swap(images, masks, labels, ids, boxes=boxes)
        fg = resized_crop_flip(images, out.params.crop, out.params.flip, size)
        m = out.masks.bool().expand(-1, 3, -1, -1)
        black = torch.zeros_like(fg)
        expect = {"original": fg, "only_fg": torch.where(m, fg, black), "no_fg": torch.where(m, black, fg)}[name]
        assert torch.equal(out.images, expect), name
        assert bool((out.bg_ids == -1).all())


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("bg_source", ["pool", "batch"])
def test_label_is_the_foregrounds(bg_source):
    """Each foreground image is one flat colour coding its label; backgrounds are a disjoint range of colours."""
    n, size = 36, 16
    _, masks, boxes, _, ids = make_scene(n, size, seed=7)
    labels = torch.arange(n) % 9
    images = (20 * labels + 10).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    pool = make_pool(18, size)
    pool.images.copy_((200 + 5 * pool.labels).to(torch.uint8).view(-1, 1, 1, 1).expand_as(pool.images))
    # in-batch backgrounds are tiles of other foreground images, so they carry their image's colour
    bg_colour = (lambda c: 200 + 5 * c) if bg_source == "pool" else (lambda c: 20 * c + 10)
    swap = BackgroundSwap(ALL5, bg_source=bg_source, pool=pool if bg_source == "pool" else None, seed=11,
                          mean=None, std=None, dtype=torch.uint8, return_masks=True)
    out = swap(images, masks, labels, ids, boxes=boxes)
    assert torch.equal(out.labels, labels)
    mixed = (out.variant == CODE["mixed_rand"]) | (out.variant == CODE["mixed_same"])
    assert bool(mixed.any()) and bool((out.bg_labels[mixed] != out.labels[mixed]).any())
    for i in range(n):
        v = out.variant_names()[i]
        fgpix = out.images[i][out.masks[i].expand(3, -1, -1).bool()]
        if v in ("mixed_rand", "mixed_same", "only_fg", "original") and fgpix.numel():
            assert bool((fgpix == 20 * labels[i] + 10).all()), (i, v)
        if v in ("mixed_rand", "mixed_same"):
            bgpix = out.images[i][~out.masks[i].expand(3, -1, -1).bool()]
            assert bool((bgpix == bg_colour(out.bg_labels[i])).all()), (i, v)
            if v == "mixed_same":
                assert int(out.bg_labels[i]) == int(labels[i])


# ------------------------------------------------------------------------------------------------ in-batch swap
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_in_batch_swap_semantics(device):
    n, size = 20, 16
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 7, 8, 8, 8, 8, 2])
    images, masks, boxes, _, ids = make_scene(n, size, seed=9, device=device, labels=labels)
    labels = labels.to(device)
    boxes[4] = torch.tensor([0, 0, size - 1, size - 1])  # no margin: no Only-BG-T, never a partner
    swap = BackgroundSwap({"mixed_rand": 0.5, "mixed_same": 0.5}, bg_source="batch", seed=2, mean=None, std=None,
                          dtype=torch.uint8, return_masks=True)
    out = swap(images, masks, labels, ids, boxes=boxes)
    strips = tile_strips(boxes, size, size)
    bgt = tile_fill_torch(images, boxes, strips).cpu()
    pos = {int(v): k for k, v in enumerate(ids.tolist())}
    id4 = int(ids[4])
    for i in range(n):
        v = out.variant_names()[i]
        if v == "original":  # a Mixed-Same without another sample of its class in the batch (class 4, 6)
            assert int(out.requested[i]) == CODE["mixed_same"]
            assert int(labels[i]) in (4, 6)
            continue
        j = pos[int(out.bg_ids[i])]
        assert j != i and int(out.bg_ids[i]) != id4
        assert int(out.bg_labels[i]) == int(labels[j])
        if v == "mixed_same":
            assert int(labels[j]) == int(labels[i])
        p = out.params
        bg_ref = ref_bilinear(bgt[j], p.bg_crop[i].cpu(), bool(p.bg_flip[i]), size).round()
        fg_ref = ref_bilinear(images[i].cpu(), p.crop[i].cpu(), bool(p.flip[i]), size).round()
        expect = torch.where(out.masks[i].cpu().bool(), fg_ref, bg_ref)
        assert float((out.images[i].cpu().float() - expect).abs().max()) <= 1.0
    # samples of classes 4 and 6 are alone in the batch: their Mixed-Same falls back to Original, and is counted
    lonely = (labels == 4) | (labels == 6)
    drawn_same = out.requested == CODE["mixed_same"]
    assert torch.equal(out.fell_back, lonely & drawn_same)
    st = swap.stats()
    assert st["mixed_same"]["fell_back"] == int((lonely & drawn_same).sum())
    assert st["mixed_same"]["drawn"] + st["mixed_rand"]["drawn"] == n
    # every partner is drawn from the eligible samples: over 300 seeds each of the 18 is used (a miss has
    # probability below 18 * (17/18)**300 < 1e-6 for a uniform draw)
    has_bgt = (strips[:, 2] > 0) & (strips[:, 3] > 0)
    mixed_rand = torch.full_like(labels, CODE["mixed_rand"])
    seen = set()
    for s in range(300):
        key = sample_params(ids, size, {"mixed_rand": 1.0}, seed=s).bg_key
        seen.add(int(BackgroundSwap._batch_partners(labels, has_bgt, mixed_rand, key)[0]))
    assert seen == set(range(n)) - {0, 4}


def test_batch_of_one_and_empty_batch():
    images, masks, boxes, labels, ids = make_scene(1, 16)
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="batch", seed=0)
    out = swap(images, masks, labels, ids, boxes=boxes)
    assert out.variant.tolist() == [CODE["original"]] and swap.stats()["mixed_rand"]["fell_back"] == 1
    out = swap(images[:0], masks[:0], labels[:0], ids[:0], boxes=boxes[:0])
    assert out.images.shape == (0, 3, 16, 16)


def test_samples_without_mask_fall_back_to_original():
    images, masks, boxes, labels, ids = make_scene(6, 16)
    masks[::2] = 0
    swap = BackgroundSwap({"only_fg": 1.0}, bg_source="batch", seed=0)
    out = swap(images, masks, labels, ids, boxes=boxes)
    assert out.variant.tolist() == [CODE["original"], CODE["only_fg"]] * 3
    assert swap.stats()["only_fg"] == {"drawn": 6, "fell_back": 3}
    # no sample can take a background: nothing to resample, every one stays Original
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="pool", pool=make_pool(5), seed=0, mean=None, std=None,
                          dtype=torch.uint8)
    out = swap(images, torch.zeros_like(masks), labels, ids, boxes=boxes)
    assert out.variant.tolist() == [CODE["original"]] * 6 and bool((out.bg_ids == -1).all())
    expect = resized_crop_flip(images, out.params.crop, out.params.flip, 16)
    assert torch.equal(out.images, expect)


# ------------------------------------------------------------------------------------------------ kornia
@pytest.mark.parametrize("bg_source", ["pool", "batch"])
def test_background_swap_inside_kornia_augmentation_sequential(bg_source):
    import kornia.augmentation as K

    n, size = 12, 16
    images, masks, boxes, labels, ids = make_scene(n, size, seed=5)
    kw = dict(bg_source=bg_source, pool=make_pool(14, size) if bg_source == "pool" else None, seed=3,
              scale=(0.3, 1.0))
    swap = BackgroundSwap(ALL5, **kw)
    aug = K.AugmentationSequential(swap, K.RandomHorizontalFlip(), data_keys=["input", "mask"])
    x, m = images.float() / 255, masks.float()  # kornia's images: floating, 0..1
    swap.set_batch(labels, ids, epoch=2, boxes=boxes)
    torch.manual_seed(0)  # kornia's flip draws from torch's RNG
    y, my = aug(x, m)
    assert y.shape == x.shape and y.dtype == x.dtype and my.shape == m.shape and my.dtype == m.dtype
    # replay: the container's params reproduce the output exactly, without set_batch
    y2, my2 = aug(x, m, params=aug._params)
    assert torch.equal(y, y2) and torch.equal(my, my2)
    # the composite is the batch form's with the same parameters, then kornia's flip; the mask follows the image
    p_swap, p_flip = aug._params[0].data, aug._params[1].data
    params = AugmentParams.from_dict(p_swap)
    assert torch.equal(params.crop, swap.sample(ids, size, 2).crop)  # the draw: a pure function of the ids
    direct = BackgroundSwap(ALL5, mean=None, std=None, dtype=torch.float32, return_masks=True, **kw)(
        images, masks, labels, ids, boxes=boxes, epoch=2, params=params)
    flipped = (p_flip["batch_prob"] > 0.5)[:, None, None, None]
    assert bool(flipped.any()) and not bool(flipped.all())
    assert torch.equal(y, torch.where(flipped, direct.images.flip(-1), direct.images))
    assert torch.equal(my, torch.where(flipped, direct.masks.flip(-1), direct.masks).float())
    assert torch.equal(p_swap["applied"], direct.variant) and torch.equal(p_swap["bg_ids"], direct.bg_ids)
    mixed = (direct.variant == CODE["mixed_rand"]) | (direct.variant == CODE["mixed_same"])
    assert bool(mixed.any())
    # the per-sample labels and ids are consumed by the draw they were set for
    with pytest.raises(ConfigError, match="set_batch"):
        aug(x, m)
    # called directly, the kornia form returns the image and the mask
    swap.set_batch(labels, ids, epoch=2, boxes=boxes)
    y3, my3 = swap(x, m)
    assert torch.equal(y3, direct.images) and torch.equal(my3, direct.masks.float())


def test_kornia_form_errors():
    images, masks, boxes, labels, ids = make_scene(3, 16)
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="batch")
    swap.set_batch(labels, ids)
    with pytest.raises(ConfigError, match="boxes"):
        swap(images.float() / 255, masks.float())
    with pytest.raises(ConfigError, match="input' and 'mask"):
        swap.set_batch(labels, ids, boxes=boxes)
        swap(images.float() / 255, data_keys=["input"])
    with pytest.raises(ConfigError, match="unknown field"):
        swap.set_batch(labels, ids, has_mask=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_choices_do_not_depend_on_batch_size_or_order(device):
    n, size = 30, 16
    images, masks, boxes, labels, ids = make_scene(n, size, seed=3, device=device)
    pool = make_pool(25, size, device=device)
    kw = dict(bg_source="pool", pool=pool, seed=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    full = BackgroundSwap(ALL5, **kw)(images, masks, labels, ids, boxes=boxes, epoch=2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    swap = BackgroundSwap(ALL5, **kw)
    for chunk in perm.split(7):
        part = swap(images[chunk], masks[chunk], labels[chunk], ids[chunk], boxes=boxes[chunk], epoch=2)
        assert torch.equal(part.images, full.images[chunk])
        assert torch.equal(part.variant, full.variant[chunk])
        assert torch.equal(part.bg_ids, full.bg_ids[chunk])
        assert torch.equal(part.params.crop, full.params.crop[chunk])
    # another epoch draws again; the same epoch replays
    other = BackgroundSwap(ALL5, **kw)(images, masks, labels, ids, boxes=boxes, epoch=3)
    assert not torch.equal(other.params.crop, full.params.crop)
    again = BackgroundSwap(ALL5, **kw)(images, masks, labels, ids, boxes=boxes, epoch=2, params=full.params)
    assert torch.equal(again.images, full.images)


def test_output_dtype_and_memory_format():
    images, masks, boxes, labels, ids = make_scene(4, 16)
    swap = BackgroundSwap(ALL5, bg_source="batch", dtype=torch.bfloat16, channels_last=True)
    out = swap(images, masks, labels, ids, boxes=boxes)
    assert out.images.dtype == torch.bfloat16
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    ref = BackgroundSwap(ALL5, bg_source="batch", mean=None, std=None, dtype=torch.uint8)(
        images, masks, labels, ids, boxes=boxes)
    from bgsynth.classes import IN9_MEAN, IN9_STD

    m = torch.tensor(IN9_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IN9_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out.images.float(), ((ref.images.float() / 255 - m) / s), atol=0.05, rtol=0.01)


def test_argument_errors():
    images, masks, boxes, labels, ids = make_scene(3, 16)
    with pytest.raises(ConfigError):
        BackgroundSwap({"mixed_rand": 1.0}, bg_source="elsewhere")
    with pytest.raises(ConfigError):
        BackgroundSwap(scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="needs a BackgroundPool"):
        BackgroundSwap({"mixed_rand": 1.0}, bg_source="pool")(images, masks, labels, ids, boxes=boxes)
    swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="batch")
    with pytest.raises(ConfigError, match="images"):
        swap(images.float(), masks, labels, ids, boxes=boxes)
    with pytest.raises(ConfigError, match="masks"):
        swap(images, masks[:, :, :8], labels, ids, boxes=boxes)
    with pytest.raises(ConfigError, match="labels"):
        swap(images, masks, labels[:2], ids, boxes=boxes)
    with pytest.raises(ConfigError, match="boxes"):
        swap(images, masks, labels, ids)


# ------------------------------------------------------------------------------------------------ the iterator
def _collect(it: TrainIterator) -> dict:
    """image id -> (label, variant, bg id, crop, flip, image) over one epoch of ``it``."""
    out = {}
    for x, y in it:
        last = it.last
        for k, i in enumerate(last.image_ids.tolist()):
            assert i not in out
            out[i] = (int(y[k]), int(last.variant[k]), int(last.bg_ids[k]), tuple(last.params.crop[k].tolist()),
                      bool(last.params.flip[k]), x[k].clone())
    return out


def test_train_iterator_takes_a_run_and_a_loader_config(tiny_index, tiny_geometry):
    from bgsynth.config import resolve_run

    run = resolve_run(device="cpu", geometry=tiny_geometry, batch_size=8, seed=2, backend="pil")
    a = TrainIterator(tiny_index, run, LoaderConfig(drop_last=False), probs={"mixed_rand": 0.5})
    b = TrainIterator(tiny_index, geometry=tiny_geometry, batch_size=8, seed=2, backend="pil", device="cpu",
                      drop_last=False, probs={"mixed_rand": 0.5})
    assert a.run == b.run and a.config == b.config and a.swap.config == b.swap.config
    assert a.swap.seed == 2 and a.batch_size == 8 and a.swap.config.channels_last is False
    swap = BackgroundSwap({"only_fg": 1.0}, bg_source="batch")
    assert TrainIterator(tiny_index, run, swap=swap).swap is swap
    with pytest.raises(ConfigError, match="SwapConfig fields"):
        TrainIterator(tiny_index, run, probz={"mixed_rand": 1.0})
    with pytest.raises(ConfigError):
        LoaderConfig(cache="sometimes")
    with pytest.raises(ConfigError):
        LoaderConfig(shard_id=2, num_shards=2)


def test_train_iterator_deterministic_across_batch_sizes_and_shards(tiny_index, tiny_geometry):
    kw = dict(split="train", geometry=tiny_geometry, seed=4, probs=ALL5, drop_last=False, backend="pil", epoch=1)
    ref = _collect(TrainIterator(tiny_index, batch_size=16, **kw))
    train_ids = set(tiny_index.select(split="train").ids)
    assert set(ref) == train_ids
    labels = dict(zip(tiny_index.ids, tiny_index.labels().tolist()))
    assert all(v[0] == labels[i] for i, v in ref.items())
    other = _collect(TrainIterator(tiny_index, batch_size=5, **kw))
    shards = [_collect(TrainIterator(tiny_index, batch_size=8, shard_id=s, num_shards=2, **kw)) for s in range(2)]
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == train_ids
    for run in (other, {**shards[0], **shards[1]}):
        for i, v in ref.items():
            w = run[i]
            assert v[:5] == w[:5], i
            assert torch.equal(v[5], w[5]), i


def test_train_iterator_epochs_reshuffle(tiny_index, tiny_geometry):
    it = TrainIterator(tiny_index, geometry=tiny_geometry, batch_size=10, seed=1, backend="pil")
    n = len(tiny_index.select(split="train"))
    assert len(it) == n // 10
    order = []
    for _ in range(2):
        ids = []
        for _x, _y in it:
            ids += it.last.image_ids.tolist()
        order.append(ids)
    assert it.epoch == 2 and len(order[0]) == 10 * (n // 10)
    assert order[0] != order[1]
    it.set_epoch(0)
    assert [i for _ in it for i in it.last.image_ids.tolist()][:10] == order[0][:10]
    # the order is a pure function of (seed, epoch, id): the hash ranks of the ids
    ids = torch.tensor(sorted(tiny_index.select(split="train").ids))
    expect = ids[torch.argsort(hash_bits(ids, 1, 0, 7), stable=True)].tolist()
    assert order[0] == expect[: len(order[0])]


def test_train_iterator_streaming_equals_cached(tiny_index, tiny_geometry):
    kw = dict(geometry=tiny_geometry, batch_size=8, seed=2, probs={"mixed_rand": 0.5, "no_fg": 0.2}, backend="pil",
              drop_last=False)
    cached = _collect(TrainIterator(tiny_index, cache=True, **kw))
    streamed = _collect(TrainIterator(tiny_index, cache=False, window_batches=3, **kw))
    assert set(cached) == set(streamed)
    for i in cached:
        assert cached[i][:5] == streamed[i][:5]
        assert torch.equal(cached[i][5], streamed[i][5])


def test_triton_kernels_give_the_same_batch():
    """The fused composite/tile kernels through Triton (interpreter on CPU, GPU on CUDA) == the torch reference."""
    from bgsynth.kernels import triton_available, triton_interpreting

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available() or (dev == "cpu" and not triton_interpreting()):
        pytest.skip("Triton is not installed (or its interpreter is off without CUDA)")
    images, masks, boxes, labels, ids = make_scene(6, 16, seed=12, device=dev)
    kw = dict(bg_source="batch", seed=3, dtype=torch.float16, channels_last=True)
    a = BackgroundSwap(ALL5, kernel_backend="torch", **kw)(images, masks, labels, ids, boxes=boxes)
    b = BackgroundSwap(ALL5, kernel_backend="triton", **kw)(images, masks, labels, ids, boxes=boxes)
    assert torch.equal(a.variant, b.variant)
    torch.testing.assert_close(a.images, b.images, atol=1e-3, rtol=1e-3)


def test_docstring_examples():
    import doctest

    import bgsynth.augment

    res = doctest.testmod(bgsynth.augment)
    assert res.attempted > 0 and res.failed == 0


def test_train_iterator_pool_has_the_index_label_space(tiny_index, tiny_geometry):
    """Mixed-Same draws within the index's classes, beyond IN-9's 9: a 12-class relabelling of the tiny set gives
    every sample a background of its own class (none falls back) and the pool has 12 classes."""
    from bgsynth.classes import LabelSpace
    from bgsynth.index import DatasetIndex

    data = tiny_index.select(split="train").data
    space = LabelSpace.from_names([f"c{k}" for k in range(12)], name="twelve")
    data["info"]["label_space"] = space.to_dict()
    data["categories"] = space.categories()
    for im in data["images"]:
        im["label"] = (im["id"] % 4) + 8  # classes 8..11 only
    index = DatasetIndex(data, tiny_index.path)
    it = TrainIterator(index, geometry=tiny_geometry, batch_size=16, device="cpu", backend="pil", progress=False,
                       probs={"mixed_same": 1.0}, mean=None, std=None, dtype=torch.uint8, flip=False)
    seen = 0
    for _x, y in it:
        out = it.last
        assert torch.equal(out.bg_labels, out.labels) and not bool(out.fell_back.any())
        seen += len(y)
    assert it.pool.num_classes == 12 and seen == len(it) * 16
