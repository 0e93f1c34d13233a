"""GrabCut masks per second: ``bgsynth.prepare.prepare`` vs a reference loop written from PAPER.md, 1 vs N processes.

* **reference**: the authors' generation script as PAPER.md describes it, one image at a time in this process:
  decode (PIL), parse the ILSVRC VOC XML and check its width/height against the image, exactly one box, paint the
  box into a mask, resize the shorter side to 256 with nearest neighbour and centre-crop 224 to check "at most 90%
  of the crop" and "at least 50% of the box inside", check that the crop-space box leaves a margin (Only-BG-T),
  then ``cv2.grabCut`` with the box as rectangle, 5 iterations, accepted at >= 10% of the box, up to 10 tries.
  It seeds OpenCV's RNG like ours (``image_seed + attempt``) so that both produce the same masks, which is checked.
* **ours, 1 process, OpenCV threads**: ``prepare(index, recompute=True, workers=1)`` in this process, with OpenCV's
  default thread pool (it parallelises parts of GrabCut a little over the cores).
* **ours, 1 process, 1 thread**: the same with ``cv2.setNumThreads(1)``: exactly what each pool worker runs, so
  this is the baseline of the scaling figure.
* **ours, N processes**: ``workers=N`` (forkserver pool, one OpenCV thread per worker).

The scaling figure is N processes against 1 process of the same kind (one OpenCV thread each): ``cv2.grabCut`` is
one image on one core, so N idle cores should give close to N times the throughput. (Compared against the
in-process run with OpenCV's own threads, which already borrows the second core for parts of GrabCut, two
processes look worse than they are: that comparison, on a shared machine, is how "0.86x" came about.) Every row
prints the 1-minute load average before and after it: on a shared machine a figure measured at load > 1 on 2
cores says more about the neighbours than about the pool (``--wait-idle`` waits for a quiet moment).

Images are ImageNet-sized (``--size``, default 500x375): scenes of the built-in generator
(:func:`bgsynth.sources.synthetic.render_sample`) resized to that size, written as JPEG with VOC XML boxes and the
true masks in the index. Warm-up first (one small run of each, which also starts the forkserver), then
``--repeat`` timed rounds alternating the rows so they see the same machine load; medians. Single-process rows also
report CPU seconds per image of every process of the run (this one, the forkserver, the workers), which is robust
to other load on a shared machine.

Then the ``--max-side`` trade-off: GrabCut at full resolution vs a reduced working resolution, images/s (all
processes) and mask IoU against the true masks, on the same images or on any index with true masks (``--index``,
e.g. the built-in dataset's). ``--calibrate`` measures what GrabCut costs per pixel (peak memory above the
process's baseline, ``VmHWM``, and CPU time; one fresh process per size), the constants of
:func:`bgsynth.masks.grabcut_cost`.

Usage::

    python benchmarks/bench_prepare.py                          # 24 images of 500x375, 3 rounds
    python benchmarks/bench_prepare.py --images 48 --repeat 5 --wait-idle 0.5 --max-sides none,320,256,160,96
    python benchmarks/bench_prepare.py --index ~/.cache/bgsynth/builtin-.../index.json --tradeoff-only
    python benchmarks/bench_prepare.py --calibrate              # bytes and microseconds per pixel
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import cv2
import numpy as np


from bgsynth.geometry import CropGeometry  # noqa: E402
from bgsynth.index import DatasetIndex, inclusive_to_bbox, mask_extent, rle_encode  # noqa: E402
from bgsynth.masks import grabcut_cost, image_seed, mask_iou  # noqa: E402
from bgsynth.prepare import prepare  # noqa: E402


def load() -> float:
    """The 1-minute load average (the machine is shared: printed beside every figure)."""
    return os.getloadavg()[0]


def session_cpu() -> float:
    """CPU seconds used so far by this session's processes: this one, the forkserver, the pool workers (alive, or
    exited and reaped by the forkserver: their time moves to its ``cutime``). On a shared machine this, unlike wall
    time, does not depend on the neighbours: equal CPU per image in 1 and N processes means N free cores give N
    times the throughput. ``0.0`` where there is no ``/proc``."""
    if not os.path.isdir("/proc/self"):
        return 0.0
    sid, total = os.getsid(0), 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(threshold: float | None, limit: float = 600.0) -> None:
    """Wait (at most ``limit`` s) until the 1-minute load average is below ``threshold``."""
    if threshold is None:
        return
    t0 = time.monotonic()
    while load() >= threshold and time.monotonic() - t0 < limit:
        time.sleep(5)


# ----------------------------------------------------------------------------------------------- data
def make_data(root: pathlib.Path, n: int, width: int, height: int, seed: int = 0) -> pathlib.Path:
    """Write ``n`` JPEGs of ``width`` x ``height`` with VOC XML and an index with the true masks; return its path."""
    from bgsynth.sources.synthetic import render_sample, voc_xml

    idx = DatasetIndex.empty(image_root=".")
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "xml").mkdir(parents=True, exist_ok=True)
    k = 0
    while len(idx) < n:
        s = render_sample(seed, "val", k % 9, k // 9, two_object_rate=0.0)
        k += 1
        img = cv2.resize(s.image, (width, height), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(s.mask, (width, height), interpolation=cv2.INTER_NEAREST)
        box = mask_extent(mask)
        if box is None:
            continue
        stem = f"bench_{len(idx):05d}"
        cv2.imwrite(str(root / "img" / f"{stem}.JPEG"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / "xml" / f"{stem}.xml").write_text(voc_xml("val", stem, width, height, "n00000000", [box]))
        idx.add_image(
            {"file_name": f"img/{stem}.JPEG", "width": width, "height": height, "label": s.label, "split": "val"},
            [{"bbox": inclusive_to_bbox(box), "segmentation": rle_encode(mask), "mask_source": "synthetic"}],
        )
    return idx.save(root / "index.json")


# ----------------------------------------------------------------------------------------------- reference
def reference_one(img_path: str, xml_path: str, seed: int) -> np.ndarray | None:
    """The authors' per-image procedure (PAPER.md, "How an image enters the set"); mask or None if dropped."""
    from PIL import Image

    if not (os.path.exists(img_path) and os.path.exists(xml_path)):
        return None
    rgb = np.asarray(Image.open(img_path).convert("RGB"))
    h, w = rgb.shape[:2]
    ann = ET.parse(xml_path).getroot()
    size = ann.find("size")
    if int(size.find("width").text) != w or int(size.find("height").text) != h:
        return None
    objs = ann.findall("object")
    if len(objs) != 1:
        return None
    bb = objs[0].find("bndbox")
    x0, y0, x1, y1 = (int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
    # filters 3 and 4 on a painted box mask: shorter side to 256 (nearest), centre crop 224
    box_mask = np.zeros((h, w), np.uint8)
    box_mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    rh, rw = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    resized = np.asarray(Image.fromarray(box_mask).resize((rw, rh), Image.NEAREST))
    top, left = int(round((rh - 224) / 2.0)), int(round((rw - 224) / 2.0))
    crop = resized[top : top + 224, left : left + 224]
    if crop.sum() > 0.9 * 224 * 224 or crop.sum() < 0.5 * resized.sum():
        return None
    if x0 <= 0 and y0 <= 0 and x1 >= w - 1 and y1 >= h - 1:
        return None  # no margin left in the full-resolution image: no Only-BG-T (prepare's default tiling="paper")
    # filter 5: GrabCut, 5 iterations, >= 10% of the box, up to 10 tries
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for attempt in range(10):
        cv2.setRNGSeed(seed + attempt)
        m = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(rgb, m, (x0, y0, x1 - x0 + 1, y1 - y0 + 1), bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
        fg = ((m == cv2.GC_FGD) | (m == cv2.GC_PR_FGD)).astype(np.uint8)
        if fg.sum() >= 0.1 * area:
            return fg
    return None


def run_reference(root: pathlib.Path, index: DatasetIndex, ids) -> dict[int, np.ndarray | None]:
    out = {}
    for i in ids:
        stem = pathlib.Path(index.image(i)["file_name"]).stem
        out[i] = reference_one(str(root / "img" / f"{stem}.JPEG"), str(root / "xml" / f"{stem}.xml"),
                               image_seed(0, i))
    return out


# ----------------------------------------------------------------------------------------------- timing
def timed(fn):
    """``(result, wall s, CPU s of every process of this session, (load before, load after))``."""
    w0, c0, l0 = time.perf_counter(), session_cpu(), load()
    res = fn()
    wall = time.perf_counter() - w0
    time.sleep(0.2)  # the forkserver reaps the pool's workers (and takes over their CPU time)
    return res, wall, session_cpu() - c0, (l0, load())


class _OpenCVThreads:
    """``with _OpenCVThreads(1): ...``: OpenCV's thread count for a block (restored after)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = cv2.getNumThreads()
        cv2.setNumThreads(self.n)

    def __exit__(self, *exc):
        cv2.setNumThreads(self.before)


# ----------------------------------------------------------------------------------------------- calibration
_CALIBRATE = r"""
import json, sys, time
import numpy as np, cv2
cv2.setNumThreads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
w, h, iters = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(0)
img = cv2.resize((rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255).astype(np.uint8), (w, h),
                 interpolation=cv2.INTER_CUBIC)
cv2.ellipse(img, (w // 2, h // 2), (w // 5, h // 4), 0, 0, 360, (220, 50, 40), -1)
mask, bgd, fgd = np.zeros((h, w), np.uint8), np.zeros((1, 65)), np.zeros((1, 65))
base = max(status("VmHWM"), status("VmRSS"))
c0 = time.process_time()
cv2.setRNGSeed(0)
cv2.grabCut(img, mask, (w // 6, h // 6, w * 2 // 3, h * 2 // 3), bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
print(json.dumps({"bytes": status("VmHWM") - base, "cpu": time.process_time() - c0}))
"""


def calibrate(sizes=((500, 375), (1000, 750), (2000, 1500), (3000, 2250)), iterations=(1, 5, 10)) -> None:
    """Peak memory and CPU time of ``cv2.grabCut`` per pixel, one fresh process per measurement."""
    print(f"GrabCut cost per pixel (one fresh process each; OpenCV {cv2.__version__}, one thread); "
          f"bgsynth.masks.grabcut_cost's estimate beside it")
    print(f"{'size':>11s} {'iter':>4s} {'MB':>7s} {'B/px':>6s} {'est B/px':>8s} {'cpu s':>6s} {'us/px':>6s} "
          f"{'est us/px':>9s} {'load':>5s}")
    for w, h in sizes:
        for it in iterations:
            out = subprocess.run([sys.executable, "-c", _CALIBRATE, str(w), str(h), str(it)], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out)
            est = grabcut_cost(h, w, iterations=it)
            px = w * h
            print(f"{w:>5d}x{h:<5d} {it:4d} {r['bytes'] / 2**20:7.0f} {r['bytes'] / px:6.0f} {est.bytes / px:8.0f} "
                  f"{r['cpu']:6.2f} {r['cpu'] / px * 1e6:6.2f} {est.seconds / px * 1e6:9.2f} {load():5.2f}")
    print("(GrabCut alone; a prepare worker adds the decode at full resolution, which grabcut_cost counts too)")


# ----------------------------------------------------------------------------------------------- main
def _rows_table(rows: dict, cpu: dict, loads: dict, n: int, base: str, ref: str) -> None:
    print(f"{'':34s} {'images/s':>9s} {'vs ref':>7s} {'vs 1 thread':>11s} {'CPU s/img':>10s} {'load before-after':>18s}")
    print(f"{'':34s} {'':9s} {'':7s} {'':11s} {'(all procs)':>10s}")
    ref_wall = statistics.median(rows[ref])
    base_wall = statistics.median(rows[base])
    for name, walls in rows.items():
        wmed = statistics.median(walls)
        c = f"{statistics.median(cpu[name]) / n:10.3f}" if cpu.get(name) else f"{'-':>10s}"
        lo = f"{min(a for a, _ in loads[name]):.2f}-{max(b for _, b in loads[name]):.2f}"
        print(f"{name:34s} {n / wmed:9.2f} {ref_wall / wmed:6.2f}x {base_wall / wmed:10.2f}x {c} {lo:>18s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24, help="images per timed round")
    ap.add_argument("--size", default="500x375", help="image size WxH")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (medians reported)")
    ap.add_argument("--workers", type=int, default=None, help="processes of the 'N processes' row (default: all cores)")
    ap.add_argument("--max-sides", default="none,256,160", help="working resolutions of the trade-off table")
    ap.add_argument("--index", default=None, help="run the trade-off on this index (needs true masks)")
    ap.add_argument("--split", default=None, help="split of --index to use")
    ap.add_argument("--tradeoff-only", action="store_true", help="skip the ours-vs-reference comparison")
    ap.add_argument("--no-tradeoff", action="store_true", help="skip the --max-side trade-off")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="LOAD",
                    help="before each round, wait (up to 10 min) until the 1-minute load average is below LOAD")
    ap.add_argument("--calibrate", action="store_true", help="only measure GrabCut's bytes and seconds per pixel")
    ap.add_argument("--root", default=None, help="where to write the benchmark images (default: a temp folder)")
    args = ap.parse_args()
    if args.calibrate:
        calibrate()
        return
    width, height = (int(v) for v in args.size.lower().split("x"))
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or ncpu
    print(f"machine: {ncpu} cores visible; OpenCV {cv2.__version__} (default threads {cv2.getNumThreads()}); "
          f"'N processes' = {workers}; load average {os.getloadavg()}")

    tmp = tempfile.TemporaryDirectory(prefix="bench_prepare_")
    root = pathlib.Path(args.root or tmp.name)
    t0 = time.perf_counter()
    index_path = make_data(root, args.images + 2, width, height)
    full = DatasetIndex.load(index_path)
    print(f"data: {len(full)} images of {width}x{height} written in {time.perf_counter() - t0:.1f} s to {root}")
    warm_ids, ids = full.ids[:2], full.ids[2:]
    warm, bench = full.select(ids=warm_ids), full.select(ids=ids)
    out = root / "out.json"

    def ours(idx, w, max_side=None):
        return prepare(idx, out=out, recompute=True, workers=w, progress=False, max_side=max_side,
                       geometry=CropGeometry())

    def one_thread(idx):
        with _OpenCVThreads(1):
            return ours(idx, 1)

    if not args.tradeoff_only:
        ref, threads, single, multi = ("reference (1 process)", "ours, 1 process, OpenCV threads",
                                       "ours, 1 process, 1 thread", f"ours, {workers} processes")
        runs = {ref: lambda: run_reference(root, bench, ids), threads: lambda: ours(bench, 1),
                single: lambda: one_thread(bench), multi: lambda: ours(bench, workers)}
        # warm-up: imports, the forkserver, caches
        run_reference(root, warm, warm_ids)
        ours(warm, 1)
        one_thread(warm)
        ours(warm, workers)
        rows = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        loads = {k: [] for k in runs}
        results = {}
        for _ in range(args.repeat):
            for name, fn in runs.items():
                wait_idle(args.wait_idle)
                results[name], wall, c, ld = timed(fn)
                rows[name].append(wall)
                loads[name].append(ld)
                cpu[name].append(c)
        ref_masks, res1 = results[ref], results[single]
        same = sum(
            1 for i in ids
            if (ref_masks[i] is None and i not in res1.ids)
            or (ref_masks[i] is not None and i in res1.ids and np.array_equal(ref_masks[i], res1.record(i).mask()))
        )
        same_n = sum(1 for i in res1.ids if i in results[multi].ids
                     and np.array_equal(res1.record(i).mask(), results[multi].record(i).mask()))
        n = len(ids)
        print(f"\nGrabCut masks from boxes, {n} images of {width}x{height}, median of {args.repeat} rounds")
        _rows_table(rows, cpu, loads, n, single, ref)
        print(f"identical masks/rejects, ours vs reference: {same}/{n}; {workers} processes vs 1: "
              f"{same_n}/{len(res1)} masks identical")
        print(f"scaling, {workers} processes vs 1 process (one OpenCV thread each): "
              f"{statistics.median(rows[single]) / statistics.median(rows[multi]):.2f}x measured "
              f"(per round: {', '.join(f'{a / b:.2f}x' for a, b in zip(rows[single], rows[multi]))}); "
              f"CPU per image {statistics.median(cpu[multi]) / statistics.median(cpu[single]):.2f}x that of 1 process, "
              f"so {workers} idle cores would give about "
              f"{workers * statistics.median(cpu[single]) / statistics.median(cpu[multi]):.2f}x")

    # ------------------------------------------------------------------------------------- max-side trade-off
    if args.no_tradeoff:
        tmp.cleanup()
        return
    if args.index:
        t_index = DatasetIndex.load(args.index)
        if args.split:
            t_index = t_index.select(split=args.split)
        where = f"{args.index}" + (f" (split {args.split})" if args.split else "")
    else:
        t_index, where = bench, f"the {len(bench)} benchmark images ({width}x{height})"
    sides = [None if s.strip().lower() in ("none", "full", "0") else int(s) for s in args.max_sides.split(",")]
    print(f"\n--max-side trade-off on {where}, {workers} processes, IoU vs the true masks")
    print(f"{'max_side':>9s} {'images/s':>9s} {'speed-up':>8s} {'mean IoU':>9s} {'p05':>6s} {'median':>7s} "
          f"{'failed':>6s} {'IoU vs full':>11s} {'load':>5s}")
    base_speed = None
    full_masks = None
    for s in sides:
        wait_idle(args.wait_idle)
        res, wall, _, ld = timed(lambda: ours(t_index, workers, s))
        q = res.data["info"]["prepare"]["quality"]
        n_gc = res.data["info"]["prepare"]["timing"]["grabcut_images"]
        speed = n_gc / wall
        base_speed = base_speed or speed
        masks = {i: res.record(i).mask() for i in res.ids}
        if full_masks is None:
            full_masks = masks
            agree = "-"
        else:
            common = sorted(set(masks) & set(full_masks))
            agree = f"{np.mean([mask_iou(masks[i], full_masks[i]) for i in common]):.3f}" if common else "-"
        print(f"{str(s or 'full'):>9s} {speed:9.2f} {speed / base_speed:7.2f}x {q['mean']:9.3f} "
              f"{q['quantiles']['p05']:6.3f} {q['quantiles']['p50']:7.3f} {q['failed']:6d} {agree:>11s} {ld[1]:5.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
