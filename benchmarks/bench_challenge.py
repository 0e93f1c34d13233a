"""The Backgrounds Challenge: bgsynth's search vs the official loop's method, same model, same data, one run.

* **ours**: :func:`bgsynth.challenge.run_challenge`: backgrounds decoded once and resident, foreground x
  background pairs composited in batches by :func:`bgsynth.variants.composite`, a foreground leaves the search when
  it is fooled, adaptive order (most fooling backgrounds for the foreground's class first). Timed from the index to the
  result (background pool and foreground decode included). Also run with ``order='reference'`` (fixed order,
  same batching and early stop) as an ablation of the adaptive order.
* **reference**, written here from PAPER.md ("How the reference tools work") and the official
  ``challenge_eval.py``: for each foreground, in a fixed order, the backgrounds are decoded again from JPEG with
  PIL (resize + centre crop, Only-BG-T tiling in NumPy), composited on the CPU as
  ``bg * (1 - mask) + mask * fg``, normalised and sent to the model in batches of 32; the loop stops after the
  first batch holding a fooling background. It is *kinder* than the official script: no DataLoader (and its
  worker processes) re-created per foreground, and inference mode instead of autograd.

Same model, same geometry, same device and thread count. The demo model is the small ``bgsynth_cnn`` trained
briefly on the built-in dataset's train split (or ``--model CKPT``). Reported per method: images forwarded (the
honest unit of work; measured, both sides), wall seconds and CPU seconds (robust to other load on a shared
machine), plus the oracle lower bound of any exact method (robust x N + vulnerable) and brute force (F x N). The
vulnerable sets of all methods are compared (they must agree).

Also printed, in the same run: the search's forwards per second (:attr:`ChallengeResult.timing`, index to result)
against the **model-only bound** (the same model's forward alone at the run's batch size, pre-made normalised
tensors in memory), and a **robust-model case** (``--skip-robust`` to leave it out): the same network with one
class's output bias raised by 1e4, so that it answers that class on every composite, searched over that class's
val foregrounds: every background must be tried for every foreground, and the per-forward rate is compared with
the bound.

Usage::

    python benchmarks/bench_challenge.py                              # ~2 min on 2 CPU cores
    python benchmarks/bench_challenge.py --fg-per-class 12 --bg-per-class 12 --model demo.pt
    python benchmarks/bench_challenge.py --device cuda --val-per-class 50 --fg-per-class 50 --bg-per-class 50
    python benchmarks/bench_challenge.py --augment mixed_rand=0.5 --skip-robust   # the needles case
    python benchmarks/bench_challenge.py --index PREPARED.json --model DEMO.pt --fg-per-class 25 --bg-per-class 25 \
        --skip-reference                                                        # the demo's challenge
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

from _common import Timer, load_average, paper_decode, paper_only_bg_t  # noqa: E402  (benchmarks/_common.py: shared timing and paper reference)

from bgsynth.challenge import challenge_foregrounds, run_challenge  # noqa: E402
from bgsynth.geometry import CropGeometry  # noqa: E402
from bgsynth.index import DatasetIndex  # noqa: E402
from bgsynth.models import Predictor, load_model  # noqa: E402

REF_BATCH = 32


# ----------------------------------------------------------------------------------------------- the reference loop
def reference_challenge(index: DatasetIndex, fg_ids, bg_ids, model: torch.nn.Module, mean, std,
                        geometry: CropGeometry, device: torch.device) -> tuple[np.ndarray, int]:
    """The official method: per foreground, backgrounds re-decoded in fixed order, batches of 32, early stop.

    Returns:
        (vulnerable bool [F], images forwarded)
    """
    m = torch.tensor(mean).view(1, 3, 1, 1).to(device)
    s = torch.tensor(std).view(1, 3, 1, 1).to(device)
    labels = index.labels(fg_ids)
    vulnerable = np.zeros(len(fg_ids), bool)
    forwards = 0
    for k, fid in enumerate(fg_ids):
        img, mask, _ = paper_decode(index.record(fid), geometry)
        fg = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
        mk = torch.from_numpy(mask.astype(np.float32))[None]
        for start in range(0, len(bg_ids), REF_BATCH):
            bgs = []
            for bid in bg_ids[start : start + REF_BATCH]:  # decoded again for every foreground
                b_img, _, b_box = paper_decode(index.record(bid), geometry)
                bgs.append(torch.from_numpy(paper_only_bg_t(b_img, b_box)).permute(2, 0, 1))
            inp = torch.stack(bgs).float() / 255.0
            combined = inp * (1 - mk) + mk * fg
            with torch.inference_mode():
                out = model(((combined.to(device) - m) / s))
            pred = out.argmax(1).cpu().numpy()
            pred = np.where(pred < 9, pred, -1)
            forwards += len(bgs)
            if (pred != labels[k]).any():
                vulnerable[k] = True
                break
    return vulnerable, forwards


# ----------------------------------------------------------------------------------------------- the model-only bound
def model_bound(predictor: Predictor, batch: int, crop: int, n_forwards: int, repeats: int = 2) -> float:
    """Forwards per second of the model alone at ``batch`` composites per forward: pre-made normalised batches in
    memory (random uint8 through :meth:`Predictor.prepare`: the predictor's dtype and memory format), the bare
    module under ``torch.inference_mode``, about ``n_forwards`` composites in all (median of ``repeats``)."""
    g = torch.Generator().manual_seed(0)
    k = max(1, -(-n_forwards // batch))
    xs = [predictor.prepare(torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=g))
          for _ in range(min(k, 8))]
    net = predictor.module
    rates = []
    with torch.inference_mode():
        net(xs[0])
        for _ in range(repeats):
            with Timer() as t:
                for j in range(k):
                    net(xs[j % len(xs)])
            rates.append(k * batch / t.wall)
    return sorted(rates)[len(rates) // 2]


def robust_predictor(predictor: Predictor, label: int) -> Predictor:
    """The same network with its output bias for ``label`` raised by 1e4: it answers ``label`` on every input at the
    cost of the real forward. Foregrounds of that class are fooled by no background: the search must try all."""
    import copy

    net = copy.deepcopy(predictor.module)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[label] += 1e4
    import dataclasses

    loaded = dataclasses.replace(predictor.loaded, module=net)
    return Predictor(loaded, device=predictor.device, amp=predictor.amp)


def robust_case(index, predictor: Predictor, common: dict, args) -> None:
    """Every background tried for every foreground: the search's per-forward rate against the model-only bound."""
    label = 0
    rp = robust_predictor(predictor, label)
    fg = challenge_foregrounds(index.select(classes=[label]), "val", seed=args.seed)
    run_challenge(index, rp, **{**common, "fg_ids": fg[:2], "bg_per_class": 1})  # warm-up
    with Timer() as t:
        res = run_challenge(index, rp, order="adaptive", **{**common, "fg_ids": fg})
    rate = res.timing["forwards_per_s"]
    bound = model_bound(rp, args.batch_size, args.crop, res.forwards)
    print(f"\nrobust case: the model with class {label}'s output bias +1e4 (it always answers {label}); the "
          f"{res.num_foregrounds} val foregrounds of class {label} x {res.num_backgrounds} backgrounds; "
          f"{res.num_robust} robust, {res.num_vulnerable} vulnerable")
    print(f"  ours: {res.forwards:,} forwards (brute force {res.brute_force_forwards:,}) in {t.wall:.2f} s wall "
          f"(run_challenge timing {res.timing['wall_s']:.2f} s): {rate:.0f} forwards/s; {load_average()}")
    print(f"  model-only bound at batch {args.batch_size}: {bound:.0f} forwards/s; ours / bound: "
          f"{rate / bound:.1%}; {load_average()}")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="dataset index (default: the built-in dataset)")
    ap.add_argument("--train-per-class", type=int, default=24, help="built-in dataset: train images per class")
    ap.add_argument("--val-per-class", type=int, default=12, help="built-in dataset: val images per class")
    ap.add_argument("--model", default=None, help="model checkpoint (default: train bgsynth_cnn briefly here)")
    ap.add_argument("--train-epochs", type=int, default=8, help="epochs of the brief training")
    ap.add_argument("--augment", default=None,
                    help="training augmentation, e.g. 'mixed_rand=0.5' (a more background-robust model: more robust "
                         "foregrounds, the regime where every method must try every background)")
    ap.add_argument("--fg-per-class", type=int, default=8, help="foregrounds per class (seeded subset)")
    ap.add_argument("--bg-per-class", type=int, default=12, help="backgrounds per class (seeded subset)")
    ap.add_argument("--resize", type=int, default=72)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="ours: composites per forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (both sides; default: the CLI's split, bgsynth.evaluate.cpu_thread_split)")
    ap.add_argument("--decode-threads", type=int, default=None, help="our decoder threads (default: the CLI's split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-reference", action="store_true", help="only run ours (e.g. on a full IN-9 set)")
    ap.add_argument("--skip-robust", action="store_true", help="skip the robust-model case")
    args = ap.parse_args(argv)

    from bgsynth.evaluate import cpu_thread_split

    device = torch.device(args.device)
    args.threads, decode_threads = cpu_thread_split(device, args.threads, args.decode_threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}; {load_average()}")
    geometry = CropGeometry(args.resize, args.crop)
    if args.index is None:
        from bgsynth.sources.synthetic import build_builtin_dataset

        path = build_builtin_dataset(train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                     seed=args.seed, progress=False)
    else:
        path = args.index
    index = DatasetIndex.load(path)

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.model
    if ckpt is None:
        from bgsynth.train import train

        with Timer() as t_train:
            tr = train(index, epochs=args.train_epochs, geometry=geometry, device=device, seed=args.seed,
                       out=pathlib.Path(tmp.name) / "demo.pt", progress=False, backend="pil", augment=args.augment)
        ckpt = tr.checkpoint
        print(f"trained bgsynth_cnn for {args.train_epochs} epochs (augment: {args.augment or 'none'}) in "
              f"{t_train.wall:.0f} s (val accuracy {tr.val_accuracy:.1%})")
    loaded = load_model(ckpt)
    predictor = Predictor(loaded, device=device, amp=None)

    fg_ids = challenge_foregrounds(index, "val", fg_per_class=args.fg_per_class, seed=args.seed)
    common = dict(split="val", geometry=geometry, backend="pil", device=device, seed=args.seed, fg_ids=fg_ids,
                  bg_per_class=args.bg_per_class, batch_size=args.batch_size, progress=False,
                  num_threads=decode_threads)
    # warm-up (imports, first-call allocations), not timed
    run_challenge(index, predictor, **{**common, "fg_ids": fg_ids[:2], "bg_per_class": 1})

    rows = []
    with Timer() as t:
        ours = run_challenge(index, predictor, order="adaptive", **common)
    rows.append(("ours (adaptive order)", ours.forwards, t.wall, t.cpu, ours.vulnerable))
    with Timer() as t:
        fixed = run_challenge(index, predictor, order="reference", **common)
    rows.append(("ours (fixed order)", fixed.forwards, t.wall, t.cpu, fixed.vulnerable))
    F, N = ours.num_foregrounds, ours.num_backgrounds
    if not args.skip_reference:
        with Timer() as t:
            ref_vul, ref_fw = reference_challenge(index, list(ours.fg_ids), list(ours.bg_ids), predictor.module.float(),
                                                  predictor.mean, predictor.std, geometry, device)
        rows.append(("reference loop (official method)", ref_fw, t.wall, t.cpu, ref_vul))

    print(f"\nBackgrounds Challenge on {F} foregrounds x {N} backgrounds "
          f"({args.resize}->{args.crop}, {device}, {args.threads} threads): accuracy {ours.accuracy:.1%} "
          f"({ours.num_vulnerable} vulnerable, {ours.num_robust} robust)")
    print(f"oracle bound (robust x N + vulnerable) = {ours.oracle_forwards:,} forwards; brute force F x N = "
          f"{ours.brute_force_forwards:,}")
    lo, hi = ours.reference_forwards_bounds()
    print(f"official order's cost derived from our run: {lo:,} .. {hi:,} forwards (measured below)")
    print(f"\n{'method':<34} {'forwards':>10} {'x bound':>8} {'wall s':>8} {'cpu s':>8} {'same answer':>12}")
    for name, fw, wall, cpu, vul in rows:
        same = bool(np.array_equal(vul, ours.vulnerable))
        print(f"{name:<34} {fw:>10,} {fw / max(ours.oracle_forwards, 1):>8.3f} {wall:>8.2f} {cpu:>8.2f} "
              f"{'yes' if same else 'NO':>12}")
    if not args.skip_reference:
        ref = rows[-1]
        print(f"\nratios reference / ours (adaptive): forwards {ref[1] / max(ours.forwards, 1):.1f}x, "
              f"wall {ref[2] / rows[0][2]:.1f}x, cpu {ref[3] / rows[0][3]:.1f}x")
    print(f"ours (adaptive) / oracle bound: {ours.forwards / max(ours.oracle_forwards, 1):.3f}; "
          f"brute force / ours: {ours.brute_force_forwards / max(ours.forwards, 1):.1f}x; {load_average()}")
    bound = model_bound(predictor, args.batch_size, args.crop, ours.forwards)
    rate = ours.timing["forwards_per_s"]
    print(f"\nforwards/s (run_challenge timing, index to result): ours {rate:.0f}; model-only bound at batch "
          f"{args.batch_size} (pre-made tensors in memory): {bound:.0f}; ours / bound: {rate / bound:.1%}; "
          f"{load_average()}")
    if not args.skip_robust:
        robust_case(index, predictor, common, args)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
