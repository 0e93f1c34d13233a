"""Tests of engine/export.py: IN-9 release layout, masks, manifest of backgrounds, resumability, one run per folder,
label spaces, ingest round trip, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bgsynth.export as export_mod
from bgsynth.classes import IN9_FOLDERS, LabelSpace
from bgsynth.config import resolve_run
from bgsynth.errors import ConfigError, EmptyInputError
from bgsynth.export import ExportConfig, export, release_paths, safe_stem, unavailable_variants
from bgsynth.index import DatasetIndex
from bgsynth.pipeline import create_loader
from bgsynth.pool import build_background_pool
from bgsynth.runs import RUN_FILE
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


def _files(root: pathlib.Path, skip=()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def _engine_outputs(index, geometry, seed, variants="all"):
    """The engine's variants of every image of ``index``, made here batch-free from one decoded batch."""
    batch = Batch.cat(list(create_loader(index, backend="pil", geometry=geometry, batch_size=64, prefetch=0)))
    pool = build_background_pool(index, geometry=geometry, backend="pil")
    pool = dataclasses.replace(pool, num_classes=index.label_space.num_classes)
    return batch, pool, synthesize(batch, variants, pool=pool, seed=seed)


def test_layout_and_contents(exported, val_index, tiny_geometry):
    out, res = exported
    assert res.images == len(val_index) == res.written and res.skipped == {}
    for v in VARIANT_NAMES:
        assert sorted(p.name for p in (out / v).iterdir()) == ["val"]
        assert {p.name for p in (out / v / "val").iterdir()} <= set(IN9_FOLDERS)
        assert res.files[v] == res.images
    assert res.files["fg_mask"] == res.images
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    # every file against the batched engine on the same decoded crops
    batch, _pool, outs = _engine_outputs(val_index, tiny_geometry, 3)
    where = release_paths(val_index, val_index.ids)
    for k, iid in enumerate(batch.image_ids.tolist()):
        split, folder, stem = where[iid]
        assert folder == IN9_FOLDERS[int(batch.labels[k])] and split == "val"  # the release's folders, as before
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
    manifest = json.loads(res.manifest.read_text())
    assert manifest["variants"] == list(VARIANT_NAMES) and manifest["seed"] == 3 and manifest["images"] == res.images
    assert manifest["label_space"]["folders"] == list(IN9_FOLDERS)


def test_resume_skips_and_restores(exported, val_index, tiny_geometry, tmp_path):
    out, res = exported
    root = tmp_path / "copy"
    shutil.copytree(out, root)
    before = _files(root)
    again = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False)
    assert again.written == 0 and again.images == res.images
    victims = sorted(root.rglob("*.JPEG"))[::7][:5] + sorted(root.rglob("*.npy"))[:2]
    for p in victims:
        p.unlink()
    emptied = sorted(root.rglob("*.JPEG"))[3]
    emptied.write_bytes(b"")  # what a power cut can leave: an empty file, rewritten like a missing one
    victims.append(emptied)
    partial = root / "original" / "val" / IN9_FOLDERS[0] / ".stale.JPEG.123.tmp"
    partial.write_bytes(b"partial")  # a killed write's temporary file
    again = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False)
    touched = {p.parent.parent.parent.name + p.stem for p in victims}
    assert 0 < again.written <= len(touched)
    assert not partial.exists()  # removed when the folder was claimed again
    assert _files(root) == before  # restored byte for byte (deterministic synthesis and encoding)


def test_killed_export_finishes_identically(exported, val_index, tiny_geometry, tmp_path, monkeypatch):
    out, _ = exported
    real = export_mod._write
    calls = {"n": 0}

    def flaky(path, img, *args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt("simulated kill")
        real(path, img, *args)

    monkeypatch.setattr(export_mod, "_write", flaky)
    root = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False, batch_size=8)
    monkeypatch.setattr(export_mod, "_write", real)
    done = export(val_index, root, seed=3, geometry=tiny_geometry, backend="pil", progress=False, batch_size=8)
    assert done.written < done.images
    assert _files(root) == _files(out)


_SLOW_WRITES = """
import os, sys, time
real = os.replace
def slow(src, dst, *a, **k):  # every file stays a temporary .tmp for a while: the kill lands mid-write
    time.sleep(0.02)
    return real(src, dst, *a, **k)
os.replace = slow
from bgsynth.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_equals_uninterrupted(builtin_root, tiny_index, tmp_path):
    """A real process killed with SIGKILL mid-export (temporary files on disk), then ``--resume``: the folder equals
    an uninterrupted export byte for byte, and no temporary file is left."""
    from bgsynth.cli import main

    args = [str(builtin_root), "--variants", "original,mixed_rand", "--resize", "72", "--crop", "64",
            "--backend", "pil", "--seed", "5", "--quiet", "--threads", "2", "--batch-size", "16"]
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, "export", *args, "--out", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            jpegs = list(root.rglob("*.JPEG")) if root.is_dir() else []
            if len(jpegs) >= 10 and list(root.rglob(".*.tmp")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the export ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(list(root.rglob("*.JPEG")))
    assert 10 <= done_before < 2 * 54 and list(root.rglob(".*.tmp")), "killed mid-write, with temporary files"
    assert main(["export", *args, "--out", str(root), "--resume"]) == 0
    fresh = tmp_path / "fresh"
    export(tiny_index, fresh, split="val", variants="original,mixed_rand", resize=72, crop=64, backend="pil",
           seed=5, progress=False)
    assert not list(root.rglob("*.tmp"))
    assert _files(root) == _files(fresh)


def test_stale_export_is_refused_and_overwrite_equals_fresh(tiny_index, tmp_path, capsys):
    """The issue's reproduction: another seed and geometry into a folder of an earlier export."""
    from bgsynth.cli import main

    sub = tiny_index.select(split="val", per_class=2, seed=0)
    kw = dict(split="val", variants="original,mixed_rand", backend="pil", progress=False)
    root = tmp_path / "D"
    export(sub, root, seed=0, resize=72, crop=64, **kw)
    stray = root / "original" / "val" / IN9_FOLDERS[0] / "mine.JPEG"
    stray.write_bytes(b"someone else's file")
    (root / "notes.txt").write_text("keep")
    before = _files(root)
    with pytest.raises(ConfigError) as e:
        export(sub, root, seed=1, resize=64, crop=56, **kw)
    msg = str(e.value)
    for part in ("seed: 0 -> 1", "resize: 72 -> 64", "crop: 64 -> 56", "--overwrite", str(root)):
        assert part in msg, (part, msg)
    assert _files(root) == before  # nothing was touched
    # the same through the CLI: a one-line error, exit 2
    idx_file = tmp_path / "sub.json"
    sub.save(idx_file)
    assert main(["export", str(idx_file), "--out", str(root), "--variants", "original,mixed_rand", "--seed", "1",
                 "--resize", "64", "--crop", "56", "--backend", "pil", "--quiet"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err
    res = export(sub, root, seed=1, resize=64, crop=56, overwrite=True, **kw)
    export(sub, tmp_path / "fresh", seed=1, resize=64, crop=56, **kw)
    strays = {"notes.txt", f"original/val/{IN9_FOLDERS[0]}/mine.JPEG"}
    assert _files(root, skip=strays) == _files(tmp_path / "fresh")
    assert stray.read_bytes() == b"someone else's file" and (root / "notes.txt").read_text() == "keep"
    assert res.files["original"] == len(sub)  # the stray JPEG is not counted
    assert json.loads(res.manifest.read_text())["files"]["original"] == len(sub)
    # a rerun of the same settings continues; --resume of nothing recorded in a folder with content is refused
    assert export(sub, root, seed=1, resize=64, crop=56, **kw).written == 0


def test_unrecorded_export_and_bad_out(tiny_index, tmp_path):
    sub = tiny_index.select(split="val", per_class=1, seed=0)
    kw = dict(split="val", variants="original", backend="pil", progress=False, resize=72, crop=64, masks=False)
    root = tmp_path / "old"
    export(sub, root, **kw)
    (root / RUN_FILE).unlink()  # an export of an earlier version: files, no record
    with pytest.raises(ConfigError, match="no recorded run"):
        export(sub, root, **kw)
    assert export(sub, root, overwrite=True, **kw).written == len(sub)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=f"{f}: is an existing file"):
        export(sub, f, **kw)
    assert f.read_text() == "x"


def test_empty_input_has_the_one_wording(tiny_index, tmp_path):
    """An empty index or an empty split is an error, worded as every command words it."""
    with pytest.raises(EmptyInputError, match=r"no images to export in split 'test'; the index holds 126 images, "
                                              r"splits present: \['train', 'val'\]"):
        export(tiny_index, tmp_path / "a", split="test", progress=False)
    with pytest.raises(EmptyInputError, match="no images to export: the index is empty"):
        export(DatasetIndex.empty(tmp_path), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def _relabelled(index: DatasetIndex, space: LabelSpace, label_of) -> DatasetIndex:
    """``index``'s images and annotations in another label space, label ``label_of(old label, image id)``."""
    new = DatasetIndex.empty(str(index.image_root.resolve()), label_space=space)
    for i in index.ids:
        im = dict(index.image(i))
        im["label"] = int(label_of(im["label"], i))
        anns = [{k: v for k, v in a.items() if k not in ("id", "image_id")} | {"category_id": im["label"]}
                for a in index.annotations(i)]
        new.add_image(im, anns)
    new.validate()
    return new


@pytest.mark.parametrize("n_classes", [2, 20])
def test_label_space_folders_and_mixed_next(tiny_index, tiny_geometry, tmp_path, n_classes):
    """Class folders and Mixed-Next's next class come from the index's label space (N = 2 and N = 20)."""
    names = [f"c{k}" for k in range(n_classes)]
    space = LabelSpace.from_names(names, name=f"test{n_classes}")
    val = tiny_index.select(split="val", per_class=2, seed=0)
    # 2 classes: y mod 2; 20 classes: 2y + (id mod 2), so classes 18 and 19 hold no image
    label_of = (lambda y, i: y % 2) if n_classes == 2 else (lambda y, i: 2 * y + i % 2)
    idx = _relabelled(val, space, label_of)
    res = export(idx, tmp_path / "out", variants="original,mixed_next", geometry=tiny_geometry, backend="pil",
                 progress=False, seed=1)
    labels = {i: idx.image(i)["label"] for i in idx.ids}
    rows = [r for r in csv.DictReader(io.StringIO(res.backgrounds.read_text())) if r["variant"] == "mixed_next"]
    assert rows and all(int(r["bg_label"]) == (labels[int(r["image_id"])] + 1) % n_classes for r in rows)
    present = set(labels.values())
    expect = [i for i in idx.ids if (labels[i] + 1) % n_classes in present]  # a next-class background exists
    width = 1 if n_classes == 2 else 2
    folders = {f"{labels[i]:0{width}d}_c{labels[i]}" for i in expect}  # the label space's folder names
    assert {p.name for p in (tmp_path / "out" / "original" / "val").iterdir()} == folders
    assert sorted(int(r["image_id"]) for r in rows) == expect and res.images == len(expect)
    assert res.excluded.get("no mixed_next", 0) == len(idx) - len(expect)
    # the files hold the engine's pixels for this label space
    batch, _pool, outs = _engine_outputs(idx, tiny_geometry, 1, ["mixed_next"])
    where = release_paths(idx, idx.ids)
    for k, i in enumerate(batch.image_ids.tolist()):
        if i in expect:
            split, folder, stem = where[i]
            got = (tmp_path / "out" / "mixed_next" / split / folder / f"{stem}.JPEG").read_bytes()
            buf = io.BytesIO()
            Image.fromarray(outs["mixed_next"].images[k].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95)
            assert got == buf.getvalue()  # the JPEG of exactly the engine's pixels
    assert json.loads(res.manifest.read_text())["label_space"]["name"] == f"test{n_classes}"


def test_single_class_skips_mixed_next_and_writes_the_rest(tiny_index, tiny_geometry, tmp_path, builtin_root,
                                                          capsys):
    one = tiny_index.select(split="val", classes=[4])
    with pytest.warns(UserWarning, match="mixed_next skipped: no image of the next class"):
        res = export(one, tmp_path / "one", geometry=tiny_geometry, backend="pil", progress=False)
    assert set(res.skipped) == {"mixed_next"} and res.images == len(one) > 0
    assert res.files == {**{v: len(one) for v in VARIANT_NAMES if v != "mixed_next"}, "fg_mask": len(one)}
    assert not (tmp_path / "one" / "mixed_next").exists()
    manifest = json.loads(res.manifest.read_text())
    assert "mixed_next" in manifest["skipped_variants"] and "mixed_next" not in manifest["variants"]
    # named explicitly, a variant is never skipped: the consistent set is then empty, and the run says so
    with pytest.warns(UserWarning, match="none of the 6 images was exported"):
        res = export(one, tmp_path / "strict", variants="original,mixed_next", geometry=tiny_geometry,
                     backend="pil", progress=False)
    assert res.images == 0 and res.excluded == {"no mixed_next": len(one)}
    # without masks every mask-based variant and fg_mask are skipped; the others are written
    bare = one.copy()
    for i in bare.ids:
        bare.set_mask(i, None, None)
    assert unavailable_variants(bare, VARIANT_NAMES) == {
        **{v: "no image has a foreground mask" for v in ("no_fg", "only_fg", *MIXED_VARIANTS)},
        "fg_mask": "no image has a foreground mask"}
    # CLI: the summary names what was skipped
    idx_file = tmp_path / "one.json"
    one.save(idx_file)
    from bgsynth.cli import main

    with pytest.warns(UserWarning):
        assert main(["export", str(idx_file), "--out", str(tmp_path / "cli"), "--resize", "72", "--crop", "64",
                     "--backend", "pil", "--quiet"]) == 0
    assert "skipped: mixed_next (no image of the next class" in capsys.readouterr().out


def test_torchvision_encoder_path_on_cpu(val_index, tiny_geometry, tmp_path):
    """The device encoder (``torchvision.io.encode_jpeg``, nvJPEG on CUDA) runs here on CPU tensors: its bytes are
    torchvision's JPEG of exactly the engine's pixels."""
    from torchvision.io import encode_jpeg

    sub = val_index.select(ids=val_index.ids[:6])
    res = export(sub, tmp_path / "tv", variants="original,only_fg,mixed_same", geometry=tiny_geometry,
                 backend="pil", progress=False, encoder="torchvision", jpeg_quality=90, seed=2)
    assert json.loads(res.manifest.read_text())["encoder"] == "torchvision"
    batch, _pool, outs = _engine_outputs(sub, tiny_geometry, 2, ["original", "only_fg", "mixed_same"])
    where = release_paths(sub, sub.ids)
    checked = 0
    for k, i in enumerate(batch.image_ids.tolist()):
        split, folder, stem = where[i]
        for v, o in outs.items():
            f = tmp_path / "tv" / v / split / folder / f"{stem}.JPEG"
            if bool(o.valid[k]):
                assert f.read_bytes() == encode_jpeg(o.images[k].contiguous(), quality=90).numpy().tobytes()
                checked += 1
    assert checked >= 12


def test_png_is_lossless(val_index, tiny_geometry, tmp_path):
    sub = val_index.select(ids=val_index.ids[:4])
    export(sub, tmp_path / "png", variants="no_fg,mixed_rand", image_format="png", geometry=tiny_geometry,
           backend="pil", progress=False, seed=4)
    batch, _pool, outs = _engine_outputs(sub, tiny_geometry, 4, ["no_fg", "mixed_rand"])
    where = release_paths(sub, sub.ids)
    for k, i in enumerate(batch.image_ids.tolist()):
        split, folder, stem = where[i]
        for v in ("no_fg", "mixed_rand"):
            got = np.asarray(Image.open(tmp_path / "png" / v / split / folder / f"{stem}.png"))
            np.testing.assert_array_equal(got, outs[v].images[k].permute(1, 2, 0).numpy())


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
        "backgrounds.csv", RUN_FILE, "fg_mask", "manifest.json", "no_fg", "original",
    ]
    part = export(idx, tmp_path / "b", variants=["original", "no_fg"], geometry=tiny_geometry, backend="pil",
                  progress=False, consistent=False, masks=False)
    assert part.files == {"original": len(idx), "no_fg": len(idx) - 1}
    # no empty class folder (torchvision's ImageFolder refuses one)
    for d in (tmp_path / "b").glob("*/val/*"):
        assert any(d.iterdir()), d
    with pytest.raises(ConfigError, match="jpeg_quality"):
        export(idx, tmp_path / "c", jpeg_quality=0)
    with pytest.raises(ConfigError, match="unknown variant"):
        export(idx, tmp_path / "c", variants=["bogus"])
    with pytest.raises(ConfigError, match="encoder"):
        export(idx, tmp_path / "c", encoder="nvjpeg2000")
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

    class Fake:
        label_space = LabelSpace("in9", tuple(f"c{k}" for k in range(9)), IN9_FOLDERS)
        images = {
            1: dict(label=0, split="val", file_name="a/dup.JPEG"),
            2: dict(label=0, split="val", file_name="b/dup.JPEG"),
            3: dict(label=1, split="val", file_name="c/dup.JPEG"),
            4: dict(label=0, split="../x", file_name="d/DUP.jpeg"),
            5: dict(label=0, split="val", file_name="e/Dup.JPEG"),
        }

        def image(self, i):
            return self.images[i]

    where = release_paths(Fake(), [1, 2, 3, 4, 5])
    assert where[1] == ("val", IN9_FOLDERS[0], "dup_1") and where[2] == ("val", IN9_FOLDERS[0], "dup_2")
    assert where[5] == ("val", IN9_FOLDERS[0], "Dup_5")  # case-insensitive collision
    assert where[3] == ("val", IN9_FOLDERS[1], "dup")  # another class folder: no collision
    assert where[4] == ("x", IN9_FOLDERS[0], "DUP")  # split folder made safe too

    class Bad(Fake):
        images = {1: dict(label=9, split="val", file_name="a.JPEG")}

    with pytest.raises(ConfigError, match=r"a.JPEG\) has label 9, expected a class of the label space 'in9'"):
        release_paths(Bad(), [1])


def test_cli_export(builtin_root, tmp_path, capsys):
    from bgsynth.cli import build_parser, main

    rc = main(["export", str(builtin_root), "--out", str(tmp_path / "rel"), "--variants", "original,mixed_next",
               "--resize", "72", "--crop", "64", "--backend", "pil", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "exported 54 images" in text and "(54 written now, 0 already there)" in text
    assert len(list((tmp_path / "rel" / "mixed_next" / "val").rglob("*.JPEG"))) == 54
    # bad values are refused by argparse before any work, one line each
    for bad, needle in ((["--threads", "-1"], "argument --threads: expected a positive integer, got -1"),
                        (["--quality", "101"], "argument --quality: expected a JPEG quality in 1..100"),
                        (["--out", str(builtin_root)], "argument --out"),
                        (["--batch-size", "0"], "argument --batch-size")):
        argv = ["export", str(builtin_root), "--out", str(tmp_path / "x"), *bad]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    sub = build_parser()._subparsers._group_actions[0].choices["export"]
    helptext = sub.format_help()
    assert "(default: True)" not in helptext and "(default: False)" not in helptext
    assert "--overwrite" in helptext and "--resume" in helptext


@pytest.mark.parametrize("quality", [95, 75, 30])
def test_opencv_encoder_writes_pils_bytes_on_photographs(quality):
    """The CPU default encoder (OpenCV, which releases the GIL) writes byte for byte the JPEG that PIL writes, for
    real photographs of varied sizes, cropped and whole, channels-last or planar."""
    from photos import PHOTOS, photo_arrays

    from bgsynth.export import _image_bytes

    for spec in PHOTOS:
        pixels, _masks = photo_arrays(spec)
        if pixels.ndim == 2:  # a greyscale photograph is exported as RGB, like every decoded image
            pixels = np.ascontiguousarray(np.repeat(pixels[..., None], 3, axis=2))
        for img in (pixels, np.ascontiguousarray(pixels[7:231, 3:227]), np.ascontiguousarray(pixels[:13, :29])):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=quality)
            assert _image_bytes(img, "jpeg", quality, "opencv") == buf.getvalue(), (spec.name, img.shape)
            planar = np.ascontiguousarray(img.transpose(2, 0, 1))
            assert _image_bytes(planar, "jpeg", quality, "opencv", planar=True) == buf.getvalue(), spec.name
            assert _image_bytes(planar, "jpeg", quality, "pil", planar=True) == buf.getvalue(), spec.name
