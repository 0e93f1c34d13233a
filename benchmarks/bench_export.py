"""Export images/s: ``bgsynth.export.export`` vs a reference loop written from PAPER.md (the authors' non-GrabCut
work), on the same images of the built-in dataset with their masks given.

* **reference**: the generation script as PAPER.md describes it ("How an image enters the set", "The eight
  variants", "How the reference tools work"), one image at a time, PIL + NumPy, every variant written as a JPEG:
  pass 1 decodes each image and writes Original, Only-BG-B, Only-BG-T (the strip rule of
  ``benchmarks/_common.py``), No-FG and Only-FG at full resolution, and the mask as ``.npy``; pass 2 makes the
  Mixed-* composites in the model's geometry as the script does: it reads the image's Only-FG JPEG back and, per
  Mixed-* variant, a chosen image's Only-BG-T JPEG, brings both to the crop (shorter side 256, centre 224),
  takes the background where the Only-FG crop is black, and writes the JPEG. (Our code, not the authors'.)
* **ours**: ``export(index, out, variants="all")`` at 224 px: all eight variants and the masks, the background
  pool made from the same images (as the release), each image decoded once.
* **encode ceiling**: the JPEG encoding alone of the eight 224 px crops per image, from memory, on the same
  threads, with export's CPU encoder (OpenCV's libjpeg-turbo: the same bytes as PIL, and unlike PIL it releases the
  GIL): the floor of any exporter that writes the same files on this CPU.

Both exporters write to fresh folders on the same file system. Warm-up first (a few images of each), then
``--repeat`` rounds alternating reference and ours so both see the same machine load; medians. Every figure is
printed with the load average (``os.getloadavg()``): the machine is shared.

Usage::

    python benchmarks/bench_export.py                       # 504 images (56 per class), 2 rounds
    python benchmarks/bench_export.py --images 900 --repeat 3 --threads 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _common import Timer, paper_only_bg_t  # noqa: E402

from bgsynth.export import export  # noqa: E402
from bgsynth.index import DatasetIndex  # noqa: E402
from bgsynth.sources.synthetic import build_builtin_dataset  # noqa: E402

RESIZE, CROP = 256, 224
QUALITY = 95


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


# ----------------------------------------------------------------------------------------------- reference
def _jpeg(path: pathlib.Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=QUALITY)


def _to_crop(im: Image.Image) -> np.ndarray:
    """Shorter side to 256 (bilinear), centre crop 224: the model's geometry."""
    w, h = im.size
    s = RESIZE / min(w, h)
    rw, rh = max(RESIZE, int(w * s)), max(RESIZE, int(h * s))
    im = im.resize((rw, rh), Image.BILINEAR)
    left, top = int(round((rw - CROP) / 2)), int(round((rh - CROP) / 2))
    return np.asarray(im.crop((left, top, left + CROP, top + CROP)))


def reference_export(records: list, out: pathlib.Path, seed: int = 0) -> None:
    """The script's non-GrabCut work on ``records`` (``ImageRecord`` with a mask), one image at a time."""
    made = {}  # image id -> (class folder, stem) of images with an Only-BG-T
    for rec in records:  # pass 1: full-resolution variants
        img = np.asarray(Image.open(rec.path).convert("RGB"))
        m = rec.mask().astype(bool)
        x0, y0, x1, y1 = rec.union_box
        folder, stem = f"{rec.label:02d}", pathlib.Path(rec.file_name).stem
        _jpeg(out / "original" / folder / f"{stem}.JPEG", img)
        bgb = img.copy()
        bgb[y0 : y1 + 1, x0 : x1 + 1] = 0
        _jpeg(out / "only_bg_b" / folder / f"{stem}.JPEG", bgb)
        bgt = paper_only_bg_t(img, (x0, y0, x1, y1))
        if bgt is not None:
            _jpeg(out / "only_bg_t" / folder / f"{stem}.JPEG", bgt)
            made[rec.id] = (folder, stem, rec.label)
        _jpeg(out / "no_fg" / folder / f"{stem}.JPEG", img * ~m[..., None])
        _jpeg(out / "only_fg" / folder / f"{stem}.JPEG", img * m[..., None])
        (out / "fg_mask" / folder).mkdir(parents=True, exist_ok=True)
        np.save(out / "fg_mask" / folder / f"{stem}.npy", m.astype(np.uint8))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, _, y) in made.items():
        by_class.setdefault(y, []).append(i)
    everyone = list(made)
    for rec in records:  # pass 2: Mixed-* in the model's geometry, from the JPEGs of pass 1
        folder, stem = f"{rec.label:02d}", pathlib.Path(rec.file_name).stem
        fg = _to_crop(Image.open(out / "only_fg" / folder / f"{stem}.JPEG").convert("RGB"))
        black = (fg == 0).all(axis=2)
        for name, pool in (("mixed_same", by_class.get(rec.label, [])), ("mixed_rand", everyone),
                           ("mixed_next", by_class.get((rec.label + 1) % 9, []))):
            cands = [i for i in pool if i != rec.id]
            if not cands:
                continue
            bf, bs, _ = made[cands[int(rng.integers(len(cands)))]]
            bg = _to_crop(Image.open(out / "only_bg_t" / bf / f"{bs}.JPEG").convert("RGB"))
            _jpeg(out / name / folder / f"{stem}.JPEG", np.where(black[..., None], bg, fg))


# ----------------------------------------------------------------------------------------------- ceiling
def encode_ceiling(crops: list[np.ndarray], threads: int) -> float:
    """Seconds to JPEG-encode every crop (8 per image) from memory on ``threads`` threads, with the encoder export
    uses on the CPU (libjpeg-turbo through OpenCV, which releases the GIL; the same bytes as PIL's)."""
    def enc(a):
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
        return len(data)

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for _ in ex.map(enc, crops, chunksize=16):
            pass
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=504, help="images (spread over the 9 classes; >= 500 asked)")
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds of each, alternating")
    ap.add_argument("--threads", type=int, default=None, help="export threads (default: bgsynth's)")
    ap.add_argument("--backend", default="auto", help="decode backend of ours")
    ap.add_argument("--tmp", default=None, help="folder for the outputs (default: a temporary folder)")
    args = ap.parse_args(argv)

    index = DatasetIndex.load(build_builtin_dataset(progress=False))
    sub = index.select(split="train", per_class=-(-args.images // 9), seed=0, require_mask=True)
    sub = sub.select(ids=sub.ids[: args.images])
    records = list(sub.records())
    print(f"{len(sub)} images of the built-in dataset (masks given), mean size "
          f"{np.mean([r.width for r in records]):.0f} x {np.mean([r.height for r in records]):.0f}; "
          f"ours at {RESIZE} -> {CROP}, all 8 variants + masks; {os.cpu_count()} CPUs; {load()}")
    base = pathlib.Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.tmp))
    kw = dict(split="train", progress=False, backend=args.backend, num_threads=args.threads)
    try:
        warm = index.select(split="val", per_class=2, seed=0, require_mask=True)
        reference_export(list(warm.records()), base / "warm-ref")
        export(warm, base / "warm-ours", **{**kw, "split": "val"})
        ref_t, ours_t = [], []
        for k in range(args.repeat):
            with Timer() as t:
                reference_export(records, base / f"ref{k}")
            ref_t.append(t)
            print(f"  round {k + 1}: reference {t.wall:7.2f} s  {len(sub) / t.wall:7.1f} img/s  "
                  f"cpu {1e3 * t.cpu / len(sub):5.1f} ms/img   {load()}")
            with Timer() as t:
                res = export(sub, base / f"ours{k}", **kw)
            ours_t.append(t)
            print(f"  round {k + 1}: ours      {t.wall:7.2f} s  {len(sub) / t.wall:7.1f} img/s  "
                  f"cpu {1e3 * t.cpu / len(sub):5.1f} ms/img   {load()}   ({res.images} exported, "
                  f"{sum(res.files.values())} files)")
            shutil.rmtree(base / f"ref{k}", ignore_errors=True)
            shutil.rmtree(base / f"ours{k}", ignore_errors=True)
        crops = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((base / "warm-ours").rglob("*.JPEG"))]
        crops = (crops * (-(-8 * len(sub) // max(1, len(crops)))))[: 8 * len(sub)]
        threads = args.threads or max(1, min(8, os.cpu_count() or 1))
        with Timer() as ceil_t:
            encode_ceiling(crops, threads)
        r = statistics.median(t.wall for t in ref_t)
        o = statistics.median(t.wall for t in ours_t)
        rc = statistics.median(t.cpu for t in ref_t)
        oc = statistics.median(t.cpu for t in ours_t)
        n = len(sub)
        print(f"reference (PAPER.md script, full resolution): {r:7.2f} s  {n / r:7.1f} img/s  "
              f"cpu {1e3 * rc / n:5.1f} ms/img   {load()}")
        print(f"ours (bgsynth export, 224 px, 8 variants):   {o:7.2f} s  {n / o:7.1f} img/s  "
              f"cpu {1e3 * oc / n:5.1f} ms/img   {load()}")
        print(f"encode ceiling ({threads} threads, 8 JPEGs/img):  {ceil_t.wall:7.2f} s  {n / ceil_t.wall:7.1f} img/s  "
              f"cpu {1e3 * ceil_t.cpu / n:5.1f} ms/img   {load()}")
        print(f"ratio ours / reference: {r / o:.2f}x images/s (target 20x), {rc / oc:.2f}x CPU time per image; "
              f"ours / encode ceiling: {ceil_t.wall / o:.2f}   {load()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
