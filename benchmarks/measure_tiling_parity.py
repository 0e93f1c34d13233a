"""How close is crop-space Only-BG-T to the paper's original-resolution Only-BG-T followed by resize + crop?

The paper's script tiles at the image's stored resolution (box and strips in original pixels), and the released
image is then brought to the model's crop. bgsynth tiles inside the crop (box carried through the geometry, strip
rule applied to the crop box in the crop). This script computes both on the built-in dataset, with the same
resampling for both (PIL bilinear, antialiased, exactly the ``pil`` decode backend), and prints:

* how often the two choose the same strip side (left/right/top/bottom),
* how often an image has an Only-BG-T in one geometry but not the other (no margin left),
* the mean absolute pixel difference (0..255, over the 3 channels) inside the crop box: over all images, over the
  images whose strip side agrees, and over those where it differs; for scale, the same difference between the
  paper's Only-BG-T and the untouched crop (the foreground the tile replaces).

Usage::

    python benchmarks/measure_tiling_parity.py                 # small built-in dataset, val split, 256 -> 224
    python benchmarks/measure_tiling_parity.py --full --split val
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.geometry import CropGeometry, tile_strips
from engine.pipeline.pil import pil_resize_crop
from kernels import tile_fill


def strip_side(box, height: int, width: int) -> str:
    """Name of the margin the paper's rule picks for an inclusive ``box`` that leaves a margin (for labelling)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    left, right, top, bottom = x0, width - x1, y0, height - y1
    if max(left, right) * height > max(top, bottom) * width:
        return "left" if left > right else "right"
    return "top" if top > bottom else "bottom"


def tile_numpy(img: np.ndarray, box, strip) -> np.ndarray:
    """Only-BG-T of an ``H x W x 3`` image at its own resolution (the paper's order)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    sx0, sy0, tw, th = (int(v) for v in strip)
    out = img.copy()
    tile = img[sy0 : sy0 + th, sx0 : sx0 + tw]
    ys = np.arange(y0, y1 + 1) % th
    xs = np.arange(x0, x1 + 1) % tw
    out[y0 : y1 + 1, x0 : x1 + 1] = tile[np.ix_(ys, xs)]
    return out


def measure(index, geometry: CropGeometry, limit: int | None = None) -> dict:
    from PIL import Image

    same = differ = only_paper = only_ours = neither = 0
    mad_same: list[float] = []
    mad_diff: list[float] = []
    mad_base: list[float] = []
    records = list(index.records())[:limit]
    for rec in records:
        box = rec.union_box
        if box is None:
            continue
        with Image.open(rec.path) as im:
            full = np.asarray(im.convert("RGB"))
        plan = geometry.plan(rec.height, rec.width)
        # the paper: tile at the stored resolution, then resize + crop
        s_full = tile_strips(torch.tensor([box]), rec.height, rec.width)[0].tolist()
        # ours: resize + crop, then tile in the crop
        crop_box = plan.box_to_crop(box)
        crop = pil_resize_crop(Image.fromarray(full), plan)
        cb = crop_box if crop_box is not None else (0, 0, -1, -1)
        s_crop = tile_strips(torch.tensor([cb]), plan.crop, plan.crop)[0].tolist()
        has_p, has_o = s_full[2] > 0, s_crop[2] > 0
        if not has_p or not has_o:
            only_paper += has_p and not has_o
            only_ours += has_o and not has_p
            neither += not has_p and not has_o
            continue
        paper = pil_resize_crop(Image.fromarray(tile_numpy(full, box, s_full)), plan)
        ours = tile_fill(
            torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None],
            torch.tensor([cb], dtype=torch.int32), torch.tensor([s_crop], dtype=torch.int32), backend="torch",
        )[0].permute(1, 2, 0).numpy()
        x0, y0, x1, y1 = cb
        diff = np.abs(paper[y0 : y1 + 1, x0 : x1 + 1].astype(np.int16) - ours[y0 : y1 + 1, x0 : x1 + 1]).mean()
        mad_base.append(float(np.abs(paper[y0 : y1 + 1, x0 : x1 + 1].astype(np.int16) - crop[y0 : y1 + 1, x0 : x1 + 1]).mean()))
        if strip_side(box, rec.height, rec.width) == strip_side(cb, plan.crop, plan.crop):
            same += 1
            mad_same.append(float(diff))
        else:
            differ += 1
            mad_diff.append(float(diff))
    both = same + differ
    return {
        "images": len(records),
        "both_have_only_bg_t": both,
        "same_side": same,
        "same_side_fraction": same / both if both else float("nan"),
        "only_paper_has_margin": only_paper,
        "only_crop_has_margin": only_ours,
        "neither_has_margin": neither,
        "mad_all": float(np.mean(mad_same + mad_diff)) if both else float("nan"),
        "mad_same_side": float(np.mean(mad_same)) if mad_same else float("nan"),
        "mad_different_side": float(np.mean(mad_diff)) if mad_diff else float("nan"),
        "mad_baseline": float(np.mean(mad_base)) if mad_base else float("nan"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the default built-in dataset instead of the small one")
    p.add_argument("--split", default="val", help="split to measure (default: val)")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from engine.sources.synthetic import load_builtin_index

    index = load_builtin_index(small=not args.full, progress=False).select(split=args.split)
    t0 = time.perf_counter()
    r = measure(index, CropGeometry(args.resize, args.crop), args.limit)
    dt = time.perf_counter() - t0
    print(f"built-in dataset ({'full' if args.full else 'small'}), split {args.split}, "
          f"resize {args.resize} / crop {args.crop}: {r['images']} images, {dt:.1f} s")
    print(f"  Only-BG-T in both geometries      : {r['both_have_only_bg_t']}")
    print(f"  margin only at original resolution: {r['only_paper_has_margin']}")
    print(f"  margin only in the crop           : {r['only_crop_has_margin']}")
    print(f"  no margin in either               : {r['neither_has_margin']}")
    print(f"  same strip side                   : {r['same_side']} ({100 * r['same_side_fraction']:.1f}%)")
    print(f"  mean |diff| inside the box, all   : {r['mad_all']:.2f} / 255")
    print(f"    ... same strip side             : {r['mad_same_side']:.2f} / 255")
    print(f"    ... different strip side        : {r['mad_different_side']:.2f} / 255")
    print(f"  scale: paper's Only-BG-T vs the untouched crop inside the box: {r['mad_baseline']:.2f} / 255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
