"""Controlled spurious correlation: the rule (bgsynth.compose), scene pools and the online iterator
(bgsynth.compose_loader), export / eval / CLI (bgsynth.compose_jobs, bgsynth.cli.compose), and the waterbirds-like
set end to end (N = 2: make -> train -> variants -> eval -> challenge -> export -> compose export/eval)."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bgsynth.classes import LabelSpace
from bgsynth.cli import COMMANDS, main
from bgsynth.cli import compose as compose_cmd
from bgsynth.compose import (
    ComposeRule,
    ComposeSpec,
    Pairing,
    compose_backgrounds,
    correlation_at,
    group_metrics,
    group_weights,
    weighted_accuracy,
)
from bgsynth.compose_jobs import (
    WATERBIRDS_COLUMNS,
    describe_composed,
    evaluate_composed,
    export_composed,
    load_classifier,
)
from bgsynth.compose_loader import ComposeIterator, load_backgrounds, scene_index
from bgsynth.distributed import shard_ids
from bgsynth.errors import BgsynthError, ConfigError
from bgsynth.index import DatasetIndex
from bgsynth.models import LoadedModel
from bgsynth.pipeline import create_loader
from bgsynth.rng import fold, splitmix64
from bgsynth.sources.synthetic import WATERBIRDS_PAIRING, build_builtin_dataset
from bgsynth.train import train
from bgsynth.types import BackgroundPool

import fixtures

FG = LabelSpace.from_names(["a", "b"], name="fg")
BG3 = LabelSpace.from_names(["x", "y", "z"], name="bg")
WB_TINY = dict(seed=0, train_per_class=6, val_per_class=4, train_places_per_class=4, val_places_per_class=3)
RUN = dict(device="cpu", backend="pil", progress=False)


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    """The tiny waterbirds-like set (built once per session: the cache folder is shared by the test modules)."""
    path = build_builtin_dataset(root=tmp_path_factory.getbasetemp() / "wb-cache", kind="waterbirds-like",
                                 progress=False, workers=1, **WB_TINY)
    return path.parent


@pytest.fixture(scope="module")
def wb_index(wb):
    return DatasetIndex.load(wb / "index.json")


@pytest.fixture(scope="module")
def places(wb, tiny_geometry):
    return load_backgrounds(wb / "places" / "train", geometry=tiny_geometry, **RUN)


def _pool(labels, ids=None, n_cls=3):
    labels = torch.as_tensor(labels, dtype=torch.int64)
    ids = torch.arange(100, 100 + len(labels)) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
    return BackgroundPool(torch.zeros(len(labels), 3, 1, 1, dtype=torch.uint8), labels, ids, n_cls)


# ==============================================================================================================
# The pairing and the rule
# ==============================================================================================================


def test_pairing_reads_names_and_ids_and_rejects_bad_ones(tmp_path):
    p = Pairing.from_mapping({"a": "x", "1": [1, "z"]}, FG, BG3)
    assert p.aligned == ((0,), (1, 2)) and p.to_dict() == {"a": ["x"], "b": ["y", "z"]}
    assert p.table.tolist() == [[True, False, False], [False, True, True]]
    assert Pairing.from_mapping(p.to_dict(), FG, BG3) == p
    with pytest.raises(ConfigError, match="unknown background class 'w'"):
        Pairing.from_mapping({"a": "w", "b": "y"}, FG, BG3)
    with pytest.raises(ConfigError, match=r"missing \['b'\]"):
        Pairing.from_mapping({"a": "x"}, FG, BG3)
    with pytest.raises(ConfigError, match="no background can conflict"):
        Pairing.from_mapping({"a": ["x", "y", "z"], "b": "y"}, FG, BG3)
    with pytest.raises(ConfigError, match="class id 7 outside"):
        Pairing.from_mapping({"a": 7, "b": "y"}, FG, BG3)
    bad = tmp_path / "pairing.json"
    bad.write_text('{"a": ["x"], "b": ["nope"]}')
    with pytest.raises(ConfigError, match=str(bad)):
        Pairing.from_json(bad, FG, BG3)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{bad}: not a readable pairing JSON"):
        Pairing.from_json(bad, FG, BG3)
    # defaults: the same names, else the same positions, else an error asking for a pairing
    assert Pairing.default(FG, LabelSpace.from_names(["b", "a"])).aligned == ((1,), (0,))
    assert Pairing.default(FG, LabelSpace.from_names(["u", "v"])).aligned == ((0,), (1,))
    with pytest.raises(ConfigError, match="--pairing"):
        Pairing.default(FG, BG3)


def _reference_choice(image_id: int, label: int, rule: ComposeRule, pool: BackgroundPool, corr: float, epoch: int):
    """The rule of bgsynth.compose's docstring, on Python integers, one image at a time (the slow reference)."""
    seed = rule.seed

    def bits(*words):  # splitmix64(id ^ fold(words)) as an unsigned 64-bit integer
        return splitmix64(image_id ^ fold(*words))

    aligned = (bits(seed, epoch, 16) >> 11) / float(1 << 53) < corr
    row = rule.pairing.aligned[label]
    cand = [b for b in range(rule.pairing.num_bg) if (b in row) == aligned]
    cls = cand[((bits(seed, epoch, 17) >> 32) * len(cand)) >> 32]
    members = sorted(int(i) for i, lab in zip(pool.image_ids.tolist(), pool.labels.tolist()) if lab == cls)
    h = splitmix64(bits(seed, epoch, 18) ^ cls)
    bg_id = members[((h >> 32) * len(members)) >> 32] if members else -1
    return aligned, cls, bg_id


def test_rule_matches_a_slow_reference_of_its_documented_draws():
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    pool = _pool([2, 0, 1, 1, 0, 2, 2, 0], ids=[50, 3, 9, 41, 7, 12, 33, 20])
    rule = ComposeRule(pairing, 0.7, seed=11)
    ids = torch.arange(0, 400, 3)
    labels = ids % 2
    for epoch in (0, 5):
        got = compose_backgrounds(ids, labels, pool, rule, epoch)
        for k, (i, y) in enumerate(zip(ids.tolist(), labels.tolist())):
            aligned, cls, bg_id = _reference_choice(i, y, rule, pool, 0.7, epoch)
            assert (bool(got.aligned[k]), int(got.bg_class[k]), int(got.bg_ids[k])) == (aligned, cls, bg_id), i
            assert int(pool.labels[got.rows[k]]) == cls and int(pool.image_ids[got.rows[k]]) == bg_id


@pytest.mark.parametrize("corr", [0.95, 0.5, 0.1])
def test_aligned_fraction_is_binomial_and_conflicting_classes_uniform(corr):
    n = 20000
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    ids = torch.arange(n) * 7 + 3
    ch = compose_backgrounds(ids, torch.zeros(n, dtype=torch.int64), _pool([0, 1, 2, 1]), ComposeRule(pairing, corr))
    k = int(ch.aligned.sum())
    sigma = math.sqrt(n * corr * (1 - corr))
    assert abs(k - n * corr) < 4.5 * sigma, (k, n * corr)
    # aligned means class x (the only aligned class of 'a'); conflicting draws split evenly between y and z
    assert bool((ch.bg_class[ch.aligned] == 0).all()) and bool((ch.bg_class[~ch.aligned] > 0).all())
    m = n - k
    y = int((ch.bg_class == 1).sum())
    assert abs(y - m / 2) < 4.5 * math.sqrt(m / 4)
    # the image within a class is uniform: class y holds two images
    first = int((ch.bg_ids == 101).sum())
    assert abs(first - y / 2) < 4.5 * math.sqrt(y / 4)


def test_correlation_zero_and_one_are_exact():
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    ids, labels = torch.arange(500), torch.arange(500) % 2
    pool = _pool([0, 1, 2])
    assert bool(compose_backgrounds(ids, labels, pool, ComposeRule(pairing, 1.0)).aligned.all())
    never = compose_backgrounds(ids, labels, pool, ComposeRule(pairing, 0.0))
    assert not bool(never.aligned.any())
    assert bool((never.bg_class[labels == 1] == 0).all())  # 'b' conflicts only with x


def test_choice_is_independent_of_batching_order_shards_and_pool_row_order():
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    rule = ComposeRule(pairing, 0.8, seed=3)
    pool = _pool([0, 1, 2, 0, 1, 2, 2], ids=[9, 4, 15, 2, 30, 21, 6])
    ids = torch.arange(40, 140)
    labels = (ids // 3) % 2
    full = compose_backgrounds(ids, labels, pool, rule, epoch=2)
    want = dict(zip(ids.tolist(), full.bg_ids.tolist()))
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    got = {}
    for start in range(0, len(ids), 7):  # batches of 7, shuffled order
        sel = perm[start : start + 7]
        got.update(zip(ids[sel].tolist(), compose_backgrounds(ids[sel], labels[sel], pool, rule, 2).bg_ids.tolist()))
    assert got == want
    ranks = {}
    for r in range(3):  # three ranks, the engine's sharding rule
        mine = torch.tensor(shard_ids(ids.tolist(), r, 3))
        ranks.update(zip(mine.tolist(), compose_backgrounds(mine, (mine // 3) % 2, pool, rule, 2).bg_ids.tolist()))
    assert ranks == want
    shuffled = pool.select(torch.tensor([3, 6, 0, 5, 1, 4, 2]))
    assert compose_backgrounds(ids, labels, shuffled, rule, 2).bg_ids.tolist() == full.bg_ids.tolist()
    assert compose_backgrounds(ids, labels, pool, rule, 3).bg_ids.tolist() != full.bg_ids.tolist()  # a new epoch
    # a class without an image in the pool gives no background (-1), the class is still drawn
    sparse = _pool([0, 1], ids=[1, 2])
    ch = compose_backgrounds(ids, labels, sparse, rule, 2)
    assert bool((ch.rows[ch.bg_class == 2] == -1).all()) and bool((ch.rows[ch.bg_class < 2] >= 0).all())


def test_rule_argument_errors():
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    with pytest.raises(ConfigError, match=r"expected a probability in \[0, 1\], got 1.5"):
        ComposeRule(pairing, 1.5)
    with pytest.raises(ConfigError, match="pool has 2 background classes, the pairing 3"):
        compose_backgrounds(torch.arange(3), torch.zeros(3, dtype=torch.int64), _pool([0, 1], n_cls=2),
                            ComposeRule(pairing))
    with pytest.raises(ConfigError, match="foreground labels in 0..1"):
        compose_backgrounds(torch.arange(3), torch.tensor([0, 1, 2]), _pool([0, 1, 2]), ComposeRule(pairing))
    assert correlation_at((0.9, 0.5), 0) == 0.9 and correlation_at((0.9, 0.5), 9) == 0.5
    assert ComposeRule(pairing, [0.9, 0.5]).correlation_at(1) == 0.5


def test_group_metrics_against_a_hand_count():
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    label = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    pred = [0, 0, 1, 0, 1, 0, 1, 1, 0]
    bg = [0, 0, 1, 2, 1, 1, 2, 0, -1]
    valid = [True, True, True, False, True, True, True, True, True]
    m = group_metrics(label, pred, bg, valid, pairing)
    by = {(g["fg_class"], g["bg_class"]): g for g in m["groups"]}
    # a/x: 2 of 2; a/y: 0 of 1; a/z: invalid only; b/x: 1 of 1; b/y: 1 of 2; b/z: 1 of 1; the -1 row is invalid
    assert [(by[k]["correct"], by[k]["total"]) for k in sorted(by)] == [(2, 2), (0, 1), (0, 0), (1, 1), (1, 2), (1, 1)]
    assert by[(0, 0)]["aligned"] and by[(1, 2)]["aligned"] and not by[(1, 0)]["aligned"]
    assert m["total"] == 7 and m["correct"] == 5 and m["invalid"] == 2
    assert m["worst_group"] == 0.0 and m["average_group"] == pytest.approx((1 + 0 + 1 + 0.5 + 1) / 5)
    assert m["aligned_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3) and m["conflicting_accuracy"] == 0.5
    assert m["aligned_gap"] == pytest.approx((2.5 / 3) - 0.5)


def test_group_weights_match_the_rule_and_weighted_accuracy_its_composed_set():
    """The group shares are those of the rule's draws (counted on 30000 composites, imbalanced classes, two aligned
    classes for 'b'), and the weighted accuracy of per-group accuracies is the accuracy on such a drawn set."""
    pairing = Pairing(FG, BG3, ((0,), (1, 2)))
    n, corr = 30000, 0.9
    ids = torch.arange(n) * 5 + 1
    labels = (torch.arange(n) % 4 == 0).long()  # a quarter of class 'b'
    ch = compose_backgrounds(ids, labels, _pool([0, 1, 2]), ComposeRule(pairing, corr, seed=4))
    counts = np.bincount((labels * 3 + ch.bg_class).numpy(), minlength=6)
    w = group_weights(pairing, corr, fg_prior=[3, 1])
    # a/x aligned: 0.75 * 0.9; a/y, a/z: 0.75 * 0.1 / 2; b/x conflicting: 0.25 * 0.1; b/y, b/z: 0.25 * 0.9 / 2
    np.testing.assert_allclose(w, [0.675, 0.0375, 0.0375, 0.025, 0.1125, 0.1125])
    for c, p in zip(counts, w):
        assert abs(c - n * p) < 4.5 * math.sqrt(n * p * (1 - p)), (counts, w)
    # a "model" right on a fixed share of each group: its accuracy on the drawn
    # set against the weighted accuracy of its per-group accuracies, measured on a balanced set
    right_share = np.array([1.0, 0.0, 0.5, 0.0, 1.0, 0.5])
    g = (labels * 3 + ch.bg_class).numpy()
    coin = np.random.default_rng(0).random(n) < 0.5  # the half-right groups: right on an independent coin
    ok = np.where(right_share[g] == 0.5, coin, right_share[g] == 1.0)
    drawn = ok.mean()
    bal_label = np.repeat([0, 0, 0, 1, 1, 1], 1000)
    bal_bg = np.tile(np.repeat([0, 1, 2], 1000), 2)
    bal_ok = np.where(right_share[bal_label * 3 + bal_bg] == 0.5, np.arange(6000) % 2 == 0,
                      right_share[bal_label * 3 + bal_bg] == 1.0)
    m = group_metrics(bal_label, np.where(bal_ok, bal_label, 1 - bal_label), bal_bg, np.ones(6000, bool), pairing)
    assert [gr["accuracy"] for gr in m["groups"]] == right_share.tolist()
    assert weighted_accuracy(m, pairing, corr, [3, 1]) == pytest.approx(drawn, abs=0.01)
    assert weighted_accuracy(m, pairing, corr, [3, 1]) == pytest.approx(float(w @ right_share))
    # a group of non-zero weight without composites: no value; errors name the function
    empty = group_metrics([0], [0], [0], [True], pairing)
    assert weighted_accuracy(empty, pairing, corr) is None
    with pytest.raises(ConfigError, match="group_weights"):
        group_weights(pairing, corr, fg_prior=[1, 2, 3])


# ==============================================================================================================
# Scene pools and the online iterator
# ==============================================================================================================


def test_scene_folder_pool_records_bad_files_and_crops_like_the_original(tmp_path, tiny_geometry):
    root = tmp_path / "scenes"
    for k, cls in enumerate(("land", "water")):
        for j in range(3):
            fixtures.write_image(root / cls / f"s{j}.jpg", width=90 + 10 * j, height=80, seed=10 * k + j)
    fixtures.write_zero_byte(root / "land" / "empty.jpg")
    fixtures.truncate_file(fixtures.write_image(root / "water" / "cut.jpg", 120, 90), keep=0.3)
    (root / "water" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="could not be used"):
        idx = scene_index(root)
    assert idx.label_space.classes == ("land", "water") and len(idx) == 6
    assert sorted((r["path"], r["reason"]) for r in idx.rejects) == [
        ("land/empty.jpg", "zero_byte_file"), ("water/cut.jpg", "truncated_image")]
    with pytest.warns(UserWarning):
        bg = load_backgrounds(root, geometry=tiny_geometry, **RUN)
    assert bg.kind == "scenes" and bg.pool.num_classes == 2 and bg.counts() == {"land": 3, "water": 3}
    assert len(bg.rejects) == 2
    # each background is the image resized (shorter side 72, bilinear) and centre-cropped to 64, by PIL directly
    for row in range(len(bg.pool)):
        rec = idx.record(int(bg.pool.image_ids[row]))
        assert int(bg.pool.labels[row]) == rec.label
        with Image.open(rec.path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 72 / min(w, h)
            nw, nh = (72, int(72 * h / w)) if w <= h else (int(72 * w / h), 72)
            im = im.resize((nw, nh), Image.BILINEAR)
            x0, y0 = round((nw - 64) / 2), round((nh - 64) / 2)
            want = np.asarray(im.crop((x0, y0, x0 + 64, y0 + 64)))
        got = bg.pool.images[row].permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (rec.file_name, s)
    with pytest.raises(ConfigError, match="one subfolder per background class"):
        scene_index(tmp_path / "scenes" / "land")
    with pytest.raises(ConfigError, match="nothing there"):
        load_backgrounds(tmp_path / "nowhere", geometry=tiny_geometry, **RUN)


def _iterate(it, epoch):
    it.set_epoch(epoch)
    seen = {}
    for _x, _y in it:
        seen.update(zip(it.last.image_ids.tolist(), it.last_choice.bg_ids.tolist()))
    return seen


def test_iterator_composites_the_rule_same_for_any_batch_size_and_rank(wb_index, places, tiny_geometry):
    pairing = Pairing.from_mapping(WATERBIRDS_PAIRING, wb_index.label_space, places.label_space)
    rule = ComposeRule(pairing, (1.0, 0.0), seed=4)
    kw = dict(geometry=tiny_geometry, drop_last=False, flip=False, random_resized_crop=False, mean=None, std=None,
              dtype=torch.uint8, **RUN)
    a = ComposeIterator(wb_index, rule, places, batch_size=4, **kw)
    b = ComposeIterator(wb_index, rule, places, batch_size=5, **kw)
    ep0 = _iterate(a, 0)
    assert len(ep0) == 12 and _iterate(b, 0) == ep0
    ranks = {}
    for r in range(2):
        ranks.update(_iterate(ComposeIterator(wb_index, rule, places, batch_size=3, shard_id=r, num_shards=2, **kw), 0))
    assert ranks == ep0
    # per-epoch correlations: epoch 0 all aligned (1.0), epoch 1 none (0.0); set_correlation overrides
    labels = {i: wb_index.image(i)["label"] for i in ep0}
    place = {int(i): int(lab) for i, lab in zip(places.pool.image_ids.tolist(), places.pool.labels.tolist())}
    assert all(place[ep0[i]] == labels[i] for i in ep0)
    assert all(place[bg] != labels[i] for i, bg in _iterate(a, 1).items())
    a.set_correlation(1.0)
    assert all(place[bg] == labels[i] for i, bg in _iterate(a, 2).items())
    assert a.stats() == {"composites": 36, "aligned": 24, "fell_back": 0}
    # the composite: the foreground crop where the mask is 1, the background crop elsewhere
    it = ComposeIterator(wb_index, rule, places, batch_size=12, **kw)
    x, _y = next(iter(it))
    store = it.store
    pos = {int(i): k for k, i in enumerate(store.image_ids.tolist())}
    rows = {int(i): k for k, i in enumerate(places.pool.image_ids.tolist())}
    for j, image_id in enumerate(it.last.image_ids.tolist()):
        m = store.masks[pos[image_id]].bool()
        want = torch.where(m, store.images[pos[image_id]], places.pool.images[rows[int(it.last_choice.bg_ids[j])]])
        assert torch.equal(x[j], want)
    with pytest.raises(ConfigError, match="rule chooses the backgrounds"):
        ComposeIterator(wb_index, rule, places, probs={"original": 1.0}, **RUN)


# ==============================================================================================================
# Export, eval, describe, CLI
# ==============================================================================================================


def test_export_writes_imagefolder_and_waterbirds_metadata(wb, wb_index, tiny_geometry, tmp_path):
    spec = ComposeSpec(str(wb / "places" / "train"), str(wb / "pairing.json"), correlation=0.95)
    out = tmp_path / "exp"
    res = export_composed(wb_index, spec, out, geometry=tiny_geometry, image_format="png", seed=2,
                          split_correlation={"val": 0.5}, **RUN)
    rows = list(csv.DictReader(open(res.metadata, newline="")))
    with open(res.metadata, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header[:6]) == WATERBIRDS_COLUMNS
    assert header[6:] == ["fg_class", "bg_class", "group", "bg_id", "aligned"]
    assert res.written == len(rows) == len(wb_index) and res.skipped == {}
    bg = load_backgrounds(wb / "places" / "train", geometry=tiny_geometry, **RUN)
    bg_rows = {int(i): k for k, i in enumerate(bg.pool.image_ids.tolist())}
    decoded = {}
    for b in create_loader(wb_index, backend="pil", geometry=tiny_geometry, batch_size=64, tiling="crop",
                           only_bg_t=False):
        for k, i in enumerate(b.image_ids.tolist()):
            decoded[i] = (b.images[k], b.masks[k])
    for r in rows:  # the way group-robustness code reads it
        y, place, split = int(r["y"]), int(r["place"]), int(r["split"])
        rec = wb_index.image(int(r["img_id"]))
        assert y == rec["label"] and split == {"train": 0, "val": 1}[rec["split"]]
        assert int(r["group"]) == 2 * y + place and int(r["aligned"]) == int(place == y)
        assert r["place_filename"].split("/")[0] == ("land", "water")[place] == r["bg_class"]
        assert r["img_filename"].split("/")[:2] == [rec["split"], ("0_landbird", "1_waterbird")[y]]
        got = np.asarray(Image.open(out / r["img_filename"]))
        img, m = decoded[int(r["img_id"])]
        want = torch.where(m.bool(), img, bg.pool.images[bg_rows[int(r["bg_id"])]]).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want)
    manifest = json.loads(res.manifest.read_text())
    assert manifest["split_codes"] == {"train": 0, "val": 1} and manifest["split_correlation"]["val"] == 0.5
    # resumable and owned: the same run again rewrites nothing; other settings are refused
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    export_composed(wb_index, spec, out, geometry=tiny_geometry, image_format="png", seed=2,
                    split_correlation={"val": 0.5}, resume=True, **RUN)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    with pytest.raises(ConfigError, match="correlation"):
        export_composed(wb_index, ComposeSpec(spec.backgrounds, spec.pairing, 0.5), out, geometry=tiny_geometry,
                        image_format="png", seed=2, split_correlation={"val": 0.5}, **RUN)


class _Constant(torch.nn.Module):
    """A 2-class "model" that always answers class 0."""

    def forward(self, x):
        return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)


def test_eval_per_group_with_a_constant_model(wb, wb_index, tiny_geometry, tmp_path):
    spec = ComposeSpec(str(wb / "places" / "val"), dict(WATERBIRDS_PAIRING), correlation=0.5)
    res = evaluate_composed(wb_index, _Constant(), spec, geometry=tiny_geometry, all_groups=True, **RUN)
    m = res.metrics
    n_val = {k: sum(1 for i in wb_index.select(split="val").ids if wb_index.image(i)["label"] == k) for k in (0, 1)}
    # every val bird once on each scene family; class 0 is always right, class 1 always wrong
    assert [(g["fg_name"], g["bg_name"], g["correct"], g["total"]) for g in m["groups"]] == [
        ("landbird", "land", n_val[0], n_val[0]), ("landbird", "water", n_val[0], n_val[0]),
        ("waterbird", "land", 0, n_val[1]), ("waterbird", "water", 0, n_val[1])]
    assert m["worst_group"] == 0.0 and m["average_group"] == 0.5 and m["aligned_gap"] == 0.0
    files = res.save(tmp_path / "ev")
    saved = json.loads(files["results"].read_text())
    assert set(saved["variants"]["composed"]) >= {"groups", "worst_group", "average_group", "aligned_gap"}
    recs = list(csv.DictReader(open(files["records"], newline="")))
    assert len(recs) == 2 * sum(n_val.values()) and {r["pred"] for r in recs} == {"0"}
    # the rule's own draw: one composite per bird, aligned as drawn
    one = evaluate_composed(wb_index, _Constant(), spec, geometry=tiny_geometry, **RUN)
    assert one.metrics["total"] == sum(n_val.values()) and one.mode == "rule"
    with pytest.raises(ConfigError, match="the model has 1 outputs, the foreground label space 2 classes"):
        evaluate_composed(wb_index, LoadedModel(_Constant(), 1, "in9", (0.5,) * 3, (0.2,) * 3), spec,
                          geometry=tiny_geometry, **RUN)


def test_describe_counts_groups_without_decoding(wb, wb_index):
    spec = ComposeSpec(str(wb / "places" / "train"), str(wb / "pairing.json"), correlation=1.0)
    d = describe_composed(wb_index, spec)
    assert d["backgrounds"]["counts"] == {"land": 4, "water": 4}
    assert d["groups"]["train"] == {"landbird/land": 6, "landbird/water": 0, "waterbird/land": 0,
                                    "waterbird/water": 6}


def _cli(argv, capsys):
    """``bgsynth compose ...`` through the command's own parser and bgsynth's error reporting."""
    if "compose" in COMMANDS:
        return main(argv)
    parser = argparse.ArgumentParser(prog="bgsynth")  # until "compose" is one of bgsynth.cli.COMMANDS
    sub = parser.add_subparsers(dest="command")
    compose_cmd.register(sub)
    args = parser.parse_args(argv)
    try:
        return compose_cmd.run(args)
    except BgsynthError as e:
        print(f"bgsynth compose: error: {e}", file=sys.stderr)
        return 2


def test_cli_describe_export_eval_and_errors(wb, tmp_path, capsys):
    index = str(wb / "index.json")
    rule = ["--backgrounds", str(wb / "places" / "train"), "--pairing", str(wb / "pairing.json"), "--seed", "1",
            "--device", "cpu", "--backend", "pil", "--resize", "40", "--crop", "32"]
    assert _cli(["compose", "describe", index, *rule, "--json", "--correlation", "1"], capsys) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["groups"]["val"]["landbird/water"] == 0
    out = tmp_path / "x"
    assert _cli(["compose", "export", index, *rule, "--out", str(out), "--split", "val",
                 "--no-progress"], capsys) == 0
    assert "wrote 8 composites" in capsys.readouterr().out and (out / "metadata.csv").is_file()
    ckpt = tmp_path / "m.pt"
    train(index, compose=ComposeSpec(str(wb / "places" / "train"), str(wb / "pairing.json")), max_steps=1,
          epochs=1, batch_size=4, geometry=(40, 32), out=ckpt, val_split=None, **RUN)
    assert _cli(["compose", "eval", index, *rule, "--model", str(ckpt), "--out", str(tmp_path / "ev"),
                 "--all-groups", "--no-progress"], capsys) == 0
    text = capsys.readouterr().out
    assert "worst group" in text and (tmp_path / "ev" / "results.json").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text('{"landbird": ["lava"], "waterbird": ["water"]}')
    rule_bad = [*rule[:2], "--pairing", str(bad), *rule[4:]]
    assert _cli(["compose", "describe", index, *rule_bad], capsys) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "'lava'" in err


# ==============================================================================================================
# N = 2 end to end
# ==============================================================================================================


def test_waterbirds_like_end_to_end_with_two_classes(wb, wb_index, tiny_geometry, tmp_path):
    """make -> train (2 outputs) -> variants -> eval -> challenge -> export -> compose export and eval, each checked
    against an independent recount (composites re-made with torch.where, predictions re-run, files counted)."""
    from bgsynth.challenge import run_challenge
    from bgsynth.evaluate import evaluate
    from bgsynth.export import export
    from bgsynth.models import Predictor
    from bgsynth.variants import synthesize

    ckpt = tmp_path / "wb.pt"
    train(wb_index, compose=ComposeSpec(str(wb / "places" / "train"), str(wb / "pairing.json")), epochs=1,
          max_steps=2, batch_size=4, geometry=tiny_geometry, out=ckpt, val_split=None, **RUN)
    loaded = load_classifier(str(ckpt), 2)
    assert loaded.num_outputs == 2 and loaded.geometry == {"resize": 72, "crop": 64}
    pred = Predictor(loaded, label_space=wb_index.label_space)
    # the index's own Only-BG-T pool, in its 2 classes (a second index as the background source)
    own = load_backgrounds(wb_index, geometry=tiny_geometry, split="val", kind="only_bg_t", **RUN)
    assert own.kind == "only_bg_t" and own.pool.num_classes == 2 and len(own.pool) == 8
    val = wb_index.select(split="val")
    batch = next(iter(create_loader(val, backend="pil", geometry=tiny_geometry, batch_size=64)))
    out = synthesize(batch, "all", pool=own.pool, seed=0)
    assert bool(out["mixed_next"].valid.all()) and torch.equal(out["mixed_next"].bg_labels, (batch.labels + 1) % 2)
    assert bool(out["mixed_same"].valid.all()) and torch.equal(out["mixed_same"].bg_labels, batch.labels)
    # eval: Original against the predictor on the decoded crops, every Mixed-* prediction re-made from its background
    res = evaluate(wb_index, pred, split="val", geometry=tiny_geometry, pool=own.pool, progress=False, backend="pil")
    y0 = pred.predict(pred.prepare(batch.images))
    assert res.accuracy("original") == pytest.approx(float((y0 == batch.labels).double().mean()))
    rec = res.records
    pos = {int(i): k for k, i in enumerate(batch.image_ids.tolist())}
    rows = {int(i): k for k, i in enumerate(own.pool.image_ids.tolist())}
    for name in ("mixed_same", "mixed_rand", "mixed_next"):
        r = rec.of_variant(name)
        for i, bg_id, p, valid in zip(r.image_id, r.bg_id, r.pred, r.valid):
            assert valid
            k = pos[int(i)]
            x = torch.where(batch.masks[k].bool(), batch.images[k], own.pool.images[rows[int(bg_id)]])
            assert int(pred.predict(pred.prepare(x[None]))[0]) == int(p)
    # the challenge: a foreground is vulnerable iff one of the backgrounds makes the model miss it (brute force)
    chal = run_challenge(wb_index, pred, split="val", geometry=tiny_geometry, progress=False, backend="pil")
    brute = {}
    for k, i in enumerate(batch.image_ids.tolist()):
        x = torch.where(batch.masks[k].bool()[None], batch.images[k][None], own.pool.images)
        brute[i] = bool((pred.predict(pred.prepare(x)) != batch.labels[k]).any())
    assert dict(zip(chal.fg_ids.tolist(), chal.vulnerable.tolist())) == brute
    # export: every val image in every variant, one class folder per class, holding that class's images
    ex = export(wb_index, tmp_path / "release", geometry=tiny_geometry, pool=own.pool, split="val", progress=False,
                backend="pil")
    assert ex.written == 8 and all(n == 8 for n in ex.files.values())
    folders = sorted(p.name for p in (tmp_path / "release" / "mixed_next" / "val").iterdir())
    assert len(folders) == 2
    per_class = [len(list((tmp_path / "release" / "original" / "val" / f).iterdir())) for f in folders]
    assert per_class == [int((batch.labels == c).sum()) for c in (0, 1)]
    # the composed set of the same data: exported and evaluated per group
    spec = ComposeSpec(str(wb / "places" / "val"), str(wb / "pairing.json"), correlation=0.5)
    cx = export_composed(wb_index, spec, tmp_path / "composed", split="val", geometry=tiny_geometry, **RUN)
    assert cx.written == 8 and sum(cx.groups["val"].values()) == 8
    ce = evaluate_composed(wb_index, pred, spec, all_groups=True, geometry=tiny_geometry, **RUN)
    assert [g["total"] for g in ce.metrics["groups"]] == [int((batch.labels == c).sum()) for c in (0, 0, 1, 1)]
