"""The main job end to end on a tiny built-in dataset: every artefact written, findings computed from the results."""

from __future__ import annotations

import json

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
