"""Tests of bgsynth.train (training through the engine's pipeline), its CLI and compare_training."""

from __future__ import annotations

import json

import pytest
import torch

from bgsynth.classes import IN9_MEAN
from bgsynth.config import resolve_run
from bgsynth.errors import ConfigError
from bgsynth.models import Predictor, load_model
from bgsynth.pipeline import create_loader
from bgsynth.train import TrainConfig, compare_training, train

SMALL = dict(epochs=4, batch_size=16, progress=False, backend="pil", device="cpu")


def subset(index, train_per_class: int, val_per_class: int):
    """A balanced slice of both splits (fewer images to decode in tests that train several times)."""
    ids = index.select(split="train", per_class=train_per_class).ids
    ids += index.select(split="val", per_class=val_per_class).ids
    return index.select(ids=ids)


@pytest.fixture(scope="module")
def trained(tiny_index, tiny_geometry, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ckpt.pt"
    res = train(tiny_index, geometry=tiny_geometry, seed=3, augment={"mixed_rand": 0.5, "only_fg": 0.1}, out=out,
                **SMALL)
    return res


def test_short_run_learns_and_records(trained, tiny_index):
    res = trained
    n_train = len(tiny_index.select(split="train"))
    assert res.steps == 4 * (n_train // 16) and res.images == res.steps * 16
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert res.val_total == len(tiny_index.select(split="val"))
    assert 0.0 <= res.val_accuracy <= 1.0
    st = res.augment_stats
    drawn = sum(v["drawn"] for v in st.values())
    assert drawn == res.images and st["mixed_rand"]["drawn"] > 0 and st["only_fg"]["drawn"] > 0
    assert res.config["augment"] == {"original": 0.4, "mixed_rand": 0.5, "only_fg": 0.1}


def test_checkpoint_loads_back_and_predicts_the_same(trained, tiny_index, tiny_geometry):
    raw = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    assert raw["format"] == "bgsynth-checkpoint" and raw["arch"] == "bgsynth_cnn" and raw["num_classes"] == 9
    assert raw["geometry"] == {"resize": 72, "crop": 64}
    assert raw["train"]["seed"] == 3 and raw["val_accuracy"] == trained.val_accuracy
    # the run's resolved settings are recorded with the job's
    assert raw["train"]["backend"] == "pil" and raw["train"]["kernel_backend"] == "auto"
    assert raw["train"]["geometry_source"] == "arguments" and raw["train"]["batch_size"] == 16
    loaded = load_model(str(trained.checkpoint))
    assert loaded.num_outputs == 9 and loaded.geometry == {"resize": 72, "crop": 64}
    torch.testing.assert_close(torch.tensor(loaded.mean), torch.tensor(IN9_MEAN))
    pred = Predictor(loaded)
    batch = next(iter(create_loader(tiny_index.select(split="val"), backend="pil", geometry=tiny_geometry,
                                    batch_size=32)))
    x = pred.prepare(batch.images)
    with torch.inference_mode():
        expect = trained.model.eval()(x).argmax(1)
    assert torch.equal(pred.predict(x), expect)
    # the stored val accuracy is what the evaluator's Original path measures
    correct = total = 0
    for b in create_loader(tiny_index.select(split="val"), backend="pil", geometry=tiny_geometry, batch_size=64):
        correct += int((pred.predict(pred.prepare(b.images)) == b.labels).sum())
        total += len(b)
    assert correct / total == pytest.approx(trained.val_accuracy)


def test_training_is_deterministic_with_a_seed(tiny_index, tiny_geometry):
    kw = dict(SMALL, epochs=1, max_steps=2, batch_size=8, val_split=None, geometry=tiny_geometry,
              augment={"mixed_rand": 0.5, "no_fg": 0.2})
    index = subset(tiny_index, 3, 1)
    a = train(index, seed=5, **kw).model.state_dict()
    # the same run given as resolved objects instead of loose options
    run = resolve_run(seed=5, batch_size=8, device="cpu", backend="pil", geometry=tiny_geometry, amp="auto")
    cfg = TrainConfig(epochs=1, max_steps=2, val_split=None, augment={"mixed_rand": 0.5, "no_fg": 0.2})
    b = train(index, run, cfg).model.state_dict()
    c = train(index, seed=6, **kw).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_argument_errors(tiny_index):
    with pytest.raises(ConfigError):
        train(tiny_index, epochs=0, progress=False)
    with pytest.raises(ConfigError):
        train(tiny_index, optimizer="lbfgs", progress=False)
    with pytest.raises(ConfigError):
        train(tiny_index, augment="mixed_next=1.0", progress=False)
    with pytest.raises(ConfigError, match="unknown option"):
        train(tiny_index, epochz=3, progress=False)
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        train(tiny_index, batch_size=1, progress=False)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(tiny_index, batch_size=1000, progress=False, backend="pil")


def test_cli_train_writes_a_loadable_checkpoint(builtin_root, tmp_path, capsys):
    from bgsynth.cli import main

    out = tmp_path / "cli.pt"
    rc = main(["train", str(builtin_root), "--out", str(out), "--epochs", "1", "--batch-size", "16", "--resize", "72",
               "--crop", "64", "--augment", "mixed_rand=1.0", "--bg-source", "batch", "--device", "cpu",
               "--backend", "pil", "--no-progress", "--val-split", "none"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mixed_rand=1" in text and str(out) in text
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["train"]["augment"] == {"mixed_rand": 1.0} and raw["train"]["bg_source"] == "batch"
    assert load_model(str(out)).geometry == {"resize": 72, "crop": 64}
    assert main(["train", str(builtin_root), "--out", str(out), "--augment", "bogus=1", "--no-progress"]) == 2


def test_compare_training_reports_both_models(tiny_index, tiny_geometry, tmp_path):
    kw = dict(epochs=1, seed=1, geometry=tiny_geometry, device="cpu", variants="original,mixed_same,mixed_rand",
              progress=False, batch_size=12, backend="pil", challenge_kwargs={"bg_per_class": 2})
    index = subset(tiny_index, 4, 3)
    res = compare_training(index, tmp_path, **kw)
    assert list(res.rows) == ["original", "mixed_rand"]
    for name, row in res.rows.items():
        acc = row["accuracy"]
        assert row["bg_gap"] == pytest.approx(acc["mixed_same"] - acc["mixed_rand"])
        assert 0.0 <= row["challenge_accuracy"] <= 1.0
        robust = round(row["challenge_accuracy"] * row["challenge_total"])
        assert row["challenge_vulnerable"] + robust == row["challenge_total"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["rows"]) == {"original", "mixed_rand"}
    assert "BG-Gap" in (tmp_path / "compare.md").read_text()
    # same settings again: the checkpoints are reused, not retrained
    mtime = (tmp_path / "mixed_rand.pt").stat().st_mtime_ns
    again = compare_training(index, tmp_path, **dict(kw, challenge=False))
    assert (tmp_path / "mixed_rand.pt").stat().st_mtime_ns == mtime
    assert again.rows["mixed_rand"]["challenge_accuracy"] is None
    assert again.rows["mixed_rand"]["accuracy"] == res.rows["mixed_rand"]["accuracy"]
