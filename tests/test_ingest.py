"""Ingest of the three real formats (ImageNet + XML, IN-9 release, COCO masks) on fixtures made in tmp dirs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from fixtures import (
    coco_json,
    make_imagenet_tree,
    make_in9_release,
    rect_mask,
    truncate_file,
    write_corrupt_jpeg,
    write_exif_rotated_jpeg,
    write_garbage,
    write_image,
    write_png_as_jpeg,
    write_text,
    write_voc,
    write_zero_byte,
)
from PIL import Image

from bgsynth.classes import IN9_FOLDERS, in1k_to_in9, in1k_wnids, wnid_to_in1k
from bgsynth.errors import ConfigError
from bgsynth.index import DatasetIndex, Reject, bbox_to_inclusive, rle_decode
from bgsynth.probe import probe_file
from bgsynth.sources import (
    IngestError,
    ingest_coco,
    ingest_imagenet,
    ingest_in9_release,
    ingest_masks,
    read_category_map,
    read_labels_file,
)

FISH = "n01440764"  # tench -> IN-9 fish (8)
DOG = "n02085620"  # Chihuahua -> IN-9 dog (0)


def _unmapped_wnid() -> str:
    m = in1k_to_in9()
    return in1k_wnids()[int(np.flatnonzero(m < 0)[0])]


def _by_name(index: DatasetIndex) -> dict:
    return {index.image(i)["file_name"]: index.record(i) for i in index.ids}


def _reasons(index: DatasetIndex) -> dict:
    return {r["path"]: r["reason"] for r in index.rejects}


# ------------------------------------------------------------------------------------------------- probing


@pytest.mark.parametrize("verify", ["full", "header"])
def test_probe_each_bad_kind(tmp_path, verify):
    good = write_image(tmp_path / "good.JPEG", 50, 30)
    trunc = truncate_file(write_image(tmp_path / "trunc.JPEG", 80, 60), 0.6)
    trunc_png = truncate_file(write_png_as_jpeg(tmp_path / "trunc_png.JPEG", 120, 90), 0.5)
    cases = {
        good: None,
        trunc: Reject.TRUNCATED,
        trunc_png: Reject.TRUNCATED,
        write_corrupt_jpeg(tmp_path / "corrupt.JPEG"): Reject.UNREADABLE,
        write_garbage(tmp_path / "garbage.JPEG"): Reject.UNREADABLE,
        write_zero_byte(tmp_path / "zero.JPEG"): Reject.ZERO_BYTE,
        tmp_path / "missing.JPEG": Reject.MISSING_FILE,
    }
    for path, reason in cases.items():
        r = probe_file(path, verify)
        assert r.reason == reason, (path.name, r)
        assert r.ok == (reason is None)
        if reason is not None:
            assert r.detail
    r = probe_file(good, verify)
    assert (r.width, r.height, r.format, r.mode, r.exif_orientation) == (50, 30, "JPEG", "RGB", 1)


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("P", "PNG"), ("RGBA", "PNG")])
def test_probe_accepts_odd_but_valid_files(tmp_path, mode, fmt):
    p = write_image(tmp_path / "odd.JPEG", 40, 24, mode=mode, fmt=fmt)  # always named .JPEG
    r = probe_file(p, "full")
    assert r.ok and (r.width, r.height) == (40, 24)
    assert r.format == fmt and r.mode == mode


def test_probe_exif_orientation_is_recorded_not_applied(tmp_path):
    p = write_exif_rotated_jpeg(tmp_path / "rot.JPEG", 64, 40, orientation=6)
    r = probe_file(p)
    # stored pixels are 64 wide, 40 high; a viewer that applies EXIF would show 40x64
    assert (r.width, r.height, r.exif_orientation) == (64, 40, 6)
    with Image.open(p) as im:
        assert im.size == (64, 40)


def test_probe_rejects_unknown_verify_mode(tmp_path):
    with pytest.raises(ConfigError, match="verify"):
        probe_file(tmp_path / "x.JPEG", verify="sometimes")


# ------------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_train_layout_maps_classes_and_boxes(tmp_path):
    unmapped = _unmapped_wnid()
    tree = make_imagenet_tree(tmp_path, [
        {"wnid": FISH, "name": f"{FISH}_1.JPEG", "width": 64, "height": 48, "boxes": [(5, 6, 40, 30)]},
        {"wnid": FISH, "name": f"{FISH}_2.JPEG", "width": 50, "height": 70, "boxes": [(0, 0, 49, 69)]},
        {"wnid": DOG, "name": f"{DOG}_7.jpg", "width": 33, "height": 33, "boxes": [(1, 2, 3, 4), (10, 10, 20, 30)]},
        {"wnid": unmapped, "name": f"{unmapped}_1.JPEG"},
        {"wnid": unmapped, "name": f"{unmapped}_2.JPEG"},
    ])
    out = tmp_path / "index.json"
    idx = ingest_imagenet(tree["images"], tree["ann"], split="train", out=out, progress=False, workers=1)
    assert len(idx) == 3 and idx.rejects == []
    assert idx.data["info"]["skipped"] == {Reject.UNMAPPED_CLASS: 2}
    recs = _by_name(idx)
    r = recs[f"{FISH}/{FISH}_1.JPEG"]
    assert (r.label, r.width, r.height, r.split) == (8, 64, 48, "train")
    assert r.meta["wnid"] == FISH and r.meta["in1k_class"] == wnid_to_in1k(FISH) == 0
    assert r.boxes.tolist() == [[5, 6, 40, 30]]  # XML xmax/ymax are inclusive
    ann = idx.annotations(r.id)[0]
    assert ann["bbox"] == [5, 6, 36, 25] and ann["category_id"] == 8
    assert recs[f"{FISH}/{FISH}_2.JPEG"].boxes.tolist() == [[0, 0, 49, 69]]
    d = recs[f"{DOG}/{DOG}_7.jpg"]
    assert d.label == 0 and d.boxes.tolist() == [[1, 2, 3, 4], [10, 10, 20, 30]]
    assert d.union_box == (1, 2, 20, 30)
    # ids follow the sorted relative paths
    assert [idx.image(i)["file_name"] for i in idx.ids] == sorted(recs)
    # the saved file is an index pycocotools reads as is
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 4
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds()))[:2] == ["bird", "carnivore"]
    assert DatasetIndex.load(out).record(r.id).boxes.tolist() == [[5, 6, 40, 30]]


def test_imagenet_each_bad_input_becomes_the_right_reject(tmp_path):
    img, ann = tmp_path / "images" / FISH, tmp_path / "ann" / FISH
    expected = {}

    def add(name, reason, w=64, h=48, boxes=((5, 6, 40, 30),), xml=True, writer=None):
        p = img / name
        (writer or (lambda q: write_image(q, w, h)))(p)
        if xml:
            write_voc(ann / f"{p.stem}.xml", w, h, boxes, FISH)
        expected[f"{FISH}/{name}"] = reason

    add("ok.JPEG", None)
    add("gray.JPEG", None, writer=lambda q: write_image(q, 64, 48, mode="L"))
    add("cmyk.JPEG", None, writer=lambda q: write_image(q, 64, 48, mode="CMYK"))
    add("png.JPEG", None, writer=lambda q: write_png_as_jpeg(q, 64, 48))
    add("edge.JPEG", None, boxes=((0, 0, 64, 48),))  # a 1-based max equal to the size is clamped
    add("trunc.JPEG", Reject.TRUNCATED, writer=lambda q: truncate_file(write_image(q, 64, 48), 0.5))
    add("corrupt.JPEG", Reject.UNREADABLE, writer=write_corrupt_jpeg)
    add("garbage.JPEG", Reject.UNREADABLE, writer=write_garbage)
    add("zero.JPEG", Reject.ZERO_BYTE, writer=write_zero_byte)
    add("noxml.JPEG", Reject.MISSING_ANNOTATION, xml=False)
    add("badxml.JPEG", Reject.BAD_ANNOTATION, xml=False)
    write_text(ann / "badxml.xml", "<annotation><size><width>64</wid")
    add("badnum.JPEG", Reject.BAD_ANNOTATION, xml=False)
    write_text(ann / "badnum.xml", "<annotation><size><width>64</width><height>48</height></size><object><name>x"
                                   "</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax>"
                                   "</bndbox></object></annotation>")
    add("nosize.JPEG", Reject.BAD_ANNOTATION, xml=False)
    write_voc(ann / "nosize.xml", None, None, [(1, 1, 5, 5)])
    add("size.JPEG", Reject.SIZE_MISMATCH, xml=False)
    write_voc(ann / "size.xml", 65, 48, [(1, 1, 5, 5)])
    add("outside.JPEG", Reject.BOX_OUTSIDE_IMAGE, boxes=((5, 6, 70, 30),))
    add("negative.JPEG", Reject.BOX_OUTSIDE_IMAGE, boxes=((-3, 6, 20, 30),))
    add("empty.JPEG", Reject.EMPTY_BOX, boxes=((30, 6, 20, 30),))
    add("noobj.JPEG", Reject.NO_OBJECT, boxes=())
    for verify in ("full", "header"):
        idx = ingest_imagenet(tmp_path / "images", tmp_path / "ann", progress=False, workers=1, verify=verify)
        got = _reasons(idx)
        assert got == {k: v for k, v in expected.items() if v is not None}
        recs = _by_name(idx)
        assert set(recs) == {k for k, v in expected.items() if v is None}
        assert (recs[f"{FISH}/gray.JPEG"].meta["mode"], recs[f"{FISH}/cmyk.JPEG"].meta["mode"]) == ("L", "CMYK")
        assert recs[f"{FISH}/png.JPEG"].meta["format"] == "PNG"
        assert recs[f"{FISH}/edge.JPEG"].boxes.tolist() == [[0, 0, 63, 47]]
        assert idx.summary()["rejects"][Reject.BOX_OUTSIDE_IMAGE] == 2
        assert all(r["detail"] for r in idx.rejects)


def test_imagenet_exif_rotated_image_keeps_stored_geometry(tmp_path):
    p = write_exif_rotated_jpeg(tmp_path / "images" / FISH / "rot.JPEG", 64, 40, orientation=6)
    write_voc(tmp_path / "ann" / FISH / "rot.xml", 64, 40, [(50, 2, 62, 20)])
    q = write_exif_rotated_jpeg(tmp_path / "images" / FISH / "rot2.JPEG", 64, 40, orientation=8)
    write_voc(tmp_path / "ann" / FISH / "rot2.xml", 40, 64, [(2, 2, 10, 10)])  # annotated in the rotated size
    idx = ingest_imagenet(tmp_path / "images", tmp_path / "ann", progress=False, workers=1)
    rec = _by_name(idx)[f"{FISH}/rot.JPEG"]
    assert (rec.width, rec.height, rec.meta["exif_orientation"]) == (64, 40, 6)
    assert rec.boxes.tolist() == [[50, 2, 62, 20]]  # untouched: stored-pixel coordinates
    (rej,) = idx.rejects
    assert rej["path"] == f"{FISH}/{q.name}" and rej["reason"] == Reject.SIZE_MISMATCH
    assert "EXIF" in rej["detail"]


def test_imagenet_flat_val_with_labels_file(tmp_path):
    val = tmp_path / "val"
    for i in range(1, 6):
        write_image(val / f"ILSVRC2012_val_{i:08d}.JPEG", 40, 30, seed=i)
        write_voc(tmp_path / "ann" / f"ILSVRC2012_val_{i:08d}.xml", 40, 30, [(1, 1, 20, 20)])
    write_image(val / "not_listed.JPEG", 40, 30)
    unmapped = _unmapped_wnid()
    labels = write_text(tmp_path / "labels.csv", "\n".join([
        "ImageId,PredictionString",  # a header line is skipped
        f"ILSVRC2012_val_00000001,{FISH} 1 1 20 20",  # Kaggle LOC_val_solution style
        "ILSVRC2012_val_00000002.JPEG 0",  # Caffe val.txt style: 0-based sorted index (0 = tench = fish)
        f"ILSVRC2012_val_00000003.JPEG {DOG}",
        f"ILSVRC2012_val_00000004.JPEG {unmapped}",
        "# a comment",
        "",
        f"ILSVRC2012_val_00000005.JPEG {wnid_to_in1k(DOG)}",
        f"ILSVRC2012_val_00000099.JPEG {FISH}",  # listed but missing
    ]))
    assert read_labels_file(labels)["ILSVRC2012_val_00000002.JPEG"] == FISH
    idx = ingest_imagenet(val, tmp_path / "ann", split="val", labels_file=labels, progress=False, workers=1)
    recs = _by_name(idx)
    assert {k: r.label for k, r in recs.items()} == {
        "ILSVRC2012_val_00000001.JPEG": 8,
        "ILSVRC2012_val_00000002.JPEG": 8,
        "ILSVRC2012_val_00000003.JPEG": 0,
        "ILSVRC2012_val_00000005.JPEG": 0,
    }
    assert all(r.split == "val" and r.boxes.tolist() == [[1, 1, 20, 20]] for r in recs.values())
    assert _reasons(idx) == {"ILSVRC2012_val_00000099.JPEG": Reject.MISSING_FILE}
    assert idx.data["info"]["skipped"] == {Reject.UNMAPPED_CLASS: 1, "no_label": 1}


def test_imagenet_labels_file_errors_name_file_and_line(tmp_path):
    bad = write_text(tmp_path / "bad.txt", f"a.JPEG {FISH}\nb.JPEG 1000\n")
    with pytest.raises(IngestError, match=r"bad\.txt, line 2"):
        read_labels_file(bad)
    write_image(tmp_path / "flat" / "a.JPEG")
    with pytest.raises(IngestError, match="labels_file"):
        ingest_imagenet(tmp_path / "flat", progress=False)


def test_imagenet_without_annotations_and_nothing_valid(tmp_path):
    write_image(tmp_path / "images" / FISH / "a.JPEG", 30, 20)
    idx = ingest_imagenet(tmp_path / "images", progress=False)
    (rec,) = idx.records()
    assert rec.boxes.shape == (0, 4) and rec.label == 8
    write_zero_byte(tmp_path / "bad" / FISH / "a.JPEG")
    write_garbage(tmp_path / "bad" / FISH / "b.JPEG")
    with pytest.raises(IngestError) as e:
        ingest_imagenet(tmp_path / "bad", progress=False)
    msg = str(e.value)
    assert str(tmp_path / "bad") in msg and Reject.ZERO_BYTE in msg and Reject.UNREADABLE in msg
    with pytest.raises(IngestError, match="not a folder"):
        ingest_imagenet(tmp_path / "nowhere", progress=False)


def test_imagenet_unknown_folder_warns_and_is_counted(tmp_path):
    write_image(tmp_path / "images" / FISH / "a.JPEG", 30, 20)
    write_image(tmp_path / "images" / "cats_and_dogs" / "b.JPEG", 30, 20)
    with pytest.warns(UserWarning, match="cats_and_dogs"):
        idx = ingest_imagenet(tmp_path / "images", progress=False)
    assert len(idx) == 1 and idx.data["info"]["skipped"] == {"unknown_class": 1}


def test_imagenet_pool_matches_serial(tmp_path):
    specs = [{"wnid": FISH if i % 2 else DOG, "name": f"x{i:03d}.JPEG", "width": 30 + i, "height": 20 + i % 7,
              "boxes": [(1, 1, 10 + i % 5, 12)]} for i in range(40)]
    tree = make_imagenet_tree(tmp_path, specs)
    truncate_file(tree["images"] / DOG / "x010.JPEG", 0.4)
    a = ingest_imagenet(tree["images"], tree["ann"], progress=False, workers=1)
    b = ingest_imagenet(tree["images"], tree["ann"], progress=False, workers=2)
    assert a.data["images"] == b.data["images"] and a.data["annotations"] == b.data["annotations"]
    assert a.rejects == b.rejects and len(a.rejects) == 1


# ------------------------------------------------------------------------------------------------- IN-9 release


def test_in9_release_masks_become_rle_and_boxes_their_extent(tmp_path):
    per_class = {IN9_FOLDERS[2]: 2, IN9_FOLDERS[6]: 1, IN9_FOLDERS[0]: 2}  # two names contain a space
    truth = make_in9_release(tmp_path / "bg", per_class, size=(40, 56), variants=("original", "mixed_rand"))
    out = tmp_path / "in9.json"
    idx = ingest_in9_release(tmp_path / "bg", out=out, progress=False, workers=1)
    recs = _by_name(idx)
    assert set(recs) == set(truth) and idx.rejects == []
    for rel, m in truth.items():
        r = recs[rel]
        assert r.label == IN9_FOLDERS.index(rel.split("/")[0])
        assert (r.height, r.width) == m.shape and r.mask_source == "released"
        np.testing.assert_array_equal(r.mask(), m)
        ys, xs = np.nonzero(m)
        assert r.boxes.tolist() == [[xs.min(), ys.min(), xs.max(), ys.max()]]
        (ann,) = idx.annotations(r.id)
        assert ann["area"] == float(m.sum())
    from pycocotools.coco import COCO

    assert len(COCO(str(out)).getAnnIds()) == len(truth)
    # another variant folder, masks attached by stem
    mixed = ingest_in9_release(tmp_path / "bg", variant="mixed_rand", progress=False, workers=1)
    assert {k: r.mask_source for k, r in _by_name(mixed).items()} == {k: "released" for k in truth}
    assert all(im["variant"] == "mixed_rand" for im in mixed.data["images"])


def test_in9_release_bad_masks_are_rejects(tmp_path):
    truth = make_in9_release(tmp_path / "bg", {IN9_FOLDERS[8]: 5}, size=(30, 40))
    names = sorted(truth)
    mdir = tmp_path / "bg" / "fg_mask" / "val" / IN9_FOLDERS[8]
    stem = [n.split("/")[1][:-5] for n in names]
    np.save(mdir / f"{stem[0]}.npy", np.ones((40, 30), np.uint8))  # transposed shape
    (mdir / f"{stem[1]}.npy").unlink()  # missing
    np.save(mdir / f"{stem[2]}.npy", np.zeros((30, 40), np.uint8))  # empty
    write_text(mdir / f"{stem[3]}.npy", "not numpy")  # unreadable
    np.save(mdir / f"{stem[4]}.npy", truth[names[4]][:, :, None] * 255)  # [H, W, 1] of 0/255 is accepted
    idx = ingest_in9_release(tmp_path / "bg", progress=False, workers=1)
    assert _reasons(idx) == {names[0]: Reject.MASK_SHAPE, names[1]: Reject.MISSING_MASK,
                             names[2]: Reject.NO_OBJECT, names[3]: Reject.MISSING_MASK}
    (rec,) = idx.records()
    np.testing.assert_array_equal(rec.mask(), truth[names[4]])
    # without masks required, a variant indexes every image
    bare = ingest_in9_release(tmp_path / "bg", masks=False, progress=False)
    assert len(bare) == 5 and all(r.mask_rle is None for r in bare.records())
    with pytest.raises(IngestError, match="only_fg"):
        ingest_in9_release(tmp_path / "bg", variant="only_fg", progress=False)


# ------------------------------------------------------------------------------------------------- COCO


def _coco_fixture(tmp_path):
    imgs = tmp_path / "coco_images"
    h, w = 30, 40
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(imgs / name, w, h)
    write_image(imgs / "e.jpg", 41, 30)
    from pycocotools import mask as mask_utils

    m_b = rect_mask(h, w, (10, 5, 19, 14))
    rle_b = mask_utils.encode(np.asfortranarray(m_b))
    rle_b = {"size": rle_b["size"], "counts": rle_b["counts"].decode()}
    m_c = rect_mask(h, w, (2, 2, 7, 9))
    flat = m_c.flatten(order="F")  # uncompressed RLE: run lengths over the column-major pixels
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    images = [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, n in enumerate("abcd")]
    for im in images:
        im["file_name"] += ".jpg"
    images.append({"id": 5, "file_name": "e.jpg", "width": 40, "height": 30})  # size disagrees with the file
    images.append({"id": 6, "file_name": "missing.jpg", "width": 40, "height": 30})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "iscrowd": 0, "bbox": [5, 5, 20, 10], "area": 200,
         "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15]]},  # polygon, dog
        {"id": 2, "image_id": 1, "category_id": 16, "iscrowd": 0, "bbox": [0, 0, 3, 3], "area": 9,
         "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]]},  # a small bird in the dog image: the label stays dog
        {"id": 3, "image_id": 2, "category_id": 16, "iscrowd": 0, "bbox": [10, 5, 10, 10], "area": 100,
         "segmentation": rle_b},  # compressed RLE, bird
        {"id": 4, "image_id": 3, "category_id": 16, "iscrowd": 1, "bbox": [2, 2, 6, 8], "area": 48,
         "segmentation": {"size": [h, w], "counts": runs}},  # uncompressed RLE
        {"id": 5, "image_id": 4, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5], "area": 25,
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},  # person: not in the map
        {"id": 6, "image_id": 5, "category_id": 18, "iscrowd": 0, "bbox": [1, 1, 5, 5], "area": 25,
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
        {"id": 7, "image_id": 6, "category_id": 18, "iscrowd": 0, "bbox": [1, 1, 5, 5], "area": 25,
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
    ]
    cats = [{"id": 1, "name": "person"}, {"id": 16, "name": "bird"}, {"id": 18, "name": "dog"}]
    path = coco_json(tmp_path / "instances.json", images, anns, cats)
    return path, imgs, {"b.jpg": m_b, "c.jpg": m_c}


@pytest.mark.parametrize("map_kind", ["dict", "json", "text"])
def test_coco_ingest(tmp_path, map_kind):
    path, imgs, truth = _coco_fixture(tmp_path)
    cmap = {"dog": "dog", "16": 1}  # by name (IN-9 by name), by id (IN-9 by id)
    if map_kind == "json":
        cmap = write_text(tmp_path / "map.json", json.dumps({"dog": "00_dog", "bird": 1}))
    elif map_kind == "text":
        cmap = write_text(tmp_path / "map.txt", "# coco -> in9\ndog = 0\n16 = bird\n")
    out = tmp_path / "coco_index.json"
    idx = ingest_coco(path, imgs, cmap, out=out, progress=False, workers=1)
    recs = _by_name(idx)
    assert {k: r.label for k, r in recs.items()} == {"a.jpg": 0, "b.jpg": 1, "c.jpg": 1}
    assert _reasons(idx) == {"e.jpg": Reject.SIZE_MISMATCH, "missing.jpg": Reject.MISSING_FILE}
    assert idx.data["info"]["skipped"] == {"unmapped_category_annotations": 1, "images_without_mapped_category": 1}
    for name, m in truth.items():
        np.testing.assert_array_equal(recs[name].mask(), m)
        ys, xs = np.nonzero(m)
        assert recs[name].boxes.tolist() == [[xs.min(), ys.min(), xs.max(), ys.max()]]  # these bboxes are tight
    a = recs["a.jpg"]
    assert a.mask_source == "external" and len(a.boxes) == 1  # the bird annotation is not the image's class
    assert a.boxes.tolist() == [[5, 5, 24, 14]]  # its COCO bbox [5, 5, 20, 10]
    assert [ann["bbox"] for ann in idx.annotations(a.id)] == [[5, 5, 20, 10]]
    ma = a.mask()
    inter = (ma & rect_mask(30, 40, (5, 5, 24, 14))).sum()
    assert inter / (ma | rect_mask(30, 40, (5, 5, 24, 14))).sum() > 0.85  # the polygon's rasterisation
    for r in recs.values():
        (ann,) = idx.annotations(r.id)
        assert bbox_to_inclusive(ann["bbox"]) == tuple(r.boxes[0]) and ann["area"] == float(r.mask().sum())
        assert rle_decode(ann["segmentation"]).shape == (30, 40)
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    assert sorted(coco.getImgIds()) == sorted(recs[k].id for k in recs)


def _coco_box_fixture(tmp_path):
    """Hand-made COCO JSON over 40x30 images: one annotation per image, mask and bbox chosen per case.

    Returns (json path, images root, category map, {file name: (annotation id, mask, bbox)}).
    """
    h, w = 30, 40
    cases = {
        # name: (mask box (inclusive), bbox as written in the JSON, or a marker for a missing one)
        "loose.jpg": ((10, 5, 19, 14), [8, 3, 16, 14]),  # a looser box than the mask's (like 241x400 vs 223x347)
        "float.jpg": ((10, 5, 19, 14), [9.6, 4.4, 11.2, 10.3]),  # fractional: rounded like every index box
        "missing.jpg": ((3, 4, 12, 20), None),  # no bbox key at all
        "malformed.jpg": ((3, 4, 12, 20), [3, 4, "ten", 17]),
        "empty.jpg": ((3, 4, 12, 20), [3, 4, 0, 17]),
        "sticks_out.jpg": ((0, 22, 39, 29), [-3, 20, 50, 20]),  # x -3..46, y 20..39: clipped to the image
        "half.jpg": ((0, 0, 9, 9), [5, 0, 10, 10]),  # exactly 50% of the mask inside: kept
        "gross.jpg": ((2, 2, 11, 11), [8, 8, 20, 20]),  # 16 of 100 mask pixels inside: reject
        "outside.jpg": ((2, 2, 11, 11), [100, 100, 5, 5]),  # no pixel inside the image
    }
    imgs = tmp_path / "coco_box_images"
    images, anns, truth = [], [], {}
    for k, (name, (mbox, bbox)) in enumerate(cases.items(), start=1):
        write_image(imgs / name, w, h, seed=k)
        m = rect_mask(h, w, mbox)
        images.append({"id": k, "file_name": name, "width": w, "height": h})
        x0, y0, x1, y1 = mbox
        ann = {"id": 100 + k, "image_id": k, "category_id": 18, "iscrowd": 0, "area": int(m.sum()),
               "segmentation": [[x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]]}
        if bbox is not None:
            ann["bbox"] = bbox
        anns.append(ann)
        truth[name] = (100 + k, m, bbox)
    path = coco_json(tmp_path / "boxes.json", images, anns, [{"id": 18, "name": "dog"}])
    return path, imgs, {"dog": 0}, truth


def _tight(m):
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def test_coco_bbox_is_the_box(tmp_path):
    path, imgs, cmap, truth = _coco_box_fixture(tmp_path)
    idx = ingest_coco(path, imgs, cmap, progress=False, workers=1)
    recs = _by_name(idx)
    bbox = {name: [a["bbox"] for a in idx.annotations(r.id)] for name, r in recs.items()}
    src = {name: [a["box_source"] for a in idx.annotations(r.id)] for name, r in recs.items()}
    for name, r in recs.items():  # the decoded polygons are the hand-made masks
        np.testing.assert_array_equal(r.mask(), truth[name][1])
    # the COCO bbox is kept exactly, not replaced by the mask's tight box [10, 5, 10, 10]
    assert bbox["loose.jpg"] == [[8, 3, 16, 14]] and src["loose.jpg"] == ["bbox"]
    assert recs["loose.jpg"].boxes.tolist() == [[8, 3, 23, 16]]
    assert _tight(truth["loose.jpg"][1]) == [10, 5, 10, 10]
    # a fractional bbox is rounded as bbox_to_inclusive rounds every index box
    assert recs["float.jpg"].boxes.tolist() == [list(bbox_to_inclusive([9.6, 4.4, 11.2, 10.3]))] == [[10, 4, 20, 13]]
    # missing, malformed or empty bbox: the mask's tight box
    for name in ("missing.jpg", "malformed.jpg", "empty.jpg"):
        assert bbox[name] == [_tight(truth[name][1])] == [[3, 4, 10, 17]] and src[name] == ["mask_fallback"], name
    # a bbox sticking out of the image is clipped to it
    assert bbox["sticks_out.jpg"] == [[0, 20, 40, 10]] and src["sticks_out.jpg"] == ["bbox"]
    # exactly half of the mask inside the bbox passes
    assert bbox["half.jpg"] == [[5, 0, 10, 10]]
    # gross disagreement and a bbox outside the image are recorded rejects with the annotation id and fractions
    rejects = {r["path"]: r for r in idx.rejects}
    assert set(rejects) == {"gross.jpg", "outside.jpg"} and "gross.jpg" not in recs and "outside.jpg" not in recs
    gross = rejects["gross.jpg"]
    assert gross["reason"] == Reject.BOX_MASK_MISMATCH == "box_mask_mismatch"
    ann_id = truth["gross.jpg"][0]
    # brute force: mask pixels inside the bbox x 8..27, y 8..27 of the 10x10 mask at 2..11
    m = truth["gross.jpg"][1]
    inside = int(m[8:28, 8:28].sum())
    assert (inside, int(m.sum())) == (16, 100)
    assert gross["detail"].startswith(f"annotation {ann_id}: 16.0% of its mask (16 of 100 pixels)")
    assert "at least 50% required" in gross["detail"] and "fills 4.0% of the bbox" in gross["detail"]
    assert rejects["outside.jpg"]["reason"] == Reject.BOX_OUTSIDE_IMAGE
    assert f"annotation {truth['outside.jpg'][0]}" in rejects["outside.jpg"]["detail"]
    info = idx.data["info"]["source"]
    assert info["box_from"] == "bbox" and info["min_mask_inside"] == 0.5
    assert info["boxes"] == {"bbox": 4, "mask": 0, "mask_fallback": 3, "clipped": 1}
    idx.validate()


def test_coco_box_from_mask_and_threshold(tmp_path):
    path, imgs, cmap, truth = _coco_box_fixture(tmp_path)
    idx = ingest_coco(path, imgs, cmap, progress=False, workers=1, box_from="mask")
    recs = _by_name(idx)
    # every box is the tight box of its mask, whatever the bbox says; nothing disagrees, nothing is outside
    assert set(recs) == set(truth) and idx.rejects == []
    for name, r in recs.items():
        assert [a["bbox"] for a in idx.annotations(r.id)] == [_tight(truth[name][1])], name
        assert [a["box_source"] for a in idx.annotations(r.id)] == ["mask"]
    assert idx.data["info"]["source"]["boxes"]["mask"] == len(truth)
    # the agreement threshold is an option: 0.1 keeps the 16% image, 0 switches the check off
    loose = ingest_coco(path, imgs, cmap, progress=False, workers=1, min_mask_inside=0.1)
    assert _reasons(loose) == {"outside.jpg": Reject.BOX_OUTSIDE_IMAGE}
    assert [a["bbox"] for a in loose.annotations(_by_name(loose)["gross.jpg"].id)] == [[8, 8, 20, 20]]
    with pytest.raises(IngestError, match="box_from"):
        ingest_coco(path, imgs, cmap, progress=False, box_from="tight")
    with pytest.raises(IngestError, match="min_mask_inside"):
        ingest_coco(path, imgs, cmap, progress=False, min_mask_inside=1.5)
    # the settings as one object (keyword options override it); unknown names list the valid ones
    from bgsynth.sources import CocoIngestConfig

    cfg = CocoIngestConfig(box_from="mask", progress=False, workers=1)
    assert ingest_coco(path, imgs, cmap, cfg).data == idx.data
    assert ingest_coco(path, imgs, cmap, cfg, min_mask_inside=0.1, box_from="bbox").data == loose.data
    with pytest.raises(IngestError, match="unknown option.*box_from"):
        ingest_coco(path, imgs, cmap, cfg, box_form="mask")


def test_cli_ingest_coco_box_from(tmp_path, capsys):
    from bgsynth.cli import main

    path, imgs, _cmap, truth = _coco_box_fixture(tmp_path)
    cmap = write_text(tmp_path / "map.txt", "dog = 0\n")
    base = ["ingest", "coco", str(path), "--images", str(imgs), "--category-map", str(cmap), "--no-progress",
            "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "bbox.json")]) == 0
    text = capsys.readouterr().out
    assert "box_mask_mismatch 1" in text and "gross.jpg" in text and f"annotation {truth['gross.jpg'][0]}" in text
    by_bbox = _by_name(DatasetIndex.load(tmp_path / "bbox.json"))
    assert by_bbox["loose.jpg"].boxes.tolist() == [[8, 3, 23, 16]]
    assert main([*base, "--out", str(tmp_path / "mask.json"), "--box-from", "mask", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == len(truth) and summary["rejects"] == {}
    by_mask = _by_name(DatasetIndex.load(tmp_path / "mask.json"))
    assert by_mask["loose.jpg"].boxes.tolist() == [[10, 5, 19, 14]]


def test_coco_errors(tmp_path):
    path, imgs, _ = _coco_fixture(tmp_path)
    with pytest.raises(IngestError, match="no category"):
        ingest_coco(path, imgs, {"cat": 4}, progress=False)
    with pytest.raises(IngestError, match="IN-9 class"):
        read_category_map({"dog": "wolfhound"})
    with pytest.raises(IngestError, match=r"map\.txt, line 1"):
        read_category_map(write_text(tmp_path / "map.txt", "dog 0\n"))
    with pytest.raises(IngestError, match="not a readable COCO JSON"):
        ingest_coco(write_text(tmp_path / "broken.json", "{"), imgs, {"dog": 0}, progress=False)
    with pytest.raises(IngestError, match="not found"):
        ingest_coco(tmp_path / "none.json", imgs, {"dog": 0}, progress=False)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_ingest_prints_reject_summary(tmp_path, capsys):
    from bgsynth.cli import main

    tree = make_imagenet_tree(tmp_path, [{"wnid": FISH, "name": "a.JPEG"}, {"wnid": FISH, "name": "b.JPEG"}])
    write_zero_byte(tree["images"] / FISH / "b.JPEG")
    out = tmp_path / "idx.json"
    rc = main(["ingest", "imagenet", str(tree["images"]), "--annotations", str(tree["ann"]), "--out", str(out),
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "1 images" in text and f"{Reject.ZERO_BYTE} 1" in text and "b.JPEG" in text
    truth = make_in9_release(tmp_path / "bg", {IN9_FOLDERS[1]: 2})
    rc = main(["ingest", "in9", str(tmp_path / "bg"), "--out", str(tmp_path / "in9.json"), "--no-progress", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["images"] == len(truth) and summary["masks"] == {"released": 2}
    # a run with nothing valid fails with a clear message and exit code 2
    write_zero_byte(tmp_path / "empty" / FISH / "z.JPEG")
    rc = main(["ingest", "imagenet", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json"), "--no-progress"])
    assert rc == 2 and "nothing valid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- hardening


def _bad_name_tree(tmp_path):
    """An ImageNet class folder with one good file and one whose name climbs out of the root on Windows-style paths."""
    tree = make_imagenet_tree(tmp_path, [{"wnid": FISH, "name": "good.JPEG"}])
    bad = "a\\..\\..\\b.JPEG"  # a legal file name on Linux; the index rule refuses it (a path on Windows)
    write_image(tree["images"] / FISH / bad, 64, 48)
    write_voc(tree["ann"] / FISH / f"{bad[:-5]}.xml", 64, 48, [(5, 6, 40, 30)])
    return tree, f"{FISH}/{bad}"


def test_bad_file_names_are_rejects_in_every_ingest_and_the_index_loads(tmp_path):
    tree, bad_rel = _bad_name_tree(tmp_path / "in")
    idx = ingest_imagenet(tree["images"], tree["ann"], out=tmp_path / "in.json", progress=False, workers=1)
    assert _reasons(idx) == {bad_rel: "bad_file_name"} and len(idx) == 1
    assert "'..'" in idx.rejects[0]["detail"]
    assert len(DatasetIndex.load(tmp_path / "in.json")) == 1  # before: "images[0].file_name ... must be relative"
    # COCO: a file_name with '..' (Windows separators), an absolute one, and a good one
    imgs = tmp_path / "coco"
    write_image(imgs / "ok.jpg", 40, 30)
    m = rect_mask(30, 40, (5, 5, 20, 20))
    names = ["ok.jpg", "..\\..\\win.JPEG", str(imgs / "ok.jpg")]
    images = [{"id": k, "file_name": n, "width": 40, "height": 30} for k, n in enumerate(names, 1)]
    anns = [{"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 16, 16],
             "segmentation": [[5, 5, 21, 5, 21, 21, 5, 21]]} for k in (1, 2, 3)]
    cj = coco_json(tmp_path / "c.json", images, anns, [{"id": 1, "name": "dog"}])
    idx = ingest_coco(cj, imgs, {"dog": 0}, out=tmp_path / "c_index.json", progress=False, workers=1)
    assert _reasons(idx) == {names[1]: "bad_file_name", names[2]: "bad_file_name"}
    assert [im["file_name"] for im in DatasetIndex.load(tmp_path / "c_index.json").data["images"]] == ["ok.jpg"]
    # the IN-9 release
    truth = make_in9_release(tmp_path / "bg", {IN9_FOLDERS[3]: 1})
    odd = tmp_path / "bg" / "original" / "val" / IN9_FOLDERS[3] / "x\\..\\..\\y.JPEG"
    write_image(odd, 56, 40)
    idx = ingest_in9_release(tmp_path / "bg", out=tmp_path / "r.json", progress=False, workers=1)
    assert _reasons(idx) == {f"{IN9_FOLDERS[3]}/{odd.name}": "bad_file_name"} and len(idx) == len(truth)
    DatasetIndex.load(tmp_path / "r.json")


def test_folders_without_images_are_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes" / FISH).mkdir(parents=True)
    write_text(tmp_path / "classes" / FISH / "notes.txt", "no images here")
    for root in ("empty", "classes"):
        with pytest.raises(IngestError, match="no image files") as e:
            ingest_imagenet(tmp_path / root, progress=False)
        assert "\n" not in str(e.value) and str(tmp_path / root) in str(e.value)
    (tmp_path / "bg" / "original" / "val" / IN9_FOLDERS[0]).mkdir(parents=True)
    (tmp_path / "bg" / "fg_mask" / "val").mkdir(parents=True)
    with pytest.raises(IngestError, match="no image files"):
        ingest_in9_release(tmp_path / "bg", progress=False)
    (tmp_path / "masks").mkdir()
    with pytest.raises(IngestError, match="no image files"):
        ingest_masks(tmp_path / "empty", tmp_path / "masks", progress=False)


def _decoded(index: DatasetIndex) -> dict:
    return {index.image(i)["file_name"]: np.asarray(Image.open(index.record(i).path).convert("RGB"))
            for i in index.ids}


@pytest.mark.parametrize("kind", ["imagenet", "in9", "coco", "masks"])
def test_ingested_index_moves_with_its_images(tmp_path, kind):
    data = tmp_path / "data"
    out = data / "indexes" / f"{kind}.json"
    if kind == "imagenet":
        tree = make_imagenet_tree(data, [{"wnid": FISH, "name": "a.JPEG"}, {"wnid": DOG, "name": "b.JPEG"}])
        ingest_imagenet(tree["images"], tree["ann"], out=out, progress=False, workers=1)
        root = "../images"
    elif kind == "in9":
        make_in9_release(data / "bg", {IN9_FOLDERS[1]: 2})
        ingest_in9_release(data / "bg", out=out, progress=False, workers=1)
        root = "../bg/original/val"
    elif kind == "coco":
        write_image(data / "imgs" / "a.jpg", 40, 30)
        cj = coco_json(data / "c.json", [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
                       [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 10],
                         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}], [{"id": 1, "name": "dog"}])
        ingest_coco(cj, data / "imgs", label_space="coco", out=out, progress=False, workers=1)
        root = "../imgs"
    else:
        write_image(data / "imgs" / "cat" / "a.jpg", 40, 30)
        _write_mask(data / "masks" / "cat" / "a.png", rect_mask(30, 40, (3, 3, 20, 20)))
        ingest_masks(data / "imgs", data / "masks", out=out, progress=False, workers=1)
        root = "../imgs"
    raw = json.loads(out.read_text())
    assert raw["info"]["image_root"] == root  # relative to the index file, as the README says
    before = _decoded(DatasetIndex.load(out))
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    data.rename(moved)
    after = DatasetIndex.load(moved / "indexes" / f"{kind}.json")
    assert str(after.image_root.resolve()).startswith(str(moved))
    got = _decoded(after)
    assert got.keys() == before.keys() and len(got) > 0
    for name, pixels in before.items():
        np.testing.assert_array_equal(got[name], pixels)


def test_pool_starts_only_for_long_jobs():
    import os

    from bgsynth.sources._probe import run_pool

    tasks = list(range(40))
    short = run_pool(_pid_of, tasks, workers=2, progress=False, serial_seconds=60)
    assert short == [(t, os.getpid()) for t in tasks]  # finished in-process before any pool was worth it
    long = run_pool(_pid_of, tasks, workers=2, progress=False, serial_seconds=0)
    assert [t for t, _ in long] == tasks and {p for _, p in long} - {os.getpid()}  # the pool took the rest


def _pid_of(t):
    import os

    return t, os.getpid()


# ------------------------------------------------------------------------------------------------- label spaces


def _write_mask(path, values, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, np.uint8), mode).save(path)
    return path


def _mask_tree(tmp_path):
    """IMAGES/<class>/*.jpg + MASKS/<class>/*.png, one case per file; returns (images, masks, truth, expected rejects)."""
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    h, w = 30, 40
    truth = {}
    for k, (cls, name, box) in enumerate([("gull", "g1", (3, 4, 20, 25)), ("gull", "g2", (0, 0, 39, 9)),
                                          ("tern", "t1", (10, 10, 30, 28))]):
        write_image(imgs / cls / f"{name}.jpg", w, h, seed=k)
        m = rect_mask(h, w, box)
        _write_mask(masks / cls / f"{name}.png", m * 255)  # 0/255 as CUB ships them
        truth[f"{cls}/{name}.jpg"] = (cls, m, box)
    write_image(imgs / "tern" / "wrong_size.jpg", w, h)
    _write_mask(masks / "tern" / "wrong_size.png", np.ones((h, w + 1)))
    write_image(imgs / "tern" / "empty.jpg", w, h)
    _write_mask(masks / "tern" / "empty.png", np.zeros((h, w)))
    write_image(imgs / "tern" / "unreadable.jpg", w, h)
    write_garbage(masks / "tern" / "unreadable.png")
    write_image(imgs / "tern" / "no_mask.jpg", w, h)
    _write_mask(masks / "tern" / "no_image.png", np.ones((h, w)))
    write_zero_byte(imgs / "gull" / "zero.jpg")
    _write_mask(masks / "gull" / "zero.png", np.ones((h, w)))
    rejects = {"tern/wrong_size.jpg": Reject.MASK_SHAPE, "tern/empty.jpg": Reject.NO_OBJECT,
               "tern/unreadable.jpg": Reject.BAD_ANNOTATION, "tern/no_mask.jpg": Reject.MISSING_MASK,
               str(masks / "tern" / "no_image.png"): Reject.MISSING_FILE, "gull/zero.jpg": Reject.ZERO_BYTE}
    return imgs, masks, truth, rejects


def test_mask_folder_ingest_with_class_folders_and_its_rejects(tmp_path):
    imgs, masks, truth, rejects = _mask_tree(tmp_path)
    idx = ingest_masks(imgs, masks, name="birds", out=tmp_path / "birds.json", progress=False, workers=1)
    assert idx.label_space.name == "birds" and idx.label_space.classes == ("gull", "tern")
    assert [c["name"] for c in idx.data["categories"]] == ["gull", "tern"]
    assert _reasons(idx) == rejects
    recs = _by_name(idx)
    assert recs.keys() == truth.keys()
    for rel, (cls, m, box) in truth.items():
        r = recs[rel]
        assert r.label == ["gull", "tern"].index(cls) and r.mask_source == "external"
        np.testing.assert_array_equal(r.mask(), m)
        assert r.boxes.tolist() == [list(box)]  # the mask's tight box
    loaded = DatasetIndex.load(tmp_path / "birds.json")
    assert loaded.label_space == idx.label_space and len(loaded) == 3
    # VOC ships masks for a subset of its images: --skip-unmasked counts them instead
    idx = ingest_masks(imgs, masks, missing_mask="skip", progress=False, workers=1)
    assert "tern/no_mask.jpg" not in _reasons(idx) and idx.data["info"]["skipped"] == {"images_without_mask": 1}


def test_mask_folder_object_ids_and_class_ids(tmp_path):
    imgs, masks = tmp_path / "JPEGImages", tmp_path / "Segmentation"
    h, w = 32, 48
    inst = np.zeros((h, w), np.uint8)
    inst[2:10, 3:15] = 1
    inst[20:30, 30:45] = 2
    write_image(imgs / "x.jpg", w, h)
    _write_mask(masks / "x.png", inst)
    cmap = write_text(tmp_path / "images.json", json.dumps({"x": "dog"}))
    idx = ingest_masks(imgs, masks, values="objects", classes=cmap, progress=False, workers=1)
    (r,) = idx.records()
    assert idx.label_space.classes == ("dog",) and r.label == 0
    assert sorted(r.boxes.tolist()) == [[3, 2, 14, 9], [30, 20, 44, 29]]  # one annotation per object
    np.testing.assert_array_equal(r.mask(), (inst > 0).astype(np.uint8))
    # class ids as VOC's SegmentationClass: 0 background, 255 the void border, several classes per image
    cls = np.zeros((h, w), np.uint8)
    cls[1:6, 1:6] = 15  # 25 px of person
    cls[10:25, 10:30] = 12  # 300 px of dog: the largest class, the image's label
    cls[9, 9:31] = 255
    write_image(imgs / "y.jpg", w, h)
    _write_mask(masks / "y.png", cls)
    os.remove(masks / "x.png")
    voc = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    idx = ingest_masks(imgs, masks, values="classes", classes=write_text(tmp_path / "voc.json", json.dumps(voc)),
                       progress=False, workers=1)
    assert idx.label_space.classes == tuple(voc)
    (r,) = idx.records()
    assert r.label == voc.index("dog") and r.boxes.tolist() == [[10, 10, 29, 24]]
    np.testing.assert_array_equal(r.mask(), (cls == 12).astype(np.uint8))
    assert _reasons(idx) == {"x.jpg": Reject.MISSING_MASK}
    with pytest.raises(IngestError, match="JSON map of mask values"):
        ingest_masks(imgs, masks, values="classes", progress=False)


def test_coco_with_its_own_categories_as_the_label_space(tmp_path):
    imgs = tmp_path / "val2017"
    cats = [{"id": 44, "name": "bottle"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    order = ["person", "dog", "bottle"]  # by category id
    rng = np.random.default_rng(0)
    images, anns, expected = [], [], {}
    for k in range(1, 21):  # N = 20
        write_image(imgs / f"{k:012d}.jpg", 40, 30, seed=k)
        images.append({"id": k, "file_name": f"{k:012d}.jpg", "width": 40, "height": 30})
        big, small = rng.choice([1, 18, 44], 2, replace=False)
        for j, (cat, side) in enumerate(((big, 12), (small, 5))):
            x0 = 2 + 20 * j
            anns.append({"id": 100 * k + j, "image_id": k, "category_id": int(cat), "iscrowd": 0,
                         "bbox": [x0, 2, side, side],
                         "segmentation": [[x0, 2, x0 + side, 2, x0 + side, 2 + side, x0, 2 + side]]})
        expected[f"{k:012d}.jpg"] = order.index({1: "person", 18: "dog", 44: "bottle"}[int(big)])
    cj = coco_json(tmp_path / "instances_val2017.json", images, anns, cats)
    idx = ingest_coco(cj, imgs, label_space="coco", out=tmp_path / "coco.json", progress=False, workers=1)
    assert idx.label_space.classes == tuple(order) and idx.data["info"]["source"]["category_ids"] == [1, 18, 44]
    assert {k: r.label for k, r in _by_name(idx).items()} == expected  # the category with the largest mask
    loaded = DatasetIndex.load(tmp_path / "coco.json")
    assert [c["name"] for c in loaded.data["categories"]] == order and len(loaded) == 20
    with pytest.raises(IngestError, match="needs a category map"):
        ingest_coco(cj, imgs, progress=False)
    with pytest.raises(IngestError, match="no category map"):
        ingest_coco(cj, imgs, {"dog": 0}, label_space="coco", progress=False)


def test_imagenet_with_all_1000_classes(tmp_path):
    unmapped = _unmapped_wnid()
    wnids = [FISH, DOG, unmapped, "n15075141"]  # the last ImageNet-1k class (toilet tissue) maps to no IN-9 class
    tree = make_imagenet_tree(tmp_path, [{"wnid": w, "name": f"{w}_{i}.JPEG"} for w in wnids for i in range(2)])
    idx = ingest_imagenet(tree["images"], tree["ann"], label_space="in1k", out=tmp_path / "in1k.json",
                          progress=False, workers=1)
    space = idx.label_space
    assert space.name == "in1k" and space.num_classes == 1000 and list(space.classes) == sorted(space.classes)
    assert len(idx) == 8 and idx.rejects == [] and not idx.data["info"]["skipped"]
    for r in idx.records():
        assert space.classes[r.label] == r.meta["wnid"] == r.file_name.split("/")[0]
        assert r.label == r.meta["in1k_class"]
    assert space.classes[-1] == "n15075141" and space.classes[0] == FISH
    loaded = DatasetIndex.load(tmp_path / "in1k.json")
    assert len(loaded.data["categories"]) == 1000 and loaded.label_space == space
    in9 = ingest_imagenet(tree["images"], tree["ann"], progress=False, workers=1)
    assert len(in9) == 4 and in9.data["info"]["skipped"] == {Reject.UNMAPPED_CLASS: 4}


def test_cli_ingest_masks_and_bad_arguments(tmp_path, capsys):
    from bgsynth.cli import main

    imgs, masks, truth, rejects = _mask_tree(tmp_path)
    out = tmp_path / "m.json"
    assert main(["ingest", "masks", str(imgs), str(masks), "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == len(truth) and sum(summary["rejects"].values()) == len(rejects)
    assert summary["label_space"] == "images"  # the images folder's name
    for bad in (["--workers", "0"], ["--out", str(tmp_path)], ["--classes", str(tmp_path / "none.json")]):
        args = ["ingest", "masks", str(imgs), str(masks), "--out", str(tmp_path / "n.json"), *bad]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()
    with pytest.raises(SystemExit):
        main(["ingest", "imagenet", str(tmp_path / "missing"), "--out", str(tmp_path / "n.json")])
    assert "no such folder" in capsys.readouterr().err


def test_ingest_does_not_import_torch(tmp_path):
    """The IN-9 release, COCO and mask-folder ingests run without torch (start-up: no 2-6 s of imports)."""
    import subprocess
    import sys

    make_in9_release(tmp_path / "bg", {IN9_FOLDERS[1]: 1})
    imgs, masks, _truth, _rejects = _mask_tree(tmp_path)
    write_image(tmp_path / "c" / "a.jpg", 40, 30)
    cj = coco_json(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
                   [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 10, 10],
                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}], [{"id": 1, "name": "dog"}])
    runs = [["in9", str(tmp_path / "bg")], ["coco", str(cj), "--images", str(tmp_path / "c"), "--label-space", "coco"],
            ["masks", str(imgs), str(masks)]]
    code = ("import sys, json; from bgsynth.cli import main\n"
            f"for k, a in enumerate({runs!r}):\n"
            f"    assert main(['ingest', *a, '--out', {str(tmp_path)!r} + f'/{{k}}.json', '--no-progress']) == 0\n"
            "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
