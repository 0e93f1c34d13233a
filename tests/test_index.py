"""The dataset index, IN-9 classes and crop geometry: the foundation every stage reads."""

from __future__ import annotations

import doctest
import json
import os
import pathlib
import stat

import numpy as np
import pytest

import bgsynth.classes
import bgsynth.distributed
import bgsynth.geometry
import bgsynth.index
from bgsynth.classes import IN9_FOLDERS, in1k_to_in9, in1k_wnids, wnid_to_in9
from bgsynth.errors import ConfigError, IndexFormatError
from bgsynth.geometry import CropGeometry
from bgsynth.index import DatasetIndex, require_index, rle_decode, rle_encode, rle_union


@pytest.mark.parametrize("mod", [bgsynth.classes, bgsynth.index, bgsynth.geometry, bgsynth.distributed])
def test_docstring_examples(mod):
    res = doctest.testmod(mod)
    assert res.attempted > 0 and res.failed == 0


def test_in9_map_matches_the_shipped_definition():
    m = in1k_to_in9()
    assert m.shape == (1000,) and int((m >= 0).sum()) == 370
    assert sorted(set(m.tolist())) == [-1] + list(range(9))
    wnids = in1k_wnids()
    # the superclass wnids of the definition are not leaves; a few leaves of each superclass (ImageNet facts)
    assert wnid_to_in9("n02085620") == 0  # Chihuahua -> dog
    assert wnid_to_in9("n01440764") == 8  # tench -> fish
    assert wnid_to_in9("n04592741") is None  # wing: not in IN-9
    assert wnid_to_in9("n99999999") is None
    assert wnids.index("n02085620") == 151
    assert IN9_FOLDERS[2] == "02_wheeled vehicle"


def test_shipped_in1k_wnids_are_timms():
    from timm.data import ImageNetInfo  # the independent source of the list bgsynth ships

    info = ImageNetInfo("imagenet-1k")
    assert in1k_wnids() == tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


def _toy_index(tmp_path, n_per_class=3):
    idx = DatasetIndex.empty(image_root="images")
    for c in range(9):
        for k in range(n_per_class):
            m = np.zeros((20, 30), np.uint8)
            m[5 : 10 + k, 4 : 12 + c] = 1
            idx.add_image(
                {"file_name": f"{c}/{k}.JPEG", "width": 30, "height": 20, "label": c, "split": "val" if k else "train"},
                [{"bbox": [4, 5, 8 + c, 5 + k], "segmentation": rle_encode(m), "mask_source": "synthetic"}],
            )
    idx.add_reject("images/bad.JPEG", "truncated_image", "no EOI")
    return idx


def test_save_load_roundtrip_atomic_and_coco_compatible(tmp_path):
    from pycocotools.coco import COCO

    idx = _toy_index(tmp_path)
    path = idx.save(tmp_path / "index.json")
    assert not list(tmp_path.glob(".index.json.*.tmp"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()
    back = DatasetIndex.load(path)
    assert back.data == idx.data
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 27 and sorted(coco.getCatIds()) == list(range(9))
    rec = back.record(back.ids[5])
    assert rec.path == str(tmp_path / "images" / rec.file_name)
    # inclusive box convention: bbox [x, y, w, h] covers x..x+w-1
    x, y, w, h = back.annotations(rec.id)[0]["bbox"]
    assert tuple(rec.boxes[0]) == (x, y, x + w - 1, y + h - 1) == rec.union_box
    assert rec.mask().sum() == back.annotations(rec.id)[0]["area"]
    assert back.summary()["rejects"] == {"truncated_image": 1}


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.pop("images"), "'images'"),
        (lambda d: d["images"][0].update(label=9), "images[0].label"),
        (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "duplicate image id"),
        (lambda d: d["images"][0].update(file_name="../escape.JPEG"), "must be relative"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 0, 3]), "positive w/h"),
        (lambda d: d["annotations"][0].update(image_id=12345), "not in images"),
        (lambda d: d["annotations"][0].update(mask_source="magic"), "mask_source"),
        (lambda d: d["info"].pop("image_root"), "image_root"),
    ],
)
def test_malformed_index_names_file_and_field(tmp_path, mutate, needle):
    path = _toy_index(tmp_path).save(tmp_path / "index.json")
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(IndexFormatError) as e:
        DatasetIndex.load(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_unreadable_index_is_a_clear_error(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(IndexFormatError, match="broken.json"):
        DatasetIndex.load(p)
    with pytest.raises(IndexFormatError, match="not found"):
        DatasetIndex.load(tmp_path / "missing.json")


def test_select_is_balanced_seeded_and_independent_of_other_classes(tmp_path):
    idx = _toy_index(tmp_path, n_per_class=5)
    a = idx.select(per_class=2, seed=3)
    assert np.bincount(a.labels(), minlength=9).tolist() == [2] * 9
    assert a.ids == idx.select(per_class=2, seed=3).ids
    assert a.ids != idx.select(per_class=2, seed=4).ids
    # a class's choice depends only on (seed, class, its candidates)
    only7 = idx.select(classes=[7], per_class=2, seed=3)
    assert only7.ids == [i for i in a.ids if a.image(i)["label"] == 7]
    val = idx.select(split="val")
    assert all(val.image(i)["split"] == "val" for i in val.ids) and len(val) == 9 * 4
    assert len(a.data["annotations"]) == len(a)


def test_rle_helpers_against_plain_numpy():
    rng = np.random.default_rng(0)
    a = (rng.random((17, 23)) > 0.6).astype(np.uint8)
    b = (rng.random((17, 23)) > 0.8).astype(np.uint8)
    assert (rle_decode(rle_encode(a)) == a).all()
    assert isinstance(rle_encode(a)["counts"], str)
    assert (rle_decode(rle_union([rle_encode(a), rle_encode(b)], 17, 23)) == (a | b)).all()
    with pytest.raises(IndexFormatError):
        rle_encode(np.zeros((2, 2, 2)))


def test_crop_plan_matches_torchvision_resize_and_center_crop_sizes():
    import torch
    from torchvision.transforms import v2

    g = CropGeometry(256, 224)
    for h, w in [(375, 500), (500, 375), (333, 333), (224, 1000), (257, 301)]:
        p = g.plan(h, w)
        img = torch.zeros(1, h, w)
        resized = v2.Resize(256)(img)
        assert resized.shape[-2:] == p.resized
        # the centre crop's offset: mark the crop window and let torchvision find it
        marked = torch.zeros(p.resized)
        marked[p.top : p.top + 224, p.left : p.left + 224] = 1
        assert v2.CenterCrop(224)(marked[None]).sum() == 224 * 224


def test_index_moved_together_with_its_images_keeps_working(tmp_path):
    """info.image_root is written relative to the index file when both lie in one tree, so copying the whole tree
    elsewhere keeps every image path valid; a root in another tree stays absolute."""
    import shutil

    from bgsynth.index import DatasetIndex
    from fixtures import write_image

    tree = tmp_path / "data"
    write_image(tree / "images" / "a" / "x.JPEG", 20, 10)
    idx = DatasetIndex.empty(image_root=str(tree / "images"))  # an absolute root, as ingest gives it
    idx.add_image({"file_name": "a/x.JPEG", "width": 20, "height": 10, "label": 0, "split": "val"},
                  [{"bbox": [1, 1, 5, 5]}])
    saved = idx.save(tree / "indexes" / "val.json")
    assert DatasetIndex.load(saved).data["info"]["image_root"] == "../images"
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(tree, moved)
    shutil.rmtree(tree)
    back = DatasetIndex.load(moved / "indexes" / "val.json")
    rec = back.record(back.ids[0])
    assert pathlib.Path(rec.path).resolve() == (moved / "images" / "a" / "x.JPEG").resolve() and pathlib.Path(rec.path).is_file()
    # saved again elsewhere in the same tree: still relative, still pointing at the same images
    again = back.save(moved / "deeper" / "more" / "val.json")
    assert DatasetIndex.load(again).data["info"]["image_root"] == "../../images"
    assert pathlib.Path(DatasetIndex.load(again).record(back.ids[0]).path).resolve() == pathlib.Path(rec.path).resolve()


def test_require_index_is_the_one_check_of_every_consumer(tiny_index):
    """A loaded index passes as itself; a path is refused (naming the caller and DatasetIndex.load) unless the
    caller loads paths, in which case the file is loaded; anything else is refused by type."""
    assert require_index(tiny_index, "x") is tiny_index
    with pytest.raises(ConfigError, match=r"^export: expected a DatasetIndex, got the path '.*'; .*DatasetIndex\.load"):
        require_index(str(tiny_index.path), "export")
    with pytest.raises(ConfigError, match=r"^show: .*got the path"):
        require_index(pathlib.Path(tiny_index.path), "show")
    loaded = require_index(pathlib.Path(tiny_index.path), "train", load_paths=True)
    assert isinstance(loaded, DatasetIndex) and loaded.ids == DatasetIndex.load(tiny_index.path).ids
    with pytest.raises(ConfigError, match=r"^train: expected a DatasetIndex, got dict"):
        require_index({"images": []}, "train", load_paths=True)
