"""The bad-input matrix: every command, run as a user would (a subprocess), fails cleanly on bad input.

Each case asserts a nonzero exit, exactly one ``error:`` line on stderr that names the offending path or flag, no
``Traceback``, and no file written outside the folder the command was meant to write. The cases run in parallel
subprocesses (most stop in argument parsing or in the first check, before torch is imported).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Callable

import pytest

from fixtures import jpeg_bytes, truncate_file, write_garbage, write_image

FISH = "n01440764"


@dataclasses.dataclass
class Case:
    name: str
    argv: list[str]  # "{d}" is replaced by the case's folder
    needle: str  # text the error line must contain (the path or the flag at fault)
    setup: Callable[[pathlib.Path], None] | None = None
    out: str | None = None  # the path the command may write under (relative to the case folder)


def _index_json(d: pathlib.Path, images: list | None = None, split: str = "val") -> pathlib.Path:
    """A valid index: one real JPEG with a box and a mask (or none with ``images=[]``)."""
    (d / "img").mkdir(parents=True, exist_ok=True)
    write_image(d / "img" / "a.JPEG", 40, 30)
    entries = [{"id": 1, "file_name": "a.JPEG", "width": 40, "height": 30, "label": 0, "split": split}]
    anns = [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0}]
    data = {"info": {"version": 1, "image_root": "img", "skipped": {}}, "images": entries if images is None else images,
            "annotations": anns if images is None else [],
            "categories": [{"id": i, "name": n, "supercategory": "in9"} for i, n in enumerate(
                ["dog", "bird", "wheeled vehicle", "reptile", "carnivore", "insect", "musical instrument", "primate",
                 "fish"])],
            "rejects": []}
    (d / "idx.json").write_text(json.dumps(data))
    return d / "idx.json"


def _empty_index(d):
    _index_json(d, images=[])


def _train_split_only(d):
    _index_json(d, split="train")


def _file(name, content=b"x"):
    def make(d):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)
    return make


def _dir(name):
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def _both(*fns):
    def make(d):
        for f in fns:
            f(d)
    return make


def _truncated_ckpt(d):
    import torch

    torch.save({"model": {"w": torch.zeros(100, 100)}}, d / "ck.pt")
    truncate_file(d / "ck.pt", 0.3)


def _masked_index(d):
    """A valid index of two images with boxes and masks (a challenge has foregrounds and backgrounds)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    (d / "img").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(2):
        write_image(d / "img" / f"{i}.JPEG", 48, 40)
        m = np.zeros((40, 48), np.uint8, order="F")
        m[12:28, 14:30] = 1
        rle = mask_utils.encode(m)
        images.append({"id": i + 1, "file_name": f"{i}.JPEG", "width": 48, "height": 40, "label": i, "split": "val"})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": i, "bbox": [14, 12, 16, 16], "area": 256,
                     "iscrowd": 0, "segmentation": {"size": [40, 48], "counts": rle["counts"].decode()},
                     "mask_source": "external"})
    _index_json(d)
    data = json.loads((d / "idx.json").read_text())
    data.update(images=images, annotations=anns)
    (d / "idx.json").write_text(json.dumps(data))


def _challenge_run_with_truncated_checkpoint(d):
    """A finished challenge run in d/o on two masked images, then its checkpoint cut short as a kill would."""
    _masked_index(d)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "bgsynth.cli", "challenge", str(d / "idx.json"), *MODEL, "--out",
                    str(d / "o"), "--no-plots"], check=True, capture_output=True, env=env, timeout=600)
    (d / "o" / "challenge.ckpt.npz").write_bytes(b"PK\x03\x04truncated")


def _imagenet_traversal(d):
    cls = d / "tree" / "val" / FISH
    cls.mkdir(parents=True)
    (cls / "a\\..\\..\\b.JPEG").write_bytes(jpeg_bytes(32, 24))


def _coco_traversal(d):
    (d / "images").mkdir()
    (d / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "..\\..\\win.JPEG", "width": 32, "height": 24}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0,
                         "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]], "area": 81}],
        "categories": [{"id": 1, "name": "fish"}]}))
    (d / "map.json").write_text(json.dumps({"fish": "fish"}))


def _jpegs_without_xml(d):
    (d / "noimg" / "val").mkdir(parents=True)
    (d / "noimg" / "val" / "readme.txt").write_text("no images here")


MODEL = ["--model", "bgsynth_cnn", "--device", "cpu"]
IDX = "{d}/idx.json"

CASES = [
    # ---- the index argument
    Case("eval-missing-index", ["eval", "{d}/nope.json", *MODEL, "--out", "{d}/o"], "nope.json"),
    Case("eval-index-is-folder", ["eval", "{d}/afolder", *MODEL, "--out", "{d}/o"], "afolder", _dir("afolder")),
    Case("eval-non-index-json", ["eval", "{d}/x.json", *MODEL, "--out", "{d}/o"], "x.json", _file("x.json", b'{"a": 1}')),
    Case("eval-garbage-json", ["eval", "{d}/x.json", *MODEL, "--out", "{d}/o"], "x.json", _file("x.json", b"\x00\xffnot json")),
    Case("eval-empty-index", ["eval", IDX, *MODEL, "--out", "{d}/o"], "idx.json", _empty_index),
    Case("eval-split-without-images", ["eval", IDX, *MODEL, "--out", "{d}/o"], "split", _train_split_only),
    Case("challenge-empty-index", ["challenge", IDX, *MODEL, "--out", "{d}/o"], "idx.json", _empty_index),
    Case("export-empty-index", ["export", IDX, "--out", "{d}/o"], "idx.json", _empty_index),
    Case("export-split-without-images", ["export", IDX, "--out", "{d}/o"], "split", _train_split_only),
    Case("prepare-empty-index", ["prepare", IDX, "-o", "{d}/p.json"], "idx.json", _empty_index),
    Case("show-empty-index", ["show", IDX, "--out", "{d}/s.png"], "idx.json", _empty_index),
    Case("report-not-a-run", ["report", "{d}/afolder", "--out", "{d}/o"], "afolder", _dir("afolder")),
    # ---- models and checkpoints
    Case("eval-unknown-arch", ["eval", IDX, "--model", "resnet9000", "--device", "cpu", "--out", "{d}/o"], "resnet9000",
         _index_json),
    Case("eval-truncated-checkpoint", ["eval", IDX, "--model", "{d}/ck.pt", "--device", "cpu", "--out", "{d}/o"],
         "ck.pt", _both(_index_json, _truncated_ckpt)),
    Case("eval-garbage-checkpoint", ["eval", IDX, "--model", "{d}/ck.pt", "--device", "cpu", "--out", "{d}/o"],
         "ck.pt", _both(_index_json, lambda d: write_garbage(d / "ck.pt"))),
    Case("eval-missing-weights", ["eval", IDX, "--model", "resnet18", "--weights", "{d}/w.pt", "--device", "cpu",
                                  "--out", "{d}/o"], "w.pt", _index_json),
    Case("challenge-truncated-resume", ["challenge", IDX, *MODEL, "--out", "{d}/o", "--resume"],
         "challenge.ckpt.npz", _challenge_run_with_truncated_checkpoint),
    Case("challenge-resume-nothing", ["challenge", IDX, *MODEL, "--out", "{d}/o", "--resume"], "nothing to resume",
         _both(_masked_index, _file("o/notes.txt", b"mine"))),
    # ---- counts and numbers
    Case("eval-batch-size-0", ["eval", IDX, *MODEL, "--batch-size", "0", "--out", "{d}/o"], "--batch-size", _index_json),
    Case("eval-batch-size-negative", ["eval", IDX, *MODEL, "--batch-size", "-1", "--out", "{d}/o"], "--batch-size",
         _index_json),
    Case("eval-batch-size-text", ["eval", IDX, *MODEL, "--batch-size", "many", "--out", "{d}/o"], "--batch-size",
         _index_json),
    Case("challenge-batch-size-0", ["challenge", IDX, *MODEL, "--batch-size", "0", "--out", "{d}/o"], "--batch-size",
         _index_json),
    Case("export-threads-negative", ["export", IDX, "--out", "{d}/o", "--threads", "-1"], "--threads", _index_json),
    Case("export-threads-0", ["export", IDX, "--out", "{d}/o", "--threads", "0"], "--threads", _index_json),
    Case("export-quality-0", ["export", IDX, "--out", "{d}/o", "--quality", "0"], "quality", _index_json),
    Case("export-quality-101", ["export", IDX, "--out", "{d}/o", "--quality", "101"], "quality", _index_json),
    Case("compose-export-quality-101", ["compose", "export", IDX, "--backgrounds", "{d}/img", "--quality", "101",
                                        "--out", "{d}/o"], "quality", _index_json),
    Case("train-batch-size-1", ["train", IDX, "--out", "{d}/m.pt", "--batch-size", "1", "--device", "cpu"],
         "batch", _index_json),
    Case("train-epochs-0", ["train", IDX, "--out", "{d}/m.pt", "--epochs", "0", "--device", "cpu"], "--epochs",
         _index_json),
    Case("prepare-max-side-negative", ["prepare", IDX, "-o", "{d}/p.json", "--max-side", "-5"], "--max-side",
         _index_json),
    Case("make-dataset-zero", ["make-dataset", "--out", "{d}/ds", "--train-per-class", "0"], "--train-per-class"),
    # ---- choices
    Case("eval-unknown-variant", ["eval", IDX, *MODEL, "--variants", "nonsense", "--out", "{d}/o"], "nonsense",
         _index_json),
    Case("eval-bad-tiling", ["eval", IDX, *MODEL, "--tiling", "bogus", "--out", "{d}/o"], "--tiling", _index_json),
    Case("eval-bad-device", ["eval", IDX, "--model", "bgsynth_cnn", "--device", "tpu", "--out", "{d}/o"], "tpu",
         _index_json),
    Case("eval-cuda-without-cuda", ["eval", IDX, "--model", "bgsynth_cnn", "--device", "cuda", "--out", "{d}/o"],
         "cuda", _index_json),
    Case("eval-bad-backend", ["eval", IDX, *MODEL, "--backend", "magic", "--out", "{d}/o"], "magic", _index_json),
    # ---- output paths
    Case("eval-out-is-file", ["eval", IDX, *MODEL, "--out", "{d}/f"], "f", _both(_index_json, _file("f"))),
    Case("challenge-out-is-file", ["challenge", IDX, *MODEL, "--out", "{d}/f"], "f", _both(_index_json, _file("f"))),
    Case("export-out-is-file", ["export", IDX, "--out", "{d}/f"], "f", _both(_index_json, _file("f"))),
    Case("report-out-is-file", ["report", "{d}/afolder", "--out", "{d}/f"], "f", _both(_dir("afolder"), _file("f"))),
    Case("show-out-is-folder", ["show", IDX, "--out", "{d}/adir"], "adir", _both(_index_json, _dir("adir"))),
    Case("ingest-out-is-folder", ["ingest", "imagenet", "{d}/tree", "-o", "{d}/adir"], "adir",
         _both(_dir("tree"), _dir("adir"))),
    Case("train-out-is-folder", ["train", IDX, "--out", "{d}/adir", "--device", "cpu"], "adir",
         _both(_index_json, _dir("adir"))),
    Case("eval-out-under-a-file", ["eval", IDX, *MODEL, "--out", "{d}/f/sub"], "f", _both(_index_json, _file("f"))),
    Case("eval-out-unwritable", ["eval", IDX, *MODEL, "--out", "/proc/bgsynth-out"], "/proc/bgsynth-out",
         _index_json),
    # ---- ingest
    Case("ingest-missing-root", ["ingest", "imagenet", "{d}/nothere", "-o", "{d}/i.json"], "nothere"),
    Case("ingest-no-jpegs", ["ingest", "imagenet", "{d}/noimg/val", "-o", "{d}/i.json"], "noimg", _jpegs_without_xml),
    Case("ingest-imagenet-traversal", ["ingest", "imagenet", "{d}/tree/val", "-o", "{d}/i.json"], "tree",
         _imagenet_traversal),
    Case("ingest-coco-traversal", ["ingest", "coco", "{d}/coco.json", "--images", "{d}/images", "--category-map", "{d}/map.json",
                                   "-o", "{d}/i.json"], "coco", _coco_traversal),
    Case("ingest-coco-not-json", ["ingest", "coco", "{d}/coco.json", "--images", "{d}/images", "--label-space", "coco",
                                    "-o", "{d}/i.json"], "coco.json",
         _both(_file("coco.json", b"<xml/>"), _dir("images"))),
    Case("ingest-coco-missing", ["ingest", "coco", "{d}/none.json", "--images", "{d}/images", "-o", "{d}/i.json"], "none.json",
         _dir("images")),
]


def _tree(d: pathlib.Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _run(case: Case, root: pathlib.Path) -> tuple[Case, subprocess.CompletedProcess, set, set]:
    d = root / case.name
    d.mkdir()
    if case.setup is not None:
        case.setup(d)
    before = _tree(d)
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    env = dict(os.environ, BGSYNTH_CACHE=str(root / "_cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "bgsynth.cli", *argv], cwd=d, env=env, capture_output=True, text=True,
                       timeout=300)
    return case, r, before, _tree(d)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        return {c.name: o for c, *o in ex.map(lambda c: _run(c, root), CASES)}


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_cleanly(case, outcomes):
    r, before, after = outcomes[case.name]
    err = r.stderr
    assert r.returncode != 0, f"{case.name}: exit 0\nstdout: {r.stdout[-800:]}\nstderr: {err[-800:]}"
    assert "Traceback" not in err, f"{case.name}: a traceback\n{err[-2000:]}"
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"{case.name}: expected one error line, got {lines or err[-1500:]}"
    assert case.needle in lines[0], f"{case.name}: the error does not name {case.needle!r}: {lines[0]}"
    new = {p for p in after - before if not p.startswith("__pycache__")}
    allowed = {"o", "f"} if case.out is None else {case.out}
    stray = {p for p in new if p.split(os.sep)[0] not in allowed}
    assert not stray, f"{case.name}: wrote outside its output: {sorted(stray)[:5]}"
