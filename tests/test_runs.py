"""bgsynth.runs: an output folder is owned by one run configuration; nothing stale, nothing foreign touched."""

from __future__ import annotations

import pathlib

import pytest

from bgsynth.errors import ConfigError
from bgsynth.runs import RUN_FILE, Fingerprint, OutputFolder, check_output_path, index_digest, remove_partial_files


def _fp(seed=0, **more):
    return Fingerprint("export", {"seed": seed, "resize": 256, **more}, index="abc", model=None)


def _is_jpeg(p):
    return p.suffix == ".JPEG"


def test_equal_fingerprint_continues_and_knows_its_files(tmp_path):
    out = tmp_path / "run"
    f = OutputFolder(out, _fp()).claim()
    (out / "a").mkdir()
    (out / "a" / "x.JPEG").write_bytes(b"1")
    f.commit([out / "a" / "x.JPEG"])
    again = OutputFolder(out, _fp(), resume=True, owned=_is_jpeg).claim()
    assert again.previous is not None and again.files == {"a/x.JPEG"}


def test_different_settings_are_refused_by_name_and_nothing_is_deleted(tmp_path):
    out = tmp_path / "run"
    f = OutputFolder(out, _fp(seed=0)).claim()
    (out / "x.JPEG").write_bytes(b"1")
    f.commit(["x.JPEG"])
    with pytest.raises(ConfigError) as e:
        OutputFolder(out, _fp(seed=1, resize=128), owned=_is_jpeg).claim()
    msg = str(e.value)
    assert "seed: 0 -> 1" in msg and "resize: 256 -> 128" in msg and "--overwrite" in msg and str(out) in msg
    assert (out / "x.JPEG").exists() and (out / RUN_FILE).exists()


def test_overwrite_deletes_the_previous_runs_files_only(tmp_path):
    out = tmp_path / "run"
    f = OutputFolder(out, _fp(seed=0)).claim()
    for name in ("x.JPEG", "y.JPEG"):
        (out / name).write_bytes(b"1")
    f.commit(["x.JPEG", "y.JPEG"])
    (out / "notes.txt").write_text("mine")
    new = OutputFolder(out, _fp(seed=1), overwrite=True, owned=_is_jpeg).claim()
    assert not (out / "x.JPEG").exists() and not (out / "y.JPEG").exists() and not (out / RUN_FILE).exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert new.previous is None and new.files == set()


def test_unrecorded_outputs_are_refused_then_replaced_on_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.JPEG").write_bytes(b"stale")
    (out / "readme.md").write_text("keep")
    with pytest.raises(ConfigError, match="no recorded run"):
        OutputFolder(out, _fp(), owned=_is_jpeg).claim()
    OutputFolder(out, _fp(), overwrite=True, owned=_is_jpeg).claim()
    assert not (out / "old.JPEG").exists() and (out / "readme.md").read_text() == "keep"


def test_a_record_never_deletes_outside_its_folder(tmp_path):
    out = tmp_path / "run"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    f = OutputFolder(out, _fp(seed=0)).claim()
    f.files.add("../victim.txt")  # a tampered record
    f.commit()
    OutputFolder(out, _fp(seed=1), overwrite=True).claim()
    assert victim.read_text() == "precious"


def test_partial_files_of_killed_writes_are_removed_on_claim(tmp_path):
    out = tmp_path / "run"
    (out / "a").mkdir(parents=True)
    (out / "a" / ".x.JPEG.k2j3.tmp").write_bytes(b"half")
    (out / "a" / ".hidden").write_bytes(b"not ours")
    (out / "a" / "keep.tmp").write_bytes(b"not ours either")
    OutputFolder(out, _fp(), overwrite=True).claim()
    assert not (out / "a" / ".x.JPEG.k2j3.tmp").exists()
    assert (out / "a" / ".hidden").exists() and (out / "a" / "keep.tmp").exists()
    assert remove_partial_files(tmp_path / "missing") == 0


def test_single_file_outputs_keep_their_record_beside_them(tmp_path):
    sheet = tmp_path / "sheet.png"
    f = OutputFolder(sheet, Fingerprint("show", {"n": 8}), single_file=True).claim()
    sheet.write_bytes(b"png")
    f.commit([sheet])
    assert (tmp_path / f"sheet.png.{RUN_FILE}").exists()
    OutputFolder(sheet, Fingerprint("show", {"n": 8}), single_file=True).claim()
    with pytest.raises(ConfigError, match="n: 8 -> 9"):
        OutputFolder(sheet, Fingerprint("show", {"n": 9}), single_file=True).claim()
    OutputFolder(sheet, Fingerprint("show", {"n": 9}), single_file=True, overwrite=True).claim()
    assert not sheet.exists()


def test_check_output_path_kinds_and_unwritable_places(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="existing file, expected a folder"):
        check_output_path(f, "folder")
    with pytest.raises(ConfigError, match="existing folder, expected a file"):
        check_output_path(tmp_path, "file")
    with pytest.raises(ConfigError, match="cannot write there"):
        check_output_path(f / "sub", "folder")  # a file in the way
    with pytest.raises(ConfigError, match="cannot write there"):
        check_output_path("/proc/bgsynth-out", "folder")  # a read-only file system, even for root
    assert check_output_path(tmp_path / "new" / "deep", "folder").is_dir()


def test_index_digest_ignores_location_and_rejects(tmp_path, tiny_index):
    d = index_digest(tiny_index)
    moved = tiny_index.copy()
    moved.data["rejects"] = []
    moved.data["info"]["image_root"] = "/somewhere/else"
    assert index_digest(moved) == d
    changed = tiny_index.copy()
    changed.data["images"][0]["label"] = (changed.data["images"][0]["label"] + 1) % 9
    assert index_digest(changed) != d


def test_finish_keeps_exactly_what_this_run_wrote(tmp_path):
    """An equal rerun that does not write a file of the earlier run (provenance.csv) removes it on finish; files
    committed by absolute path, relative path or string all count as written; foreign files stay."""
    out = tmp_path / "run"
    first = OutputFolder(out, _fp()).claim()
    for name in ("results.json", "provenance.csv", "sub/plot.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    first.commit([out / "results.json", "provenance.csv", str(out / "sub" / "plot.png")])
    assert first.finish() == []
    (out / "mine.txt").write_text("mine")
    again = OutputFolder(out, _fp()).claim()
    again.commit([str(out / "results.json"), pathlib.Path("sub/plot.png")])
    assert again.finish() == ["provenance.csv"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        [RUN_FILE, "mine.txt", "results.json", "sub/plot.png"]
    assert again.files == {"results.json", "sub/plot.png"}
