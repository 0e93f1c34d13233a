"""Tests of the Backgrounds Challenge (bgsynth.challenge, bgsynth.cli.challenge, bgsynth.report.challenge_plots).

The central check is exactness: the vulnerable set of the search equals a brute-force evaluation of every
(foreground, background) pair written plainly here (torch.where composite, one forward per foreground).

Two kinds of models:

* :class:`LookupPredictor`, a fake with known behaviour: it recovers from the pixels of a composite which
  foreground and which background it was made of (exact uint8 matching, so a wrong composite raises) and answers
  from a fooling matrix chosen by the test. It is exactly batch-independent, checks the composite semantics
  (foreground pixels where the mask is set, the pool row elsewhere) and records every pair it is shown.
* the random-init ``bgsynth_cnn`` run in float64. A float32 model can change a near-tie prediction with the batch
  composition (different batch sizes take different conv algorithms and summation orders), which would make an
  exact comparison between differently batched evaluations flaky; in float64 such a flip would need a logit
  near-tie within ~1e-13, so both evaluations see the same predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bgsynth.challenge import (
    NOT_FOOLED,
    REFERENCE_BATCH,
    UNMAPPED_U8,
    ChallengeConfig,
    ChallengeResult,
    ChallengeSearch,
    challenge_foregrounds,
    merge_results,
    reference_cost,
    resolve_challenge,
    run_challenge,
)
from bgsynth.challenge_search import ACTIVE, ROBUST, VULNERABLE, SearchState, background_push, foreground_orders
from bgsynth.errors import CheckpointError, ConfigError

from conftest import cpu_and_cuda

REPO = pathlib.Path(__file__).resolve().parents[1]
MEAN = (0.4717, 0.4499, 0.3837)
STD = (0.2600, 0.2516, 0.2575)


# ------------------------------------------------------------------------------------------------------------
# Fixtures: the tiny built-in dataset's val split, decoded once here independently of the search
# ------------------------------------------------------------------------------------------------------------


FG_PER_CLASS = 3  # foregrounds per class in these tests (27); runs use BG_PER_CLASS backgrounds per class (27)
BG_PER_CLASS = 3


@pytest.fixture(scope="module")
def case(tiny_index, tiny_geometry):
    """Foregrounds (3 val images with a mask per class) and the whole Only-BG-T pool of val (54), decoded with the
    PIL backend, independently of the search. Runs use a seeded subset of the pool (``bg_per_class``); tables
    cover the whole pool, so any subset can be checked."""
    from bgsynth.pipeline import create_loader
    from bgsynth.pool import build_background_pool

    fg_ids = challenge_foregrounds(tiny_index, "val", fg_per_class=FG_PER_CLASS, seed=0)
    batches = list(create_loader(tiny_index, backend="pil", geometry=tiny_geometry, batch_size=256, ids=fg_ids))
    fg = {
        "ids": torch.cat([b.image_ids for b in batches]),
        "images": torch.cat([b.images for b in batches]),
        "masks": torch.cat([b.masks for b in batches]),
        "labels": torch.cat([b.labels for b in batches]),
    }
    pool = build_background_pool(tiny_index, geometry=tiny_geometry, backend="pil", split="val")
    return fg, pool


def make_fooling(labels: np.ndarray, n_bg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fooling matrix with robust rows, rows fooled by exactly one background (anywhere), sparse and dense rows,
    and the prediction of each pair (the label where not fooled; another class or -1 = unmapped where fooled)."""
    rng = np.random.default_rng(seed)
    f = len(labels)
    kind = rng.choice(4, size=f, p=[0.3, 0.25, 0.25, 0.2])
    fool = np.zeros((f, n_bg), bool)
    for i in range(f):
        if kind[i] == 1:
            fool[i, rng.integers(n_bg)] = True
        elif kind[i] == 2:
            fool[i] = rng.random(n_bg) < 0.08
        elif kind[i] == 3:
            fool[i] = rng.random(n_bg) < 0.7
    other = (labels[:, None] + rng.integers(1, 9, size=(f, n_bg))) % 9
    other = np.where(rng.random((f, n_bg)) < 0.15, -1, other)
    pred = np.where(fool, other, labels[:, None])
    return fool, pred


class LookupPredictor:
    """Fake model: identifies (foreground, background) of each composite from its pixels, answers from a table.

    Identification compares a sample of pixels inside each foreground's mask (which foreground) and outside it
    (which background); the composite is then checked exactly, pixel for pixel, against
    ``where(mask_i, fg_i, pool_j)``: a composite made any other way raises.
    """

    K = 48  # sampled pixels per foreground, inside and outside its mask

    def __init__(self, fg, pool, pred_table: np.ndarray, fail_after: int | None = None):
        self.mean, self.std = MEAN, STD
        self.input_dtype = torch.float32
        self.channels_last = False
        self.device = torch.device("cpu")
        self.fg_images = fg["images"]
        self.fg_keep = fg["masks"].bool()
        self.pool_images = pool.images.cpu()
        self.table = torch.as_tensor(pred_table)
        self.fail_after = fail_after
        self.calls = 0
        self.forwards = 0
        self.seen: list[tuple[int, int]] = []
        f, _, c, _ = self.fg_images.shape
        gen = torch.Generator().manual_seed(0)
        inside, outside = [], []
        for i in range(f):
            m = self.fg_keep[i, 0].flatten()
            for sel, out in ((m, inside), (~m, outside)):
                pos = sel.nonzero().squeeze(1)
                assert len(pos) > 0, f"foreground {i}: empty mask or full mask"
                out.append(pos[torch.randint(len(pos), (self.K,), generator=gen)])
        self.inside = torch.stack(inside)  # [F, K]
        self.outside = torch.stack(outside)
        flat = self.fg_images.flatten(2)  # [F, 3, C*C]
        self.fg_vals = torch.gather(flat, 2, self.inside[:, None].expand(-1, 3, -1))  # [F, 3, K]
        self.pool_flat = self.pool_images.flatten(2)  # [N, 3, C*C]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.table.numpy().tobytes()).hexdigest()

    def _uint8(self, x: torch.Tensor) -> torch.Tensor:
        # exact: the float32 round trip errs by ~1e-5 of a grey level, far below the 0.5 that rounding absorbs
        m = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return torch.round((x.float().cpu() * s + m) * 255).clamp(0, 255).to(torch.uint8)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        u = self._uint8(x)
        b = len(u)
        uf = u.flatten(2)  # [B, 3, C*C]
        f = len(self.inside)
        at_in = torch.gather(uf[:, :, None, :].expand(-1, -1, f, -1), 3,
                             self.inside[None, None].expand(b, 3, -1, -1))  # [B, 3, F, K]
        fg_ok = (at_in == self.fg_vals.permute(1, 0, 2)[None]).all(3).all(1)  # [B, F]
        assert bool((fg_ok.sum(1) == 1).all()), "a composite's foreground pixels match no (or several) foregrounds"
        i = fg_ok.int().argmax(1)
        q = self.outside[i]  # [B, K]
        at_out = torch.gather(uf, 2, q[:, None].expand(-1, 3, -1))  # [B, 3, K]
        pool_at = torch.gather(self.pool_flat[None].expand(b, -1, -1, -1), 3,
                               q[:, None, None].expand(-1, len(self.pool_flat), 3, -1))  # [B, N, 3, K]
        bg_ok = (pool_at == at_out[:, None]).all(3).all(2)  # [B, N]
        assert bool((bg_ok.sum(1) >= 1).all()), "a composite's background pixels match no pool image"
        j = bg_ok.int().argmax(1)
        expected = torch.where(self.fg_keep[i], self.fg_images[i], self.pool_images[j])
        assert torch.equal(expected, u), "a composite is not where(mask, foreground, background)"
        self.seen.extend(zip(i.tolist(), j.tolist()))
        self.forwards += b
        return self.table[i, j].to(x.device)


def brute_force(fg, pool, predictor, dtype=torch.float32) -> np.ndarray:
    """Every pair, written plainly: per foreground, composite with every background by torch.where, normalise,
    one forward; returns the prediction matrix int64 [F, N]."""
    mean = torch.tensor(predictor.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(predictor.std, dtype=torch.float32).view(1, 3, 1, 1)
    bgs = pool.images.cpu()
    out = np.zeros((len(fg["ids"]), len(bgs)), np.int64)
    for i in range(len(fg["ids"])):
        comp = torch.where(fg["masks"][i : i + 1].bool(), fg["images"][i : i + 1], bgs)
        x = ((comp.float() / 255.0 - mean) / std).to(dtype)
        out[i] = predictor.predict(x).cpu().numpy()
    return out


@pytest.fixture(scope="module")
def lookup(case):
    fg, pool = case
    labels = fg["labels"].numpy()
    fool, pred = make_fooling(labels, len(pool), seed=11)
    return fool, pred


def _run(tiny_index, tiny_geometry, predictor, **kw):
    kw.setdefault("backend", "pil")
    kw.setdefault("progress", False)
    if "fg_ids" not in kw:
        kw["fg_ids"] = challenge_foregrounds(tiny_index, "val", fg_per_class=FG_PER_CLASS, seed=0)
    kw.setdefault("bg_per_class", BG_PER_CLASS)
    return run_challenge(tiny_index, predictor, geometry=tiny_geometry, **kw)


def columns(res: ChallengeResult, all_bg_ids: np.ndarray) -> np.ndarray:
    """Columns of a whole-pool table that a run's backgrounds are."""
    cols = np.searchsorted(all_bg_ids, res.bg_ids)
    np.testing.assert_array_equal(all_bg_ids[cols], res.bg_ids)
    return cols


def check_records(res: ChallengeResult, pred_bf: np.ndarray, fg_ids: np.ndarray, bg_ids: np.ndarray):
    """Vulnerable set == brute force; every fooling record is a real fooling pair with the model's prediction.

    ``pred_bf`` is the brute-force prediction table over ``fg_ids`` x ``bg_ids`` (a superset of the run's).
    """
    rows = np.searchsorted(fg_ids, res.fg_ids)
    np.testing.assert_array_equal(fg_ids[rows], res.fg_ids)
    cols = columns(res, bg_ids)
    table = pred_bf[np.ix_(rows, cols)]
    fooled = table != res.fg_labels[:, None]
    np.testing.assert_array_equal(res.vulnerable, fooled.any(1))
    assert res.num_vulnerable == int(fooled.any(1).sum())
    n = res.num_backgrounds
    for k in range(res.num_foregrounds):
        if res.vulnerable[k]:
            j = int(np.searchsorted(res.bg_ids, res.fool_bg[k]))
            assert res.bg_ids[j] == res.fool_bg[k]
            assert fooled[k, j], f"foreground {res.fg_ids[k]}: recorded background {res.fool_bg[k]} does not fool it"
            assert res.fool_pred[k] == table[k, j]
            assert 1 <= res.tried[k] <= n
        else:
            assert res.fool_bg[k] == -1 and res.fool_pred[k] == NOT_FOOLED
            assert res.tried[k] == n
    assert res.forwards == int(res.tried.sum())
    assert res.oracle_forwards <= res.forwards <= res.brute_force_forwards
    assert res.accuracy == pytest.approx(1 - res.num_vulnerable / res.num_foregrounds)


# ------------------------------------------------------------------------------------------------------------
# Cost model
# ------------------------------------------------------------------------------------------------------------


def test_reference_cost_by_hand():
    np.testing.assert_array_equal(reference_cost(np.array([-1, 0, 31, 32, 63, 64, 99]), 100),
                                  [100, 32, 32, 64, 64, 96, 100])
    np.testing.assert_array_equal(reference_cost(np.array([0, 5, -1]), 10), [10, 10, 10])
    np.testing.assert_array_equal(reference_cost(np.array([3, 4]), 10, batch=4), [4, 8])


# ------------------------------------------------------------------------------------------------------------
# Exactness against brute force
# ------------------------------------------------------------------------------------------------------------


def test_lookup_brute_force_is_the_table(case, lookup):
    """The plain brute force with the fake model reproduces its table: composites are what the fake expects."""
    fg, pool = case
    fool, pred = lookup
    p = LookupPredictor(fg, pool, pred)
    np.testing.assert_array_equal(brute_force(fg, pool, p), pred)
    # the precondition of the exactness tests: a real mix
    assert 0 < fool.any(1).sum() < len(fool)
    assert ((fool.sum(1) == 1)).sum() > 0


@pytest.mark.parametrize(
    "seed,batch_size,fg_tile,order",
    [(0, 3, 1, "adaptive"), (1, 7, 5, "adaptive"), (2, 64, None, "adaptive"), (3, 13, 40, "reference"),
     (4, 300, 8, "adaptive")],
)
def test_exact_vs_brute_force_lookup(case, lookup, tiny_index, tiny_geometry, seed, batch_size, fg_tile, order):
    fg, pool = case
    fool, pred = lookup
    p = LookupPredictor(fg, pool, pred)
    res = _run(tiny_index, tiny_geometry, p, seed=seed, batch_size=batch_size, fg_tile=fg_tile, order=order)
    fg_ids, all_bg = fg["ids"].numpy(), pool.image_ids.numpy()
    check_records(res, pred, fg_ids, all_bg)
    assert res.num_foregrounds == 9 * FG_PER_CLASS and res.num_backgrounds == 9 * BG_PER_CLASS
    # every forward was a distinct pair of the run's sets, and the search counted exactly what the model saw
    assert len(set(p.seen)) == len(p.seen) == res.forwards == p.forwards
    cols = set(columns(res, all_bg).tolist())
    assert {j for _, j in p.seen} <= cols
    # a robust foreground was composited with every background of the run
    seen = set(p.seen)
    for k in np.flatnonzero(~res.vulnerable):
        i = int(np.searchsorted(fg_ids, res.fg_ids[k]))
        assert all((i, j) in seen for j in cols)


def test_own_background_is_one_of_the_backgrounds(case, tiny_index, tiny_geometry):
    """As in the official script, a foreground is also tried on its own Only-BG-T."""
    fg, pool = case
    labels = fg["labels"].numpy()
    all_bg = pool.image_ids.numpy()
    own = np.searchsorted(all_bg, fg["ids"].numpy())
    np.testing.assert_array_equal(all_bg[own], fg["ids"].numpy())
    table = np.repeat(labels[:, None], len(all_bg), axis=1)
    table[np.arange(len(labels)), own] = (labels + 1) % 9  # only its own background fools each foreground
    fg_ids = fg["ids"].tolist()[::3]
    res = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, table), fg_ids=fg_ids, bg_per_class=None,
               batch_size=64)
    assert res.num_backgrounds == len(all_bg) and res.vulnerable.all()
    np.testing.assert_array_equal(res.fool_bg, fg_ids)


def test_unmapped_prediction_counts_as_fooled(case, tiny_index, tiny_geometry):
    fg, pool = case
    labels = fg["labels"].numpy()
    # every foreground is fooled at once, except two that resist every background; one of those is shown an
    # unmapped ImageNet class (-1) by one background
    table = (np.repeat(labels[:, None], len(pool), axis=1) + 1) % 9
    table[:2] = labels[:2, None]
    res0 = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, table), batch_size=32)
    assert res0.num_vulnerable == len(labels) - 2 and not res0.vulnerable[:2].any()
    j = int(np.searchsorted(pool.image_ids.numpy(), res0.bg_ids[4]))
    table[0, j] = -1
    res = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, table), batch_size=32)
    assert res.vulnerable[0] and not res.vulnerable[1] and res.num_vulnerable == len(labels) - 1
    assert res.fool_bg[0] == res0.bg_ids[4] and res.fool_pred[0] == -1
    assert res.accuracy == pytest.approx(1 / len(labels))


def test_adaptive_order_near_the_oracle_bound(case, tiny_index, tiny_geometry):
    """With backgrounds that pull every foreground to their own class, the search learns it at once."""
    fg, pool = case
    labels = fg["labels"].numpy()
    bg_labels = pool.labels.numpy()
    # a background of class b makes the model say b (fooling every foreground of another class); a few
    # foregrounds resist everything
    table = np.repeat(bg_labels[None, :], len(labels), axis=0)
    strong = np.arange(len(labels)) % 7 == 0
    table[strong] = labels[strong, None]
    res = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, table), batch_size=8, bg_per_class=None)
    np.testing.assert_array_equal(res.vulnerable, ~strong)
    assert res.forwards <= 1.1 * res.oracle_forwards
    lo, hi = res.reference_forwards_bounds()
    assert res.num_robust * res.num_backgrounds < lo <= hi <= res.brute_force_forwards


def test_exact_vs_brute_force_cnn_float64(case, tiny_index, tiny_geometry):
    """A real (random-init) network, evaluated in float64 (see the module docstring)."""
    from bgsynth.models import LoadedModel, Predictor, create_model

    fg, pool = case
    torch.manual_seed(0)
    net = create_model("bgsynth_cnn").double().eval()
    pred = Predictor(LoadedModel(net, 9, "in9", MEAN, STD, arch="bgsynth_cnn"))
    assert pred.input_dtype == torch.float64
    # a subset keeps the float64 brute force short: 18 foregrounds x 18 backgrounds (2 per class each)
    labels = fg["labels"].numpy()
    pick = torch.as_tensor(np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(9)])))
    sub = {k: v[pick] for k, v in fg.items()}
    fg_ids = sub["ids"].tolist()
    res0 = _run(tiny_index, tiny_geometry, pred, fg_ids=fg_ids, bg_per_class=2, batch_size=5)
    subpool = pool.select(torch.as_tensor(columns(res0, pool.image_ids.numpy())))
    bf = brute_force(sub, subpool, pred, dtype=torch.float64)
    assert (bf != sub["labels"].numpy()[:, None]).any(), "precondition: the random network fools some foreground"
    check_records(res0, bf, sub["ids"].numpy(), subpool.image_ids.numpy())
    res1 = _run(tiny_index, tiny_geometry, pred, fg_ids=fg_ids, bg_per_class=2, batch_size=64, order="reference",
                fg_tile=3)
    check_records(res1, bf, sub["ids"].numpy(), subpool.image_ids.numpy())


# ------------------------------------------------------------------------------------------------------------
# Full matrix
# ------------------------------------------------------------------------------------------------------------


def test_full_matrix_equals_brute_force(case, lookup, tiny_index, tiny_geometry, tmp_path):
    fg, pool = case
    fool, pred_all = lookup
    res = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred_all), full_matrix=True,
               store_predictions=True, batch_size=50)
    labels = fg["labels"].numpy()
    np.testing.assert_array_equal(res.fg_ids, fg["ids"].numpy())
    cols = columns(res, pool.image_ids.numpy())
    pred = pred_all[:, cols]  # the brute-force table of this run's backgrounds
    bg_ids, bg_labels = pool.image_ids.numpy()[cols], pool.labels.numpy()[cols]
    bf_fool = pred != labels[:, None]
    np.testing.assert_array_equal(res.fooling_matrix(), bf_fool)
    np.testing.assert_array_equal(res.fool_bits, np.packbits(bf_fool, axis=1))
    np.testing.assert_array_equal(res.pred_matrix, np.where(pred < 0, UNMAPPED_U8, pred).astype(np.uint8))
    np.testing.assert_array_equal(res.predictions(), pred)
    check_records(res, pred, fg["ids"].numpy(), bg_ids)
    assert res.forwards == res.brute_force_forwards

    # first fooling background in the fixed order, and the official loop's cost simulated plainly
    n = len(bg_ids)
    spent = 0
    for i in range(len(labels)):
        first = -1
        for start in range(0, n, REFERENCE_BATCH):
            stop = min(start + REFERENCE_BATCH, n)
            spent += stop - start
            hits = np.flatnonzero(bf_fool[i, start:stop])
            if len(hits):
                first = start + int(hits[0])
                break
        assert res.first_fool_fixed[i] == first
        if first >= 0:
            assert res.fool_bg[i] == bg_ids[first]
    assert res.reference_forwards == spent
    assert res.reference_forwards_bounds() == (spent, spent)

    # per-background fraction of other-class foregrounds fooled, and the per-class ranking
    frac = res.bg_fool_fraction()
    for j in range(n):
        other = labels != bg_labels[j]
        assert frac[j] == pytest.approx(bf_fool[other, j].mean())
    top = res.most_adversarial(k=2)
    for c, lst in top.items():
        cand = sorted((-frac[j], int(bg_ids[j])) for j in range(n) if bg_labels[j] == c)[:2]
        assert [b for b, _ in lst] == [b for _, b in cand]
        assert [f for _, f in lst] == pytest.approx([-f for f, _ in cand])
    np.testing.assert_array_equal(res.vulnerability_counts(), bf_fool.sum(1))
    shown = {b for lst in res.most_adversarial(8).values() for b, _ in lst}
    assert set(res.gallery_images) == shown
    b0 = sorted(shown)[0]
    j0 = int(np.searchsorted(pool.image_ids.numpy(), b0))
    np.testing.assert_array_equal(res.gallery_images[b0], pool.images[j0].permute(1, 2, 0).numpy())

    # files: JSON + bit-packed matrix, and the plots
    paths = res.save(tmp_path)
    back = ChallengeResult.load(tmp_path)
    for name in ("fool_bits", "pred_matrix", "vulnerable", "fool_bg", "fool_pred", "first_fool_fixed", "tried"):
        np.testing.assert_array_equal(getattr(back, name), getattr(res, name))
    assert back.to_dict(include_timing=False) == res.to_dict(include_timing=False)
    d = json.loads(paths["json"].read_text())
    assert d["vulnerable"] == res.num_vulnerable and d["total"] == len(labels)
    assert d["vulnerability_histogram"] == np.bincount(bf_fool.sum(1), minlength=n + 1).tolist()
    from bgsynth.report.challenge_plots import challenge_plots

    plots = challenge_plots(res, tmp_path)
    for key in ("gallery", "vulnerability", "class_accuracy"):
        assert plots[key].is_file() and plots[key].stat().st_size > 1000
    from PIL import Image

    with Image.open(plots["gallery"]) as im:
        assert im.width > 300 and im.height > 300


# ------------------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------------------


def test_shards_merge_to_the_single_run(case, lookup, tiny_index, tiny_geometry):
    fg, pool = case
    fool, pred = lookup
    single = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), full_matrix=True, batch_size=40)
    parts = [_run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), full_matrix=True, batch_size=40,
                  shard_id=s, num_shards=2) for s in range(2)]
    for s, p in enumerate(parts):
        assert p.fg_ids.tolist() == sorted(single.fg_ids.tolist())[s::2]
    merged = merge_results(parts[::-1])
    for name in ("fg_ids", "fg_labels", "vulnerable", "fool_bg", "fool_pred", "tried", "fool_bits", "first_fool_fixed"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(single, name))
    assert merged.forwards == single.forwards
    assert merged.config["shards"] == [0, 1]
    assert merged.config["foregrounds_digest"] == single.config["foregrounds_digest"]
    # adaptive shards: the same vulnerable set (the records may differ: each shard learns its own order)
    adaptive = [_run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), batch_size=16, shard_id=s,
                     num_shards=2) for s in range(2)]
    np.testing.assert_array_equal(merge_results(adaptive).vulnerable, single.vulnerable)
    with pytest.raises(ConfigError, match="overlap"):
        merge_results([parts[0], parts[0]])
    with pytest.raises(ConfigError, match="settings"):
        merge_results([parts[0], adaptive[1]])
    with pytest.raises(ConfigError, match="at least one"):
        merge_results([])


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ------------------------------------------------------------------------------------------------------------


def _same(a: ChallengeResult, b: ChallengeResult) -> None:
    assert a.to_dict(include_timing=False) == b.to_dict(include_timing=False)
    for name in ("fool_bits", "pred_matrix", "first_fool_fixed"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("full_matrix", [False, True])
def test_crash_at_any_point_resumes_to_the_identical_result(case, lookup, tiny_index, tiny_geometry, tmp_path,
                                                            full_matrix):
    fg, pool = case
    fool, pred = lookup
    kw = dict(batch_size=24 if full_matrix else 12, fg_tile=12, full_matrix=full_matrix,
              store_predictions=full_matrix)
    ref = _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), **kw)
    steps = ref.timing["steps"]
    assert steps > 6
    for fail_after in (1, steps // 2 + 1):
        ck = tmp_path / f"{full_matrix}-{fail_after}" / "state.npz"
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred, fail_after=fail_after), checkpoint=ck,
                 checkpoint_every=0, **kw)
        assert ck.is_file()
        with np.load(ck) as z:
            meta = json.loads(bytes(z["meta"]).decode())
        assert meta["steps"] == fail_after  # a checkpoint after every finished forward batch
        done_before = meta["forwards"]
        again = LookupPredictor(fg, pool, pred)
        res = _run(tiny_index, tiny_geometry, again, checkpoint=ck, checkpoint_every=0, resume=True, **kw)
        assert res.timing["resumed"]
        _same(res, ref)
        # nothing is lost but the interrupted forward batch: the resumed run does exactly the remaining work
        with np.load(ck) as z:
            meta = json.loads(bytes(z["meta"]).decode())
        assert meta["steps"] == ref.timing["steps"]  # the checkpoint now holds the finished run
        assert again.forwards == ref.forwards - done_before
    # resuming a finished run does no work
    done = LookupPredictor(fg, pool, pred)
    _same(_run(tiny_index, tiny_geometry, done, checkpoint=ck, resume=True, **kw), ref)
    assert done.forwards == 0


def test_resume_refuses_another_run(case, lookup, tiny_index, tiny_geometry, tmp_path):
    fg, pool = case
    fool, pred = lookup
    ck = tmp_path / "state.npz"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred, fail_after=2), checkpoint=ck,
             checkpoint_every=0, batch_size=8)
    with pytest.raises(CheckpointError, match="batch_size"):
        _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), checkpoint=ck, resume=True, batch_size=9)
    other = pred.copy()
    other[0, 0] = (other[0, 0] + 1) % 9
    with pytest.raises(CheckpointError, match="model"):
        _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, other), checkpoint=ck, resume=True, batch_size=8)
    ck.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        _run(tiny_index, tiny_geometry, LookupPredictor(fg, pool, pred), checkpoint=ck, resume=True, batch_size=8)


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "bgsynth.cli", "challenge", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_sigkill_then_resume_matches_uninterrupted(builtin_root, tiny_geometry, tmp_path):
    """``bgsynth challenge`` killed with SIGKILL after its first checkpoint, then ``--resume``: same files."""
    from bgsynth.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = tmp_path / "cnn.pt"
    save_checkpoint(create_model("bgsynth_cnn"), model, "bgsynth_cnn", 9, extra={"geometry": tiny_geometry})
    # the subprocess imports the bgsynth this process imports (a PYTHONPATH shim of a worktree, or the install)
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=pythonpath)
    common = [builtin_root, "--model", model, "--backend", "pil", "--device", "cpu", "--fg-per-class", 2,
              "--bg-per-class", 2, "--full-matrix", "--store-predictions", "--batch-size", 1, "--no-progress",
              "--no-plots", "--checkpoint-every", 0]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _cli([*common, "--out", ref_dir], env)
    proc = _cli([*common, "--out", run_dir], env)
    ckpt = run_dir / "challenge.ckpt.npz"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (run_dir / "challenge.json").exists()
    with np.load(ckpt) as z:
        killed_at = json.loads(bytes(z["meta"]).decode())["forwards"]
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    total = json.loads((ref_dir / "challenge.json").read_text())["work"]["forwards"]
    assert 0 < killed_at < total
    resumed = _cli([*common, "--out", run_dir, "--resume"], env)
    out2, err2 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err2
    assert "accuracy" in out2 and "vulnerable" in out2 and "forwards" in out2
    a = json.loads((ref_dir / "challenge.json").read_text())
    b = json.loads((run_dir / "challenge.json").read_text())
    assert b["timing"]["resumed"] and not a["timing"]["resumed"]
    assert b["timing"]["forwards_this_process"] <= total - killed_at + 1
    a.pop("timing"), b.pop("timing")
    assert a == b
    assert (ref_dir / "challenge_matrix.npz").read_bytes() == (run_dir / "challenge_matrix.npz").read_bytes()


# ------------------------------------------------------------------------------------------------------------
# Errors, CLI summary, CUDA
# ------------------------------------------------------------------------------------------------------------


def test_bad_arguments(case, lookup, tiny_index, tiny_geometry):
    fg, pool = case
    p = LookupPredictor(fg, pool, lookup[1])
    with pytest.raises(ConfigError, match="order"):
        _run(tiny_index, tiny_geometry, p, order="random")
    with pytest.raises(ConfigError, match="batch_size"):
        _run(tiny_index, tiny_geometry, p, batch_size=0)
    with pytest.raises(ConfigError, match="no foreground"):
        _run(tiny_index, tiny_geometry, p, split="nosuchsplit")
    with pytest.raises(ConfigError, match="resume"):
        _run(tiny_index, tiny_geometry, p, resume=True)
    with pytest.raises(ConfigError, match="Predictor-like"):
        _run(tiny_index, tiny_geometry, object())


def test_challenge_config_is_validated():
    assert ChallengeConfig(full_matrix=True).order == "reference"
    assert ChallengeConfig(fg_ids=np.array([3, 1])).fg_ids == (3, 1)
    assert ChallengeConfig().tile(16) == 64 and ChallengeConfig(fg_tile=5).tile(16) == 5
    for bad in ({"order": "random"}, {"fg_tile": 0}, {"bg_per_class": 0}, {"share_every": -1},
                {"checkpoint_every": -1}, {"shard_id": 2, "num_shards": 2}, {"gallery_k": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ChallengeConfig(**bad)
    with pytest.warns(UserWarning, match="store_predictions"):
        assert not ChallengeConfig(store_predictions=True).store_predictions


def test_resolve_challenge_options():
    """Run options go to the RunConfig (challenge defaults), the rest to ChallengeConfig; ``checkpoint`` is the
    search-state file, while the model's file (from the predictor) is what the geometry warning names."""
    from types import SimpleNamespace

    pred = SimpleNamespace(device="cpu", loaded=SimpleNamespace(geometry=None, provenance={"file": "model.pt"}))
    with pytest.warns(UserWarning, match="model.pt") as rec:
        run, cfg = resolve_challenge(pred, options={"checkpoint": "state.npz", "resume": True, "order": "reference"})
    assert not any("state.npz" in str(w.message) for w in rec)
    assert cfg.checkpoint == "state.npz" and cfg.resume and cfg.order == "reference"
    assert (run.batch_size, run.device.type, run.progress, run.geometry_source) == (64, "cpu", True, "default")
    stored = SimpleNamespace(device="cpu", loaded=SimpleNamespace(geometry={"resize": 72, "crop": 64}, provenance={}))
    run, _ = resolve_challenge(stored, options={"batch_size": 9, "progress": False})
    assert (run.geometry.resize, run.geometry.crop, run.geometry_source, run.batch_size) == (72, 64, "checkpoint", 9)
    with pytest.raises(ConfigError, match="unknown option"):
        resolve_challenge(stored, options={"fg_per_class": 3})


def test_search_state_transitions():
    """The explicit state's two transitions: which pairs come next (chunks growing with what was survived,
    fewest tried first, in the class's order) and what the answers decide."""
    labels = np.array([0, 1, 1])
    st = SearchState.new(np.array([10, 11, 12]), labels, 5, full_matrix=False, store_predictions=False)
    st.next_pos = 3  # admitted (ChallengeSearch.admit decodes them, then activates them)
    st.activate([0, 1, 2])
    assert st.status.tolist() == [ACTIVE] * 3 and st.window_tried.shape == (3, 5)
    orders = np.tile(np.arange(5)[::-1], (9, 1))  # every class tries pool row 4 first
    rows, bgs = st.next_pairs(64, orders, full_matrix=False)
    assert rows.tolist() == [0, 1, 2] and bgs.tolist() == [4, 4, 4]  # one probe each
    left = st.record(rows, bgs, np.array([0, 5, 1]), full_matrix=False)  # foreground 1 fooled (class 5)
    assert left.tolist() == [1] and st.window.tolist() == [0, 2]
    assert st.status[1] == VULNERABLE and st.fool_idx[1] == 4 and st.fool_pred[1] == 5
    assert st.pair_counts[4, 1, 5] == 1 and st.pair_counts[4, 0, 0] == 1 and st.forwards == 3
    chunks = []
    for _ in range(4):
        rows, bgs = st.next_pairs(64, orders, full_matrix=False)
        chunks.append(np.bincount(rows, minlength=2).tolist())
        st.record(rows, bgs, labels[st.window[rows]], full_matrix=False)  # never fooled
    assert chunks == [[1, 1]] * 4  # chunk = half of what was survived (at least 1), up to what is left
    assert (st.status[[0, 2]] == ROBUST).all() and st.complete and st.tried.tolist() == [5, 1, 5]


def test_search_object_step_by_step_and_resume(case, lookup, tiny_index, tiny_geometry, tmp_path):
    """The ChallengeSearch API: the resolved objects give what the keyword call gives; a search driven a step at a
    time, saved, and resumed into a new search ends with the same result."""
    from bgsynth.pool import build_background_pool

    fg, pool = case
    pred = lookup[1]
    fg_ids = challenge_foregrounds(tiny_index, "val", fg_per_class=FG_PER_CLASS, seed=0)
    opts = dict(geometry=tiny_geometry, backend="pil", progress=False, batch_size=12, fg_tile=9, fg_ids=fg_ids,
                bg_per_class=BG_PER_CLASS)
    ref = run_challenge(tiny_index, LookupPredictor(fg, pool, pred), **opts)
    run, cfg = resolve_challenge(LookupPredictor(fg, pool, pred), options=opts)
    _same(run_challenge(tiny_index, LookupPredictor(fg, pool, pred), run, cfg), ref)
    bg = build_background_pool(tiny_index, geometry=run.geometry, backend="pil", split="val",
                               per_class=BG_PER_CLASS, seed=run.seed)
    first = ChallengeSearch(tiny_index, LookupPredictor(fg, pool, pred), bg, run, cfg, fg_ids=fg_ids)
    first.admit()
    for _ in range(3):
        first.step()
        first.admit()
    first.save(tmp_path / "mid.npz")
    first.close()
    again = LookupPredictor(fg, pool, pred)
    second = ChallengeSearch(tiny_index, again, bg, run, cfg, fg_ids=fg_ids)
    assert second.resume(tmp_path / "mid.npz") and second.state.steps == 3
    second.run()
    res = second.result(wall_s=1.0)
    _same(res, ref)
    assert res.timing["resumed"] and again.forwards == ref.forwards - first.state.forwards


def test_index_is_loaded_by_the_caller(builtin_root):
    with pytest.raises(ConfigError, match="DatasetIndex"):
        run_challenge(str(builtin_root), object())


def test_cli_in_process_prints_the_summary(builtin_root, tiny_geometry, tmp_path, capsys):
    from bgsynth.cli import main
    from bgsynth.models import create_model, save_checkpoint

    torch.manual_seed(1)
    model = tmp_path / "cnn.pt"
    save_checkpoint(create_model("bgsynth_cnn"), model, "bgsynth_cnn", 9, extra={"geometry": tiny_geometry})
    rc = main(["challenge", str(builtin_root), "--model", str(model), "--out", str(tmp_path / "o"), "--backend",
               "pil", "--device", "cpu", "--fg-per-class", "2", "--bg-per-class", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Backgrounds Challenge: accuracy" in out and "oracle bound" in out and "dog" in out
    d = json.loads((tmp_path / "o" / "challenge.json").read_text())
    assert d["total"] == 18 and d["backgrounds"] == 18 and len(d["pool"]["ids"]) == 18
    assert d["accuracy"] == pytest.approx(1 - d["vulnerable"] / d["total"])
    assert (tmp_path / "o" / "challenge_class_accuracy.png").is_file()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_device_matches_lookup(case, lookup, tiny_index, tiny_geometry, device):
    """The search on each device (composites made there by bgsynth.kernels.composite) gives the brute-force answer."""
    fg, pool = case
    fool, pred = lookup
    p = LookupPredictor(fg, pool, pred)
    res = _run(tiny_index, tiny_geometry, p, device=device, batch_size=24)
    check_records(res, pred, fg["ids"].numpy(), pool.image_ids.numpy())


def test_foreground_orders_move_up_the_backgrounds_pushing_to_the_runner_up():
    """A foreground that has tried two backgrounds and leans to class 2 moves the background that pushes to class 2
    up its class's order; one that has tried fewer keeps its class's order; every row is a permutation."""
    C, N = 3, 8
    counts = np.zeros((N, C, C + 1))
    counts[:, 1, 1] = 4.0  # every background leaves class-1 foregrounds mostly on class 1 ...
    counts[7, 1, 1], counts[7, 1, 2] = 1.0, 3.0  # ... but background 7 moves them to class 2
    push = background_push(counts, np.array([0, 1, 1, 2, 0, 1, 2, 0]))
    assert push[7, 2] > push[:7, 2].max()
    class_order = np.tile(np.arange(N), (C, 1))  # background 7 last
    logmass = np.log(np.array([[0.05, 0.6, 0.35, 1e-6]] * 2)) * np.array([[2.0], [1.0]])
    tried = np.zeros((2, N), bool)
    tried[0, :2] = tried[1, 0] = True
    out = foreground_orders(class_order, push, logmass, tried, np.array([1, 1]))
    assert sorted(out[0].tolist()) == list(range(N)) and out[0].tolist().index(7) < N - 1
    np.testing.assert_array_equal(out[1], class_order[1])  # one background tried: the class's order
    flat = foreground_orders(class_order, np.zeros_like(push), logmass, tried, np.array([1, 1]))
    np.testing.assert_array_equal(flat, class_order[[1, 1]])  # no background pushes: the class's order
