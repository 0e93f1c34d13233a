"""Images/s of each decode backend vs a "PIL + torch DataLoader" reference, side by side in one run.

* **ours**: :func:`bgsynth.pipeline.create_loader` with each available backend (``pil``, ``torchvision``,
  ``dali`` in DALI's CPU-only mode; on CUDA also ``torchvision``/``dali``/``pil`` with ``device="cuda"``). Each
  batch is complete: images in the crop geometry *plus* masks (RLE decode + nearest resize), union boxes, Only-BG-T
  strips, labels and ids, decoded one batch ahead by the loader's prefetch thread.
* **reference**: the way the official evaluation feeds a model: a ``torch.utils.data.Dataset`` that opens each file
  with PIL, ``convert("RGB")``, ``Resize(resize)`` + ``CenterCrop(crop)`` + ``PILToTensor``, in a
  ``DataLoader`` with ``--workers`` worker processes (images only: no masks or boxes).

Dataset: the built-in dataset (:func:`bgsynth.sources.synthetic.build_builtin_dataset`, cached; image sides 200-500
px) or, if that module is missing, ``--fallback-images`` random-texture 500x375 JPEGs written to a temporary folder.
Each configuration runs one warm-up epoch, then ``--repeats`` timed epochs; the median is reported.

``--consumer`` adds the threading comparison of a CPU evaluation (the work of ``bgsynth eval`` per batch: all eight
variants normalised + the demo CNN's forward on them, on the calling thread, while the loader decodes the next
batch): images/s and CPU seconds per image for thread settings side by side, the loader's defaults
(:func:`bgsynth.pipeline.common.default_decode_threads`, torch single-threaded in decoder threads) against the
previous ones (``min(8, cores)`` decoder threads, each starting torch's OpenMP team for its resizes). The load
average is printed beside every figure (the machine is shared).

Usage::

    python benchmarks/bench_decode.py                        # val split of a small built-in dataset, 256 -> 224
    python benchmarks/bench_decode.py --val-per-class 100 --threads 4 --workers 4 --batch-size 128
    python benchmarks/bench_decode.py --consumer --resize 72 --crop 64 --backends torchvision
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


from bgsynth.geometry import CropGeometry  # noqa: E402
from bgsynth.index import DatasetIndex, inclusive_to_bbox, rle_encode  # noqa: E402
from bgsynth.pipeline import available_backends, auto_backend, create_loader  # noqa: E402
from bgsynth.pipeline import common as pipeline_common  # noqa: E402


def load_average() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------------------------- the reference
class ReferenceDataset(torch.utils.data.Dataset):
    """PIL open / convert / Resize / CenterCrop / PILToTensor, one file per item (the official way)."""

    def __init__(self, paths, labels, geometry: CropGeometry):
        from torchvision import transforms as T

        self.paths = list(paths)
        self.labels = list(labels)
        self.tf = T.Compose([T.Resize(geometry.resize), T.CenterCrop(geometry.crop), T.PILToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), self.labels[i]


def reference_epoch(loader: torch.utils.data.DataLoader, device: torch.device) -> int:
    n = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def ours_epoch(loader, device: torch.device) -> int:
    n = 0
    for batch in loader:
        n += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def measure(epoch, repeats: int) -> tuple[float, int]:
    epoch()  # warm-up: imports, thread pools, DALI pipeline build, page cache
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = epoch()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times), n


# ----------------------------------------------------------------------------------------------- data
def fallback_dataset(folder: pathlib.Path, n: int, seed: int = 0) -> DatasetIndex:
    """``n`` 500x375 (or 375x500) random-texture JPEGs with a box and an elliptic mask each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    idx = DatasetIndex.empty(image_root=str(folder / "images"))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        h, w = (375, 500) if k % 4 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 90 * np.sin(xx / rng.uniform(4, 30)), 128 + 90 * np.cos(yy / rng.uniform(4, 30)),
                        (xx + yy) % 256], -1) + rng.normal(0, 10, (h, w, 3))
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = int(rng.integers(x0 + 20, w)), int(rng.integers(y0 + 20, h))
        m = Image.new("L", (w, h))
        ImageDraw.Draw(m).ellipse((x0, y0, x1, y1), fill=1)
        name = f"{k % 9:02d}/{k:05d}.JPEG"
        (folder / "images" / name).parent.mkdir(exist_ok=True)
        pil.save(folder / "images" / name, quality=90)
        idx.add_image({"file_name": name, "width": w, "height": h, "label": k % 9, "split": "val"},
                      [{"bbox": inclusive_to_bbox((x0, y0, x1, y1)), "segmentation": rle_encode(np.asarray(m)),
                        "mask_source": "synthetic"}])
    idx.save(folder / "index.json")
    return DatasetIndex.load(folder / "index.json")


def load_data(args, tmp: pathlib.Path) -> tuple[DatasetIndex, str]:
    try:
        from bgsynth.sources.synthetic import build_builtin_dataset
    except ImportError:
        return fallback_dataset(tmp, args.fallback_images), f"{args.fallback_images} random 500x375 JPEGs"
    path = build_builtin_dataset(root=args.root, seed=0, train_per_class=1, val_per_class=args.val_per_class,
                                 progress=False)
    idx = DatasetIndex.load(path).select(split="val")
    return idx, f"built-in dataset, val split ({path.parent.name})"


# ----------------------------------------------------------------------------------------------- consumer
def consumer_rows(index: DatasetIndex, geometry: CropGeometry, args) -> list[tuple]:
    """Images/s of decode + an evaluation's work per batch on the calling thread, per thread setting."""
    import contextlib
    import resource

    from bgsynth.models import create_model
    from bgsynth.pool import build_background_pool
    from bgsynth.variants import synthesize

    model = create_model("bgsynth_cnn").eval()
    pool = build_background_pool(index, geometry, backend="pil")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cores = pipeline_common.available_cores()
    torch_default = torch.get_num_threads()

    def epoch(backend: str, threads: int | None, share: bool) -> int:
        n = 0
        loader = create_loader(index, backend=backend, geometry=geometry, batch_size=args.batch_size,
                               num_threads=threads, share_cores=share)
        with torch.inference_mode():
            for batch in loader:
                for out in synthesize(batch, "all", pool=pool, mean=mean, std=std).values():
                    model(out.images)
                n += len(batch)
        loader.close()
        return n

    @contextlib.contextmanager
    def per_decoder(threads: int | None):
        saved = pipeline_common.DECODER_TORCH_THREADS
        pipeline_common.DECODER_TORCH_THREADS = threads
        try:
            yield
        finally:
            pipeline_common.DECODER_TORCH_THREADS = saved

    default = pipeline_common.default_decode_threads("cpu")
    before = min(8, cores)
    settings = [  # (label, decoder threads, torch threads per decoder thread, share_cores)
        (f"before: {before} decoders (torch {torch_default} each), torch {torch_default}", before, None, False),
        (f"default: {default} decoder(s) (torch 1), torch {max(1, cores - default)}", None, 1, True),
        (f"{default} decoder(s) (torch 1), torch {torch_default}", None, 1, False),
        (f"{before} decoders (torch 1), torch {max(1, cores - before)}", before, 1, True),
    ]
    rows = []
    backends = [b for b in args.backends_list if b in available_backends()]
    for backend in backends:
        for label, threads, per, share in settings:
            with per_decoder(per):
                epoch(backend, threads, share)  # warm-up
                walls, cpus = [], []
                for _ in range(args.repeats):
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                    t0 = time.perf_counter()
                    n = epoch(backend, threads, share)
                    walls.append(time.perf_counter() - t0)
                    r1 = resource.getrusage(resource.RUSAGE_SELF)
                    cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            rows.append((backend, label, n / wall, 1e3 * cpu / n, load_average()))
            print(f"  {backend:<12} {label:<44} {n / wall:8.1f} img/s  {1e3 * cpu / n:6.1f} CPU ms/img  "
                  f"({load_average()})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="cache folder of the built-in dataset (default: BGSYNTH_CACHE or ~/.cache/bgsynth)")
    p.add_argument("--val-per-class", type=int, default=40, help="val images per class of the built-in dataset (default 40)")
    p.add_argument("--fallback-images", type=int, default=300, help="images when the built-in dataset is unavailable")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="decoder threads of our loaders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median reported)")
    p.add_argument("--backends", default="all", help="comma-separated backends (default: all available)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA configurations even if CUDA is present")
    p.add_argument("--consumer", action="store_true",
                   help="also time decode + an evaluation's work per batch (8 variants + the demo CNN) per thread setting")
    p.add_argument("--consumer-only", action="store_true", help="only the --consumer comparison")
    args = p.parse_args(argv)

    geometry = CropGeometry(args.resize, args.crop)
    backends = available_backends() if args.backends == "all" else [b.strip() for b in args.backends.split(",")]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        index, what = load_data(args, pathlib.Path(tmp))
        print(f"data: {what}: {len(index)} images; geometry {geometry.resize} -> {geometry.crop}; "
              f"batch {args.batch_size}; our threads {args.threads}; reference workers {args.workers}; "
              f"torch threads {torch.get_num_threads()}; cores {pipeline_common.available_cores()}; "
              f"median of {args.repeats}; {load_average()}")
        args.backends_list = backends
        if args.consumer or args.consumer_only:
            print("decode + evaluation work on the calling thread (8 variants normalised + demo CNN), CPU:")
            consumer_rows(index, geometry, args)
            if args.consumer_only:
                return 0
        recs = list(index.records())
        rows = []
        for dev in devices:
            ds = ReferenceDataset([r.path for r in recs], [r.label for r in recs], geometry)
            ref_loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                                     pin_memory=dev.type == "cuda")
            ref_ips, n = measure(lambda: reference_epoch(ref_loader, dev), args.repeats)
            rows.append(("reference: PIL + DataLoader", str(dev), ref_ips, 1.0, n, load_average()))
            for b in backends:
                loader = create_loader(index, backend=b, geometry=geometry, batch_size=args.batch_size, device=dev,
                                       num_threads=args.threads)
                ips, n = measure(lambda: ours_epoch(loader, dev), args.repeats)
                mode = " (CPU-only mode)" if b == "dali" and dev.type == "cpu" else ""
                rows.append((f"ours: {b}{mode}", str(dev), ips, ips / ref_ips, n, load_average()))
                loader.close()
                if loader.rejects:
                    print(f"  note: {b} rejected {len(loader.rejects)} file(s)")

    w = max(len(r[0]) for r in rows)
    print(f"\n{'pipeline':<{w}}  {'device':<6}  {'images/s':>9}  {'vs reference':>12}  images  load average")
    print(f"{'-' * w}  {'-' * 6}  {'-' * 9}  {'-' * 12}  ------  ------------")
    for name, dev, ips, ratio, n, load in rows:
        print(f"{name:<{w}}  {dev:<6}  {ips:>9.0f}  {ratio:>11.2f}x  {n:<6}  {load}")
    print(f"\nauto backend: cpu -> {auto_backend('cpu')}"
          + (f", cuda -> {auto_backend('cuda')}" if torch.cuda.is_available() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
