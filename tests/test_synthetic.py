"""The built-in dataset: determinism, ground truth, correlation, layout, cache."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

from bgsynth.classes import NUM_IN9, wnid_to_in9
from bgsynth.errors import ConfigError
from bgsynth.index import DatasetIndex, mask_extent, rle_decode
from bgsynth.sources.imagenet import parse_voc_xml
from bgsynth.sources.synthetic import (
    BUILTIN_WNIDS,
    BuiltinSpec,
    SCENE_FAMILIES,
    build_builtin_dataset,
    dataset_dir_name,
    default_cache_dir,
    load_builtin_index,
    render_background,
    render_sample,
    sample_scene,
    write_dataset,
)

TINY = dict(seed=0, train_per_class=3, val_per_class=2)


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return build_builtin_dataset(root=root, progress=False, workers=2, **TINY)


def test_builtin_wnids_map_to_their_class():
    assert [wnid_to_in9(w) for w in BUILTIN_WNIDS] == list(range(NUM_IN9))
    assert len(SCENE_FAMILIES) == NUM_IN9 == len(set(SCENE_FAMILIES))


def test_render_is_a_pure_function_of_its_arguments():
    a = render_sample(0, "train", 4, 7)
    b = render_sample(0, "train", 4, 7)
    np.testing.assert_array_equal(a.image, b.image)
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    for oa, ob in zip(a.objects, b.objects):
        np.testing.assert_array_equal(oa.mask, ob.mask)
    for other in (render_sample(1, "train", 4, 7), render_sample(0, "val", 4, 7), render_sample(0, "train", 4, 8)):
        assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)


def test_sizes_boxes_and_masks_agree():
    shapes = set()
    for label in range(NUM_IN9):
        for n in range(4):
            s = render_sample(3, "train", label, n, two_object_rate=0.5)
            h, w, c = s.image.shape
            shapes.add((h, w))
            assert c == 3 and 200 <= h <= 500 and 200 <= w <= 500 and s.image.dtype == np.uint8
            assert s.label == label and 0 <= s.scene < NUM_IN9
            union = np.zeros((h, w), np.uint8)
            for o in s.objects:
                assert o.mask.shape == (h, w) and set(np.unique(o.mask)) <= {0, 1}
                assert o.mask.sum() >= 100
                ys, xs = np.nonzero(o.mask)  # box == extent of the true mask, computed independently
                assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())
                assert not (union & o.mask).any()  # visible masks of two objects never overlap
                union |= o.mask
            np.testing.assert_array_equal(s.mask, union)
    assert len(shapes) > 20  # varied sizes and aspects
    two = render_sample(0, "train", 2, 0, two_object_rate=1.0)
    assert len(two.objects) == 2


def test_foreground_pixels_come_from_the_object():
    """The mask is exact: pixels just outside it look like the background, not like the object."""
    s = render_sample(0, "train", 5, 1, correlation=1.0)  # a ladybug on rock
    m = s.mask.astype(bool)
    img = s.image.astype(np.float32)
    red_in = (img[..., 0] - img[..., 1])[m].mean()
    red_out = (img[..., 0] - img[..., 1])[~m].mean()
    assert red_in - red_out > 20  # the shell's red/orange/yellow dominates inside only


def test_correlation_is_respected_statistically():
    n = 400
    for corr in (0.8, 0.3, 1.0 / 9):
        own = np.zeros(NUM_IN9)
        other_counts = np.zeros((NUM_IN9, NUM_IN9))
        for label in range(NUM_IN9):
            for i in range(n):
                s = sample_scene(11, "train", label, i, corr)
                own[label] += s == label
                other_counts[label, s] += s != label
        p = own.sum() / (n * NUM_IN9)
        sigma = np.sqrt(corr * (1 - corr) / (n * NUM_IN9))
        assert abs(p - corr) < 4 * sigma, (corr, p)
        # the others are uniform: each of the 8 gets (1 - corr) / 8 of a class's images
        others = other_counts[~np.eye(NUM_IN9, dtype=bool)]
        expect = n * (1 - corr) / (NUM_IN9 - 1)
        assert abs(others.mean() - expect) < 0.1 * expect + 1
        chi2 = ((others - expect) ** 2 / expect).sum()
        assert chi2 < 72 + 4 * np.sqrt(2 * 72)  # 72 cells
    assert all(sample_scene(0, "val", k, i, 1.0) == k for k in range(NUM_IN9) for i in range(20))
    assert all(sample_scene(0, "val", k, i, 0.0) != k for k in range(NUM_IN9) for i in range(20))
    # the rendered scene is the sampled one
    assert all(render_sample(2, "val", k, 0, 0.5).scene == sample_scene(2, "val", k, 0, 0.5) for k in (0, 4))
    with pytest.raises(ConfigError, match="correlation"):
        sample_scene(0, "train", 0, 0, 1.5)


def test_backgrounds_render_every_family():
    rng = np.random.default_rng(0)
    means = []
    for fam in SCENE_FAMILIES:
        bg = render_background(fam, rng, 50, 70)
        assert bg.shape == (50, 70, 3) and bg.dtype == np.float32 and np.isfinite(bg).all()
        means.append(bg.reshape(-1, 3).mean(0))
    means = np.array(means)
    assert np.linalg.norm(means[1] - means[0]) > 30  # sky is not grass
    with pytest.raises(ConfigError, match="family"):
        render_background("lava", rng, 10, 10)


def test_write_dataset_is_deterministic_and_worker_independent(tmp_path):
    kw = dict(train_per_class=1, val_per_class=1, progress=False)
    write_dataset(tmp_path / "a", seed=5, workers=1, **kw)
    write_dataset(tmp_path / "b", seed=5, workers=2, **kw)
    write_dataset(tmp_path / "c", seed=6, workers=1, **kw)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db and len(da) == 2 * 9 * 2 + 2  # images + XMLs + two mask files
    assert set(dc) == set(da) and all(dc[k] != da[k] for k in da if k.endswith(".JPEG"))


def test_build_layout_xml_and_index(tiny_build):
    path = tiny_build
    root = path.parent
    assert root.name == dataset_dir_name(**TINY) == "builtin-v1-s0-c0.8-t3-v2"
    idx = DatasetIndex.load(path)
    assert len(idx) == 9 * 5 and idx.rejects == []
    assert idx.summary()["per_split"] == {"train": 27, "val": 18}
    assert idx.summary()["masks"] == {"synthetic": 45}
    masks = {s: json.loads((root / "annotations" / f"masks_{s}.json").read_text())["images"] for s in ("train", "val")}
    for r in idx.records():
        wnid = BUILTIN_WNIDS[r.label]
        rel = pathlib.PurePosixPath(r.file_name)
        assert rel.parts[:2] == (r.split, wnid) and rel.suffix == ".JPEG"
        if r.split == "train":
            assert rel.name.startswith(f"{wnid}_")
            xml = root / "annotations" / "train" / wnid / f"{rel.stem}.xml"
        else:
            xml = root / "annotations" / "val" / f"{rel.stem}.xml"
        ann = parse_voc_xml(xml)
        assert (ann["width"], ann["height"]) == (r.width, r.height)
        assert [name for name, _ in ann["objects"]] == [wnid] * len(r.boxes)
        assert [list(b) for _, b in ann["objects"]] == r.boxes.tolist()
        assert r.meta["wnid"] == wnid and r.meta["format"] == "JPEG" and r.meta["scene"] in SCENE_FAMILIES
        truth = masks[r.split][r.file_name]
        assert SCENE_FAMILIES[truth["scene"]] == r.meta["scene"]
        anns = idx.annotations(r.id)
        assert len(anns) == len(truth["masks"])
        for a, rle in zip(anns, truth["masks"]):
            m = rle_decode(a["segmentation"])
            np.testing.assert_array_equal(m, rle_decode(rle))
            assert a["mask_source"] == "synthetic" and a["area"] == float(m.sum())
            x0, y0, x1, y1 = mask_extent(m)
            assert a["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
        # the JPEG on disk is the rendered image (up to JPEG loss)
        from PIL import Image

        with Image.open(r.path) as im:
            assert im.size == (r.width, r.height) and im.mode == "RGB"
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 45
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[0]))[0]
    assert coco.annToMask(ann).shape == (idx.image(0)["height"], idx.image(0)["width"])
    assert idx.image_root == root  # relative root: the folder can move


def test_build_is_cached_and_atomic(tiny_build, monkeypatch):
    root = tiny_build.parent.parent
    mtime = tiny_build.stat().st_mtime_ns
    assert build_builtin_dataset(root=root, progress=False, **TINY) == tiny_build
    assert build_builtin_dataset(root, BuiltinSpec(**TINY), progress=False) == tiny_build  # the same spec
    assert BuiltinSpec(**TINY).dir_name() == dataset_dir_name(**TINY) == tiny_build.parent.name
    assert tiny_build.stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(ConfigError, match="unknown option.*train_per_class"):
        build_builtin_dataset(root=root, trains_per_class=3)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # a build that dies half way leaves nothing behind
    import bgsynth.sources.synthetic as syn

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(syn, "_attach_masks", boom)
    with pytest.raises(RuntimeError, match="killed"):
        build_builtin_dataset(root=root, progress=False, seed=9, train_per_class=1, val_per_class=1, workers=1)
    assert sorted(p.name for p in root.iterdir()) == [tiny_build.parent.name]


def test_force_rebuild_gives_identical_bytes(tmp_path):
    kw = dict(root=tmp_path, seed=1, train_per_class=1, val_per_class=1, progress=False, workers=1)
    p = build_builtin_dataset(**kw)
    before = _digest(p.parent)
    p2 = build_builtin_dataset(force=True, **kw)
    assert p2 == p and _digest(p.parent) == before


def test_default_cache_dir_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("BGSYNTH_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    idx = load_builtin_index(train_per_class=1, val_per_class=1, progress=False, workers=1)
    assert len(idx) == 18 and idx.path.parent.parent == tmp_path / "cache"
    monkeypatch.delenv("BGSYNTH_CACHE")
    assert default_cache_dir() == pathlib.Path(os.path.expanduser("~")) / ".cache" / "bgsynth"
    with pytest.raises(ConfigError, match="correlation"):
        build_builtin_dataset(root=tmp_path, correlation=2.0)
    with pytest.raises(ConfigError, match="at least 1"):
        build_builtin_dataset(root=tmp_path, train_per_class=0)


def test_cli_make_dataset(tmp_path, capsys):
    from bgsynth.cli import main

    rc = main(["make-dataset", "--train-per-class", "1", "--val-per-class", "1", "--seed", "4", "--out",
               str(tmp_path), "--no-progress", "--workers", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["images"] == 18 and pathlib.Path(out["index"]).is_file()
    assert pathlib.Path(out["index"]).parent.name == dataset_dir_name(4, 1, 1)


# ==============================================================================================================
# The waterbirds-like kind
# ==============================================================================================================

WB = dict(seed=0, train_per_class=4, val_per_class=3, train_places_per_class=2, val_places_per_class=2)


def test_waterbirds_place_frequency_is_binomial_and_render_is_pure():
    from bgsynth.sources.synthetic import render_place, render_waterbird, waterbirds_place

    n = 4000
    for corr in (0.95, 0.5):
        k = sum(waterbirds_place(3, "train", y, i, corr) == y for y in (0, 1) for i in range(n))
        sigma = np.sqrt(2 * n * corr * (1 - corr))
        assert abs(k - 2 * n * corr) < 4.5 * sigma, (corr, k)
    a, b = render_waterbird(1, "val", 1, 5, 0.5), render_waterbird(1, "val", 1, 5, 0.5)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.scene == waterbirds_place(1, "val", 1, 5, 0.5) and len(a.objects) == 1
    m = a.objects[0].mask
    ys, xs = np.nonzero(m)
    assert a.objects[0].box == (xs.min(), ys.min(), xs.max(), ys.max()) and m.sum() >= 200
    np.testing.assert_array_equal(render_place(1, "val", 0, 2), render_place(1, "val", 0, 2))
    assert not np.array_equal(render_place(1, "val", 0, 2)[:50, :50], render_place(1, "val", 1, 2)[:50, :50])
    # a water scene is bluer than a land scene, on average over a few of each
    blue = [np.mean([render_place(0, "train", p, i)[..., 2].astype(float).mean() -
                     render_place(0, "train", p, i)[..., 1].astype(float).mean() for i in range(4)]) for p in (0, 1)]
    assert blue[1] - blue[0] > 20
    with pytest.raises(ConfigError, match="label 0 or 1"):
        render_waterbird(0, "train", 2, 0)


def test_waterbirds_like_build_layout_index_and_cache(tmp_path):
    from bgsynth.sources.synthetic import WATERBIRDS_PAIRING, WaterbirdsSpec

    path = build_builtin_dataset(root=tmp_path, kind="waterbirds-like", progress=False, workers=2, **WB)
    root = path.parent
    assert root.name == WaterbirdsSpec(**WB).dir_name() == "waterbirds-v1-s0-c0.95-t4-v3-p2-q2"
    idx = DatasetIndex.load(path)
    assert idx.label_space.classes == ("landbird", "waterbird") and len(idx) == 14 and idx.rejects == []
    assert idx.summary()["per_split"] == {"train": 8, "val": 6} and idx.summary()["masks"] == {"synthetic": 14}
    for r in idx.records():
        assert r.file_name.startswith(f"{r.split}/{idx.label_space.folders[r.label]}/") and pathlib.Path(r.path).is_file()
        assert r.meta["scene"] == ("land", "water")[r.meta["place"]]
        m = r.mask()
        x0, y0, x1, y1 = mask_extent(m)
        assert r.boxes.tolist() == [[x0, y0, x1, y1]]
    for split, n in (("train", 2), ("val", 2)):
        for fam in ("land", "water"):
            assert len(list((root / "places" / split / fam).glob("*.jpg"))) == n
    assert json.loads((root / "pairing.json").read_text()) == WATERBIRDS_PAIRING
    assert idx.data["info"]["builtin"]["kind"] == "waterbirds-like"
    before = _digest(root)
    assert build_builtin_dataset(root=tmp_path, kind="waterbirds-like", progress=False, **WB) == path  # cached
    p2 = build_builtin_dataset(root=tmp_path / "again", kind="waterbirds-like", progress=False, workers=1, **WB)
    assert _digest(p2.parent) == before  # the same bytes, whatever the number of workers
    with pytest.raises(ConfigError, match="kind"):
        build_builtin_dataset(root=tmp_path, kind="birds")
    with pytest.raises(ConfigError, match="unknown option.*two_object_rate"):
        build_builtin_dataset(root=tmp_path, kind="waterbirds-like", two_object_rate=0.1)


def test_cli_make_dataset_waterbirds_like(tmp_path, capsys):
    from bgsynth.cli import main

    rc = main(["make-dataset", "--kind", "waterbirds-like", "--train-per-class", "2", "--val-per-class", "1",
               "--places-per-class", "1", "--val-places-per-class", "1", "--out", str(tmp_path), "--no-progress",
               "--workers", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["images"] == 6 and out["per_class"] == {"landbird": 3, "waterbird": 3}
    assert main(["make-dataset", "--val-correlation", "0.5", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--val-correlation: options of --kind waterbirds-like" in capsys.readouterr().err
