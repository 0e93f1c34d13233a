"""Decode pipeline: the three backends agree, targets follow the geometry exactly, odd files, EXIF, sharding, pool.

Independent references used here:
* crop masks/boxes: the nearest map written out with exact fractions (``floor((i + 1/2) * src / dst)``) and a
  full-resolution box mask carried through it pixel by pixel (not CropPlan's searchsorted);
* Only-BG-T strips: PAPER.md's rule as plain Python ``if``s; tiling: a per-pixel loop;
* pixels of the ``pil`` backend: ``torchvision.transforms.Resize(resize) + CenterCrop(crop)`` on the PIL image.

Pixel tolerance between backends on CPU: all three decode JPEG with libjpeg-turbo (bit-identical pixels); they
differ only in the resampler's rounding (PIL and torchvision's uint8 path use fixed-point coefficients, DALI
float), measured at max |diff| = 1 and mean |diff| < 0.2 grey levels on the built-in dataset, so the bound is
max <= 2 and mean <= 0.5. On CUDA, nvJPEG's IDCT/chroma upsampling differs from libjpeg-turbo: mean <= 1.5 and
99th percentile <= 8 grey levels.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pathlib
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from bgsynth.errors import BackendUnavailableError, ConfigError, DecodeError, PoolTooLargeError
from bgsynth.geometry import CropGeometry
from bgsynth.index import DatasetIndex, Reject, inclusive_to_bbox, rle_encode
from bgsynth.pipeline import (
    AUTO_ORDER,
    BACKENDS,
    BackendSpec,
    auto_backend,
    available_backends,
    create_loader,
    register_backend,
)
from bgsynth.probe import SampleError, probe_image
from bgsynth.pipeline.dali import crop_window
from bgsynth.types import BackgroundPool, Batch
from bgsynth.pool import build_background_pool

ALL = ("pil", "torchvision", "dali")
BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(), reason=f"{b} not installed")) for b in ALL
]
FAST = [p for p in BACKEND_PARAMS if p.values[0] != "pil"]
TARGETS = ("masks", "boxes", "strips", "labels", "image_ids", "has_mask", "has_bgt")
CPU_MAX, CPU_MEAN = 2, 0.5
CUDA_MEAN, CUDA_P99 = 1.5, 8.0
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def collect(loader) -> Batch:
    return Batch.cat(list(loader))


def pixel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().int() - b.cpu().int()).abs()


def assert_targets_equal(x: Batch, ref: Batch) -> None:
    for f in TARGETS:
        a, b = getattr(x, f).cpu(), getattr(ref, f).cpu()
        assert a.dtype == b.dtype and torch.equal(a, b), f"Batch.{f} differs"


# ------------------------------------------------------------------------------------------------ references


def ref_plan(h: int, w: int, g: CropGeometry) -> tuple[int, int, int, int]:
    """(rh, rw, top, left) as torchvision's Resize(int) + CenterCrop compute them."""
    if h <= w:
        rh, rw = g.resize, int(g.resize * w / h)
    else:
        rh, rw = int(g.resize * h / w), g.resize
    return rh, rw, int(round((rh - g.crop) / 2.0)), int(round((rw - g.crop) / 2.0))


def ref_source_index(i: int, src: int, dst: int) -> int:
    """Source pixel whose area holds the centre of output pixel ``i`` (exact rational arithmetic)."""
    return min(math.floor((Fraction(i) + Fraction(1, 2)) * Fraction(src, dst)), src - 1)


def ref_crop(full: np.ndarray, g: CropGeometry) -> np.ndarray:
    h, w = full.shape
    rh, rw, top, left = ref_plan(h, w, g)
    rows = [ref_source_index(top + i, h, rh) for i in range(g.crop)]
    cols = [ref_source_index(left + j, w, rw) for j in range(g.crop)]
    return np.array([[full[y, x] for x in cols] for y in rows], dtype=full.dtype)


def ref_strip(box, c: int) -> tuple[int, int, int, int]:
    """PAPER.md's Only-BG-T strip for an inclusive box in a c x c crop."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0 or (x0 == 0 and y0 == 0 and x1 == c - 1 and y1 == c - 1):
        return (0, 0, 0, 0)
    left, right, top, bottom = x0, c - x1, y0, c - y1
    if max(left, right) * c > max(top, bottom) * c:
        return (0, 0, left, c) if left > right else (x1, 0, right, c)
    return (0, 0, c, top) if top > bottom else (0, y1, c, bottom)


def ref_only_bg_t(img: np.ndarray, box, strip) -> np.ndarray:
    """Per-pixel tiling of PAPER.md: inside the box, pixel (y, x) <- strip pixel (y mod th, x mod tw)."""
    out = img.copy()
    x0, y0, x1, y1 = box
    sx0, sy0, tw, th = strip
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            out[:, y, x] = img[:, sy0 + y % th, sx0 + x % tw]
    return out


# ------------------------------------------------------------------------------------------------ fixtures


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 90 * np.sin(xx / 9.0), 128 + 90 * np.cos(yy / 7.0), (xx * 3 + yy * 2) % 256], -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr_or_img, **kw) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


@dataclasses.dataclass
class Odd:
    index: DatasetIndex
    ids: dict  # name -> image id
    exif_box: tuple
    colour: tuple


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Odd:
    """A hand-made index of odd files: grey, CMYK, PNG-named-JPEG, progressive, EXIF-rotated, broken ones."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(7)
    idx = DatasetIndex.empty(image_root=str(root / "img"))
    (root / "img").mkdir()
    ids = {}

    def add(name, data, w, h, box=(5, 6, 30, 25), mask=True, label=0):
        (root / "img" / f"{name}.JPEG").write_bytes(data) if data is not None else None
        anns = []
        if box is not None:
            a = {"bbox": inclusive_to_bbox(box)}
            if mask:
                m = np.zeros((h, w), np.uint8)
                m[box[1] : box[3] + 1, box[0] : box[2] + 1] = 1
                m[box[1] : box[1] + 3] = 0  # not just the box: a mask with its own shape
                a.update(segmentation=rle_encode(m), mask_source="synthetic")
            anns.append(a)
        ids[name] = idx.add_image({"file_name": f"{name}.JPEG", "width": w, "height": h, "label": label,
                                   "split": "val"}, anns)

    good = _picture(rng, 80, 100)
    add("good", _jpeg(good, quality=90), 100, 80)
    add("gray", _jpeg(Image.fromarray(good).convert("L"), quality=90), 100, 80, label=1)
    add("cmyk", _jpeg(Image.fromarray(_picture(rng, 70, 90)).convert("CMYK"), quality=90), 90, 70, label=2)
    add("png", _jpeg(_picture(rng, 64, 96), format="PNG"), 96, 64, label=3)
    add("progressive", _jpeg(_picture(rng, 90, 60), quality=85, progressive=True), 60, 90, label=4)
    add("small", _jpeg(_picture(rng, 40, 50), quality=90), 50, 40, box=(0, 0, 49, 39), label=5)
    add("nomask", _jpeg(_picture(rng, 75, 75), quality=90), 75, 75, mask=False, label=6)
    add("nobox", _jpeg(_picture(rng, 66, 99), quality=90), 99, 66, box=None, label=7)
    # stored 90 wide x 60 high with EXIF Orientation=6 (a viewer would show it rotated to 60 x 90); a red block
    # at a known stored-pixel box
    colour = (220, 30, 40)
    exif_img = _picture(rng, 60, 90)
    exif_box = (10, 20, 39, 49)
    exif_img[exif_box[1] : exif_box[3] + 1, exif_box[0] : exif_box[2] + 1] = colour
    exif = Image.Exif()
    exif[0x0112] = 6
    add("exif", _jpeg(exif_img, quality=95, subsampling=0, exif=exif.tobytes()), 90, 60, box=exif_box, label=8)
    full = _jpeg(_picture(rng, 80, 100), quality=90)
    add("truncated", full[: len(full) // 2], 100, 80)
    add("zero", b"", 100, 80)
    add("junk", b"this is not an image at all " * 20, 100, 80)
    add("missing", None, 100, 80)
    add("wrongsize", _jpeg(_picture(rng, 50, 70)), 100, 80)
    idx.save(root / "index.json")
    return Odd(DatasetIndex.load(root / "index.json"), ids, exif_box, colour)


BAD = {
    "truncated": Reject.TRUNCATED,
    "zero": Reject.ZERO_BYTE,
    "junk": Reject.UNREADABLE,
    "missing": Reject.MISSING_FILE,
    "wrongsize": Reject.SIZE_MISMATCH,
}


@pytest.fixture(scope="module")
def decoded(tiny_index, tiny_geometry) -> dict:
    """Every available backend's decode of the whole tiny built-in dataset (CPU)."""
    out = {}
    for b in ALL:
        if b in available_backends():
            loader = create_loader(tiny_index, backend=b, geometry=tiny_geometry, batch_size=32, num_threads=2)
            out[b] = collect(loader)
            assert loader.rejects == [], f"{b} rejected files of the built-in dataset: {loader.rejects}"
    return out


# ------------------------------------------------------------------------------------------------ agreement


@pytest.mark.parametrize("backend", FAST)
def test_backends_agree_with_pil(decoded, backend):
    ref, x = decoded["pil"], decoded[backend]
    assert_targets_equal(x, ref)
    assert x.images.dtype == torch.uint8 and x.images.shape == ref.images.shape
    d = pixel_diff(x.images, ref.images)
    assert d.max().item() <= CPU_MAX, f"{backend}: max |diff| {d.max().item()}"
    assert d.float().mean().item() <= CPU_MEAN, f"{backend}: mean |diff| {d.float().mean().item():.3f}"


def test_pil_backend_equals_torchvision_transforms(tiny_index, tiny_geometry, decoded):
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(tiny_geometry.resize, interpolation=T.InterpolationMode.BILINEAR),
                    T.CenterCrop(tiny_geometry.crop), T.PILToTensor()])
    batch = decoded["pil"]
    for row in range(0, len(batch), 7):
        rec = tiny_index.record(int(batch.image_ids[row]))
        with Image.open(rec.path) as im:
            expected = tf(im.convert("RGB"))
        assert torch.equal(batch.images[row], expected), rec.path


def test_batch_contents_and_order(tiny_index, tiny_geometry, decoded):
    batch = decoded["pil"]
    c = tiny_geometry.crop
    assert batch.images.shape == (len(tiny_index), 3, c, c)
    assert batch.masks.shape == (len(tiny_index), 1, c, c) and batch.masks.dtype == torch.uint8
    assert batch.boxes.dtype == torch.int32 and batch.strips.dtype == torch.int32
    assert batch.image_ids.tolist() == tiny_index.ids
    assert batch.labels.tolist() == tiny_index.labels().tolist()
    assert set(batch.masks.unique().tolist()) <= {0, 1}


def test_masks_boxes_strips_match_brute_force(tiny_index, tiny_geometry, decoded):
    batch = decoded["pil"]
    c = tiny_geometry.crop
    rows = range(0, len(batch), 3)
    for row in rows:
        rec = tiny_index.record(int(batch.image_ids[row]))
        full = rec.mask()
        assert full is not None and bool(batch.has_mask[row])
        assert np.array_equal(batch.masks[row, 0].numpy(), ref_crop(full, tiny_geometry)), rec.path
        x0, y0, x1, y1 = rec.union_box
        box_full = np.zeros((rec.height, rec.width), np.uint8)
        box_full[y0 : y1 + 1, x0 : x1 + 1] = 1
        cropped = ref_crop(box_full, tiny_geometry)
        ys, xs = np.nonzero(cropped)
        expected = (0, 0, -1, -1) if len(ys) == 0 else (xs.min(), ys.min(), xs.max(), ys.max())
        assert tuple(batch.boxes[row].tolist()) == tuple(int(v) for v in expected), rec.path
        strip = ref_strip(expected, c)
        assert tuple(batch.strips[row].tolist()) == strip, rec.path
        assert bool(batch.has_bgt[row]) == (strip[2] > 0)


def test_odd_files_agree_across_backends(odd):
    results = {}
    for b in ALL:
        if b not in available_backends():
            continue
        loader = create_loader(odd.index, backend=b, geometry=CropGeometry(72, 64), batch_size=4, num_threads=2)
        with pytest.warns(UserWarning, match="skipped"):
            batch = collect(loader)
        results[b] = (batch, loader)
        got = {pathlib.Path(r["path"]).stem: r["reason"] for r in loader.rejects}
        assert got == BAD, f"{b}: rejects {got}"
        good = sorted(i for n, i in odd.ids.items() if n not in BAD)
        assert batch.image_ids.tolist() == good
        row = {int(i): k for k, i in enumerate(batch.image_ids.tolist())}
        gray = batch.images[row[odd.ids["gray"]]]
        assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]), f"{b}: grey image not grey RGB"
        falls = {pathlib.Path(f["path"]).stem for f in loader.fallbacks}
        assert falls == (set() if b == "pil" else {"cmyk", "png"}), f"{b}: fallbacks {loader.fallbacks}"
        # images without a mask / without a box
        r = row[odd.ids["nomask"]]
        assert not batch.has_mask[r] and batch.masks[r].sum() == 0
        r = row[odd.ids["nobox"]]
        assert batch.boxes[r].tolist() == [0, 0, -1, -1] and batch.strips[r].tolist() == [0, 0, 0, 0]
        assert not batch.has_bgt[r]
        r = row[odd.ids["small"]]  # the box is the whole image: no Only-BG-T margin
        assert batch.boxes[r].tolist() == [0, 0, 63, 63] and not batch.has_bgt[r]
    ref = results["pil"][0]
    for b, (batch, _) in results.items():
        assert_targets_equal(batch, ref)
        d = pixel_diff(batch.images, ref.images)
        assert d.max().item() <= CPU_MAX and d.float().mean().item() <= CPU_MEAN, b


@pytest.mark.parametrize("backend", FAST)
def test_refused_file_falls_back_to_pil(odd, backend, monkeypatch):
    """A file the fast decoder refuses (simulated) is decoded by PIL; the rest of its batch is not affected."""
    g = CropGeometry(72, 64)
    names = ["good", "gray", "progressive", "exif"]
    ids = [odd.ids[n] for n in names]
    normal = collect(create_loader(odd.index, backend=backend, geometry=g, ids=ids, batch_size=4))
    pil = collect(create_loader(odd.index, backend="pil", geometry=g, ids=ids, batch_size=4))
    target = odd.index.record(odd.ids["progressive"]).path
    if backend == "dali":
        from bgsynth.pipeline.dali import DALILoader

        run = DALILoader._run

        def refusing_run(self, samples):
            if any(s.path == target for s in samples):
                raise RuntimeError("Critical error in pipeline:\nsimulated refusal")
            return run(self, samples)

        monkeypatch.setattr(DALILoader, "_run", refusing_run)
    else:
        import torchvision.io

        decode = torchvision.io.decode_jpeg
        refused = pathlib.Path(target).read_bytes()

        def refusing_decode(data, *args, **kwargs):
            if isinstance(data, torch.Tensor) and data.numpy().tobytes() == refused:
                raise RuntimeError("simulated refusal")
            return decode(data, *args, **kwargs)

        monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing_decode)
    loader = create_loader(odd.index, backend=backend, geometry=g, ids=ids, batch_size=4)
    batch = collect(loader)
    assert loader.rejects == []
    assert [f["path"] for f in loader.fallbacks] == [target]
    assert "refused" in loader.fallbacks[0]["reason"]
    assert_targets_equal(batch, normal)
    row = batch.image_ids.tolist().index(odd.ids["progressive"])
    assert torch.equal(batch.images[row], pil.images[row])
    others = [r for r in range(len(batch)) if r != row]
    assert torch.equal(batch.images[others], normal.images[others])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_exif_orientation_is_not_applied(odd, backend):
    path = odd.index.record(odd.ids["exif"]).path
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == 6  # the fixture really carries the rotation tag
        stored = np.array(im.convert("RGB"))
    g = CropGeometry(72, 64)
    loader = create_loader(odd.index, backend=backend, geometry=g, ids=[odd.ids["exif"]], batch_size=2)
    batch = collect(loader)
    assert loader.rejects == [] and len(batch) == 1
    # pixels: the stored (unrotated) image resized with PIL and centre-cropped
    rh, rw, top, left = ref_plan(60, 90, g)
    expected = np.array(Image.fromarray(stored).resize((rw, rh), Image.BILINEAR))[top : top + 64, left : left + 64]
    d = pixel_diff(batch.images[0].permute(1, 2, 0), torch.from_numpy(expected))
    assert d.max().item() <= CPU_MAX
    # the box (and mask) carried through the geometry land on the red block in the decoded pixels
    x0, y0, x1, y1 = batch.boxes[0].tolist()
    inner = batch.images[0][:, y0 + 2 : y1 - 1, x0 + 2 : x1 - 1].reshape(3, -1).float().mean(1)
    assert (inner - torch.tensor(odd.colour, dtype=torch.float32)).abs().max() < 12
    fg = batch.masks[0, 0].bool()
    assert fg.any() and (batch.images[0][0][fg].float().mean() > 180)


def test_on_error_raise_names_the_file(odd):
    loader = create_loader(odd.index, backend="pil", geometry=CropGeometry(72, 64), on_error="raise",
                           ids=[odd.ids["good"], odd.ids["truncated"]])
    with pytest.raises(DecodeError, match=r"truncated\.JPEG"):
        collect(loader)
    loader = create_loader(odd.index, backend="pil", geometry=CropGeometry(72, 64), on_error="raise",
                           ids=[odd.ids["zero"]], prefetch=0)
    with pytest.raises(DecodeError, match=r"zero\.JPEG.*zero_byte"):
        collect(loader)


def test_require_mask(odd):
    g = CropGeometry(72, 64)
    with pytest.warns(UserWarning, match="without a mask"):
        loader = create_loader(odd.index, backend="pil", geometry=g, require_mask=True,
                               ids=[odd.ids["good"], odd.ids["nomask"], odd.ids["nobox"]])
    assert loader.ids == [odd.ids["good"]]
    assert {pathlib.Path(r["path"]).stem: r["reason"] for r in loader.rejects} == {
        "nomask": Reject.MISSING_MASK, "nobox": Reject.MISSING_MASK}
    with pytest.raises(DecodeError, match="nomask"):
        create_loader(odd.index, backend="pil", geometry=g, require_mask=True, on_error="raise",
                      ids=[odd.ids["nomask"]])


# ------------------------------------------------------------------------------------------------ order, shards


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_sharding_batching_and_last_partial_batch(tiny_index, tiny_geometry, backend):
    ids = tiny_index.ids[:23]
    full = create_loader(tiny_index, backend=backend, geometry=tiny_geometry, ids=ids, batch_size=5)
    assert len(full) == 5
    batches = list(full)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    whole = Batch.cat(batches)
    assert whole.image_ids.tolist() == sorted(ids)
    # batch-size independence, re-iteration and synchronous decoding give the same bytes
    for kw in (dict(batch_size=1, prefetch=0), dict(batch_size=64), dict(batch_size=5)):
        other = collect(create_loader(tiny_index, backend=backend, geometry=tiny_geometry, ids=ids, **kw))
        assert_targets_equal(other, whole)
        assert torch.equal(other.images, whole.images)
    assert torch.equal(collect(full).images, whole.images)
    # shards: disjoint, union = unsharded, each row identical to the unsharded one
    seen = []
    for s in range(3):
        sh = create_loader(tiny_index, backend=backend, geometry=tiny_geometry, ids=ids, batch_size=4,
                           shard_id=s, num_shards=3)
        assert sh.ids == sorted(ids)[s::3]
        part = collect(sh)
        rows = torch.tensor([sorted(ids).index(i) for i in part.image_ids.tolist()])
        assert_targets_equal(part, whole.slice(rows))
        assert torch.equal(part.images, whole.images[rows])
        seen += part.image_ids.tolist()
    assert sorted(seen) == sorted(ids) and len(set(seen)) == len(seen)


def test_prefetch_overlaps_and_stops(tiny_index, tiny_geometry):
    loader = create_loader(tiny_index, backend="pil", geometry=tiny_geometry, ids=tiny_index.ids[:12],
                           batch_size=3, prefetch=2)
    started = []
    second_started = threading.Event()
    produce = loader._produce

    def spy(chunk):
        started.append(chunk[0])
        if len(started) == 2:
            second_started.set()
        return produce(chunk)

    loader._produce = spy
    it = iter(loader)
    first = next(it)
    # while the consumer holds batch 0 (and has not asked for batch 1), batch 1 is being decoded
    assert second_started.wait(timeout=30)
    assert first.image_ids.tolist() == tiny_index.ids[:3]
    it.close()  # an early stop ends the producer thread
    assert not any(t.name.startswith("bgsynth-pil-prefetch") and t.is_alive() for t in threading.enumerate())


def test_default_decoder_threads_leave_the_consumer_its_cores(monkeypatch):
    """A quarter of the cores on a CPU run (1..8), all but one on CUDA (1..8)."""
    from bgsynth.pipeline import common

    want_cpu = {1: 1, 2: 1, 4: 1, 8: 2, 16: 4, 32: 8, 96: 8}
    want_cuda = {1: 1, 2: 1, 4: 3, 16: 8}
    for cores, want in want_cpu.items():
        monkeypatch.setattr(common, "available_cores", lambda c=cores: c)
        assert common.default_decode_threads("cpu") == want, cores
    for cores, want in want_cuda.items():
        monkeypatch.setattr(common, "available_cores", lambda c=cores: c)
        assert common.default_decode_threads("cuda") == want, cores


def test_decoder_and_consumer_threads_stay_within_the_cores(tiny_index, tiny_geometry, monkeypatch):
    """While a CPU loader is iterated, decoder threads + the iterating thread's torch threads <= the cores (the
    latter restored after, or never lowered with share_cores=False); torch ops in decoder threads are
    single-threaded, and threads started later still get the process's default."""
    from bgsynth.pipeline import common

    before = torch.get_num_threads()
    monkeypatch.setattr(common, "available_cores", lambda: 2)
    seen = []
    loader = create_loader(tiny_index, backend="pil", geometry=tiny_geometry, ids=tiny_index.ids[:4], batch_size=2,
                           num_threads=1)
    for _batch in loader:
        seen.append(torch.get_num_threads())
    assert seen == [1, 1] and torch.get_num_threads() == before
    kept = create_loader(tiny_index, backend="pil", geometry=tiny_geometry, ids=tiny_index.ids[:2], num_threads=1,
                         share_cores=False)
    assert [torch.get_num_threads() for _ in kept] == [before]
    two = create_loader(tiny_index, backend="pil", geometry=tiny_geometry, num_threads=2)
    in_decoders = {two._threads().submit(torch.get_num_threads).result() for _ in range(4)}
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    two.close()
    assert in_decoders == {1} and later == [before] and torch.get_num_threads() == before


def test_dali_runs_in_cpu_only_mode(tiny_index, tiny_geometry):
    if "dali" not in available_backends():
        pytest.skip("dali not installed")
    loader = create_loader(tiny_index, backend="dali", geometry=tiny_geometry, ids=tiny_index.ids[:4])
    collect(loader)
    assert loader._pipe is not None and loader._pipe.device_id is None


def test_crop_window_is_the_crop_in_source_coordinates():
    g = CropGeometry(72, 64)
    p = g.plan(60, 90)  # resized 72 x 108, offset (4, 22)
    s, e = crop_window(p)
    assert s.tolist() == pytest.approx([4 * 60 / 72, 22 * 90 / 108])
    assert e.tolist() == pytest.approx([68 * 60 / 72, 86 * 90 / 108])


# ------------------------------------------------------------------------------------------------ probing


def test_probe_image_formats_and_truncation():
    rng = np.random.default_rng(0)
    pic = _picture(rng, 30, 40)
    p = probe_image(_jpeg(pic))
    assert (p.format, p.height, p.width, p.components, p.route) == ("JPEG", 30, 40, 3, "fast")
    assert probe_image(_jpeg(Image.fromarray(pic).convert("L"))).components == 1
    p = probe_image(_jpeg(Image.fromarray(pic).convert("CMYK")))
    assert (p.components, p.route) == (4, "pil")
    p = probe_image(_jpeg(pic, format="PNG"))
    assert (p.format, p.height, p.width, p.route) == ("PNG", 30, 40, "pil")
    p = probe_image(_jpeg(pic, format="BMP"))
    assert (p.format, p.height, p.width, p.route) == ("BMP", 30, 40, "pil")
    png = _jpeg(pic, format="PNG")
    for data, reason in ((b"", Reject.ZERO_BYTE), (b"GIF89", Reject.UNREADABLE), (png[:40], Reject.TRUNCATED),
                         (b"\xff\xd8\xff\xe0\x00", Reject.TRUNCATED)):
        with pytest.raises(SampleError) as e:
            probe_image(data)
        assert e.value.reason == reason
    # an EXIF thumbnail holds its own SOI..EOI inside APP1: the size is the main image's, and a cut main stream
    # is still detected although an EOI marker occurs in the file
    main = _jpeg(pic, quality=90)
    thumb = _jpeg(_picture(rng, 8, 10))
    payload = b"Exif\x00\x00" + thumb
    with_thumb = main[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + main[2:]
    with Image.open(io.BytesIO(with_thumb)) as im:
        assert im.size == (40, 30)
    p = probe_image(with_thumb)
    assert (p.height, p.width, p.route) == (30, 40, "fast")
    sos = with_thumb.index(b"\xff\xda")
    with pytest.raises(SampleError) as e:
        probe_image(with_thumb[: sos + 40])
    assert e.value.reason == Reject.TRUNCATED


# ------------------------------------------------------------------------------------------------ errors, registry


def test_argument_errors(tiny_index, tiny_geometry):
    with pytest.raises(ConfigError, match="unknown decode backend"):
        create_loader(tiny_index, backend="nope")
    for kw in (dict(batch_size=0), dict(shard_id=3, num_shards=3), dict(prefetch=-1), dict(on_error="ignore"),
               dict(num_threads=0), dict(geometry="72x64"), dict(device="mps"), dict(tiling="full"),
               dict(shards=2)):
        with pytest.raises(ConfigError):
            create_loader(tiny_index, backend="pil", **kw)
    empty = create_loader(tiny_index, backend="pil", ids=[])
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(ConfigError, match="not in the index"):
        create_loader(tiny_index, backend="pil", ids=[10**9])
    with pytest.raises(ConfigError, match="DatasetIndex"):
        create_loader({"images": []}, backend="pil")


def test_loader_from_resolved_settings(tiny_index, tiny_geometry):
    from bgsynth.config import resolve_run
    from bgsynth.pipeline import DecodeOptions

    ids = tiny_index.ids[:6]
    run = resolve_run(geometry=tiny_geometry, backend="pil", batch_size=4, device="cpu", batch_kind="decode")
    a = create_loader(tiny_index, run, DecodeOptions(ids=reversed(ids), prefetch=0))
    b = create_loader(tiny_index, backend="pil", geometry=tiny_geometry, batch_size=4, ids=ids, prefetch=0)
    assert a.run == b.run and a.options == b.options and a.ids == b.ids == ids and len(a) == 2
    assert torch.equal(collect(a).images, collect(b).images)
    # keyword options override the given objects; the default batch size is the decode kind's
    c = create_loader(tiny_index, run, DecodeOptions(ids=ids), batch_size=3, shard_id=1, num_shards=2)
    assert c.batch_size == 3 and c.ids == ids[1::2]
    default = resolve_run(device="cpu", batch_kind="decode").batch_size
    assert create_loader(tiny_index, backend="pil").batch_size == default


def test_index_loaded_at_the_edge_and_auto_backend(builtin_root, tiny_geometry):
    with pytest.raises(ConfigError, match="DatasetIndex.load"):
        create_loader(str(builtin_root), geometry=tiny_geometry, batch_size=8)
    loader = create_loader(DatasetIndex.load(builtin_root), geometry=tiny_geometry, batch_size=8)
    assert loader.name == auto_backend("cpu") == next(b for b in AUTO_ORDER["cpu"] if b in available_backends())
    assert len(next(iter(loader))) == 8


def test_missing_backend_says_how_to_install(tiny_index):
    spec = register_backend(BackendSpec("fake", "bgsynth.pipeline.pil:PILLoader", ("no_such_module_bgsynth",),
                                        "pip install no-such-module-bgsynth", "test"))
    try:
        assert "fake" not in available_backends()
        with pytest.raises(BackendUnavailableError, match="pip install no-such-module-bgsynth"):
            create_loader(tiny_index, backend="fake")
    finally:
        BACKENDS.pop(spec.name)
    with pytest.raises(ConfigError, match="exists already"):
        register_backend(BackendSpec("pil", "x:y", (), "", ""))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda(tiny_index):
    with pytest.raises(BackendUnavailableError, match="cuda"):
        create_loader(tiny_index, backend="pil", device="cuda")


# ------------------------------------------------------------------------------------------------ background pool


@pytest.mark.parametrize("tiling", ["crop", "paper"])
def test_background_pool_is_only_bg_t_of_val(tiny_index, tiny_geometry, tiling):
    pool = build_background_pool(tiny_index, tiny_geometry, backend="pil", split="val", batch_size=16, tiling=tiling)
    val = tiny_index.select(split="val")
    dec = collect(create_loader(val, backend="pil", geometry=tiny_geometry, tiling=tiling))
    keep = dec.has_bgt
    assert pool.image_ids.tolist() == dec.image_ids[keep].tolist() == sorted(pool.image_ids.tolist())
    assert pool.labels.tolist() == dec.labels[keep].tolist()
    assert len(pool) > 0 and pool.images.dtype == torch.uint8
    for k, row in enumerate(keep.nonzero().squeeze(1).tolist()[::4]):
        j = pool.image_ids.tolist().index(int(dec.image_ids[row]))
        if tiling == "crop":
            expected = ref_only_bg_t(dec.images[row].numpy(), dec.boxes[row].tolist(), dec.strips[row].tolist())
        else:  # the loader's paper Only-BG-T crop (checked against the slow reference in tests/test_photos.py)
            expected = dec.bgt[row].numpy()
        assert np.array_equal(pool.images[j].numpy(), expected)


def test_background_pool_options_and_errors(tiny_index, tiny_geometry, monkeypatch):
    pool = build_background_pool(tiny_index, tiny_geometry, backend="pil", per_class=2, seed=3)
    chosen = tiny_index.select(per_class=2, seed=3)
    assert set(pool.image_ids.tolist()) <= set(chosen.ids)
    assert max(np.bincount(pool.labels.numpy())) <= 2
    plain = collect(create_loader(chosen, backend="pil", geometry=tiny_geometry))
    assert torch.equal(pool.images, plain.bgt[plain.has_bgt])
    monkeypatch.setattr(BackgroundPool, "estimate_bytes", staticmethod(lambda n, crop: 1 << 62))
    with pytest.raises(PoolTooLargeError):
        build_background_pool(tiny_index, tiny_geometry, backend="pil")


def _relabelled(index: DatasetIndex, n_classes: int) -> DatasetIndex:
    """The val split of ``index`` in a label space of ``n_classes`` classes (image ``i`` gets class ``i % N``)."""
    from bgsynth.classes import LabelSpace

    space = LabelSpace.from_names([f"class{k}" for k in range(n_classes)], name=f"n{n_classes}")
    data = {k: v for k, v in index.select(split="val").data.items()}
    data["info"] = dict(data["info"], label_space=space.to_dict())
    data["categories"] = space.categories()
    data["images"] = [dict(im, label=im["id"] % n_classes) for im in data["images"]]
    data["annotations"] = [dict(a, category_id=a["image_id"] % n_classes) for a in data["annotations"]]
    return DatasetIndex(data, index.path)


@pytest.mark.parametrize("n_classes", [2, 20])
def test_pool_carries_the_label_space_and_mixed_follow_it(tiny_index, tiny_geometry, n_classes):
    """Every pool builder sets ``num_classes`` to the index's label space, and Mixed-Same/Rand/Next pick the
    background tests/reference.py picks with that N (Mixed-Next: ``(y + 1) mod N``), pixels included."""
    from bgsynth.distributed import DistContext
    from bgsynth.pool import build_background_pool_sharded, empty_pool, gather_background_pool, pool_from_batches
    from bgsynth.variants import MIXED_VARIANTS, synthesize
    from reference import reference_background

    index = _relabelled(tiny_index, n_classes)
    assert index.label_space.num_classes == n_classes
    batches = list(create_loader(index, backend="pil", geometry=tiny_geometry, batch_size=32, prefetch=0))
    pool = pool_from_batches(batches, tiny_geometry.crop, "cpu", num_classes=n_classes)
    built = build_background_pool(index, tiny_geometry, backend="pil")
    pools = [pool, built, gather_background_pool(pool, DistContext.single()), empty_pool(8, "cpu", n_classes)]
    if n_classes == 2:  # without a process group the sharded builder is the plain one; one decode is enough
        pools.append(build_background_pool_sharded(index, DistContext.single(), geometry=tiny_geometry, backend="pil"))
    assert [p.num_classes for p in pools] == [n_classes] * len(pools)
    assert torch.equal(built.images, pool.images) and built.labels.tolist() == pool.labels.tolist()
    ids, labels = pool.image_ids.tolist(), pool.labels.tolist()
    differs_from_in9 = 0
    for batch in batches:
        outs = synthesize(batch, list(MIXED_VARIANTS), pool=pool, seed=3)
        for v in MIXED_VARIANTS:
            for i in range(len(batch)):
                iid, lab = int(batch.image_ids[i]), int(batch.labels[i])
                row, bg_id, bg_label = reference_background(iid, lab, v, ids, labels, 3, num_classes=n_classes)
                assert (int(outs[v].bg_ids[i]), int(outs[v].bg_labels[i])) == (bg_id, bg_label), (v, iid)
                assert bool(outs[v].valid[i]) == (row >= 0 and bool(batch.has_mask[i])), (v, iid)
                if row >= 0:
                    m = batch.masks[i].bool()
                    want = torch.where(m, batch.images[i], pool.images[row])
                    assert torch.equal(outs[v].images[i], want), (v, iid)
                if v == "mixed_next":
                    if n_classes == 2:
                        assert bg_label in (-1, (lab + 1) % 2)
                    differs_from_in9 += reference_background(iid, lab, v, ids, labels, 3)[1] != bg_id
    assert differs_from_in9 > 0  # a pool left at IN-9's 9 classes would have picked other backgrounds


# ------------------------------------------------------------------------------------------------ CUDA


@CUDA
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cuda_backends_agree_with_cpu_reference(tiny_index, tiny_geometry, decoded, backend):
    loader = create_loader(tiny_index, backend=backend, geometry=tiny_geometry, batch_size=32, device="cuda")
    batch = collect(loader)
    assert batch.device.type == "cuda" and all(getattr(batch, f).is_cuda for f in TARGETS)
    ref = decoded["pil"]
    assert_targets_equal(batch, ref)
    d = pixel_diff(batch.images, ref.images).float()
    assert d.mean().item() <= CUDA_MEAN and d.flatten().quantile(0.99).item() <= CUDA_P99, backend


@CUDA
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_cuda_odd_files_and_exif(odd, backend):
    loader = create_loader(odd.index, backend=backend, geometry=CropGeometry(72, 64), batch_size=4, device="cuda")
    with pytest.warns(UserWarning, match="skipped"):
        batch = collect(loader)
    assert {pathlib.Path(r["path"]).stem: r["reason"] for r in loader.rejects} == BAD
    row = batch.image_ids.tolist().index(odd.ids["exif"])
    x0, y0, x1, y1 = batch.boxes[row].tolist()
    inner = batch.images[row][:, y0 + 2 : y1 - 1, x0 + 2 : x1 - 1].reshape(3, -1).float().mean(1).cpu()
    assert (inner - torch.tensor(odd.colour, dtype=torch.float32)).abs().max() < 16


@CUDA
def test_cuda_background_pool(tiny_index, tiny_geometry):
    cpu = build_background_pool(tiny_index, tiny_geometry, backend="pil", split="val")
    gpu = build_background_pool(tiny_index, tiny_geometry, backend="pil", split="val", device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.images.cpu(), cpu.images) and torch.equal(gpu.image_ids.cpu(), cpu.image_ids)


# ------------------------------------------------------------------------------------------------ paper tiling
def test_only_bg_t_full_equals_the_tiling_kernel():
    """The one-image full-resolution tiling of the decoders == bgsynth.kernels.tile_fill (the batched reference kernel) on
    random images, boxes (also partly outside the image) and the strips the paper's rule picks."""
    from types import SimpleNamespace

    from bgsynth import kernels
    from bgsynth.geometry import tile_strips
    from bgsynth.pipeline.host import only_bg_t_full

    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(-3, w + 3, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(-3, h + 3, 2))
        strip = tile_strips(torch.tensor([[x0, y0, x1, y1]]), h, w)[0].tolist()
        if strip[2] == 0:
            continue
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sample = SimpleNamespace(record=SimpleNamespace(union_box=(x0, y0, x1, y1)), strip=tuple(strip))
        chw = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        want = kernels.tile_fill(chw[None], torch.tensor([[x0, y0, x1, y1]]), torch.tensor([strip]), backend="torch")[0]
        got_hwc = only_bg_t_full(img, sample)
        got_chw = only_bg_t_full(chw, sample)
        assert np.array_equal(got_hwc, want.permute(1, 2, 0).numpy()), (x0, y0, x1, y1, h, w)
        assert torch.equal(got_chw, want), (x0, y0, x1, y1, h, w)
        checked += 1
    assert checked > 200


def test_dali_paste_plan_tiles_the_image_exactly_once():
    """The rectangles DALI pastes cover every output pixel once, and copying them reproduces only_bg_t_full."""
    from types import SimpleNamespace

    from bgsynth.geometry import tile_strips
    from bgsynth.pipeline.host import only_bg_t_full
    from bgsynth.pipeline.dali import paste_plan

    rng = np.random.default_rng(2)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(2, 40, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        strip = tile_strips(torch.tensor([[x0, y0, x1, y1]]), h, w)[0].tolist()
        if strip[2] == 0:
            continue
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ia, sh, oa = paste_plan(h, w, (x0, y0, x1, y1), strip)
        out = np.zeros_like(img)
        cover = np.zeros((h, w), np.int32)
        for (iy, ix), (ph, pw), (oy, ox) in zip(ia, sh, oa):
            out[oy : oy + ph, ox : ox + pw] = img[iy : iy + ph, ix : ix + pw]
            cover[oy : oy + ph, ox : ox + pw] += 1
        assert (cover == 1).all()
        sample = SimpleNamespace(record=SimpleNamespace(union_box=(x0, y0, x1, y1)), strip=tuple(strip))
        assert np.array_equal(out, only_bg_t_full(img, sample))
