"""Scaling with ranks: ``bgsynth eval`` and ``bgsynth challenge`` on 1 process vs 2 torchrun ranks, side by side.

Each configuration runs the real CLI in a fresh process group, exactly as a user would launch it:

* **1 process**: ``python -m bgsynth.cli <command> ...`` (``OMP_NUM_THREADS=--threads``);
* **N ranks**: ``python -m torch.distributed.run --standalone --nproc_per_node=N -m bgsynth.cli <command> ...``
  (gloo on CPU, ``OMP_NUM_THREADS=--threads`` per rank).

Measured: ``eval`` (all eight variants), ``challenge`` (the default adaptive search: each foreground stops at its
first fooling background) and ``challenge-matrix`` (``--full-matrix``: every pair; the forward-bound regime
of robust foregrounds). Reported, medians over ``--repeats`` runs after one warm-up launch:

* wall seconds of the work (the command's own timer: from the index to the merged result) and of the whole
  launch (process start, imports and rendezvous included), and the speedups 1 process / N ranks;
* per-rank balance: images, forwards and seconds of each rank (eval: ``timing.ranks``; challenge:
  ``timing.shards``), with the imbalance max / mean;
* challenge only: the forwards of the N shards together against the single run's (each rank learns its own
  adaptive background order from its shard, so the search spends a little more in total), and, from the single
  run's per-foreground costs, the imbalance that other ways of cutting the shards would have had (the sorted ids
  strided by rank, which is :func:`bgsynth.distributed.shard_ids`; contiguous blocks; a hashed permutation) for
  2, 4, 8 and 16 ranks.

The results are checked: the N-rank eval records and challenge answer (and full matrix) must equal the single
process's. The model is the demo CNN trained briefly on Mixed-Rand (``--train-epochs``; cached in the bgsynth
cache folder) so that the challenge has robust (expensive) as well as vulnerable (cheap) foregrounds, or
``--model CKPT``.

Usage::

    python benchmarks/bench_scaling.py                          # small built-in dataset, 1 vs 2 ranks on CPU
    python benchmarks/bench_scaling.py --val-per-class 50 --repeats 3
    python benchmarks/bench_scaling.py --index /data/in9/index.json --model ckpt.pt --device cuda --ranks 8

On N GPUs (one rank per GPU; NCCL)::

    torchrun --standalone --nproc_per_node=N -m bgsynth.cli eval INDEX --model CKPT --device cuda --out eval-run
    torchrun --standalone --nproc_per_node=N -m bgsynth.cli challenge INDEX --model CKPT --device cuda --out ch-run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(ranks: int, args: list[str], threads: int) -> float:
    """Run the CLI on ``ranks`` processes; returns the launch's wall seconds."""
    cmd = [sys.executable, "-m", "bgsynth.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "bgsynth.cli"]
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, *args], cwd=REPO, env=_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"bench_scaling: {' '.join(cmd + args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def _imbalance(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.max() / v.mean()) if len(v) and v.mean() > 0 else float("nan")


def _model(args, index_path: str) -> str:
    if args.model:
        return args.model
    from bgsynth.geometry import CropGeometry
    from bgsynth.sources.synthetic import default_cache_dir
    from bgsynth.train import train

    key = hashlib.sha256(f"{pathlib.Path(index_path).resolve()}|{args.train_epochs}|{args.resize}|{args.crop}".encode())
    out = default_cache_dir() / f"bench_scaling-{key.hexdigest()[:12]}.pt"
    if not out.is_file():
        print(f"training the demo CNN on Mixed-Rand for {args.train_epochs} epochs (the challenge needs robust "
              f"foregrounds; cached as {out}) ...", flush=True)
        train(index_path, epochs=args.train_epochs, batch_size=32, geometry=CropGeometry(args.resize, args.crop),
              augment="mixed_rand=1.0", backend=args.backend, device="cpu", out=out, progress=False, val_split=None)
    return str(out)


def _cut_costs(fg_ids: np.ndarray, cost: np.ndarray, ranks: int) -> dict[str, float]:
    """Imbalance (max / mean of the per-rank sums of ``cost``) of three ways to cut the foregrounds into shards."""
    from bgsynth.distributed import shard_ids

    order = np.argsort(fg_ids)
    ids, c = fg_ids[order], cost[order]
    pos = {int(i): k for k, i in enumerate(ids)}
    strided = [c[[pos[i] for i in shard_ids(ids, r, ranks)]].sum() for r in range(ranks)]
    blocks = [b.sum() for b in np.array_split(c, ranks)]
    key = np.array([int(hashlib.blake2b(str(int(i)).encode(), digest_size=8).hexdigest(), 16) for i in ids])
    hashed = [c[np.argsort(key, kind="stable")][r::ranks].sum() for r in range(ranks)]
    return {"strided (shard_ids)": _imbalance(strided), "contiguous blocks": _imbalance(blocks),
            "hashed permutation": _imbalance(hashed)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="dataset index (default: the built-in dataset, sizes below)")
    ap.add_argument("--train-per-class", type=int, default=24, help="built-in dataset: train images per class")
    ap.add_argument("--val-per-class", type=int, default=12, help="built-in dataset: val images per class")
    ap.add_argument("--model", default=None, help="checkpoint to evaluate (default: train the demo CNN briefly)")
    ap.add_argument("--train-epochs", type=int, default=10, help="epochs of the demo CNN when no --model is given")
    ap.add_argument("--resize", type=int, default=72, help="crop geometry: shorter side")
    ap.add_argument("--crop", type=int, default=64, help="crop geometry: centre crop")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the distributed runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median reported)")
    ap.add_argument("--device", default="cpu", help="device of every rank ('cuda': one GPU per rank)")
    ap.add_argument("--backend", default="pil", help="decode backend")
    ap.add_argument("--batch-size", type=int, default=64, help="eval images per batch / challenge composites per forward")
    ap.add_argument("--commands", default="eval,challenge,challenge-matrix", help="which commands to measure")
    args = ap.parse_args(argv)

    if args.index is None:
        from bgsynth.sources.synthetic import build_builtin_dataset

        index_path = str(build_builtin_dataset(train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                               progress=False))
    else:
        index_path = args.index
    model = _model(args, index_path)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_scaling."))
    try:
        return _measure(args, ap, index_path, model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, ap, index_path: str, model: str, work: pathlib.Path) -> int:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"index {index_path}\nmodel {model}\n{os.cpu_count()} CPUs (load average {load:.1f}), {args.threads} "
          f"thread(s) per process, device {args.device}, geometry {args.resize}->{args.crop}, "
          f"{args.repeats} timed run(s) per configuration after a warm-up launch\n", flush=True)
    common = [index_path, "--model", model, "--device", args.device, "--backend", args.backend, "--no-progress",
              "--resize", str(args.resize), "--crop", str(args.crop), "--batch-size", str(args.batch_size)]
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    for c in commands:
        if c not in ("eval", "challenge", "challenge-matrix"):
            ap.error(f"--commands: expected eval, challenge, challenge-matrix; got {c!r}")
    # warm-up: page cache, imports, the launcher's first start
    _launch(args.ranks, ["eval", *common, "--no-report", "--examples-per-class", "0", "--out", str(work / "warm-up")],
            args.threads)
    rows = []
    for command in commands:
        runs: dict[int, list[dict]] = {1: [], args.ranks: []}
        for ranks in (1, args.ranks):
            for rep in range(args.repeats):
                out = work / f"{command}-{ranks}-{rep}"
                extra = (["--no-report", "--provenance", "--examples-per-class", "0"] if command == "eval"
                         else ["--no-plots", "--checkpoint-every", "3600"])
                if command == "challenge-matrix":
                    extra.append("--full-matrix")
                cli = "challenge" if command.startswith("challenge") else command
                launch = _launch(ranks, [cli, *common, *extra, "--out", str(out)], args.threads)
                if command == "eval":
                    res = json.loads((out / "results.json").read_text())
                    t = res["timing"]
                    per = t.get("ranks") or [{"rank": 0, "images": t["images"], "forwards": t["forwards"],
                                              "seconds": t["seconds"]}]
                    runs[ranks].append({"launch": launch, "work": t["seconds"], "per": per,
                                        "answer": (out / "provenance.csv").read_bytes(), "forwards": t["forwards"]})
                else:
                    res = json.loads((out / "challenge.json").read_text())
                    t = res["timing"]
                    shards = t.get("shards") or [t]
                    per = [{"rank": k, "images": None, "forwards": s["forwards_this_process"], "seconds": s["wall_s"]}
                           for k, s in enumerate(shards)]
                    fg = res["foregrounds"]
                    answer = [(r["id"], r["vulnerable"]) for r in fg]
                    if command == "challenge-matrix":
                        with np.load(out / "challenge_matrix.npz") as z:
                            answer = (answer, hashlib.sha256(z["fool_bits"].tobytes()).hexdigest())
                    runs[ranks].append({"launch": launch, "work": t["wall_s"], "per": per, "answer": answer,
                                        "forwards": res["work"]["forwards"], "fg": fg,
                                        "n_bg": res["backgrounds"]})
        one, many = runs[1], runs[args.ranks]
        same = all(r["answer"] == one[0]["answer"] for r in one + many)
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        rows.append((command, one, many, same, med))

    print(f"{'command':<17} {'ranks':>5} {'work s':>8} {'launch s':>9} {'forwards':>9}   per rank: forwards / seconds")
    for command, one, many, same, med in rows:
        for ranks, rs in ((1, one), (args.ranks, many)):
            per = rs[len(rs) // 2]["per"]
            desc = ", ".join(f"r{p['rank']}: {p['forwards']} / {p['seconds']:.2f}s" for p in per)
            print(f"{command:<17} {ranks:>5} {med(rs, 'work'):>8.2f} {med(rs, 'launch'):>9.2f} "
                  f"{int(med(rs, 'forwards')):>9}   {desc}")
    print()
    for command, one, many, same, med in rows:
        per = many[len(many) // 2]["per"]
        print(f"{command}: speedup {args.ranks} ranks vs 1 process: work x{med(one, 'work') / med(many, 'work'):.2f}, "
              f"launch x{med(one, 'launch') / med(many, 'launch'):.2f}; per-rank imbalance (max/mean): forwards "
              f"{_imbalance([p['forwards'] for p in per]):.3f}, seconds {_imbalance([p['seconds'] for p in per]):.3f}; "
              f"result identical to 1 process: {'yes' if same else 'NO'}")
        if command == "challenge":
            f1, fn = med(one, "forwards"), med(many, "forwards")
            print(f"challenge: forwards of the {args.ranks} shards together / single run: {fn / f1:.3f} "
                  f"(the cost of each rank learning its own background order)")
            fg = one[0]["fg"]
            ids = np.array([r["id"] for r in fg])
            tried = np.array([r["tried"] for r in fg], dtype=np.float64)
            oracle = np.array([1.0 if r["vulnerable"] else one[0]["n_bg"] for r in fg])
            print(f"challenge: {int((~np.array([r['vulnerable'] for r in fg])).sum())} robust of {len(fg)} "
                  f"foregrounds; imbalance (max/mean) of per-rank cost if the foregrounds were cut ...")
            print(f"  {'ranks':>5}  {'cut':<20} {'by tried':>9} {'by oracle':>10}")
            for r in (2, 4, 8, 16):
                if r > len(fg):
                    break
                a, b = _cut_costs(ids, tried, r), _cut_costs(ids, oracle, r)
                for name in a:
                    print(f"  {r:>5}  {name:<20} {a[name]:>9.3f} {b[name]:>10.3f}")
        if not same:
            print(f"{command}: the {args.ranks}-rank result differs from the single process!", file=sys.stderr)
            return 1
    print(f"\nOn N GPUs: torchrun --standalone --nproc_per_node=N -m bgsynth.cli eval {index_path} --model {model} "
          f"--device cuda --out eval-run\n           torchrun --standalone --nproc_per_node=N -m bgsynth.cli challenge "
          f"{index_path} --model {model} --device cuda --out challenge-run\n(Slurm: see docs/cluster.md.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
