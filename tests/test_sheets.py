"""Tests of engine/report/sheets.py and ``bgsynth show``: files written, exact sizes, tiles hold the images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bgsynth.errors import ConfigError
from bgsynth.report.sheets import LEFT, PAD, TOP, decoded_sheet, sheet_size, variant_sheet
from bgsynth.variants import VARIANT_NAMES, background_pool_from_batch, synthesize
from test_variants import random_batch


def _tile(sheet: np.ndarray, row: int, col: int, tile: int) -> np.ndarray:
    x = LEFT + col * (tile + PAD) + PAD
    y = TOP + row * (tile + PAD) + PAD
    return sheet[y : y + tile, x : x + tile]


def test_variant_sheet_size_and_tiles(tmp_path):
    batch = random_batch(1, b=5, c=24)
    pool = background_pool_from_batch(random_batch(2, b=12, c=24))
    outs = synthesize(batch, "all", pool=pool)
    path = variant_sheet(batch, outs, tmp_path / "sub" / "sheet.png", tile=24)
    assert path.is_file()
    im = Image.open(path)
    assert im.format == "PNG" and im.size == sheet_size(5, 8, 24)
    arr = np.asarray(im.convert("RGB"))
    for i in range(5):
        for j, name in enumerate(VARIANT_NAMES):
            t = _tile(arr, i, j, 24)
            img = outs[name].images[i].permute(1, 2, 0).numpy()
            if bool(outs[name].valid[i]):
                np.testing.assert_array_equal(t, img, err_msg=f"row {i}, {name}")
            else:  # crossed out in grey: the diagonal is grey
                assert (t[np.arange(2, 22), np.arange(2, 22)] == 160).all(), f"row {i}, {name}"
    assert not all(bool(o.valid.all()) for o in outs.values()), "the fixture should have invalid cells"


def test_variant_sheet_resizes_and_limits_rows(tmp_path):
    batch = random_batch(3, b=6, c=20)
    outs = synthesize(batch, ["original", "only_fg"])
    path = variant_sheet(batch, outs, tmp_path / "s.png", tile=40, max_rows=4)
    assert Image.open(path).size == sheet_size(4, 2, 40)
    with pytest.raises(ConfigError, match="uint8"):
        variant_sheet(batch, synthesize(batch, ["original"], dtype=torch.float32), tmp_path / "f.png")
    with pytest.raises(ConfigError, match="at least one"):
        variant_sheet(batch, {}, tmp_path / "e.png")


def test_decoded_sheet(tmp_path):
    batch = random_batch(4, b=10, c=32)
    path = decoded_sheet(batch, tmp_path / "d.png", tile=32, columns=4)
    assert Image.open(path).size == sheet_size(3, 4, 32)
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    checked = 0
    # a masked pixel away from the box outline and the caption (top rows) is tinted towards red
    for k in range(10):
        m = batch.masks[k, 0].numpy().astype(bool)
        if not bool(batch.has_mask[k]):
            continue
        t = _tile(arr, k // 4, k % 4, 32)
        img = batch.images[k].permute(1, 2, 0).numpy().astype(int)
        ys, xs = np.nonzero(m[16:, :])
        for y, x in zip(ys[:5] + 16, xs[:5]):
            x0, y0, x1, y1 = batch.boxes[k].tolist()
            if x in (x0, x1) or y in (y0, y1):
                continue
            want = np.round(0.55 * img[y, x] + 0.45 * np.array([255, 0, 0]))
            np.testing.assert_allclose(t[y, x], want, atol=1)
            checked += 1
    assert checked >= 10


def test_cli_show(builtin_root, tmp_path, capsys):
    from bgsynth.cli import main

    out = tmp_path / "sheet.png"
    rc = main(["show", str(builtin_root), "--out", str(out), "-n", "3", "--resize", "72", "--crop", "64",
               "--backend", "pil", "--tile", "48"])
    assert rc == 0 and "3 images" in capsys.readouterr().out
    assert Image.open(out).size == sheet_size(3, 8, 48)
    rc = main(["show", str(builtin_root), "--out", str(tmp_path / "d.png"), "-n", "9", "--per-class", "--decoded",
               "--resize", "72", "--crop", "64", "--backend", "pil"])
    assert rc == 0 and Image.open(tmp_path / "d.png").size == sheet_size(2, 8, 64)


def test_show_owns_its_sheet(tiny_index, tmp_path, capsys):
    """A sheet belongs to one run: another seed at the same path is refused by name; --overwrite replaces it; a
    folder at --out is refused before any work."""
    from bgsynth.cli import main
    from bgsynth.show import show_index

    out = tmp_path / "sheet.png"
    kw = dict(n=2, resize=72, crop=64, backend="pil", variants="original,mixed_rand")
    show_index(tiny_index, out, seed=0, **kw)
    assert (tmp_path / "sheet.png.bgsynth-run.json").is_file()
    first = out.read_bytes()
    show_index(tiny_index, out, seed=0, **kw)  # the same settings: written again, the same pixels
    assert out.read_bytes() == first
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1.*--overwrite"):
        show_index(tiny_index, out, seed=1, **kw)
    assert out.read_bytes() == first
    show_index(tiny_index, out, seed=1, overwrite=True, **kw)
    with pytest.raises(ConfigError, match="is an existing folder"):
        show_index(tiny_index, tmp_path, **kw)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"not a sheet of bgsynth")
    with pytest.raises(ConfigError, match="no recorded run"):
        show_index(tiny_index, mine, **kw)
    assert mine.read_bytes() == b"not a sheet of bgsynth"
    with pytest.raises(SystemExit) as e:  # argparse: before anything is decoded or drawn
        main(["show", str(tiny_index.path), "--out", str(tmp_path), "-n", "1"])
    assert e.value.code == 2 and f"argument --out: {tmp_path}: is an existing folder" in capsys.readouterr().err


def test_show_empty_split_has_the_one_wording(tiny_index, tmp_path):
    from bgsynth.errors import EmptyInputError
    from bgsynth.show import show_index

    with pytest.raises(EmptyInputError, match=r"no images to show in split 'test'; the index holds 126 images"):
        show_index(tiny_index, tmp_path / "s.png", split="test", backend="pil")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("n_classes", [2, 20])
def test_show_per_class_follows_the_label_space(tiny_index, tmp_path, n_classes):
    """``per_class`` spreads the rows over the label space's N classes (not IN-9's 9); rows are labelled with its
    names."""
    from bgsynth.classes import LabelSpace
    from bgsynth.index import DatasetIndex
    from bgsynth.report.sheets import _label
    from bgsynth.show import show_index

    names = [f"k{c}" for c in range(n_classes)]
    space = LabelSpace.from_names(names)
    val = tiny_index.select(split="val")
    idx = DatasetIndex.empty(str(val.image_root.resolve()), label_space=space)
    for i in val.ids:
        im = dict(val.image(i))
        im["label"] = im["label"] % 2 if n_classes == 2 else 2 * im["label"] + i % 2
        anns = [{k: v for k, v in a.items() if k not in ("id", "image_id")} | {"category_id": im["label"]}
                for a in val.annotations(i)]
        idx.add_image(im, anns)
    n = 2 * n_classes if n_classes == 2 else n_classes
    out, drawn = show_index(idx, tmp_path / "s.png", n=n, per_class=True, decoded=True, resize=72, crop=64,
                            backend="pil", tile=32)
    present = sorted(set(idx.labels().tolist()))
    want = min(n, 2 * len(present)) if n_classes == 2 else len(present)  # ceil(n / N) per present class
    assert drawn == want
    assert Image.open(out).size == sheet_size(-(-drawn // 8), min(8, drawn), 32)
    assert _label(1, names) == "k1" and _label(n_classes, names) == f"label {n_classes}"
    assert _label(8) == "fish" and _label(9) == "label 9"  # IN-9 names without a label space
