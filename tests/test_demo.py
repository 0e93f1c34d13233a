"""The main job end to end on a tiny built-in dataset: every artefact written, findings computed from the results."""

from __future__ import annotations

import json
import pathlib

import pytest

from bgsynth.demo import CHANCE, run_demo
from bgsynth.index import DatasetIndex, Reject
from bgsynth.masks import SelectionFilters


def test_demo_end_to_end_and_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    res = run_demo(out_dir=out, cache_dir=tmp_path / "cache", device="cpu", epochs=1, challenge_fg_per_class=2,
                   challenge_bg_per_class=3, progress=False, dataset=dict(train_per_class=10, val_per_class=4))
    for name in ("report.md", "variants.png", "decoded.png", "eval/results.json", "eval/report.md",
                 "challenge/challenge.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "eval" / "results.json").read_text())
    assert set(data["accuracy"]) == {"original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same",
                                     "mixed_rand", "mixed_next"}
    # the findings restate the numbers of the result files, not something else
    by_name = {f["finding"][:3]: f for f in res.findings}
    gap = data["bg_gap"]
    assert by_name["BG-"]["observed"] == (gap > 0)
    bg_only = [data["accuracy"][v] for v in ("only_bg_b", "only_bg_t", "no_fg")]
    assert by_name["(a)"]["observed"] == all(a > CHANCE for a in bg_only)
    chal = json.loads((out / "challenge" / "challenge.json").read_text())
    assert res.challenge.num_foregrounds == 2 * 9
    assert by_name["(b)"]["observed"] == (res.challenge.num_vulnerable > 0)
    assert str(res.challenge.num_vulnerable) in (out / "report.md").read_text()
    assert chal is not None
    # the selection filters ran on the built-in images although they all carry true masks: every two-object image
    # is gone, and the counts per reason are in the prepared index
    prepared = DatasetIndex.load(res.index)
    raw = DatasetIndex.load(res.index.parent / "index.json")
    prep = prepared.data["info"]["prepare"]
    assert prep["settings"]["tiling"] == "paper" and prep["filters_enabled"] == list(SelectionFilters().enabled())
    two = sum(1 for r in raw.records() if len(r.boxes) > 1)
    assert two > 0 and prep["filtered"][Reject.MULTIPLE_OBJECTS] == two
    assert prep["filtered_by_mask_source"]["synthetic"] == prep["filtered"]
    assert all(len(r.boxes) == 1 for r in prepared.records())
    assert len(prepared) == len(raw) - sum(prep["filtered"].values()) and prep["grabcut_masks"] == 0
    # a second run reuses the cached dataset, prepared index and model, and says what the filters dropped
    mtime = res.checkpoint.stat().st_mtime_ns
    capsys.readouterr()
    res2 = run_demo(out_dir=out, cache_dir=tmp_path / "cache", device="cpu", epochs=1, challenge=False,
                    progress=True, dataset=dict(train_per_class=10, val_per_class=4))
    assert res2.checkpoint == res.checkpoint and res2.checkpoint.stat().st_mtime_ns == mtime
    assert res2.eval_result.metrics == res.eval_result.metrics
    printed = capsys.readouterr().out
    assert "selection filters on every image" in printed
    assert f"{len(prepared)} of {len(raw)} images kept" in printed
    assert f"dropped {sum(prep['filtered'].values())}: " in printed and Reject.MULTIPLE_OBJECTS in printed


def test_waterbirds_like_demo_end_to_end_and_reused(tmp_path):
    """The group-robustness demo on a tiny waterbirds-like set: both trainings, a table per group, findings that
    restate the numbers; a second run reuses the finished models."""
    import torch

    from bgsynth.demo import group_findings

    out = tmp_path / "wbdemo"
    kw = dict(out_dir=out, cache_dir=tmp_path / "cache", device="cpu", epochs=1, progress=False, kind="waterbirds-like",
              batch_size=8,
              dataset=dict(train_per_class=8, val_per_class=3, train_places_per_class=3, val_places_per_class=2))
    res = run_demo(**kw)
    rows = res.comparison.rows
    assert list(rows) == ["correlation 0.95", "balanced (0.5)"]
    assert [r["correlation"] for r in rows.values()] == [0.95, 0.5]
    for r in rows.values():
        groups = r["metrics"]["groups"]
        assert [g["total"] for g in groups] == [3, 3, 3, 3]  # every val bird once on each scene family
        assert r["metrics"]["worst_group"] == min(g["accuracy"] for g in groups)
        # the accuracy at the run's training distribution: 8 birds per class, the aligned scene with probability c
        c = r["correlation"]
        share = {True: c / 2, False: (1 - c) / 2}
        assert r["train_weighted_accuracy"] == pytest.approx(sum(share[g["aligned"]] * g["accuracy"] for g in groups))
        ck = torch.load(r["checkpoint"], map_location="cpu", weights_only=True)
        assert ck["num_classes"] == 2 and ck["train"]["compose"]["correlation"] == r["correlation"]
    assert res.findings == group_findings(res.comparison) and len(res.findings) == 2
    text = res.report.read_text()
    assert "landbird/land*" in text and "waterbird/land" in text and "worst group" in text
    assert "average (train dist.)" in text and f"{100 * rows['correlation 0.95']['train_weighted_accuracy']:.1f}" in text
    saved = json.loads((out / "compose" / "compare.json").read_text())
    assert saved["rows"]["balanced (0.5)"]["metrics"]["average_group"] == rows["balanced (0.5)"]["metrics"]["average_group"]
    mtimes = [pathlib.Path(r["checkpoint"]).stat().st_mtime_ns for r in rows.values()]
    again = run_demo(**kw)
    assert [pathlib.Path(r["checkpoint"]).stat().st_mtime_ns for r in again.comparison.rows.values()] == mtimes
    assert [r["metrics"] for r in again.comparison.rows.values()] == [r["metrics"] for r in rows.values()]
