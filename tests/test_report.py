"""bgsynth.report and the eval/report CLI: tables, figures, contact sheet, several runs side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bgsynth.report import load_results, write_report
from bgsynth.report.plots import prediction_sheet
from bgsynth.report.tables import (
    class_names,
    comparison_csv,
    counts_table,
    fmt_pct,
    format_summary,
    group_summary_table,
    label_space_of,
    markdown_table,
    paper_table,
    per_class_table,
)
from bgsynth.results import EvalRecords, EvalResult, load_result, metrics_from_records

VARIANTS = ("original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _result(correct_per_variant: dict[str, int], n: int = 18, name: str = "net") -> EvalResult:
    """A result whose variant v has exactly ``correct_per_variant[v]`` of ``n`` images right."""
    ids = np.arange(n)
    labels = ids % 9
    cols = {k: [] for k in ("image_id", "variant", "label", "pred", "bg_id", "bg_label", "valid")}
    for vi, v in enumerate(VARIANTS):
        k = correct_per_variant[v]
        pred = np.where(ids < k, labels, (labels + 1) % 9)
        mixed = v.startswith("mixed")
        cols["image_id"].append(ids)
        cols["variant"].append(np.full(n, vi))
        cols["label"].append(labels)
        cols["pred"].append(pred)
        cols["bg_id"].append(np.where(mixed, (ids + 1) % n, -1))
        cols["bg_label"].append(np.where(mixed, (labels + 1) % 9, -1))
        cols["valid"].append(np.ones(n, bool))
    rec = EvalRecords(VARIANTS, 0, *(np.concatenate(cols[c]) for c in cols))
    m = metrics_from_records(rec)
    return EvalResult(variants=list(VARIANTS), metrics=m["variants"], bg_gap=m["bg_gap"], label_protocol="official",
                      model={"spec": name, "arch": "bgsynth_cnn", "name": name, "num_outputs": 9, "output_space": "in9"},
                      config={"index": "idx.json", "split": "val", "seed": 0, "geometry": {"resize": 72, "crop": 64}},
                      dataset={"images": n}, timing={"seconds": 2.0, "images": n, "images_per_s": n / 2,
                                                     "composites_per_s": 8 * n / 2, "forwards": 8 * n},
                      records=rec)


CORRECT_A = dict(original=18, only_bg_b=9, only_bg_t=6, no_fg=3, only_fg=12, mixed_same=15, mixed_rand=9, mixed_next=2)
CORRECT_B = dict(original=16, only_bg_b=2, only_bg_t=2, no_fg=2, only_fg=14, mixed_same=14, mixed_rand=13, mixed_next=12)


def test_tables():
    a = _result(CORRECT_A, name="A")
    assert markdown_table(["x", "y|z"], [[1, None]]) == "| x | y\\|z |\n|---|---|\n| 1 | None |"
    assert fmt_pct(None) == "-" and fmt_pct(0.12345, 2) == "12.35" and fmt_pct(0.05, 1, signed=True) == "+5.0"
    t = paper_table([a]).splitlines()
    assert t[0] == ("| model | Original | Only-BG-B | Only-BG-T | No-FG | Only-FG | Mixed-Same | Mixed-Rand | "
                    "Mixed-Next | BG-Gap |")
    # 18/18, 9/18, 6/18, 3/18, 12/18, 15/18, 9/18, 2/18; gap (15 - 9) / 18
    assert t[2] == "| A | 100.0 | 50.0 | 33.3 | 16.7 | 66.7 | 83.3 | 50.0 | 11.1 | 33.3 |"
    assert "| Mixed-Rand | 50.00 | 9/18 | 0 | 0 |" in counts_table(a)
    csv_rows = comparison_csv([a, _result(CORRECT_B, name="B")]).splitlines()
    assert csv_rows[0].startswith("model,original,only_bg_b") and csv_rows[2].startswith("B,88.8889,")
    s = format_summary(a)
    assert "BG-Gap" in s and "33.3" in s and "label protocol 'official'" in s


def test_prediction_sheet_marks_right_and_wrong(tmp_path):
    imgs = torch.full((2, 3, 3, 16, 16), 128, dtype=torch.uint8)
    ex = {"variants": ["original", "only_fg", "mixed_rand"], "image_ids": [4, 9], "labels": [0, 1], "images": imgs,
          "pred": np.array([[0, 5, 0], [1, -1, 1]]), "valid": np.array([[True, True, True], [True, True, False]])}
    p = prediction_sheet(ex, tmp_path / "sheet.png", tile=40)
    im = np.asarray(Image.open(p).convert("RGB"))
    left, top, pad, cap, tile = 112, 34, 4, 14, 40

    def frame(i, j):  # a pixel of the coloured frame of tile (i, j)
        return tuple(im[top + i * (tile + cap + pad) + 1, left + j * (tile + pad) + pad + 1])

    assert frame(0, 0) == (0, 170, 0) and frame(0, 1) == (220, 0, 0) and frame(0, 2) == (0, 170, 0)
    assert frame(1, 0) == (0, 170, 0) and frame(1, 1) == (220, 0, 0) and frame(1, 2) == (150, 150, 150)
    centre = im[top + tile // 2, left + pad + tile // 2]
    assert tuple(centre) == (128, 128, 128)


def _check_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_write_report_single_and_compare(tmp_path):
    a, b = _result(CORRECT_A, name="A"), _result(CORRECT_B, name="B")
    p = write_report(a, tmp_path / "a")
    md = p.read_text()
    assert "| A | 100.0 | 50.0 | 33.3 | 16.7 | 66.7 | 83.3 | 50.0 | 11.1 | 33.3 |" in md
    assert "above the 11.1% chance level" in md and "BG-Gap = Mixed-Same - Mixed-Rand = +33.3 points" in md
    for f in ("accuracy.png", "per_class.png", "bg_class.png"):
        _check_png(tmp_path / "a" / f)
        assert f"]({f})" in md
    assert not (tmp_path / "a" / "examples.png").exists()  # no example composites in a hand-made result
    for r, d in ((a, "a"), (b, "b")):
        r.save(tmp_path / d)
    cmp = write_report([tmp_path / "a", tmp_path / "b" / "results.json"], tmp_path / "cmp", names=["first", "second"])
    md = cmp.read_text()
    table = [line for line in md.splitlines() if line.startswith("| first") or line.startswith("| second")]
    assert len(table) == 2 and table[1].startswith("| second | 88.9 |")
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
    _check_png(tmp_path / "cmp" / "accuracy.png")
    _check_png(tmp_path / "cmp" / "per_class_2.png")
    with pytest.raises(Exception, match="names"):
        write_report([a, b], tmp_path / "bad", names=["only one"])


def test_cli_eval_and_report(builtin_root, tmp_path):
    from bgsynth.cli import main
    from bgsynth.models import create_model, save_checkpoint

    torch.manual_seed(0)
    ck = save_checkpoint(create_model("bgsynth_cnn"), tmp_path / "net.pt", "bgsynth_cnn", 9,
                         {"geometry": {"resize": 72, "crop": 64}})
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    rc = main(["eval", str(builtin_root), "--model", str(ck), "--backend", "pil", "--device", "cpu", "--out", str(out1),
               "--provenance", "--no-progress", "--batch-size", "32"])
    assert rc == 0
    for f in ("results.json", "results.csv", "provenance.csv", "report.md", "accuracy.png", "per_class.png",
              "bg_class.png", "examples.png"):
        assert (out1 / f).is_file(), f
    d = json.loads((out1 / "results.json").read_text())
    assert d["config"]["geometry"] == {"resize": 72, "crop": 64}  # from the checkpoint
    assert d["dataset"]["images"] == 54 and d["model"]["sha256"]
    assert len((out1 / "provenance.csv").read_text().splitlines()) == 1 + 54 * 8
    rc = main(["eval", str(builtin_root), "--model", "bgsynth_cnn", "--resize", "72", "--crop", "64",
               "--variants", "original,mixed_rand", "--backend", "pil", "--device", "cpu", "--out", str(out2),
               "--no-progress", "--no-report", "--seed", "3"])
    assert rc == 0 and not (out2 / "report.md").exists()
    assert load_result(out2).variants == ["original", "mixed_rand"]
    rc = main(["report", str(out1), str(out2), "--out", str(tmp_path / "cmp"), "--names", "ckpt,random"])
    assert rc == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| ckpt |" in md and "| random |" in md and "examples_1.png" in md
    # errors surface as exit code 2 with a message, not a traceback
    assert main(["eval", str(builtin_root), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")]) == 2
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2



def test_no_matplotlib_without_a_plot():
    """matplotlib is imported by the plotting functions only: evaluating, exporting or drawing a contact sheet
    (PIL) never loads it."""
    import subprocess
    import sys

    code = ("import sys, bgsynth.evaluate, bgsynth.export, bgsynth.show, bgsynth.report, bgsynth.cli.eval; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------------------------- label spaces
def _hand_result(names: list[str], per_class: dict[str, list[tuple[int, int]]], name: str = "net",
                 groups: dict | None = None) -> EvalResult:
    """A result written by hand (no metrics code): ``per_class[v]`` = ``(correct, total)`` per class of a label
    space with ``names``; Mixed-* also split by background class the same way; ``groups[v]`` = group metrics."""
    metrics = {}
    for v, cells in per_class.items():
        c, t = sum(k for k, _ in cells), sum(n for _, n in cells)
        acc = [k / n if n else None for k, n in cells]
        m = {"accuracy": c / t, "correct": c, "total": t, "invalid": 0, "unmapped": 0,
             "per_class": {"accuracy": acc, "correct": [k for k, _ in cells], "total": [n for _, n in cells]}}
        if v.startswith("mixed"):
            m["by_bg_class"] = {"accuracy": acc}
            m["pred_is_bg_class"] = 0.0
        if groups and v in groups:
            m.update(groups[v])
        metrics[v] = m
    gap = None
    if "mixed_same" in metrics and "mixed_rand" in metrics:
        gap = metrics["mixed_same"]["accuracy"] - metrics["mixed_rand"]["accuracy"]
    r = EvalResult(variants=list(per_class), metrics=metrics, bg_gap=gap, label_protocol="official",
                   model={"name": name, "arch": "x", "num_outputs": len(names)},
                   config={"index": "idx.json", "split": "val", "seed": 0, "geometry": {"resize": 72, "crop": 64}},
                   dataset={"images": sum(n for _, n in next(iter(per_class.values())))},
                   label_space={"name": f"toy{len(names)}", "classes": names})
    return r


def test_report_reads_the_label_space_of_the_result(tmp_path):
    """N = 2: class names, chance 50%; the label space comes from the results file when it records one."""
    names = ["landbird", "waterbird"]
    r = _hand_result(names, {"original": [(9, 10), (8, 10)], "only_bg_t": [(4, 10), (4, 10)],
                             "mixed_same": [(7, 10), (7, 10)], "mixed_rand": [(5, 10), (6, 10)]})
    p = write_report(r, tmp_path / "a")
    md = p.read_text()
    assert "| variant | landbird | waterbird |" in md
    assert "| Original | 90.0 | 80.0 |" in md and "| Only-BG-T | 40.0 | 40.0 |" in md
    assert "| variant \\ background class | landbird | waterbird | pred = bg class |" in md
    # background-only 40% is below the 50% chance of 2 classes (above IN-9's 11.1%)
    assert "Background-only accuracy (only_bg_t: 40.0%) is not above the 50.0% chance level." in md
    assert "Accuracy is top-1 on toy2 (2 classes) (chance 50.0%)" in md and "dog" not in md
    # through results.json with a "label_space" record
    d = r.to_dict()
    d["label_space"] = {"name": "toy2", "classes": names}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(d))
    (loaded,) = load_results([tmp_path / "run"])
    assert per_class_table(loaded).splitlines()[0] == "| variant | landbird | waterbird |"
    md = write_report([tmp_path / "run"], tmp_path / "b").read_text()
    assert "| Original | 90.0 | 80.0 |" in md and "50.0% chance" in md
    # IN-9 stays the default when a result records none
    assert label_space_of(_result(CORRECT_A)).classes[:2] == ("dog", "bird")


def test_report_twenty_classes_and_a_size_mismatch(tmp_path):
    names = [f"c{k:02d}" for k in range(20)]
    cells = [(k % 3, 3) for k in range(20)]
    r = _hand_result(names, {"original": cells, "mixed_rand": cells})
    md = write_report(r, tmp_path / "a").read_text()
    assert "| variant | " + " | ".join(names) + " |" in md
    assert "| Original | " + " | ".join(fmt_pct(k % 3 / 3) for k in range(20)) + " |" in md
    assert "(chance 5.0%)" in md
    bad = _hand_result(["a", "b", "c"], {"original": [(1, 2), (2, 2)]})  # 3 names, 2 per-class entries
    with pytest.warns(UserWarning, match="its per-class metrics 2"):
        assert class_names(bad) == ("class 0", "class 1")


def test_group_metrics_are_rendered_when_present(tmp_path):
    """Group accuracy (foreground class x background class): a table, the summary and one chart, from a hand-made
    result dict; nothing of it without groups."""
    names = ["land", "water"]
    groups = [{"fg_class": 0, "bg_class": 0, "correct": 9, "total": 10, "accuracy": 0.9},
              {"fg_class": 0, "bg_class": 1, "correct": 1, "total": 4, "accuracy": 0.25},
              {"fg_class": 1, "bg_class": 0, "correct": 2, "total": 4, "accuracy": 0.5},
              {"fg_class": 1, "bg_class": 1, "correct": 8, "total": 10, "accuracy": 0.8}]
    # by hand: average of the groups (0.9 + 0.25 + 0.5 + 0.8) / 4 = 0.6125; worst 0.25 (land on water);
    # aligned (0.9 + 0.8) / 2 - conflicting (0.25 + 0.5) / 2 = 0.475
    g = {"groups": groups, "average_group": 0.6125, "worst_group": 0.25, "aligned_gap": 0.475}
    r = _hand_result(names, {"original": [(10, 14), (10, 14)], "mixed_rand": [(10, 14), (10, 14)]},
                     groups={"mixed_rand": g})
    md = write_report(r, tmp_path / "g").read_text()
    assert "### Group accuracy (foreground class x background class)" in md
    assert "| Mixed-Rand | 4 | 61.3 | 25.0 (land on water) | +47.5 |" in md  # 100 * 0.6125 = 61.250000000000014
    assert "| foreground \\ background | land | water |" in md
    assert "| land | 90.0 (9/10) | 25.0 (1/4) |" in md and "| water | 50.0 (2/4) | 80.0 (8/10) |" in md
    _check_png(tmp_path / "g" / "groups.png")
    assert "](groups.png)" in md
    # a worst group given as a record, class names given as names
    g2 = {"groups": [dict(x, fg_class=names[x["fg_class"]], bg_class=names[x["bg_class"]]) for x in groups],
          "worst_group": {"fg_class": "land", "bg_class": "water", "accuracy": 0.25}}
    r2 = _hand_result(names, {"mixed_rand": [(10, 14), (10, 14)]}, groups={"mixed_rand": g2})
    assert "| Mixed-Rand | 4 | - | 25.0 (land on water) | - |" in group_summary_table(r2)
    plain = write_report(_result(CORRECT_A), tmp_path / "plain")
    assert "Group accuracy" not in plain.read_text() and not (tmp_path / "plain" / "groups.png").exists()


def test_report_owns_its_files(tmp_path, capsys):
    """Another set of runs is refused by name; --overwrite replaces only the report's files; a rerun of the same
    runs (any names, title) drops its own figures that no longer apply; --out naming a file is refused up front."""
    from bgsynth.cli import main

    a, b = _result(CORRECT_A, name="A"), _result(CORRECT_B, name="B")
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    out = tmp_path / "cmp"
    write_report([tmp_path / "a", tmp_path / "b"], out, names=["x", "y"])
    (out / "notes.txt").write_text("mine")
    assert (out / "per_class_2.png").is_file() and (out / "report.md.bgsynth-run.json").is_file()
    with pytest.raises(Exception, match=r'run 2: "../b" -> null; runs: 2 -> 1\).*--overwrite'):
        write_report([tmp_path / "a"], out, names=["x"])
    assert (out / "per_class_2.png").is_file()
    write_report([tmp_path / "a", tmp_path / "b"], out, names=["x", "z"], title="renamed")  # the same runs
    assert "| z |" in (out / "report.md").read_text()
    write_report([tmp_path / "a"], out, names=["x"], overwrite=True)
    assert not (out / "per_class_2.png").exists() and not (out / "comparison.csv").exists()
    assert (out / "per_class.png").is_file() and (out / "notes.txt").read_text() == "mine"
    # the same report again after the run lost its Mixed-* variants: bg_class.png is no longer the report's
    assert (out / "bg_class.png").is_file()
    d = json.loads((tmp_path / "a" / "results.json").read_text())
    d["variants"] = ["original"]
    d["metrics"] = {"original": d["metrics"]["original"]}
    d["bg_gap"] = None
    (tmp_path / "a" / "results.json").write_text(json.dumps(d))
    write_report([tmp_path / "a"], out, names=["x"])
    assert not (out / "bg_class.png").exists() and (out / "accuracy.png").is_file()
    # a report inside a run's folder leaves the run's files alone
    write_report(tmp_path / "b", tmp_path / "b")
    write_report(tmp_path / "b", tmp_path / "b", title="again", overwrite=True)
    assert (tmp_path / "b" / "results.json").is_file() and (tmp_path / "b" / "report.md").is_file()
    # a writer that owns the folder passes its claim: the report's files are recorded as that writer's
    from bgsynth.runs import RUN_FILE, Fingerprint, OutputFolder

    claim = OutputFolder(tmp_path / "ev", Fingerprint("eval", {"seed": 0})).claim()
    write_report(a, tmp_path / "ev", folder=claim)
    recorded = json.loads((tmp_path / "ev" / RUN_FILE).read_text())
    assert recorded["fingerprint"]["writer"] == "eval" and {"report.md", "accuracy.png"} <= set(recorded["files"])
    assert not (tmp_path / "ev" / "report.md.bgsynth-run.json").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "a"), "--out", str(f)])
    assert e.value.code == 2 and f"argument --out: {f}: is an existing file" in capsys.readouterr().err
    with pytest.raises(Exception, match="is an existing file"):
        write_report(tmp_path / "a", f)
    assert f.read_text() == "x"
