"""Variants/s of the batched engine vs a per-image reference, side by side in one run.

* **ours**: :func:`bgsynth.variants.synthesize` on decoded :class:`~bgsynth.types.Batch` es (torch kernels
  on the CPU; the Triton kernels on CUDA).
* **reference**: the paper's procedure one image at a time with NumPy, as the authors' generation script does it
  (PAPER.md: "one image at a time on the CPU"): strip rule in Python, slicing/``np.tile`` for the variants, Mixed-*
  background picked per image from in-memory Only-BG-T images (more generous than the script, which reads them
  back from JPEG files).

Both start from the same decoded crops (built-in dataset via the ``pil`` loader by default, or random data) and
produce uint8 crops in the same memory layout (the reference's ``H x W x 3`` arrays, ours channels_last ``[B,3,H,W]``)
or, with ``--normalize``, normalised float32 ``[3,H,W]`` / ``[B,3,H,W]`` tensors as a model would take them. Decoding is
not timed. Warm-up first, then the median of ``--repeat`` runs, timed as this process's CPU time
(``time.process_time``: with one thread it equals wall time on an idle machine, and it is robust to other load on a
shared one).

Paper vs crop tiling (``--tiling-images``, on by default): the paper's Only-BG-T is tiled on the stored image at
full resolution and then resized (a second resize per image, done while decoding), the crop approximation tiles
the decoded crop. Both are timed end to end from the JPEG files (decode + Only-BG-T), per decode backend, as
wall time and CPU time, and as the one-time cost of building the resident background pool; the eval-throughput
side is in ``bench_eval.py --tiling``.

On CUDA (when present) it also measures the Triton path on device-resident data: composites/s of one fused
Mixed-Rand composite (gather + select + normalise + bf16 + channels_last) and of Only-BG-T, and the achieved
memory bandwidth (bytes read + written / time) as a share of the device's peak, by the code of ``bgsynth bench``
(:func:`bgsynth.bench.kernel_bandwidth`).

The speed target of the CPU path (``--target``, 3x by default) is checked on the "all 8" row; the load average is
printed beside every figure (the machine may be shared).

Usage::

    python benchmarks/bench_variants.py                       # small built-in dataset, 256 -> 224, CPU
    python benchmarks/bench_variants.py --data random --batch 128 --normalize
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

from _common import paper_only_bg_t  # noqa: E402  (benchmarks/_common.py: shared timing and paper reference)

from bgsynth.geometry import CropGeometry, tile_strips  # noqa: E402
from bgsynth.types import Batch  # noqa: E402
from bgsynth.variants import VARIANT_NAMES, background_pool_from_batch, synthesize  # noqa: E402

MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)


# ----------------------------------------------------------------------------------------------- the reference
def reference_variant(name, img, mask, box, label, image_id, pool, rng_seed):
    """One variant of one image (``H x W x 3`` uint8), the per-image way."""
    x0, y0, x1, y1 = box
    if name == "original":
        return img.copy()
    if name == "only_bg_b":
        out = img.copy()
        out[y0 : y1 + 1, x0 : x1 + 1] = 0
        return out
    if name == "only_bg_t":
        return paper_only_bg_t(img, box)
    m = mask.astype(bool)
    if name == "no_fg":
        out = img.copy()
        out[m] = 0
        return out
    if name == "only_fg":
        out = img.copy()
        out[~m] = 0
        return out
    target = {"mixed_same": label, "mixed_next": (label + 1) % 9, "mixed_rand": None}[name]
    cands = [k for k, (lab, _) in pool.items() if k != image_id and (target is None or lab == target)]
    if not cands:
        return None
    bg = pool[cands[np.random.default_rng((rng_seed, image_id)).integers(len(cands))]][1]
    out = bg.copy()
    out[m] = img[m]
    return out


def reference_run(names, samples, pool, normalize: bool):
    out = []
    for img, mask, box, label, iid in samples:
        for name in names:
            v = reference_variant(name, img, mask, box, label, iid, pool, 0)
            if v is not None and normalize:
                v = torch.from_numpy(((v.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1).copy())
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------- data
def load_batches(args) -> list[Batch]:
    geometry = CropGeometry(args.resize, args.crop)
    if args.data == "builtin":
        from bgsynth.pipeline import create_loader
        from bgsynth.sources.synthetic import load_builtin_index

        index = load_builtin_index(small=True, progress=False).select(split="val")
        if args.images:
            index = index.select(ids=index.ids[: args.images])
        # crop tiling: Only-BG-T is then made by the tiling kernel here (with paper tiling the decoder makes it)
        return list(create_loader(index, backend="pil", geometry=geometry, batch_size=args.batch, prefetch=0,
                                  tiling="crop"))
    g = torch.Generator().manual_seed(0)
    n, c = args.images or 256, args.crop
    batches = []
    for start in range(0, n, args.batch):
        b = min(args.batch, n - start)
        x0 = torch.randint(0, c // 3, (b,), generator=g)
        y0 = torch.randint(0, c // 3, (b,), generator=g)
        x1 = x0 + torch.randint(c // 4, c // 2, (b,), generator=g)
        y1 = y0 + torch.randint(c // 4, c // 2, (b,), generator=g)
        boxes = torch.stack([x0, y0, x1, y1], -1).to(torch.int32)
        strips = tile_strips(boxes, c, c)
        yy, xx = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
        masks = ((xx[None] >= x0[:, None, None] + 4) & (xx[None] <= x1[:, None, None] - 4)
                 & (yy[None] >= y0[:, None, None] + 4) & (yy[None] <= y1[:, None, None] - 4)).to(torch.uint8)[:, None]
        batches.append(Batch(
            torch.randint(0, 256, (b, 3, c, c), generator=g, dtype=torch.uint8), masks, boxes, strips,
            torch.randint(0, 9, (b,), generator=g), torch.arange(start, start + b), torch.ones(b, dtype=torch.bool),
            strips[:, 2] > 0,
        ))
    return batches


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _median_time(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- CUDA
def bench_cuda(args) -> None:
    """Triton vs the torch reference on device-resident data: composites/s and achieved bandwidth, by the same
    code as ``bgsynth bench`` (:func:`bgsynth.bench.kernel_bandwidth`)."""
    from bgsynth.bench import kernel_bandwidth

    dev = torch.device("cuda")
    b = args.cuda_batch
    tri = kernel_bandwidth(dev, batch=b, pool=args.cuda_pool, crop=args.crop, backend="triton")
    ref = kernel_bandwidth(dev, batch=b, pool=args.cuda_pool, crop=args.crop, backend="torch", iters=5)
    print(f"\nCUDA ({torch.cuda.get_device_name(dev)}), batch {b}, pool {args.cuda_pool}, {args.crop}x{args.crop}:")
    print(f"{'kernel':<30}{'triton img/s':>14}{'GB/s':>9}{'of peak':>9}{'torch img/s':>14}{'ratio':>8}")
    for t, r in zip(tri, ref):
        share = "-" if t["share_of_peak"] is None else f"{100 * t['share_of_peak']:.0f}%"
        print(f"{t['kernel']:<30}{b / t['seconds']:>14,.0f}{t['gb_per_s']:>9,.0f}{share:>9}{b / r['seconds']:>14,.0f}"
              f"{r['seconds'] / t['seconds']:>7.1f}x")


# ----------------------------------------------------------------------------------------------- tiling
def bench_tiling(args) -> None:
    """Decode + Only-BG-T images/s with paper tiling vs crop tiling, per decode backend, and the pool build."""
    from _common import Timer

    from bgsynth.pipeline import available_backends, create_loader
    from bgsynth.pool import build_background_pool
    from bgsynth.sources.synthetic import load_builtin_index

    geometry = CropGeometry(args.resize, args.crop)
    index = load_builtin_index(small=True, progress=False).select(split="val")
    if args.tiling_images:
        index = index.select(ids=index.ids[: args.tiling_images])
    n = len(index)

    def run(backend, tiling):
        loader = create_loader(index, backend=backend, geometry=geometry, batch_size=args.batch, tiling=tiling,
                               num_threads=args.decode_threads)
        for bt in loader:
            synthesize(bt, ["only_bg_t"], backend="torch")
        loader.close()

    print(f"\npaper vs crop tiling: decode + Only-BG-T of {n} built-in val JPEGs ({args.resize} -> {args.crop}), "
          f"{args.decode_threads} decode thread(s), median of {args.repeat}; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{'backend':<13}{'crop img/s':>11}{'paper img/s':>12}{'paper/crop':>11}{'crop CPU ms':>12}{'paper CPU ms':>13}")
    for backend in [b for b in ("pil", "torchvision", "dali") if b in available_backends()]:
        res = {}
        for tiling in ("crop", "paper"):
            run(backend, tiling)  # warm-up (DALI builds its pipeline)
            walls, cpus = [], []
            for _ in range(args.repeat):
                with Timer() as t:
                    run(backend, tiling)
                walls.append(t.wall)
                cpus.append(t.cpu)
            res[tiling] = (statistics.median(walls), statistics.median(cpus))
        (wc, cc), (wp, cp) = res["crop"], res["paper"]
        print(f"{backend:<13}{n / wc:>11,.0f}{n / wp:>12,.0f}{wc / wp:>10.2f}x{1e3 * cc / n:>12.2f}{1e3 * cp / n:>13.2f}")
    for tiling in ("crop", "paper"):
        with Timer() as t:
            pool = build_background_pool(index, geometry, backend="auto", tiling=tiling)
        print(f"background pool ({tiling}): {len(pool)} images in {t.wall:.2f} s wall, {t.cpu:.2f} s CPU (once per run)")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("builtin", "random"), default="builtin")
    p.add_argument("--images", type=int, default=None, help="number of images (default: the small val split / 256)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--normalize", action="store_true", help="float32 normalised outputs (as fed to a model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the reference is single-threaded)")
    p.add_argument("--cuda-batch", type=int, default=512)
    p.add_argument("--cuda-pool", type=int, default=2048)
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--tiling-images", type=int, default=None,
                   help="images for the paper-vs-crop tiling comparison (default: the small val split)")
    p.add_argument("--decode-threads", type=int, default=2, help="decoder threads of the tiling comparison")
    p.add_argument("--no-tiling", action="store_true", help="skip the paper-vs-crop tiling comparison")
    p.add_argument("--target", type=float, default=3.0, help="the speed target: all 8 variants vs the reference")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    batches = load_batches(args)
    pool = background_pool_from_batch(Batch.cat(batches))
    samples = []
    for bt in batches:
        for i in range(len(bt)):
            samples.append((bt.images[i].permute(1, 2, 0).numpy().copy(), bt.masks[i, 0].numpy().copy(),
                            tuple(int(v) for v in bt.boxes[i]), int(bt.labels[i]), int(bt.image_ids[i])))
    ref_pool = {int(i): (int(l), im.permute(1, 2, 0).numpy().copy())
                for i, l, im in zip(pool.image_ids, pool.labels, pool.images)}
    n = len(samples)
    # same output memory layout on both sides: HWC arrays / channels_last uint8, or CHW float tensors
    kw = dict(mean=MEAN.tolist(), std=STD.tolist()) if args.normalize else dict(channels_last=True)
    print(f"{args.data} data: {n} images in batches of {args.batch}, crop {args.crop}, pool {len(pool)}, "
          f"{'float32 normalised' if args.normalize else 'uint8'} outputs, {args.threads} thread(s), "
          f"median of {args.repeat}")
    print(f"{'variant':<12}{'ours var/s':>12}{'reference var/s':>17}{'ratio':>8}   load average")
    rows = [[name] for name in VARIANT_NAMES] + [["all 8"]]
    ratio = None
    for row in rows:
        names = list(VARIANT_NAMES) if row[0] == "all 8" else [row[0]]
        t_ours = _median_time(lambda: [synthesize(bt, names, pool=pool, backend="torch", **kw) for bt in batches],
                              args.repeat)
        t_ref = _median_time(lambda: reference_run(names, samples, ref_pool, args.normalize), args.repeat)
        v = n * len(names)
        ratio = t_ref / t_ours
        print(f"{row[0]:<12}{v / t_ours:>12,.0f}{v / t_ref:>17,.0f}{ratio:>7.1f}x   {_load()}")
    verdict = "met" if ratio >= args.target else "NOT met"
    print(f"target: all 8 variants >= {args.target:.1f}x the per-image reference: {ratio:.1f}x, {verdict}")
    if not args.no_tiling:
        bench_tiling(args)
    if torch.cuda.is_available() and not args.no_cuda:
        bench_cuda(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
