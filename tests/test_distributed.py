"""bgsynth.distributed: 2-process runs (gloo on CPU) of eval, challenge, prepare and train give the single-process
results; a killed rank fails the job, ``--resume`` completes it; a stalled rank times out.

The 2-process runs are real process groups: ``torch.multiprocessing`` spawn with the launcher's environment
(``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) for the API and in-process CLI checks, and
``python -m torch.distributed.run`` (torchrun) for the kill-and-resume check. References are computed in this
process, without a process group.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
from torch import nn

import bgsynth.distributed as D
from bgsynth.pool import gather_background_pool
from bgsynth.classes import IN9_MEAN, IN9_STD, NUM_IN9
from bgsynth.distributed import DistContext, DistributedError, init_distributed, shard_ids
from bgsynth.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUP_TIMEOUT = 120  # BGSYNTH_DIST_TIMEOUT of the healthy groups (a hang fails instead of blocking CI)
SEED = 3
from fixtures import calibrate_batchnorm


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra) -> dict:
    # the caller's PYTHONPATH first: the tree under test (a worktree's import shim) must win over an installed copy
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path,
               BGSYNTH_DIST_TIMEOUT=str(GROUP_TIMEOUT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def ckpt(tiny_index, tiny_geometry, tmp_path_factory):
    """bgsynth_cnn, seeded random init, BatchNorm statistics calibrated on a few train images so that its
    predictions spread over the classes (a raw random net predicts one class nearly everywhere)."""
    from bgsynth.models import create_model, save_checkpoint
    from bgsynth.pipeline import create_loader

    torch.manual_seed(0)
    net = create_model("bgsynth_cnn", NUM_IN9)
    sub = tiny_index.select(split="train", per_class=3)
    x = torch.cat([b.images for b in create_loader(sub, backend="pil", geometry=tiny_geometry, batch_size=64)])
    m = torch.tensor(IN9_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IN9_STD).view(1, 3, 1, 1)
    x = (x.float() / 255.0 - m) / s
    calibrate_batchnorm(net, x)
    path = tmp_path_factory.mktemp("dist-model") / "cnn.pt"
    save_checkpoint(net, path, "bgsynth_cnn", NUM_IN9, extra={"geometry": tiny_geometry})
    return path


@pytest.fixture(scope="module")
def ckpt_biased(ckpt, tiny_geometry):
    """The same net leaning towards one class (carnivore): its foregrounds partly survive every background, so
    the challenge has robust as well as vulnerable foregrounds (the raw net is fooled everywhere)."""
    from bgsynth.models import load_model, save_checkpoint

    net = load_model(str(ckpt)).module
    with torch.no_grad():
        [m for m in net.modules() if isinstance(m, nn.Linear)][-1].bias[4] += 0.6
    path = ckpt.with_name("cnn_biased.pt")
    save_checkpoint(net, path, "bgsynth_cnn", NUM_IN9, extra={"geometry": tiny_geometry})
    return path


# ------------------------------------------------------------------------------------------------------------
# What each rank of the spawned group does (module level: spawn imports it by name)
# ------------------------------------------------------------------------------------------------------------


def _eval_kwargs(geometry) -> dict:
    return dict(variants="all", split="val", seed=SEED, geometry=geometry, backend="pil", device="cpu", batch_size=8,
                progress=False, examples_per_class=0)


def _prepare_kwargs(geometry) -> dict:
    return dict(split="val", recompute=True, per_class=3, max_side=48, workers=1, geometry=geometry, progress=False,
                iterations=3)


def _challenge_args(root, ckpt, out, *extra) -> list[str]:
    return ["challenge", str(root), "--model", str(ckpt), "--backend", "pil", "--device", "cpu", "--no-progress",
            "--no-plots", "--out", str(out), *map(str, extra)]


def _rank_main(rank: int, world: int, port: int, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), BGSYNTH_DIST_TIMEOUT=str(GROUP_TIMEOUT))
    torch.set_num_threads(1)
    import bgsynth.cli
    from bgsynth.evaluate import evaluate
    from bgsynth.geometry import CropGeometry
    from bgsynth.index import DatasetIndex
    from bgsynth.prepare import prepare
    from bgsynth.models import Predictor, load_model
    from bgsynth.train import train

    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
    out: dict = {"rank": rank}
    d = pathlib.Path(job["dir"])
    geom = CropGeometry(*job["geometry"])
    index = DatasetIndex.load(job["root"])

    # collectives: ragged gather (rank 0 has no rows), broadcast, agreement, main-first order
    parts = ctx.all_gather_tensors(torch.arange(rank * 3 * 2, dtype=torch.int16).view(rank * 3, 2))
    out["ragged"] = [p.tolist() for p in parts]
    out["broadcast"] = ctx.broadcast_object({"from": rank}, src=1)
    out["all_true"] = (ctx.all_true(True), ctx.all_true(rank == 0))
    order = d / "main_first.log"
    with ctx.main_first(local=False):
        with open(order, "a") as f:
            f.write(f"{rank}\n")

    # eval through the API: every rank returns the merged result
    pred = lambda: Predictor(load_model(str(job["ckpt"])), device="cpu")  # noqa: E731
    for name, extra in (("two_phase", {}), ("pool_first", {"cache_bytes": 0})):
        res = evaluate(index, pred(), **_eval_kwargs(geom), **extra)
        out[f"eval_{name}"] = {"records": res.records.to_columns(), "metrics": res.metrics, "bg_gap": res.bg_gap,
                               "dataset": res.dataset, "timing": res.timing, "config": res.config}
    # a split smaller than the world: rank 1 has no image and still takes part in every collective
    one = index.select(split="val", ids=index.select(split="val").ids[:1])
    res = evaluate(one, pred(), **_eval_kwargs(geom))
    out["eval_one"] = {"records": res.records.to_columns(), "metrics": res.metrics}
    # eval through the CLI: rank 0 alone writes
    rc = bgsynth.cli.main(["eval", str(job["root"]), "--model", str(job["ckpt"]), "--backend", "pil", "--device", "cpu",
                          "--split", "val", "--seed", str(SEED), "--batch-size", "8", "--provenance", "--no-report",
                          "--no-progress", "--examples-per-class", "0", "--out", str(d / "eval_cli")])
    out["eval_cli_rc"] = rc

    # challenge through the CLI (challenge_to_dir): adaptive, and the full matrix
    out["challenge_rc"] = [
        bgsynth.cli.main(_challenge_args(job["root"], job["ckpt_biased"], d / "ch_adaptive", "--batch-size", 16)),
        bgsynth.cli.main(_challenge_args(job["root"], job["ckpt_biased"], d / "ch_matrix", "--full-matrix", "--fg-per-class",
                                        3, "--bg-per-class", 3, "--batch-size", 16)),
    ]

    # prepare: GrabCut shared by the ranks, one index
    idx = prepare(index, out=d / "prepared.json", **_prepare_kwargs(geom))
    out["prepare"] = idx.data
    # prepare killed on both ranks after 4 GrabCut images each, then resumed from the ranks' journals (plus the
    # journal of a rank beyond this world, as an earlier run with more ranks would leave)
    import bgsynth.prepare

    real, calls = bgsynth.prepare._grabcut_task, [0]

    def crashing(task):
        if calls[0] >= 4:
            raise RuntimeError("simulated crash")
        calls[0] += 1
        return real(task)

    bgsynth.prepare._grabcut_task = crashing
    try:
        prepare(index, out=d / "resumed.json", checkpoint_every=1, **_prepare_kwargs(geom))
    except RuntimeError as e:
        out["prepare_crash"] = str(e)
    finally:
        bgsynth.prepare._grabcut_task = real
    ctx.barrier()
    out["journals"] = sorted(p.name for p in d.glob("resumed.json.journal*"))
    if ctx.is_main:
        shutil.copy(d / "resumed.json.journal.rank0.jsonl", d / "resumed.json.journal.rank5.jsonl")
    ctx.barrier()
    out["prepare_resumed"] = prepare(index, out=d / "resumed.json", resume=True, **_prepare_kwargs(geom)).data

    # train: DDP, 3 steps of a global batch of 16
    res = train(index, epochs=1, batch_size=16, max_steps=3, augment="mixed_rand=1.0", backend="pil", device="cpu",
                geometry=geom, val_split="val", out=d / "ddp.pt", progress=False, seed=1)
    out["train"] = {
        "state": {k: v.clone() for k, v in res.model.state_dict().items()},
        "history": [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in res.history],
        "steps": res.steps, "images": res.images, "stats": res.augment_stats, "val": (res.val_accuracy, res.val_total),
        "checkpoint": None if res.checkpoint is None else str(res.checkpoint),
    }
    with open(d / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(out, f)
    ctx.shutdown()


@pytest.fixture(scope="module")
def group(builtin_root, tiny_geometry, ckpt, ckpt_biased, tmp_path_factory):
    """Run :func:`_rank_main` on 2 spawned ranks once; returns (folder, [rank 0 output, rank 1 output])."""
    d = tmp_path_factory.mktemp("group")
    job = {"dir": str(d), "root": str(builtin_root), "ckpt": str(ckpt), "ckpt_biased": str(ckpt_biased),
           "geometry": (tiny_geometry.resize, tiny_geometry.crop)}
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), job), nprocs=2, join=True,
                                          start_method="spawn")
    outs = []
    for r in range(2):
        with open(d / f"rank{r}.pkl", "rb") as f:
            outs.append(pickle.load(f))
    return d, outs


# ------------------------------------------------------------------------------------------------------------
# Single process: the context degrades to identities
# ------------------------------------------------------------------------------------------------------------


def test_single_process_context():
    ctx = DistContext.single()
    assert not ctx.enabled and ctx.is_main and ctx.is_local_main
    t = torch.arange(5)
    assert ctx.all_gather_object({"x": 1}) == [{"x": 1}]
    assert ctx.broadcast_object(7) == 7
    assert ctx.all_reduce(t.clone(), "max").tolist() == t.tolist()
    assert [p.tolist() for p in ctx.all_gather_tensors(t)] == [t.tolist()]
    assert ctx.all_true(False) is False and ctx.all_true(True) is True
    with ctx.main_first():
        pass
    ctx.barrier()
    assert ctx.device("cpu") == torch.device("cpu")
    assert ctx.cpu_share() >= 1
    with pytest.raises(ConfigError, match="op"):
        ctx.all_reduce(t, "prod")
    from bgsynth.errors import BgsynthError

    assert issubclass(DistributedError, BgsynthError)  # the CLI prints it as one line and exits with code 2


def test_shard_ids_cover_every_id_once():
    ids = [17, 3, 5, 11, 2, 8, 13]
    for world in (1, 2, 3, 8):
        parts = [shard_ids(ids, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == sorted(ids)
        assert all(p == sorted(p) for p in parts)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_ids(ids, 1, 2) == [3, 8, 13]
    with pytest.raises(ConfigError, match="shard_id"):
        shard_ids(ids, 2, 2)


def test_init_distributed_checks_the_environment(monkeypatch):
    monkeypatch.setattr(D, "_CURRENT", None)
    for k in ("MASTER_ADDR", "MASTER_PORT", "BGSYNTH_DIST_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = init_distributed()
    assert not ctx.enabled and D.current() is ctx
    monkeypatch.setattr(D, "_CURRENT", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        init_distributed(timeout_s=5)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK"):
        init_distributed(timeout_s=5)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("BGSYNTH_DIST_BACKEND", "mpi")
    with pytest.raises(ConfigError, match="backend"):
        init_distributed(timeout_s=5)
    monkeypatch.delenv("BGSYNTH_DIST_BACKEND")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("BGSYNTH_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="BGSYNTH_DIST_TIMEOUT"):
        init_distributed()
    assert D._CURRENT is None


def test_gather_background_pool_single_sorts_and_refuses_duplicates():
    from bgsynth.types import BackgroundPool

    imgs = torch.arange(3 * 3 * 2 * 2, dtype=torch.uint8).view(3, 3, 2, 2)
    pool = BackgroundPool(imgs, torch.tensor([4, 5, 6]), torch.tensor([30, 10, 20]))
    got = gather_background_pool(pool, DistContext.single())
    assert got.image_ids.tolist() == [10, 20, 30] and got.labels.tolist() == [5, 6, 4]
    assert torch.equal(got.images, imgs[[1, 2, 0]])
    dup = BackgroundPool(imgs, torch.tensor([4, 5, 6]), torch.tensor([1, 1, 2]))
    with pytest.raises(ConfigError, match="more than one"):
        gather_background_pool(dup, DistContext.single())


# ------------------------------------------------------------------------------------------------------------
# 2 ranks == 1 process
# ------------------------------------------------------------------------------------------------------------


def test_collectives_on_two_ranks(group):
    d, outs = group
    for o in outs:
        assert o["ragged"] == [[], [[0, 1], [2, 3], [4, 5]]]
        assert o["broadcast"] == {"from": 1}
        assert o["all_true"] == (True, False)
    assert (d / "main_first.log").read_text().split() == ["0", "1"]


def test_eval_two_ranks_equal_one_process(group, builtin_root, tiny_index, tiny_geometry, ckpt):
    from bgsynth.evaluate import evaluate
    from bgsynth.results import EvalRecords, load_result
    from bgsynth.models import Predictor, load_model

    d, outs = group
    single = evaluate(tiny_index, Predictor(load_model(str(ckpt)), device="cpu"), **_eval_kwargs(tiny_geometry))
    assert len(np.unique(single.records.pred)) > 2  # the net's predictions spread: the comparison means something
    assert single.config["single_decode"]
    for name in ("two_phase", "pool_first"):
        for o in outs:  # every rank holds the merged result
            got = o[f"eval_{name}"]
            recs = EvalRecords.from_columns(got["records"])
            for col in ("image_id", "variant", "label", "pred", "bg_id", "bg_label", "valid"):
                np.testing.assert_array_equal(getattr(recs, col), getattr(single.records, col), err_msg=f"{name}/{col}")
            assert got["metrics"] == single.metrics
            assert got["bg_gap"] == single.bg_gap
            for key in ("images", "planned", "split_images", "per_class", "rejects"):
                assert got["dataset"][key] == single.dataset[key], key
            assert got["timing"]["forwards"] == single.timing["forwards"]
            ranks = got["timing"]["ranks"]
            assert [r["images"] for r in ranks] == [len(shard_ids(tiny_index.select(split="val").ids, r, 2))
                                                   for r in range(2)]
            assert got["config"]["world_size"] == 2 and got["config"]["pool"]["size"] == single.config["pool"]["size"]
    assert outs[0]["eval_two_phase"]["config"]["single_decode"]
    assert not outs[0]["eval_pool_first"]["config"]["single_decode"]
    # one image on two ranks
    one = tiny_index.select(split="val", ids=tiny_index.select(split="val").ids[:1])
    ref = evaluate(one, Predictor(load_model(str(ckpt)), device="cpu"), **_eval_kwargs(tiny_geometry))
    for o in outs:
        assert o["eval_one"]["metrics"] == ref.metrics
        np.testing.assert_array_equal(EvalRecords.from_columns(o["eval_one"]["records"]).pred, ref.records.pred)
    # the CLI: rank 0 wrote the files, the same provenance as a single process
    assert [o["eval_cli_rc"] for o in outs] == [0, 0]
    cli = load_result(d / "eval_cli")
    assert cli.metrics == single.metrics
    np.testing.assert_array_equal(cli.records.pred, single.records.pred)
    np.testing.assert_array_equal(cli.records.bg_id, single.records.bg_id)


def _challenge_json(path: pathlib.Path) -> dict:
    d = json.loads((path / "challenge.json").read_text())
    d.pop("timing")
    d.pop("config")
    return d


def test_challenge_two_ranks_equal_one_process(group, builtin_root, tiny_index, tiny_geometry, ckpt_biased, tmp_path):
    import bgsynth.cli
    from bgsynth.challenge import ChallengeResult, merge_results, run_challenge
    from bgsynth.models import Predictor, load_model

    d, outs = group
    assert all(o["challenge_rc"] == [0, 0] for o in outs)
    # per-rank checkpoints
    assert sorted(p.name for p in (d / "ch_adaptive").glob("challenge.ckpt*")) == [
        "challenge.ckpt.rank0.npz", "challenge.ckpt.rank1.npz"]
    # full matrix: everything but the timing equals one process, to the bit
    ref = tmp_path / "ref_matrix"
    assert bgsynth.cli.main(_challenge_args(builtin_root, ckpt_biased, ref, "--full-matrix", "--fg-per-class", 3,
                                           "--bg-per-class", 3, "--batch-size", 64)) == 0
    assert _challenge_json(d / "ch_matrix") == _challenge_json(ref)
    a, b = ChallengeResult.load(d / "ch_matrix"), ChallengeResult.load(ref)
    np.testing.assert_array_equal(a.fool_bits, b.fool_bits)
    assert a.config["shards"] == [0, 1]
    # adaptive: the same answer as one process (each rank learns its own order, so the work differs) ...
    two = ChallengeResult.load(d / "ch_adaptive")
    pred = lambda: Predictor(load_model(str(ckpt_biased)), device="cpu")  # noqa: E731
    kw = dict(split="val", geometry=tiny_geometry, backend="pil", batch_size=16, progress=False)
    single = run_challenge(tiny_index, pred(), **kw)
    assert 0 < single.num_vulnerable < single.num_foregrounds
    np.testing.assert_array_equal(two.fg_ids, single.fg_ids)
    np.testing.assert_array_equal(two.vulnerable, single.vulnerable)
    assert two.accuracy == single.accuracy
    # the ranks exchanged their pair statistics (order sharing), so the work differs from two independent shards,
    # but every recorded fooling background really fools its foreground (checked against the full matrix)
    assert two.config["order_sharing"] == 8
    assert all(t["order_exchanges"] >= 1 for t in two.timing["shards"])
    shards = merge_results([run_challenge(tiny_index, pred(), shard_id=s, num_shards=2, **kw) for s in range(2)])
    np.testing.assert_array_equal(two.vulnerable, shards.vulnerable)
    full = run_challenge(tiny_index, pred(), full_matrix=True, **kw)
    np.testing.assert_array_equal(full.fg_ids, two.fg_ids)
    fooled = full.fooling_matrix()
    col = {int(b): j for j, b in enumerate(full.bg_ids)}
    for i in np.flatnonzero(two.vulnerable):
        assert fooled[i, col[int(two.fool_bg[i])]], int(two.fg_ids[i])
    assert (two.tried[~two.vulnerable] == two.num_backgrounds).all()


def test_prepare_two_ranks_same_index(group, tiny_index, tiny_geometry, tmp_path):
    from bgsynth.index import DatasetIndex
    from bgsynth.prepare import prepare

    d, outs = group
    single = prepare(tiny_index, out=tmp_path / "single.json", **_prepare_kwargs(tiny_geometry))
    rep = single.data["info"]["prepare"]
    assert rep["rejects"].get("grabcut_failed", 0) > 0 or rep["processed"] > 27  # the per-class waves had work

    def strip(data: dict) -> dict:
        data = json.loads(json.dumps(data))
        t = data["info"]["prepare"].pop("timing")
        assert t["resumed_from_journal"] == 0
        data["info"].pop("image_root")  # relative to where the index was saved
        return data

    written = json.loads((d / "prepared.json").read_text())
    assert strip(written) == strip(single.data)
    for o in outs:
        assert strip(o["prepare"]) == strip(single.data)
    a, b = DatasetIndex.load(d / "prepared.json"), DatasetIndex.load(tmp_path / "single.json")
    assert a.ids == b.ids and [os.path.realpath(a.record(i).path) for i in a.ids] == [
        os.path.realpath(b.record(i).path) for i in b.ids]
    assert outs[0]["prepare"]["info"]["prepare"]["timing"]["ranks"] == 2
    assert not list(d.glob("prepared.json.journal*"))  # every rank dropped its journal
    # killed, then resumed: the same index; the 2 x 4 images done before the kill came from the journals
    assert [o.get("prepare_crash") for o in outs] == ["simulated crash"] * 2
    assert outs[0]["journals"] == ["resumed.json.journal.rank0.jsonl", "resumed.json.journal.rank1.jsonl"]
    for o in outs:
        got = o["prepare_resumed"]
        assert got["info"]["prepare"]["timing"]["resumed_from_journal"] == 8
        got["info"]["prepare"]["timing"]["resumed_from_journal"] = 0
        assert strip(got) == strip(single.data)
    assert not list(d.glob("resumed.json.journal*"))  # the orphan of "rank 5" was merged and removed


def test_train_ddp_two_ranks(group):
    from bgsynth.models import load_model

    d, outs = group
    a, b = (o["train"] for o in outs)
    for k in a["state"]:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BatchNorm statistics are per rank
            assert torch.equal(a["state"][k], b["state"][k]), k  # DDP keeps the replicas identical
    assert a["history"] == b["history"] and a["steps"] == b["steps"] == 3
    assert a["images"] == 3 * 16  # the global batch
    assert a["stats"] == b["stats"] and sum(v["drawn"] for v in a["stats"].values()) == 3 * 16
    assert a["val"] == b["val"] and a["val"][1] == 54
    assert a["checkpoint"] == b["checkpoint"] == str(d / "ddp.pt")
    loaded = load_model(str(d / "ddp.pt"))
    for k, v in loaded.module.state_dict().items():
        assert torch.equal(v, a["state"][k]), k  # rank 0's weights


# ------------------------------------------------------------------------------------------------------------
# Failures
# ------------------------------------------------------------------------------------------------------------


def _worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` among the processes started with ``BGSYNTH_TEST_TAG=tag``."""
    want = {f"BGSYNTH_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = set((p / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:  # the launcher itself has no RANK in its environment
            return int(p.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_killed_rank_fails_the_job_then_resume_completes_it(builtin_root, ckpt_biased, tmp_path):
    """torchrun with 2 ranks: SIGKILL rank 1 after its first checkpoint -> the job exits non-zero; rerun with
    ``--resume`` -> the same result as one process (full matrix: to the bit)."""
    import bgsynth.cli

    tag = uuid.uuid4().hex
    env = _env(BGSYNTH_TEST_TAG=tag)
    out = tmp_path / "run"
    args = _challenge_args(builtin_root, ckpt_biased, out, "--full-matrix", "--fg-per-class", 3, "--bg-per-class", 3,
                           "--batch-size", 1, "--checkpoint-every", 0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bgsynth.cli"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    ck1 = out / "challenge.ckpt.rank1.npz"
    deadline = time.monotonic() + 180
    pid = None
    while proc.poll() is None and time.monotonic() < deadline:
        if ck1.exists():
            pid = _worker_pid(tag, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.002)
    assert pid is not None, (tmp_path / "killed.log").read_text()
    rc = proc.wait(timeout=120)  # torchrun tears the group down: no hang
    log.close()
    assert rc != 0, (tmp_path / "killed.log").read_text()
    assert not (out / "challenge.json").exists()
    with np.load(ck1) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert 0 < meta["forwards"] < 27 * 27 // 2  # rank 1 was killed half-way through its shard

    done = subprocess.run([*cmd, *args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads((out / "challenge.json").read_text())
    assert res["timing"]["shards"][1]["resumed"]  # rank 1 went on from its checkpoint (rank 0 may have had none yet)
    ref = tmp_path / "ref"
    assert bgsynth.cli.main(_challenge_args(builtin_root, ckpt_biased, ref, "--full-matrix", "--fg-per-class", 3,
                                           "--bg-per-class", 3, "--batch-size", 64)) == 0
    assert _challenge_json(out) == _challenge_json(ref)
    with np.load(out / "challenge_matrix.npz") as a, np.load(ref / "challenge_matrix.npz") as b:
        np.testing.assert_array_equal(a["fool_bits"], b["fool_bits"])


_STALL = """
import sys, time
from bgsynth.distributed import DistributedError, init_distributed
ctx = init_distributed()
if ctx.rank == 1:
    time.sleep(600)  # stalled: never reaches the gather
t0 = time.monotonic()
try:
    ctx.all_gather_object({"rank": ctx.rank})
except DistributedError as e:
    print(f"waited {time.monotonic() - t0:.1f} s: {e}", file=sys.stderr)
    sys.exit(3)
"""


def test_stalled_rank_times_out():
    """Two ranks started by hand (no torchrun to supervise them); rank 1 stalls. Rank 0's collective gives up
    after ``BGSYNTH_DIST_TIMEOUT`` seconds with a :class:`DistributedError` instead of hanging."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _STALL], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, BGSYNTH_DIST_TIMEOUT=3))
             for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=120)  # a guard against a hang, not a speed assertion
        assert procs[0].returncode == 3, err[-3000:]
        assert "all_gather_object failed" in err and "BGSYNTH_DIST_TIMEOUT" in err and "timeout of 3 s" in err
        assert procs[1].poll() is None  # the stalled rank is still there: rank 0 did not wait for it to exit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
