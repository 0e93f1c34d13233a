"""Label spaces of N = 2, 9 and 20 classes end to end on procedural data: a folder of images with PNG masks is
ingested (its class folders are the label space), then every variant, the evaluation, the Backgrounds Challenge and
the export run on it. Expectations are computed here, independently of the engine: the Mixed-* background of every
image by the reference rule of PAPER.md with ``(y + 1) mod N`` (tests/reference.py), the challenge's answer by brute
force over the full matrix of predictions, the class folders and the counts from the files written.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bgsynth.challenge import run_challenge
from bgsynth.classes import IN9_MEAN, IN9_STD
from bgsynth.evaluate import evaluate
from bgsynth.export import export
from bgsynth.geometry import CropGeometry
from bgsynth.models import LoadedModel, Predictor, create_model
from bgsynth.sources.mask_folder import ingest_masks
from reference import reference_background

GEOMETRY = CropGeometry(resize=48, crop=40)
PER_CLASS = 3
SEED = 3


def _scene(rng: np.random.Generator, k: int, n: int, w: int = 64, h: int = 52) -> tuple[np.ndarray, np.ndarray]:
    """A textured scene whose colour follows the class, an ellipse of the class's colour inside a margin, and its
    0/255 mask (the object leaves margins on every side, so Only-BG-T exists)."""
    hue = k / n
    base = np.array([255 * hue, 255 * (1 - hue), 128 + 100 * np.sin(6.28 * hue)], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img = base[None, None] * 0.5 + rng.normal(0, 25, (h, w, 3)) + (xx[..., None] * 1.5)
    cy, cx = h / 2 + rng.integers(-3, 4), w / 2 + rng.integers(-4, 5)
    ry, rx = rng.integers(9, 13), rng.integers(10, 15)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img[mask] = 255 - base
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


@pytest.fixture(scope="module", params=[2, 9, 20], ids=lambda n: f"N{n}")
def space(request, tmp_path_factory):
    n = request.param
    root = tmp_path_factory.mktemp(f"labels{n}")
    rng = np.random.default_rng(n)
    names = [f"class{k:02d}" for k in range(n)]
    for k, name in enumerate(names):
        for j in range(PER_CLASS):
            img, mask = _scene(rng, k, n)
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / name / f"{name}_{j}.jpg", quality=92)
            Image.fromarray(mask).save(root / "masks" / name / f"{name}_{j}.png")
    # one bad mask (another size): a recorded reject, not a crash
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / names[0] / f"{names[0]}_0.png")
    index = ingest_masks(root / "images", root / "masks", values="binary", classes="folders", split="val",
                         workers=1, progress=False, out=root / "index.json")
    torch.manual_seed(n)
    net = create_model("bgsynth_cnn", n).eval()
    loaded = LoadedModel(net, n, "custom", tuple(IN9_MEAN), tuple(IN9_STD), provenance={"spec": f"n{n}"})
    return n, names, index, Predictor(loaded, label_space=index.label_space), root


def test_ingest_makes_the_label_space(space):
    n, names, index, _pred, _root = space
    assert index.label_space.num_classes == n and list(index.label_space.classes) == names
    assert [c["name"] for c in index.data["categories"]] == names
    assert len(index) == n * PER_CLASS - 1
    (rej,) = index.data["rejects"]
    assert rej["reason"] == "mask_shape_mismatch" and rej["path"] == f"{names[0]}/{names[0]}_0.jpg"
    assert f"{names[0]}_0.png is 10x10, the image is 64x52" in rej["detail"]
    labels = {index.image(i)["file_name"].split("/")[0]: index.image(i)["label"] for i in index.ids}
    assert labels == {name: k for k, name in enumerate(names)}


def test_variants_and_eval_follow_the_label_space(space):
    n, names, index, pred, _root = space
    r = evaluate(index, pred, variants="all", geometry=GEOMETRY, backend="pil", batch_size=16, progress=False,
                 seed=SEED, examples_per_class=0)
    assert r.label_space == index.label_space
    recs = r.records
    truth = {i: index.image(i)["label"] for i in index.ids}
    bgt = recs.of_variant("only_bg_t")
    pool_ids = sorted(int(i) for i in bgt.image_id[bgt.valid])
    assert len(pool_ids) == len(index)  # every procedural object leaves a margin
    pool_labels = [truth[i] for i in pool_ids]
    for v in ("mixed_same", "mixed_rand", "mixed_next"):
        m = recs.of_variant(v)
        for i, y, ok, bid, blab in zip(m.image_id, m.label, m.valid, m.bg_id, m.bg_label):
            _row, want_id, want_label = reference_background(int(i), int(y), v, pool_ids, pool_labels, seed=SEED,
                                                             num_classes=n)
            assert (bool(ok), int(bid), int(blab)) == (want_id >= 0, int(want_id), int(want_label)), (v, int(i))
        if v == "mixed_next":
            assert m.valid.all() and ((m.label + 1) % n == m.bg_label).all()
    assert ((recs.pred >= 0) & (recs.pred < n)).all()
    for v in r.variants:
        rows = recs.of_variant(v)
        rows = rows.take(rows.valid)
        met = r.metrics[v]
        assert met["per_class"]["total"] == [int((rows.label == c).sum()) for c in range(n)]
        assert np.array(met["confusion"]).shape == (n, n + 1)
        assert met["accuracy"] == pytest.approx(float((rows.pred == rows.label).mean()))
    assert json.loads(r.to_json())["classes"] == names


def test_challenge_equals_brute_force_in_the_label_space(space):
    n, _names, index, pred, _root = space
    opts = dict(geometry=GEOMETRY, backend="pil", progress=False, bg_per_class=None, seed=SEED)
    full = run_challenge(index, pred, full_matrix=True, store_predictions=True, batch_size=64, **opts)
    preds = full.pred_matrix.astype(np.int64)
    assert preds.shape == (len(full.fg_ids), len(full.bg_ids)) and preds.max() < n
    brute = (preds != full.fg_labels[:, None]).any(axis=1)  # fooled by some background: pred != its class
    np.testing.assert_array_equal(full.vulnerable, brute)
    adaptive = run_challenge(index, pred, batch_size=16, **opts)
    np.testing.assert_array_equal(adaptive.vulnerable, brute)
    for f in np.flatnonzero(adaptive.vulnerable):  # the fooling background really fools it
        b = int(np.searchsorted(full.bg_ids, adaptive.fool_bg[f]))
        assert preds[f, b] != full.fg_labels[f] and preds[f, b] == adaptive.fool_pred[f]
    assert adaptive.label_space == index.label_space and len(adaptive.per_class()) == n
    assert adaptive.forwards <= full.forwards


def test_export_writes_the_label_space_folders(space, tmp_path):
    n, names, index, _pred, _root = space
    res = export(index, tmp_path / "out", variants="all", geometry=GEOMETRY, backend="pil", progress=False,
                 seed=SEED)
    folders = index.label_space.folders
    assert len(folders) == n
    for v in ("original", "only_bg_t", "mixed_next"):
        per_folder = {p.name: len(list(p.iterdir())) for p in (tmp_path / "out" / v / "val").iterdir()}
        want = {folders[k]: PER_CLASS - (k == 0) for k in range(n)}
        assert per_folder == want, v
    rows = [r for r in csv.DictReader(io.StringIO(res.backgrounds.read_text())) if r["variant"] == "mixed_next"]
    truth = {i: index.image(i)["label"] for i in index.ids}
    assert len(rows) == len(index)
    assert all(int(r["bg_label"]) == (truth[int(r["image_id"])] + 1) % n for r in rows)
    assert json.loads(res.manifest.read_text())["label_space"]["classes"] == names
