"""Training on a composed (Waterbirds-style) set: online composition vs writing the set to JPEG files first.

* **ours**: :func:`bgsynth.train.train` with ``compose=``: the foreground split decoded once and kept in memory,
  each sample's background drawn by the rule (:mod:`bgsynth.compose`) from a resident pool of scene crops, the
  composite made in-batch (:class:`~bgsynth.augment.BackgroundSwap`: flip, composite, normalise in one pass), the
  model trained on it. Nothing is written.
* **reference**: the way existing generators are used (the Waterbirds script of group DRO): a generator writes
  every composite to disk as a JPEG, here one image at a time with PIL and NumPy (the bird image and its mask at
  full resolution, the place image resized to cover it and centre-cropped, pasted where the mask is 1, JPEG
  quality 95), with the *same* backgrounds the rule chose; then a :class:`torch.utils.data.Dataset` reads the
  files with PIL (resize + centre crop to the model's crop, random flip, ``ToTensor`` + ``Normalize``) through a
  :class:`torch.utils.data.DataLoader` with ``--workers`` worker processes, and the same model is trained with the
  same optimizer, batch size and number of steps.

Both train the same CNN for ``--epochs`` epochs. Reported, in the same run: wall time of each side (the
reference's split into writing the set and training from it), CPU seconds per training sample (this process and
its waited-for children, the DataLoader workers and the generator included), the ratios, and the load average
before and after each side (the machine is shared). A correlation that changes per epoch (``--correlation
0.95,0.5``) costs ours nothing more; the reference must write a new set for every epoch whose correlation differs,
which ``--rewrite-per-epoch`` measures.

Usage::

    python benchmarks/bench_compose.py                          # 150 train birds per class, 3 epochs, 72 -> 64
    python benchmarks/bench_compose.py --per-class 300 --epochs 5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import Timer  # noqa: E402

from bgsynth.classes import IN9_MEAN, IN9_STD  # noqa: E402
from bgsynth.compose import ComposeSpec, compose_backgrounds  # noqa: E402
from bgsynth.compose_loader import load_backgrounds  # noqa: E402
from bgsynth.config import resolve_run  # noqa: E402
from bgsynth.geometry import CropGeometry  # noqa: E402
from bgsynth.index import DatasetIndex  # noqa: E402
from bgsynth.models import create_model  # noqa: E402
from bgsynth.sources.synthetic import build_builtin_dataset  # noqa: E402
from bgsynth.train import train  # noqa: E402


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


# ----------------------------------------------------------------------------------------------- the reference
def write_composed(index: DatasetIndex, bg_index: DatasetIndex, choice_bg_ids: dict, out: pathlib.Path) -> list:
    """The generator script's way: one image at a time, full resolution, PIL + NumPy, JPEG files. Returns
    ``[(path, label)]``."""
    items = []
    for image_id in index.ids:
        rec = index.record(image_id)
        with Image.open(rec.path) as im:
            fg = np.asarray(im.convert("RGB"))
        mask = rec.mask().astype(bool)
        h, w = mask.shape
        place = bg_index.record(choice_bg_ids[image_id])
        with Image.open(place.path) as im:
            im = im.convert("RGB")
            s = max(w / im.width, h / im.height)
            im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.BILINEAR)
            x0, y0 = (im.width - w) // 2, (im.height - h) // 2
            bg = np.asarray(im.crop((x0, y0, x0 + w, y0 + h)))
        comp = np.where(mask[..., None], fg, bg)
        path = out / f"{rec.label}" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(comp).save(path, quality=95)
        items.append((str(path), rec.label))
    return items


class FileSet(torch.utils.data.Dataset):
    """JPEG files -> resize (shorter side) + centre crop + random flip + ToTensor + Normalize, per sample."""

    def __init__(self, items, geometry: CropGeometry, seed: int):
        self.items, self.geometry, self.seed = items, geometry, seed
        self.mean = torch.tensor(IN9_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IN9_STD).view(3, 1, 1)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        g = self.geometry
        with Image.open(path) as im:
            im = im.convert("RGB")
            plan = g.plan(im.height, im.width)
            rh, rw = plan.resized
            im = im.resize((rw, rh), Image.BILINEAR)
            top, left = plan.offset
            im = im.crop((left, top, left + g.crop, top + g.crop))
        if float(torch.rand(())) < 0.5:  # the DataLoader seeds each worker
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std, label


def train_from_files(items, geometry, epochs, batch, workers, seed, num_classes):
    torch.manual_seed(seed)
    model = create_model("bgsynth_cnn", num_classes=num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * batch / 64, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = torch.utils.data.DataLoader(FileSet(items, geometry, seed), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    steps = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    return steps


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=150, help="train birds per class")
    ap.add_argument("--places", type=int, default=80, help="train scenes per family")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resize", type=int, default=72)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--correlation", default="0.95", help="one value, or one per epoch (comma-separated)")
    ap.add_argument("--rewrite-per-epoch", action="store_true",
                    help="the reference writes a new set for every epoch (a correlation that changes per epoch)")
    ap.add_argument("--cache-dir", default=None, help="where the waterbirds-like set is built (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    corr = [float(c) for c in args.correlation.split(",")]
    corr = corr[0] if len(corr) == 1 else tuple(corr)
    cache = pathlib.Path(args.cache_dir or tempfile.mkdtemp(prefix="bench-compose-"))
    path = build_builtin_dataset(root=cache, kind="waterbirds-like", train_per_class=args.per_class, val_per_class=1,
                                 train_places_per_class=args.places, val_places_per_class=1, progress=False)
    root = path.parent
    index = DatasetIndex.load(path).select(split="train")
    geometry = CropGeometry(args.resize, args.crop)
    spec = ComposeSpec(str(root / "places" / "train"), str(root / "pairing.json"), correlation=corr)
    n = len(index)
    print(f"{n} train birds, {2 * args.places} scenes, {args.epochs} epochs, batch {args.batch}, "
          f"{args.resize} -> {args.crop}, correlation {corr}, torch threads {torch.get_num_threads()}")

    # ours: online, nothing written
    print(f"ours      before: {load()}")
    with Timer() as t_ours:
        res = train(index, compose=spec, epochs=args.epochs, batch_size=args.batch, geometry=geometry, device="cpu",
                    backend="auto", val_split=None, progress=False, seed=0)
    print(f"ours      after:  {load()}")
    samples = res.images

    # the reference: the same rule's backgrounds, written to JPEG files, then a DataLoader
    run = resolve_run(geometry=geometry, device="cpu", seed=0)
    bg = load_backgrounds(spec.backgrounds, run)
    rule = spec.rule(index.label_space, bg.label_space, 0)
    passes = args.epochs if args.rewrite_per_epoch else 1
    print(f"reference before: {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-compose-files-") as tmp:
        with Timer() as t_write:
            for e in range(passes):
                ids = torch.tensor(index.ids)
                ch = compose_backgrounds(ids, torch.from_numpy(index.labels()), bg.pool, rule, e)
                items = write_composed(index, bg.index, dict(zip(index.ids, ch.bg_ids.tolist())),
                                       pathlib.Path(tmp) / f"e{e}")
        with Timer() as t_train:
            steps = train_from_files(items, geometry, args.epochs, args.batch, args.workers, 0, 2)
    print(f"reference after:  {load()}")
    ref_wall, ref_cpu = t_write.wall + t_train.wall, t_write.cpu + t_train.cpu
    print(f"\n{'':28s}{'wall s':>10s}{'CPU ms/sample':>16s}")
    print(f"{'ours (online)':28s}{t_ours.wall:10.1f}{1000 * t_ours.cpu / samples:16.2f}")
    print(f"{'reference: write JPEGs':28s}{t_write.wall:10.1f}{1000 * t_write.cpu / samples:16.2f}")
    print(f"{'reference: DataLoader train':28s}{t_train.wall:10.1f}{1000 * t_train.cpu / samples:16.2f}")
    print(f"{'reference total':28s}{ref_wall:10.1f}{1000 * ref_cpu / samples:16.2f}")
    print(f"\nratio reference / ours: wall x{ref_wall / t_ours.wall:.2f}, CPU per sample x{ref_cpu / t_ours.cpu:.2f} "
          f"({samples} samples each side, reference steps {steps} vs ours {res.steps}); {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
