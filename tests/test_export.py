"""Tests of engine/export.py: IN-9 release layout, masks, manifest of backgrounds, resumability, ingest round trip."""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import bgsynth.export as export_mod
from bgsynth.classes import IN9_FOLDERS
from bgsynth.errors import ConfigError
from bgsynth.config import resolve_run
from bgsynth.export import ExportConfig, export, release_paths, safe_stem
from bgsynth.pipeline import create_loader
from bgsynth.pool import build_background_pool
from bgsynth.types import Batch
from bgsynth.variants import MIXED_VARIANTS, VARIANT_NAMES, choose_backgrounds, synthesize


@pytest.fixture(scope="module")
def val_index(tiny_index):
    return tiny_index.select(split="val", per_class=3, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, val_index, tiny_geometry):
    out = tmp_path_factory.mktemp("release")
    res = export(val_index, out, variants="all", seed=3, geometry=tiny_geometry, backend="pil", progress=False,
                 num_threads=2)
    return out, res


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_contents(exported, val_index, tiny_geometry):
    out, res = exported
    assert res.images == len(val_index) == res.written
    for v in VARIANT_NAMES:
        assert sorted(p.name for p in (out / v).iterdir()) == ["val"]
        assert {p.name for p in (out / v / "val").iterdir()} <= set(IN9_FOLDERS)
        assert res.files[v] == res.images
    assert res.files["fg_mask"] == res.images
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    # every file against the batched engine on the same decoded crops
    batch = Batch.cat(list(create_loader(val_index, backend="pil", geometry=tiny_geometry, batch_size=64,
                                         prefetch=0)))
    pool = build_background_pool(val_index, geometry=tiny_geometry, backend="pil")
    outs = synthesize(batch, "all", pool=pool, seed=3)
    where = release_paths(val_index, val_index.ids)
    for k, iid in enumerate(batch.image_ids.tolist()):
        split, folder, stem = where[iid]
        assert folder == IN9_FOLDERS[int(batch.labels[k])] and split == "val"
        mask = np.load(out / "fg_mask" / split / folder / f"{stem}.npy")
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        np.testing.assert_array_equal(mask, batch.masks[k, 0].numpy())
        for v in VARIANT_NAMES:
            data = (out / v / split / folder / f"{stem}.JPEG").read_bytes()
            want = np.ascontiguousarray(outs[v].images[k].permute(1, 2, 0).numpy())
            buf = io.BytesIO()
            Image.fromarray(want).save(buf, format="JPEG", quality=95)
            assert data == buf.getvalue(), (v, stem)  # the JPEG (quality 95) of exactly the engine's pixels
            assert Image.open(io.BytesIO(data)).size == (64, 64)


def test_backgrounds_manifest(exported, val_index, tiny_geometry):
    out, res = exported
    rows = list(csv.DictReader(io.StringIO(res.backgrounds.read_text())))
    assert {r["variant"] for r in rows} == set(MIXED_VARIANTS)
    pool = build_background_pool(val_index, geometry=tiny_geometry, backend="pil")
    ids = val_index.ids
    labels = [val_index.image(i)["label"] for i in ids]
    for v in MIXED_VARIANTS:
        got = {int(r["image_id"]): (int(r["bg_image_id"]), int(r["bg_label"]), r["file"]) for r in rows
               if r["variant"] == v}
        assert sorted(got) == ids
        _, bg_ids, bg_labels = choose_backgrounds(torch.tensor(ids), torch.tensor(labels), v, pool, 3)
        for i, lab, b, bl in zip(ids, labels, bg_ids.tolist(), bg_labels.tolist()):
            assert got[i][:2] == (b, bl)
            assert (out / got[i][2]).is_file() and got[i][2].startswith(f"{v}/val/")
            assert b != i
            if v == "mixed_same":
                assert bl == lab
            if v == "mixed_next":
                assert bl == (lab + 1) % 9
    manifest = __import__("json").loads(res.manifest.read_text())
    assert manifest["variants"] == list(VARIANT_NAMES) and manifest["seed"] == 3 and manifest["images"] == res.images


def test_resume_skips_and_restores(exported, val_index, tiny_geometry, tmp_path):
    out, res = exported
    # copy the finished export, damage it, resume
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(out, root)
    before = _files(root)
    again = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False)
    assert again.written == 0 and again.images == res.images
    victims = sorted(root.rglob("*.JPEG"))[::7][:5] + sorted(root.rglob("*.npy"))[:2]
    for p in victims:
        p.unlink()
    (root / "original" / "val" / IN9_FOLDERS[0] / ".stale.JPEG.123.tmp").write_bytes(b"partial")
    again = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False)
    touched = {p.parent.parent.parent.name + p.stem for p in victims}
    assert 0 < again.written <= len(touched)
    after = _files(root)
    after.pop(f"original/val/{IN9_FOLDERS[0]}/.stale.JPEG.123.tmp")
    assert after == before  # restored byte for byte (deterministic synthesis and encoding)


def test_killed_export_finishes_identically(exported, val_index, tiny_geometry, tmp_path, monkeypatch):
    out, _ = exported
    real = export_mod._write
    calls = {"n": 0}

    def flaky(path, hwc, image_format, quality):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill")
        real(path, hwc, image_format, quality)

    monkeypatch.setattr(export_mod, "_write", flaky)
    root = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False, batch_size=8)
    monkeypatch.setattr(export_mod, "_write", real)
    done = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False, batch_size=8)
    assert done.written < done.images
    assert _files(root) == _files(out)


def test_readable_by_release_ingest(exported):
    from bgsynth.sources.in9_release import ingest_in9_release

    out, res = exported
    for variant in ("original", "mixed_rand"):
        idx = ingest_in9_release(out, variant=variant, split="val", workers=1, verify="header", progress=False)
        assert len(idx) == res.images
        for rec in idx.records():
            assert IN9_FOLDERS[rec.label] == pathlib.Path(rec.file_name).parent.name
            assert (rec.height, rec.width) == (64, 64)
            assert rec.mask() is not None


def test_subset_of_variants_and_consistency(val_index, tiny_geometry, tmp_path):
    # a foreground without a mask has no No-FG: left out of a consistent export, kept otherwise
    idx = val_index.copy()
    victim = idx.ids[0]
    idx.set_mask(victim, None, None)
    res = export(idx, tmp_path / "a", variants=["original", "no_fg"], geometry=tiny_geometry, backend="pil",
                 progress=False)
    assert res.images == len(idx) - 1 and sum(res.excluded.values()) == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "backgrounds.csv", "fg_mask", "manifest.json", "no_fg", "original",
    ]
    part = export(idx, tmp_path / "b", variants=["original", "no_fg"], geometry=tiny_geometry, backend="pil",
                  progress=False, consistent=False, masks=False)
    assert part.files == {"original": len(idx), "no_fg": len(idx) - 1}
    with pytest.raises(ConfigError, match="jpeg_quality"):
        export(idx, tmp_path / "c", jpeg_quality=0)
    with pytest.raises(ConfigError, match="unknown variant"):
        export(idx, tmp_path / "c", variants=["bogus"])
    with pytest.raises(ConfigError, match="DatasetIndex.load"):  # the index is loaded once, by the caller
        export(str(idx.path), tmp_path / "c")
    # a resolved RunConfig and an ExportConfig stand for the keyword options: the same files
    run = resolve_run(geometry=tiny_geometry, backend="pil", device="cpu", progress=False)
    again = export(idx, tmp_path / "d", run, ExportConfig(variants="original,no_fg", consistent=False, masks=False))
    assert again.files == part.files
    for f in (tmp_path / "b").rglob("*.JPEG"):
        assert f.read_bytes() == (tmp_path / "d" / f.relative_to(tmp_path / "b")).read_bytes()


def test_safe_names():
    assert safe_stem("n01440764/n01440764_10026.JPEG") == "n01440764_10026"
    assert safe_stem("..\\..\\evil name.jpg") == "evil_name"
    assert safe_stem("../.hidden.jpeg") == "hidden"
    assert safe_stem("a/b/..") == "image"
    assert safe_stem("x/ü ñ.png") == "___"  # non-ASCII and spaces replaced one for one

    @dataclasses.dataclass
    class Rec:
        label: int
        split: str
        file_name: str

    class Fake:
        recs = {
            1: Rec(0, "val", "a/dup.JPEG"),
            2: Rec(0, "val", "b/dup.JPEG"),
            3: Rec(1, "val", "c/dup.JPEG"),
            4: Rec(0, "../x", "d/DUP.jpeg"),
            5: Rec(0, "val", "e/Dup.JPEG"),
        }

        def record(self, i):
            return self.recs[i]

    where = release_paths(Fake(), [1, 2, 3, 4, 5])
    assert where[1] == ("val", IN9_FOLDERS[0], "dup_1") and where[2] == ("val", IN9_FOLDERS[0], "dup_2")
    assert where[5] == ("val", IN9_FOLDERS[0], "Dup_5")  # case-insensitive collision
    assert where[3] == ("val", IN9_FOLDERS[1], "dup")  # another class folder: no collision
    assert where[4] == ("x", IN9_FOLDERS[0], "DUP")  # split folder made safe too

    class Bad(Fake):
        recs = {1: Rec(-1, "val", "a.JPEG")}

    with pytest.raises(ConfigError, match="not an IN-9 class"):
        release_paths(Bad(), [1])


def test_cli_export(builtin_root, tmp_path, capsys):
    from bgsynth.cli import main

    rc = main(["export", str(builtin_root), "--out", str(tmp_path / "rel"), "--variants", "original,mixed_next",
               "--resize", "72", "--crop", "64", "--backend", "pil", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "exported 54 images" in text
    assert len(list((tmp_path / "rel" / "mixed_next" / "val").rglob("*.JPEG"))) == 54
