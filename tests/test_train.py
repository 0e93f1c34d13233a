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


# ==============================================================================================================
# The run's checkpoint: owned, resumable; label spaces; composed training sets
# ==============================================================================================================

WB_TINY = dict(seed=0, train_per_class=6, val_per_class=4, train_places_per_class=4, val_places_per_class=3)


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    """The tiny waterbirds-like set (shared with tests/test_compose.py through the session's cache folder)."""
    from bgsynth.sources.synthetic import build_builtin_dataset

    return build_builtin_dataset(root=tmp_path_factory.getbasetemp() / "wb-cache", kind="waterbirds-like",
                                 progress=False, workers=1, **WB_TINY).parent


def _train_args(index, out, *more):
    return ["train", str(index), "--out", str(out), "--epochs", "3", "--batch-size", "6", "--resize", "72", "--crop",
            "64", "--device", "cpu", "--backend", "pil", "--no-progress", "--val-split", "none", "--seed", "2",
            "--augment", "mixed_rand=0.5", *more]


def test_killed_training_resumes_to_bit_identical_weights(tiny_index, tmp_path, capsys):
    """SIGKILL mid-training, --resume: the final weights equal an uninterrupted run's, bit for bit (CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bgsynth.cli import main

    index = tmp_path / "small.json"
    small = tiny_index.select(split="train", per_class=2)
    small.save(index)
    total = 3 * (len(small) // 6)  # 3 epochs of 3 steps
    ref, ck = tmp_path / "ref.pt", tmp_path / "ck.pt"
    assert main(_train_args(index, ref)) == 0
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "bgsynth.cli", *_train_args(index, ck, "--checkpoint-every", "1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "ck.pt.state"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # as soon as the first state is written: mid-epoch 0 (or a little later)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = int(torch.load(state, map_location="cpu", weights_only=True)["steps"])
    assert 1 <= killed_at < total and not ck.exists()
    # a truncated copy of the state is refused with one line naming the file
    bad = tmp_path / "bad.pt"
    (tmp_path / "bad.pt.state").write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    (tmp_path / "bad.pt.bgsynth-run.json").write_text((tmp_path / "ck.pt.bgsynth-run.json").read_text())
    capsys.readouterr()
    assert main(_train_args(index, bad, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.pt.state: not a readable training state" in err
    # the killed run continues from its state
    assert main(_train_args(index, ck, "--resume", "--checkpoint-every", "1")) == 0
    assert not state.exists()
    a = torch.load(ref, map_location="cpu", weights_only=True)
    b = torch.load(ck, map_location="cpu", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["train"]["steps"] == b["train"]["steps"] == total
    # resuming a finished run returns it without training
    capsys.readouterr()
    assert main(_train_args(index, ck, "--resume", "--checkpoint-every", "1")) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_checkpoint_is_owned_by_its_settings(tiny_index, tiny_geometry, tmp_path):
    from bgsynth.errors import CheckpointError

    index = subset(tiny_index, 2, 1)
    out = tmp_path / "own.pt"
    kw = dict(SMALL, epochs=1, max_steps=1, batch_size=4, val_split=None, geometry=tiny_geometry, out=out)
    train(index, seed=1, **kw)
    record = json.loads((tmp_path / "own.pt.bgsynth-run.json").read_text())
    assert record["files"] == ["own.pt"] and record["fingerprint"]["settings"]["seed"] == 1
    with pytest.raises(ConfigError, match=r"written by another train run \(settings that differ: seed: 1 -> 2\)"):
        train(index, seed=2, **kw)
    with pytest.raises(ConfigError, match="seed: 1 -> 2"):
        train(index, seed=2, resume=True, **kw)
    assert train(index, seed=2, overwrite=True, **kw).checkpoint == out
    assert torch.load(out, weights_only=True)["train"]["seed"] == 2
    # a checkpoint no recorded run wrote is not replaced silently either
    stray = tmp_path / "stray.pt"
    stray.write_bytes(b"someone else's file")
    with pytest.raises(ConfigError, match="no recorded run"):
        train(index, seed=1, **dict(kw, out=stray))
    # a state that is not a training state, under resume: one line naming the file
    (tmp_path / "own.pt.state").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"own.pt.state: not a readable training state") as e:
        train(index, seed=2, resume=True, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="resume continues"):
        train(index, seed=2, resume=True, **dict(kw, out=None))


def test_model_has_one_output_per_class_and_trains_on_a_composed_set(wb, tiny_geometry, tmp_path):
    from bgsynth.compose import ComposeSpec
    from bgsynth.index import DatasetIndex

    index = DatasetIndex.load(wb / "index.json")
    spec = ComposeSpec(str(wb / "places" / "train"), str(wb / "pairing.json"), correlation=(1.0, 0.0))
    res = train(index, compose=spec, geometry=tiny_geometry, out=tmp_path / "wb.pt",
                **dict(SMALL, epochs=2, batch_size=4))
    raw = torch.load(res.checkpoint, weights_only=True)
    assert raw["num_classes"] == 2 and raw["state_dict"]["fc.weight"].shape[0] == 2
    assert raw["train"]["label_space"]["classes"] == ["landbird", "waterbird"]
    assert raw["train"]["compose"]["correlation"] == [1.0, 0.0]
    steps_per_epoch = 12 // 4
    st = res.augment_stats["compose"]
    # epoch 0 at correlation 1.0 (every sample aligned), epoch 1 at 0.0 (none): exactly one epoch's samples aligned
    assert st == {"composites": 2 * steps_per_epoch * 4, "aligned": steps_per_epoch * 4, "fell_back": 0}
    assert res.val_total == 8 and 0.0 <= res.val_accuracy <= 1.0
    with pytest.raises(ConfigError, match="augment left at Original"):
        train(index, compose=spec, augment="mixed_rand=1.0", **SMALL)
