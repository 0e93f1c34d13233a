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
