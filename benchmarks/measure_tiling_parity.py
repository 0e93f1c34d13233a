"""How far is the crop-space Only-BG-T approximation (``tiling="crop"``) from the paper's construction?

The paper's script tiles at the image's stored resolution (strip rule on the full-resolution margins, tile from the
image origin) and the image is then brought to the model's crop; that is bgsynth's default (``tiling="paper"``).
``tiling="crop"`` resizes and crops first and tiles inside the crop (strip rule on the crop box): faster, but not
the paper's backgrounds. This script decodes the same images in both modes with the same decode backend and
prints, over the images that have an Only-BG-T in both:

* how often the two choose the same strip side (left/right/top/bottom), and how many images have an Only-BG-T in
  one mode only (the centre crop can leave no margin although the stored image has one, or the reverse);
* the mean absolute difference inside the crop box (0..255, over the 3 channels) and the share of those pixels off
  by more than 8 grey levels: over all images, where the strip side agrees and where it differs; for scale, the
  same difference between the paper's Only-BG-T and the untouched crop (the foreground the tile replaces).

Data: ``--data photos`` (default) builds the real-photograph test fixture (``tests/photos.py``: 14 scikit-image
photographs cut to ImageNet-like sizes, with boxes and masks; needs scikit-image); ``--data builtin`` measures
the built-in cartoons, which understate the difference (flat procedural backgrounds).

Usage::

    python benchmarks/measure_tiling_parity.py                      # real photographs, 256 -> 224
    python benchmarks/measure_tiling_parity.py --data builtin --full
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve()

from bgsynth.geometry import CropGeometry, tile_strips  # noqa: E402
from bgsynth.pipeline import create_loader  # noqa: E402
from bgsynth.types import Batch  # noqa: E402
from bgsynth.variants import synthesize  # noqa: E402


def strip_side(box, height: int, width: int) -> str | None:
    """The margin the paper's rule picks for an inclusive ``box`` (``None``: no margin)."""
    s = tile_strips(torch.tensor([list(box)]), height, width)[0].tolist()
    if s[2] == 0:
        return None
    sx0, sy0, tw, th = s
    if th == height and tw != width:
        return "left" if sx0 == 0 else "right"
    return "top" if sy0 == 0 else "bottom"


def decode_all(index, geometry, backend, tiling) -> Batch:
    loader = create_loader(index, backend=backend, geometry=geometry, batch_size=32, tiling=tiling)
    try:
        return Batch.cat(list(loader))
    finally:
        loader.close()


def measure(index, geometry: CropGeometry, backend: str = "pil") -> dict:
    paper = decode_all(index, geometry, backend, "paper")
    crop = decode_all(index, geometry, backend, "crop")
    assert paper.image_ids.tolist() == crop.image_ids.tolist()
    p_img = synthesize(paper, ["only_bg_t"])["only_bg_t"]
    c_img = synthesize(crop, ["only_bg_t"])["only_bg_t"]
    same = differ = only_paper = only_crop = neither = 0
    rows = {"same": [], "differ": []}
    base = []
    for k, image_id in enumerate(paper.image_ids.tolist()):
        rec = index.record(image_id)
        hp, hc = bool(p_img.valid[k]), bool(c_img.valid[k])
        if not (hp and hc):
            only_paper += hp and not hc
            only_crop += hc and not hp
            neither += not hp and not hc
            continue
        x0, y0, x1, y1 = paper.boxes[k].tolist()
        a = p_img.images[k, :, y0 : y1 + 1, x0 : x1 + 1].int()
        b = c_img.images[k, :, y0 : y1 + 1, x0 : x1 + 1].int()
        x = paper.images[k, :, y0 : y1 + 1, x0 : x1 + 1].int()
        d = (a - b).abs()
        side_p = strip_side(rec.union_box, rec.height, rec.width)
        side_c = strip_side((x0, y0, x1, y1), geometry.crop, geometry.crop)
        key = "same" if side_p == side_c else "differ"
        same += key == "same"
        differ += key == "differ"
        rows[key].append((d.float().mean().item(), (d > 8).float().mean().item(), d.numel()))
        base.append((a - x).abs().float().mean().item())
    allr = rows["same"] + rows["differ"]

    def mean(v):
        return float(np.mean(v)) if v else float("nan")

    def share(rs):  # pixel-weighted share of |diff| > 8
        return float(sum(r[1] * r[2] for r in rs) / sum(r[2] for r in rs)) if rs else float("nan")

    return {
        "images": len(paper),
        "both": same + differ, "same_side": same, "different_side": differ,
        "only_paper": only_paper, "only_crop": only_crop, "neither": neither,
        "mad_all": mean([r[0] for r in allr]), "mad_same": mean([r[0] for r in rows["same"]]),
        "mad_differ": mean([r[0] for r in rows["differ"]]),
        "over8_all": share(allr), "over8_same": share(rows["same"]), "over8_differ": share(rows["differ"]),
        "mad_baseline": mean(base),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("photos", "builtin"), default="photos")
    p.add_argument("--full", action="store_true", help="builtin: the default built-in dataset, not the small one")
    p.add_argument("--split", default="val", help="builtin: split to measure")
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--backend", default="pil", help="decode backend of both modes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from bgsynth.index import DatasetIndex

    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "photos":
            sys.path.insert(0, str(HERE.parents[1] / "tests"))
            from photos import build_photo_index

            index = DatasetIndex.load(build_photo_index(pathlib.Path(tmp)))
            what = "real photographs (tests/photos.py)"
        else:
            from bgsynth.sources.synthetic import load_builtin_index

            index = load_builtin_index(small=not args.full, progress=False).select(split=args.split)
            what = f"built-in dataset ({'full' if args.full else 'small'}), split {args.split}"
        t0 = time.perf_counter()
        r = measure(index, CropGeometry(args.resize, args.crop), args.backend)
        dt = time.perf_counter() - t0
    print(f"{what}, resize {args.resize} / crop {args.crop}, backend {args.backend}: {r['images']} images, "
          f"{dt:.1f} s (load average {' '.join(f'{v:.1f}' for v in os.getloadavg())})")
    print(f"  Only-BG-T in both modes          : {r['both']}")
    print(f"  only with paper tiling           : {r['only_paper']}")
    print(f"  only with crop tiling            : {r['only_crop']}")
    print(f"  in neither                       : {r['neither']}")
    print(f"  same strip side                  : {r['same_side']} of {r['both']}")
    print(f"  mean |paper - crop| inside the box: {r['mad_all']:.1f} / 255, {100 * r['over8_all']:.0f}% of pixels > 8")
    print(f"    ... same strip side            : {r['mad_same']:.1f} / 255, {100 * r['over8_same']:.0f}% > 8")
    print(f"    ... different strip side       : {r['mad_differ']:.1f} / 255, {100 * r['over8_differ']:.0f}% > 8")
    print(f"  scale: paper Only-BG-T vs the untouched crop inside the box: {r['mad_baseline']:.1f} / 255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
