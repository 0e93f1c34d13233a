"""What the benchmarks share: CPU-time measurement and the paper's per-image Only-BG-T reference (PAPER.md).

The reference is written independently of the engine (NumPy, one image at a time) so that a benchmark compares
the engine with the procedure the paper describes, not with itself.
"""

from __future__ import annotations

import resource
import time

import numpy as np

__all__ = ["cpu_seconds", "Timer", "paper_decode", "paper_strip", "paper_only_bg_t", "load_average"]


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


class Timer:
    """``with Timer() as t: ...`` then ``t.wall`` and ``t.cpu`` in seconds."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = cpu_seconds() - self.c0


def paper_decode(rec, geometry):
    """One image the reference way: PIL decode, bilinear resize, centre crop; mask and box through the same plan.

    Returns:
        ``(image uint8 [C, C, 3], mask bool [C, C], inclusive crop box)`` with ``(0, 0, -1, -1)`` for no box.
    """
    from PIL import Image

    plan = geometry.plan(rec.height, rec.width)
    with Image.open(rec.path) as im:
        im = im.convert("RGB")
        rh, rw = plan.resized
        im = im.resize((rw, rh), Image.BILINEAR)
        top, left = plan.offset
        img = np.asarray(im.crop((left, top, left + plan.crop, top + plan.crop)))
    m = rec.mask()
    mask = plan.crop_mask(m).astype(bool) if m is not None else np.zeros(img.shape[:2], bool)
    box = plan.box_to_crop(rec.union_box) if rec.union_box is not None else None
    return img, mask, (0, 0, -1, -1) if box is None else box


def paper_strip(box, h, w):
    """PAPER.md's Only-BG-T strip rule -> (x, y, tile_w, tile_h), or None when the box leaves no margin."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0 or (x0 <= 0 and y0 <= 0 and x1 >= w - 1 and y1 >= h - 1):
        return None
    left, right, top, bottom = x0, w - x1, y0, h - y1
    if max(left, right) * h > max(top, bottom) * w:
        return (0, 0, x0, h) if left > right else (x1, 0, w - x1, h)
    return (0, 0, w, y0) if top > bottom else (0, y1, w, h - y1)


def paper_only_bg_t(img: np.ndarray, box):
    """Only-BG-T of one ``H x W x 3`` image: the inclusive box filled with the strip tiled from the origin."""
    h, w = img.shape[:2]
    s = paper_strip(box, h, w)
    if s is None:
        return None
    sx, sy, tw, th = s
    x0, y0, x1, y1 = box
    tiled = np.tile(img[sy : sy + th, sx : sx + tw], (h // th + 1, w // tw + 1, 1))[:h, :w]
    out = img.copy()
    out[y0 : y1 + 1, x0 : x1 + 1] = tiled[y0 : y1 + 1, x0 : x1 + 1]
    return out


def load_average() -> str:
    """The 1/5/15-minute load average, for printing beside every figure (the machine may be shared)."""
    import os

    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"
