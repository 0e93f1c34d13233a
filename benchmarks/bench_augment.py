"""Augmented training samples/s: the batched on-device background swap vs a per-sample CPU reference.

* **ours**: :class:`bgsynth.augment.BackgroundSwap` on device-resident uint8 batches: per-sample variant draw
  (hashed, :mod:`bgsynth.rng`), random resized crop + flip of image and background with kornia
  (``crop_by_indices`` slice + bilinear resize, ``hflip``) and of the mask (one exact nearest-neighbour gather),
  Mixed-Rand background from a resident pool, composite + normalise + cast in one
  :func:`bgsynth.variants.composite` pass -> float32 ``[B, 3, S, S]``.
* **reference**: the usual way, per sample in a :class:`torch.utils.data.DataLoader` with ``--workers`` worker
  processes: PIL random resized crop (torchvision's ``get_params``) + flip of image and mask, the same for a random
  background from the in-memory Only-BG-T pool, paste with NumPy, ``ToTensor`` + ``Normalize``, default collate.

Both start from the same decoded uint8 crops in memory (random pixels with a blob mask per image, ``--size``
pixels square: decoding is not timed, it is the same for both) and make the same kind of batch (Mixed-Rand with
probability ``--p-mixed``, else Original). Warm-up first, then ``--repeat`` timed rounds, alternating ours and the
reference so both see the same machine load; medians. The reference's workers are persistent (started before the
timing). Reported: samples/s from wall time, and CPU seconds per 1000 samples (this process's CPU time plus the
workers', read from ``/proc``; robust to other load on a shared machine).

On CUDA (when present), the augmentation's cost per batch is compared with one ResNet-50 training step (bf16
autocast, channels_last, SGD, batch ``--gpu-batch`` at 224 px): the fraction of a step the augmentation takes.

Usage::

    python benchmarks/bench_augment.py                    # CPU: 224 px, batch 64, 2 workers
    python benchmarks/bench_augment.py --size 128 --batch 128 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# OpenMP threads that spin while waiting collapse when the cores are shared with other processes (measured here:
# 2 spinning threads ran 10x slower than 1 on a loaded 2-core machine); set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


from bgsynth.augment import BackgroundSwap  # noqa: E402
from bgsynth.classes import IN9_MEAN, IN9_STD  # noqa: E402
from bgsynth.geometry import tile_strips  # noqa: E402
from bgsynth.types import BackgroundPool  # noqa: E402
from bgsynth.variants import tile_in_crop  # noqa: E402


# ----------------------------------------------------------------------------------------------- data
def make_data(n: int, size: int, seed: int = 0):
    """Random crops with an elliptical foreground mask, its box, labels, ids, and an Only-BG-T pool of them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    boxes = torch.zeros(n, 4, dtype=torch.int64)
    for i in range(n):
        cx, cy = (float(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=g))
        rx, ry = (float(v) for v in torch.randint(size // 8, size // 4, (2,), generator=g))
        m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= 1
        masks[i, 0] = m.to(torch.uint8)
        ys, xs = m.nonzero(as_tuple=True)
        boxes[i] = torch.tensor([int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    labels = torch.arange(n) % 9
    ids = torch.arange(n, dtype=torch.int64)
    strips = tile_strips(boxes, size, size)
    pool = BackgroundPool(tile_in_crop(images, boxes, strips), labels.clone(), ids.clone())
    return images, masks, boxes, labels, ids, pool


# ----------------------------------------------------------------------------------------------- reference
class RefDataset(torch.utils.data.Dataset):
    """Per-sample PIL/NumPy augmentation: random resized crop + flip of image and mask, background paste."""

    def __init__(self, images, masks, pool_images, p_mixed: float, size: int, seed: int):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, as a decoded JPEG
        self.masks = masks[:, 0].numpy()
        self.pool = pool_images.permute(0, 2, 3, 1).contiguous().numpy()
        self.p_mixed, self.size, self.seed = p_mixed, size, seed
        self.mean = np.asarray(IN9_MEAN, np.float32)[:, None, None]
        self.std = np.asarray(IN9_STD, np.float32)[:, None, None]

    def __len__(self):
        return len(self.images)

    def _rrc(self, rng, img, mask=None):
        from PIL import Image

        from torchvision.transforms import RandomResizedCrop

        pil = Image.fromarray(img)
        i, j, h, w = RandomResizedCrop.get_params(pil, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        flip = rng.random() < 0.5
        box = (j, i, j + w, i + h)
        out = pil.resize((self.size, self.size), Image.BILINEAR, box=box)
        m = None
        if mask is not None:
            m = Image.fromarray(mask * 255).resize((self.size, self.size), Image.NEAREST, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
            m = None if m is None else m.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out), (None if m is None else np.asarray(m) > 127)

    def __getitem__(self, k):
        rng = np.random.default_rng((self.seed, k))
        torch.manual_seed(self.seed * 1_000_003 + k)
        fg, m = self._rrc(rng, self.images[k], self.masks[k])
        if rng.random() < self.p_mixed:
            bg, _ = self._rrc(rng, self.pool[rng.integers(len(self.pool))])
            fg = np.where(m[..., None], fg, bg)
        x = torch.from_numpy(np.ascontiguousarray(fg.transpose(2, 0, 1))).float().div_(255.0)
        x = (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)
        return x, k % 9


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``); 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class Reference:
    """A persistent-worker DataLoader over the reference dataset (workers start once, outside the timing)."""

    def __init__(self, ds, batch: int, workers: int, n_batches: int):
        sub = torch.utils.data.Subset(ds, range(batch * n_batches))
        self.loader = torch.utils.data.DataLoader(sub, batch_size=batch, num_workers=workers, shuffle=False,
                                                  persistent_workers=workers > 0)

    def _cpu(self) -> float:
        it = getattr(self.loader, "_iterator", None)
        workers = getattr(it, "_workers", []) if it is not None else []
        return time.process_time() + sum(_proc_cpu(w.pid) for w in workers)

    def run(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process and the workers) for one pass."""
        c0 = self._cpu()
        t0 = time.perf_counter()
        for x, y in self.loader:
            pass
        return time.perf_counter() - t0, self._cpu() - c0


def run_ours(swap, data, batch: int, n_batches: int, epoch: int, device) -> tuple[float, float]:
    images, masks, boxes, labels, ids, _ = data
    n = len(images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for b in range(n_batches):
        s = slice((b * batch) % n, (b * batch) % n + batch)
        out = swap(images[s], masks[s], labels[s], ids[s], boxes=boxes[s], epoch=epoch)
    sync()
    del out
    return time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------------------------- CUDA
def cuda_fraction(args) -> None:
    import torchvision

    dev = torch.device("cuda")
    B, S = args.gpu_batch, 224
    data = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in make_data(B, S, seed=1)[:5]]
    pool = make_data(max(B, 512), S, seed=2)[5].to(dev)
    swap = BackgroundSwap({"mixed_rand": args.p_mixed}, bg_source="pool", pool=pool, seed=0, dtype=torch.bfloat16,
                          channels_last=True)
    model = torchvision.models.resnet50(num_classes=9).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_fixed = torch.randn(B, 3, S, S, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 9, (B,), device=dev)

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def aug(epoch):
        return swap(*data[:2], data[3], data[4], boxes=data[2], epoch=epoch).images

    def timed(fn, reps):
        times = []
        for r in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(r)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    for r in range(5):
        step(x_fixed)
        aug(r)
    torch.cuda.synchronize()
    t_step = timed(lambda r: step(x_fixed), args.gpu_repeat)
    t_aug = timed(aug, args.gpu_repeat)
    t_both = timed(lambda r: step(aug(r)), args.gpu_repeat)
    print(f"\nCUDA ({torch.cuda.get_device_name()}), batch {B} at {S} px, bf16 channels_last:")
    print(f"  ResNet-50 training step           {t_step:8.2f} ms")
    print(f"  BackgroundSwap (Mixed-Rand p={args.p_mixed:g}) {t_aug:8.2f} ms   = {100 * t_aug / t_step:.1f}% of a step "
          f"({B / t_aug * 1e3:,.0f} samples/s)")
    print(f"  augmentation + step (serial)      {t_both:8.2f} ms   (+{100 * (t_both - t_step) / t_step:.1f}%)")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="crop side (px)")
    ap.add_argument("--batch", type=int, default=64, help="samples per batch")
    ap.add_argument("--batches", type=int, default=4, help="batches per timed round")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of ours (same cores as the workers)")
    ap.add_argument("--p-mixed", type=float, default=1.0, help="probability of Mixed-Rand (else Original)")
    ap.add_argument("--gpu-batch", type=int, default=256, help="CUDA: batch of the ResNet-50 step")
    ap.add_argument("--gpu-repeat", type=int, default=20, help="CUDA: timed repetitions")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA part")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    n = args.batch * args.batches
    data = make_data(n, args.size)
    ds = RefDataset(data[0], data[1], data[5].images, args.p_mixed, args.size, seed=0)
    cpu = torch.device("cpu")
    swap = BackgroundSwap({"mixed_rand": args.p_mixed}, bg_source="pool", pool=data[5], seed=0)
    print(f"augmentation: Mixed-Rand p={args.p_mixed:g} + random resized crop + flip + normalise, "
          f"{args.size} px, batch {args.batch}, {args.batches} batches per round, {args.repeat} rounds")
    print(f"ours: {args.threads} torch threads; reference: PIL/NumPy per sample, DataLoader with "
          f"{args.workers} persistent workers")
    reference = Reference(ds, args.batch, args.workers, args.batches)
    run_ours(swap, data, args.batch, 1, 0, cpu)  # warm-up
    reference.run()  # warm-up (starts the workers)
    ours, ref = [], []
    for r in range(args.repeat):
        ours.append(run_ours(swap, data, args.batch, args.batches, r + 1, cpu))
        ref.append(reference.run())
    o_wall = statistics.median(w for w, _ in ours)
    r_wall = statistics.median(w for w, _ in ref)
    o_cpu = statistics.median(c for _, c in ours)
    r_cpu = statistics.median(c for _, c in ref)
    print(f"\n{'':28s}{'samples/s (wall)':>18s}{'CPU s / 1000 samples':>24s}")
    print(f"{'ours (batched, BackgroundSwap)':28s}{n / o_wall:18,.0f}{1000 * o_cpu / n:24.2f}")
    print(f"{'reference (per-sample, PIL)':28s}{n / r_wall:18,.0f}{1000 * r_cpu / n:24.2f}")
    print(f"{'ratio (ours / reference)':28s}{r_wall / o_wall:17.2f}x{r_cpu / o_cpu:23.2f}x")
    if torch.cuda.is_available() and not args.no_cuda:
        cuda_fraction(args)


if __name__ == "__main__":
    main()
