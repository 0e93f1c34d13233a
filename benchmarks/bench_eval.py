"""End-to-end evaluation of all eight variants: bgsynth's one pass vs the reference way, side by side in one run.

* **ours**: :func:`bgsynth.evaluate.evaluate`: each JPEG decoded once, all eight variants synthesized in-batch,
  composites fed straight to the model; nothing written to disk. Timed from the index to the finished result
  (background pool included).
* **reference** (PAPER.md, "How the reference tools work"), written here as the reference:

  1. *export*: one image at a time with PIL/NumPy, every variant written as JPEG into the release layout
     ``<variant>/val/<NN_class>/<stem>.JPEG`` (plus the crop's mask as ``fg_mask/val/<NN_class>/<stem>.npy``).
     Original/Only-BG-B/Only-BG-T/No-FG/Only-FG come from the decoded crop; Mixed-* read the foreground crop,
     its mask and the chosen background's Only-BG-T back from disk, as the authors' script does.
  2. *eval*: one run per variant, as the official ``in9_eval.py``: ``ImageFolder`` + ``ToTensor`` in a
     ``DataLoader`` (batch 32, worker processes), the model wrapped with its input normaliser, one call per batch.
     By default the reference runs under ``torch.no_grad()`` (fair to it); ``--ref-autograd`` reproduces the
     official script exactly (autograd on).

* **model-only bound**: the same model's forward alone, same batch sizes and dtype, over normalised batches made
  beforehand and already in memory (``torch.inference_mode``): what no evaluation can beat. Printed with
  ours / bound.

Same model (``--arch``, random init from seed 0, or ``--model CKPT``), same geometry, same machine, same torch
thread count (by default the CLI's split of the cores between the model and the decoder,
:func:`bgsynth.evaluate.cpu_thread_split`).
Reported: wall seconds and CPU seconds (this process + reaped worker processes, which is robust to other load on a
shared machine), images/s = source images per second for all eight variants, and the ratio ours/reference.

Usage::

    python benchmarks/bench_eval.py                                  # built-in dataset, 16 val images per class
    python benchmarks/bench_eval.py --val-per-class 50 --resize 256 --crop 224 --threads 2
    python benchmarks/bench_eval.py --index /data/in9/index.json --device cuda --batch-size 256
    # model-only bound, ~1-3 min on 2 CPU cores each:
    python benchmarks/bench_eval.py --arch resnet18 --resize 256 --crop 224 --val-per-class 4 --skip-reference
    python benchmarks/bench_eval.py --index ~/.cache/bgsynth/builtin-v1-s0-c0.8-t200-v50/index.json \
        --model ~/.cache/bgsynth/builtin-v1-s0-c0.8-t200-v50/demo-model-*.pt --resize 72 --crop 64 --skip-reference
    # linear scaling (the val split cycled with distinct ids beyond its size):
    python benchmarks/bench_eval.py --index ... --model ... --resize 72 --crop 64 --scaling 90,450,900,3600
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile

import numpy as np
import torch

from _common import Timer, load_average, paper_decode, paper_only_bg_t  # noqa: E402  (benchmarks/_common.py: shared timing and paper reference)

from bgsynth.classes import IN9_FOLDERS, IN9_MEAN, IN9_STD  # noqa: E402
from bgsynth.evaluate import evaluate  # noqa: E402
from bgsynth.geometry import CropGeometry  # noqa: E402
from bgsynth.index import DatasetIndex  # noqa: E402
from bgsynth.models import LoadedModel, Predictor, create_model  # noqa: E402
from bgsynth.results import VARIANT_ORDER  # noqa: E402


# ----------------------------------------------------------------------------------------------- timing
# ----------------------------------------------------------------------------------------------- reference export
def reference_export(index: DatasetIndex, geometry: CropGeometry, out: pathlib.Path, seed: int = 0) -> int:
    """Write all eight variants of every image as JPEG in the release layout, one image at a time."""
    from PIL import Image

    def path(variant, label, stem, ext=".JPEG"):
        d = out / variant / "val" / IN9_FOLDERS[label]
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{stem}{ext}"

    recs = list(index.records())
    bgt_of: dict[int, pathlib.Path] = {}
    written = 0
    for rec in recs:  # pass 1: everything that needs only the image itself
        img, mask, box = paper_decode(rec, geometry)
        stem, y = f"{rec.id:08d}", rec.label
        x0, y0, x1, y1 = box
        v = {"original": img, "no_fg": np.where(mask[..., None], 0, img).astype(np.uint8),
             "only_fg": np.where(mask[..., None], img, 0).astype(np.uint8)}
        b = img.copy()
        if x1 >= x0:
            b[y0 : y1 + 1, x0 : x1 + 1] = 0
        v["only_bg_b"] = b
        t = paper_only_bg_t(img, box)
        if t is not None:
            v["only_bg_t"] = t
        for name, arr in v.items():
            Image.fromarray(arr).save(path(name, y, stem))
            written += 1
        np.save(path("fg_mask", y, stem, ".npy"), mask)
        if t is not None:
            bgt_of[rec.id] = path("only_bg_t", y, stem)
    rng = np.random.default_rng(seed)
    pool = sorted(bgt_of)
    pool_labels = {i: index.image(i)["label"] for i in pool}
    by_class = {c: [i for i in pool if pool_labels[i] == c] for c in range(9)}
    for rec in recs:  # pass 2: Mixed-*, foreground and background read back from disk
        stem, y = f"{rec.id:08d}", rec.label
        fg = np.asarray(Image.open(path("original", y, stem)).convert("RGB"))
        mask = np.load(path("fg_mask", y, stem, ".npy"))
        for name, cands in (("mixed_same", by_class[y]), ("mixed_rand", pool), ("mixed_next", by_class[(y + 1) % 9])):
            cands = [i for i in cands if i != rec.id]
            if not cands:
                continue
            bg = np.asarray(Image.open(bgt_of[cands[int(rng.integers(len(cands)))]]).convert("RGB"))
            Image.fromarray(np.where(mask[..., None], fg, bg).astype(np.uint8)).save(path(name, y, stem))
            written += 1
    return written


# ----------------------------------------------------------------------------------------------- reference eval
class NormalizedModel(torch.nn.Module):
    """The official eval's wrapper: clamp to [0, 1], normalise, run the net."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((torch.clamp(x, 0, 1) - self.mean) / self.std)


def reference_eval(root: pathlib.Path, variant: str, model, device, workers: int, autograd: bool) -> tuple[int, int]:
    """One official-style run: ImageFolder + ToTensor + DataLoader(batch 32) -> (correct, total)."""
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(root / variant / "val"), transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    correct = 0
    ctx = torch.enable_grad() if autograd else torch.no_grad()
    with ctx:
        for inp, target in loader:
            out = model(inp.to(device, non_blocking=True))
            pred = out.topk(1, 1, True, True)[1].cpu()[:, 0]
            # ImageFolder indexes the class folders present; map back to IN-9 ids by folder name
            classes = torch.tensor([IN9_FOLDERS.index(c) for c in ds.classes])
            correct += int((pred == classes[target]).sum())
    return correct, len(ds)


# ----------------------------------------------------------------------------------------------- the model-only bound
def model_bound(predictor: Predictor, sizes: list[int], crop: int, repeats: int) -> float:
    """Seconds of the model's forward alone over pre-made normalised batches already in memory (median).

    The batches have the sizes of our run's forwards (``sizes``), are made before the clock starts (random uint8
    through :meth:`Predictor.prepare`: the predictor's dtype, device and memory format) and are fed to the bare
    module under ``torch.inference_mode``: no decode, no synthesis, no prediction bookkeeping.
    """
    g = torch.Generator().manual_seed(0)
    xs = [predictor.prepare(torch.randint(0, 256, (b, 3, crop, crop), dtype=torch.uint8, generator=g)) for b in sizes]
    net = predictor.module
    times = []
    with torch.inference_mode():
        net(xs[0])  # warm-up
        for _ in range(repeats):
            with Timer() as t:
                for x in xs:
                    net(x)
            times.append(t.wall)
    return statistics.median(times)


def forward_sizes(n_composites: int, n_images: int, n_variants: int, batch_size: int) -> list[int]:
    """The batch sizes of an evaluation's forwards: per decoded batch, one forward per variant."""
    sizes = []
    for k in range(0, n_images, batch_size):
        sizes += [min(batch_size, n_images - k)] * n_variants
    assert sum(sizes) == n_composites, (sum(sizes), n_composites)
    return sizes


def repeated_index(index: DatasetIndex, n: int) -> DatasetIndex:
    """An index of ``n`` images: ``index``'s images cycled, each copy with its own id (and annotation ids)."""
    import copy

    src = index.data
    anns: dict[int, list] = {}
    for a in src["annotations"]:
        anns.setdefault(int(a["image_id"]), []).append(a)
    imgs = sorted(src["images"], key=lambda e: e["id"])
    data = {k: copy.deepcopy(v) for k, v in src.items() if k not in ("images", "annotations")}
    data["images"], data["annotations"] = [], []
    for k in range(n):
        e = dict(imgs[k % len(imgs)], id=k)
        data["images"].append(e)
        for a in anns.get(int(imgs[k % len(imgs)]["id"]), []):
            data["annotations"].append(dict(a, id=len(data["annotations"]), image_id=k))
    return DatasetIndex(data, index.path)


def make_predictor(args, device) -> Predictor:
    """The benchmark's model: a checkpoint (``--model``) or ``--arch`` initialised from seed 0."""
    if args.model:
        from bgsynth.models import load_model

        return Predictor(load_model(args.model), device=device, amp=None)
    torch.manual_seed(0)
    net = create_model(args.arch).eval()
    loaded = LoadedModel(net, 9, "in9", tuple(IN9_MEAN), tuple(IN9_STD), arch=args.arch, provenance={"spec": "bench"})
    return Predictor(loaded, device=device, amp=None)


def time_ours(index, predictor, kw: dict, repeats: int):
    """Median wall and CPU seconds of :func:`evaluate` over ``repeats`` runs, and the last result."""
    ours, result = [], None
    for _ in range(repeats):
        with Timer() as t:
            result = evaluate(index, predictor, **kw)
        ours.append(t)
    return statistics.median(t.wall for t in ours), statistics.median(t.cpu for t in ours), result


def scaling(args, predictor, geometry, kw) -> None:
    """Eval time per image over growing image counts (the split's images cycled with distinct ids)."""
    base = DatasetIndex.load(args.index).select(split=args.split)
    counts = [int(c) for c in args.scaling.split(",")]
    evaluate(base.select(per_class=2), predictor, **kw)  # warm-up
    print(f"\nlinear scaling: {args.split} split of {len(base)} images, cycled with distinct ids beyond that; "
          f"{args.resize}->{args.crop}, {len(VARIANT_ORDER)} variants, batch {args.batch_size}, torch threads "
          f"{args.threads}; medians of {args.repeats} runs")
    print(f"{'images':>8s} {'wall s':>8s} {'ms/image':>9s} {'vs 450':>7s} {'CPU ms/image':>13s} {'bound s':>8s} "
          f"{'ours/bound':>10s}  load")
    rows = []
    for n in counts:
        idx = base.select(per_class=n // 9) if n < len(base) and n % 9 == 0 else repeated_index(base, n)
        w, c, res = time_ours(idx, predictor, kw, args.repeats)
        sizes = forward_sizes(res.timing["forwards"], len(idx), len(VARIANT_ORDER), args.batch_size)
        bw = model_bound(predictor, sizes, args.crop, args.repeats)
        rows.append((n, w, c, bw))
        ref = next((r[1] / r[0] for r in rows if r[0] == 450), None)
        per = 1000 * w / n
        rel = f"{per / (1000 * ref):7.2f}" if ref else f"{'':>7s}"
        print(f"{n:8d} {w:8.2f} {per:9.3f} {rel} {1000 * c / n:13.3f} {bw:8.2f} {bw / w:10.1%}  {load_average()}")
    for what, k in (("wall", 1), ("CPU", 2)):
        pers = [r[k] / r[0] for r in rows]
        mid = statistics.median(pers)
        print(f"per-image {what} time within {100 * (max(pers) / mid - 1):+.1f}% / {100 * (min(pers) / mid - 1):+.1f}% "
              f"of the median ({1000 * mid:.3f} ms/image)")


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--index", default=None, help="dataset index (default: a built-in dataset in the cache)")
    ap.add_argument("--val-per-class", type=int, default=16, help="built-in dataset size (val images per class)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--per-class", type=int, default=None, help="evaluate only N images per class of the split")
    ap.add_argument("--arch", default="bgsynth_cnn", help="model architecture (random init, seed 0), e.g. resnet18")
    ap.add_argument("--model", default=None, help="a checkpoint instead of --arch (e.g. the demo's)")
    ap.add_argument("--resize", type=int, default=128)
    ap.add_argument("--crop", type=int, default=112)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", help="our decode backend")
    ap.add_argument("--batch-size", type=int, default=64, help="our batch size (and the bound's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (both sides; default: the CLI's split, bgsynth.evaluate.cpu_thread_split)")
    ap.add_argument("--decode-threads", type=int, default=None, help="our decoder threads (default: the CLI's split)")
    ap.add_argument("--workers", type=int, default=2, help="reference DataLoader worker processes (official: 8)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs of ours and of the model-only bound (median); 1 warm-up run first")
    ap.add_argument("--skip-reference", action="store_true", help="only ours and the model-only bound")
    ap.add_argument("--scaling", default=None,
                    help="instead: eval time per image over these image counts, e.g. 90,450,900,3600")
    ap.add_argument("--ref-autograd", action="store_true", help="reference with autograd on, as the official script")
    ap.add_argument("--keep", default=None, help="keep the reference export in this folder")
    args = ap.parse_args(argv)

    from bgsynth.evaluate import cpu_thread_split

    device = torch.device(args.device)
    args.threads, decode_threads = cpu_thread_split(device, args.threads, args.decode_threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.index is None:
        from bgsynth.sources.synthetic import build_builtin_dataset

        args.index = build_builtin_dataset(train_per_class=1, val_per_class=args.val_per_class, progress=False)
    geometry = CropGeometry(args.resize, args.crop)
    predictor = make_predictor(args, device)
    kw = dict(variants="all", split=None, geometry=geometry, backend=args.backend, device=device,
              batch_size=args.batch_size, progress=False, examples_per_class=0, num_threads=decode_threads)
    if args.scaling:
        scaling(args, predictor, geometry, kw)
        return 0
    index = DatasetIndex.load(args.index).select(split=args.split)
    if args.per_class:
        index = index.select(per_class=args.per_class)
    n = len(index)
    name = pathlib.Path(args.model).name if args.model else args.arch
    print(f"{n} images ({args.split}), geometry {args.resize}->{args.crop}, device {device}, torch threads "
          f"{args.threads}, decoder threads {decode_threads}, {name}, batch {args.batch_size}, "
          f"{str(predictor.input_dtype).replace('torch.', '')}; all {len(VARIANT_ORDER)} variants; {load_average()}")

    # ours: warm-up, then the median of --repeats; the model-only bound right after, over the same batch sizes
    evaluate(index.select(per_class=2), predictor, **kw)
    ow, oc, result = time_ours(index, predictor, kw, args.repeats)
    comps = result.timing["forwards"]
    sizes = forward_sizes(comps, n, len(VARIANT_ORDER), args.batch_size)
    fw = model_bound(predictor, sizes, args.crop, args.repeats)
    print(f"\nmodel-only bound (forward over {len(sizes)} pre-made batches in memory): {fw:.2f} s, "
          f"{comps / fw:.1f} composites/s; {load_average()}")
    print(f"bgsynth evaluate (index to result, 8 variants):                  {ow:.2f} s, "
          f"{comps / ow:.1f} composites/s; {load_average()}")
    print(f"ours / bound: {fw / ow:.1%}")
    if args.skip_reference:
        return 0

    # reference: export once, then one eval run per variant
    tmp = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="bgsynth-bench-eval-"))
    if tmp.exists() and args.keep:
        shutil.rmtree(tmp)
    ref_model = NormalizedModel(predictor.module, predictor.mean, predictor.std).to(device).eval()
    try:
        with Timer() as te:
            files = reference_export(index, geometry, tmp)
        ref_eval = {}
        with Timer() as tv:
            for v in VARIANT_ORDER:
                ref_eval[v] = reference_eval(tmp, v, ref_model, device, args.workers, args.ref_autograd)
        disk = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rw, rc = te.wall + tv.wall, te.cpu + tv.cpu
    rows = [
        ("model forward alone (bound)", fw, float("nan")),
        ("ours: one pass, 8 variants", ow, oc),
        ("reference: export (PIL, JPEG)", te.wall, te.cpu),
        ("reference: eval, 8 runs", tv.wall, tv.cpu),
        ("reference: total", rw, rc),
    ]
    print(f"\n{'':32s} {'wall s':>8s} {'img/s':>8s} {'CPU s':>8s} {'img/CPU-s':>10s}")
    for label, w, c in rows:
        print(f"{label:32s} {w:8.2f} {n / w:8.1f} {c:8.2f} {n / c:10.1f}")
    print(f"\nspeed-up ours vs reference total: {rw / ow:.2f}x wall, {rc / oc:.2f}x CPU "
          f"(vs reference eval alone: {tv.wall / ow:.2f}x wall, {tv.cpu / oc:.2f}x CPU); {load_average()}")
    print(f"reference wrote {files} JPEGs ({disk / 2**20:.1f} MiB); ours wrote nothing; "
          f"ours forwarded {result.timing['forwards']} composites")
    acc_ref = {v: c / t for v, (c, t) in ref_eval.items()}
    print("accuracy ours/reference (random-init net; JPEG re-encoding and another background choice make them differ "
          "slightly): " + ", ".join(f"{v} {100 * (result.accuracy(v) or 0):.1f}/{100 * acc_ref[v]:.1f}" for v in VARIANT_ORDER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
