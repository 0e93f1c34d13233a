"""Shared machinery of the decode backends: host preparation, file probing, batch assembly, prefetching, registry.

Every backend (``pil``, ``torchvision``, ``dali``) differs only in how it turns encoded bytes into the resized,
centre-cropped ``uint8`` pixels of an image. Everything else is done here, once:

* reading the index record and the file bytes, probing the container (JPEG/PNG/other, stored size, number of
  colour components, truncation) so that every backend rejects the same files for the same reasons;
* the :class:`~bgsynth.geometry.CropPlan` of each image (exact resize size and crop offset that each backend obeys);
* masks (``plan.crop_mask`` of the decoded RLE), union boxes (``plan.box_to_crop``), Only-BG-T strips
  (:func:`bgsynth.geometry.tile_strips`), labels and ids, so they are identical across backends by construction;
* with ``tiling="paper"``, the paper's Only-BG-T: the strip rule on each image's full-resolution margins and the
  tiling of its stored pixels (:func:`only_bg_t_full`, one implementation for every backend but DALI, which does
  the same copies in its graph; equal to :func:`bgsynth.kernels.tile_fill` on the full image, as tested); each backend
  then resizes and crops that image exactly like the Original;
* the per-file PIL fallback for data a fast decoder does not handle (CMYK JPEG, PNG or other formats in a
  ``.JPEG`` file, files the fast decoder refuses), recorded in ``loader.fallbacks``;
* rejects (``loader.rejects``, with a warning) or a :class:`~bgsynth.errors.DecodeError` for undecodable files;
* deterministic order, sharding and a background producer thread that decodes batch ``k + 1`` while batch ``k``
  is consumed (on CUDA on a side stream, synchronised with the consumer's stream by an event).

Orientation: ILSVRC boxes and the index masks are in stored-pixel coordinates, so no backend applies EXIF
orientation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import importlib.util
import math
import os
import queue
import struct
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError, DecodeError, IndexFormatError
from ..geometry import CropGeometry, CropPlan, tile_strips
from ..index import DatasetIndex, ImageRecord, Reject
from ..probe import ImageProbe, SampleError, probe_image
from ..types import TILINGS, Batch

__all__ = [
    "HostSample",
    "read_sample",
    "crop_targets",
    "full_strips",
    "only_bg_t_full",
    "check_decoded_size",
    "assemble_batch",
    "DecodeLoader",
    "BackendSpec",
    "BACKENDS",
    "register_backend",
    "backend_available",
]

# --------------------------------------------------------------------------------------------------------------
# Host-side preparation of one image
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostSample:
    """One image ready for a decoder: its record, crop plan, encoded bytes and header probe.

    ``strip`` is the full-resolution Only-BG-T tile ``(sx0, sy0, tw, th)`` of the paper's construction when the
    decoder must make it (``tiling="paper"``, see :func:`full_strips`), else ``None``.
    """

    record: ImageRecord
    plan: CropPlan
    data: bytes
    probe: ImageProbe
    mask: np.ndarray | None = None
    box: tuple[int, int, int, int] = (0, 0, -1, -1)
    strip: tuple[int, int, int, int] | None = None

    @property
    def path(self) -> str:
        return self.record.path


def read_sample(record: ImageRecord, geometry: CropGeometry) -> HostSample:
    """Read and probe one image's file and make its :class:`~bgsynth.geometry.CropPlan`.

    Raises:
        SampleError: missing, unreadable, zero-byte or truncated file, or a stored size that differs from the
            index's ``width``/``height`` (masks and boxes would not line up).
    """
    try:
        with open(record.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SampleError(Reject.MISSING_FILE, "file not found") from None
    except OSError as e:
        raise SampleError(Reject.UNREADABLE, f"cannot read file ({e})") from None
    probe = probe_image(data)
    if (probe.height, probe.width) != (record.height, record.width):
        raise SampleError(
            Reject.SIZE_MISMATCH,
            f"index says {record.width}x{record.height}, file holds {probe.width}x{probe.height} {probe.format}",
        )
    return HostSample(record, geometry.plan(record.height, record.width), data, probe)


def crop_targets(sample: HostSample) -> HostSample:
    """Fill ``sample.mask`` (``uint8 [C, C]`` or ``None``) and ``sample.box`` (inclusive crop box) in place.

    The mask is the index RLE decoded at the stored size and carried through ``plan.crop_mask`` (nearest); the
    box is the union box carried through ``plan.box_to_crop``, ``(0, 0, -1, -1)`` when there is no box or no crop
    pixel samples it.

    Raises:
        SampleError: the index mask's size differs from the image's (``mask_shape_mismatch``).
    """
    rec = sample.record
    try:
        m = rec.mask()
    except IndexFormatError as e:
        raise SampleError(Reject.MASK_SHAPE, str(e)) from None
    sample.mask = None if m is None else sample.plan.crop_mask(m)
    ub = rec.union_box
    cb = None if ub is None else sample.plan.box_to_crop(ub)
    sample.box = (0, 0, -1, -1) if cb is None else tuple(int(v) for v in cb)
    return sample


def full_strips(samples: Sequence[HostSample]) -> list[tuple[int, int, int, int] | None]:
    """The paper's Only-BG-T tile of each sample at its stored resolution, or ``None`` without a margin.

    The strip rule (:func:`bgsynth.geometry.tile_strips`, batched over the samples' own sizes) applied to the
    inclusive union box in stored pixels: PAPER.md's construction, before any resize.
    """
    if not samples:
        return []
    boxes = torch.tensor([s.record.union_box or (0, 0, -1, -1) for s in samples], dtype=torch.int64)
    h = torch.tensor([s.record.height for s in samples], dtype=torch.int64)
    w = torch.tensor([s.record.width for s in samples], dtype=torch.int64)
    strips = tile_strips(boxes, h, w).tolist()
    return [tuple(st) if st[2] > 0 else None for st in strips]


def only_bg_t_full(image: torch.Tensor | np.ndarray, sample: HostSample) -> torch.Tensor | np.ndarray:
    """The paper's Only-BG-T of one decoded image at its stored resolution.

    Pixels inside the inclusive union box take the strip ``sample.strip`` tiled from the image origin, the others
    keep their value: the same result as :func:`bgsynth.kernels.tile_fill` on the full-resolution pixels, computed for
    one image by using the strip's shape. The strip rule always picks a full-height (left/right) or a full-width
    (top/bottom) strip, so the tiling repeats along one axis only and the box region is one ``index_select``
    along that axis (an order of magnitude cheaper on the CPU than the batched kernel's two-axis gather over the
    whole image, which matters at full resolution).

    Args:
        image: ``uint8 [3, H, W]`` tensor (any device) or ``uint8 [H, W, 3]`` NumPy array (as PIL gives it).
        sample: the sample; ``sample.strip`` must be set.

    Returns:
        The same layout and type as ``image``, new memory.
    """
    hwc = isinstance(image, np.ndarray)
    # NumPy input: one writable copy is both the source and the output (index_select materialises the tiled box
    # before it is written, so reading strip pixels that lie inside the box is safe)
    x = torch.from_numpy(np.array(image, copy=True)) if hwc else image
    ay, ax = (0, 1) if hwc else (1, 2)  # axes of y and x
    H, W = x.shape[ay], x.shape[ax]
    x0, y0, x1, y1 = sample.record.union_box
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W - 1), min(y1, H - 1)
    sx0, sy0, tw, th = sample.strip
    out = x if hwc else x.clone()
    if x1 < x0 or y1 < y0:  # no pixel of the box lies in the image: nothing to tile
        return out.numpy() if hwc else out
    rows = (slice(y0, y1 + 1), slice(x0, x1 + 1)) if hwc else (slice(None), slice(y0, y1 + 1), slice(x0, x1 + 1))
    if th == H:  # a left/right strip: source column sx0 + x % tw, same row
        cols = sx0 + torch.arange(x0, x1 + 1, device=x.device) % tw
        band = x[y0 : y1 + 1] if hwc else x[:, y0 : y1 + 1]
        out[rows] = band.index_select(ax, cols)
    else:  # a top/bottom strip: source row sy0 + y % th, same column
        src = sy0 + torch.arange(y0, y1 + 1, device=x.device) % th
        band = x[:, x0 : x1 + 1] if hwc else x[:, :, x0 : x1 + 1]
        out[rows] = band.index_select(ay, src)
    return out.numpy() if hwc else out


def check_decoded_size(sample: HostSample, height: int, width: int, decoder: str) -> None:
    """Raise :class:`SampleError` when a decoder returned another size than the stored one."""
    if (int(height), int(width)) != (sample.record.height, sample.record.width):
        raise SampleError(
            Reject.SIZE_MISMATCH,
            f"{decoder} decoded {width}x{height}, index says {sample.record.width}x{sample.record.height}",
        )


def assemble_batch(
    samples: Sequence[HostSample],
    images: torch.Tensor,
    geometry: CropGeometry,
    device: torch.device,
    tiling: str = "crop",
    bgt: torch.Tensor | None = None,
) -> Batch:
    """Build a :class:`Batch` from decoded crops and the host samples they came from.

    Masks, boxes, strips, labels, ids and ``has_bgt`` are computed here and only here, from the index and the
    :class:`~bgsynth.geometry.CropPlan`; no backend touches them.

    Args:
        samples: the ``B`` successfully decoded samples, in batch order.
        images: ``uint8 [B, 3, C, C]`` crops (any device; moved to ``device``).
        geometry: the crop geometry (``C = geometry.crop``).
        device: target device of the batch.
        tiling: ``"paper"``: ``has_bgt`` is the full-resolution margin rule (``sample.strip``); ``"crop"``: the
            crop box's margin in the crop.
        bgt: ``uint8 [B, 3, C, C]`` paper Only-BG-T crops (``tiling="paper"`` only), or ``None``.

    Each sample's ``mask``/``box`` must have been filled by :func:`crop_targets`.
    """
    c = geometry.crop
    n = len(samples)
    masks = np.zeros((n, 1, c, c), np.uint8)
    boxes = np.empty((n, 4), np.int32)
    has_mask = np.zeros(n, bool)
    for i, s in enumerate(samples):
        if s.mask is not None:
            masks[i, 0] = s.mask
            has_mask[i] = True
        boxes[i] = s.box
    boxes_t = torch.from_numpy(boxes)
    strips = tile_strips(boxes_t, c, c)
    host = dict(
        masks=torch.from_numpy(masks),
        boxes=boxes_t,
        strips=strips,
        labels=torch.tensor([s.record.label for s in samples], dtype=torch.int64),
        image_ids=torch.tensor([s.record.id for s in samples], dtype=torch.int64),
        has_mask=torch.from_numpy(has_mask),
        has_bgt=(
            torch.tensor([s.strip is not None for s in samples], dtype=torch.bool) if tiling == "paper"
            else strips[:, 2] > 0
        ),
    )
    if device.type == "cuda":
        host = {k: (v.pin_memory() if torch.cuda.is_available() else v) for k, v in host.items()}
    host = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    return Batch(
        images=images.to(device, non_blocking=True),
        bgt=None if bgt is None else bgt.to(device, non_blocking=True),
        tiling=tiling,
        **host,
    )


def _to_device(t: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    return t.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------------------
# Devices and the backend registry
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A decode backend in the registry: where its loader class lives and what it needs.

    Attributes:
        name: registry name.
        target: ``"module:Class"`` of its :class:`DecodeLoader` subclass (imported on first use).
        requires: importable modules it needs.
        install: the pip command that provides them.
        description: one line for listings.
    """

    name: str
    target: str
    requires: tuple[str, ...]
    install: str
    description: str

    def available(self) -> bool:
        return all(_importable(m) for m in self.requires)

    def load(self) -> type["DecodeLoader"]:
        if not self.available():
            missing = [m for m in self.requires if not _importable(m)]
            raise BackendUnavailableError(
                f"decode backend {self.name!r} needs {', '.join(missing)}, which is not installed; "
                f"install it with: {self.install}"
            )
        mod, _, cls = self.target.partition(":")
        try:
            return getattr(importlib.import_module(mod), cls)
        except ImportError as e:
            raise BackendUnavailableError(
                f"decode backend {self.name!r} failed to import ({e}); reinstall it with: {self.install}"
            ) from e


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add a backend to the registry (``create_loader(backend=spec.name)`` then finds it)."""
    if spec.name in BACKENDS or spec.name == "auto":
        raise ConfigError(f"register_backend: a decode backend named {spec.name!r} exists already")
    BACKENDS[spec.name] = spec
    return spec


_IMPORTABLE: dict[str, bool] = {}


def _importable(module: str) -> bool:
    if module not in _IMPORTABLE:
        try:
            _IMPORTABLE[module] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            _IMPORTABLE[module] = False
    return _IMPORTABLE[module]


def backend_available(name: str) -> bool:
    """Whether the decode backend ``name`` is registered and its dependencies are installed."""
    spec = BACKENDS.get(name)
    return spec is not None and spec.available()


# --------------------------------------------------------------------------------------------------------------
# The loader base class
# --------------------------------------------------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class DecodeLoader:
    """Iterable of :class:`Batch` over (a shard of) an index; the base class of every decode backend.

    Subclasses implement :meth:`decode_fast` (JPEG bytes -> crops); this class does everything else (see the
    module docstring). Use :func:`bgsynth.pipeline.create_loader` rather than instantiating it directly.

    Args:
        index: the dataset index.
        geometry: the crop geometry.
        batch_size: images per batch (the last batch may be smaller; rejected images leave their batch smaller).
        device: target device of the batches.
        shard_id, num_shards: this process takes ``sorted_ids[shard_id::num_shards]``.
        ids: restrict to these image ids (default: all of the index).
        prefetch: batches decoded ahead by a background thread (0: decode in the consumer's thread).
        num_threads: decoder threads (default ``min(8, os.cpu_count())``).
        require_mask: images without a foreground mask are rejected (``missing_mask``) or raise.
        on_error: ``"reject"`` (skip undecodable images, record them in :attr:`rejects`, warn) or ``"raise"``
            (:class:`~bgsynth.errors.DecodeError` naming the file).
        tiling: ``"paper"`` (the paper's Only-BG-T, tiled at full resolution; ``has_bgt`` by the full-resolution
            margin) or ``"crop"`` (tiled inside the crop later, by the variants; ``has_bgt`` by the crop margin).
        only_bg_t: with ``tiling="paper"``, also make each image's Only-BG-T crop (``Batch.bgt``); ``False``
            saves the second resize when no consumer needs it (e.g. the challenge's foregrounds).

    Attributes:
        ids: the image ids of this shard, in iteration order.
        rejects: ``{"path", "reason", "detail"}`` of every image skipped so far (one entry per file and reason).
        fallbacks: ``{"path", "reason"}`` of every image a fast decoder left to PIL.

    .. note:: ``len(loader)`` is the number of planned batches, ``ceil(len(ids) / batch_size)``; a batch whose
       images were all rejected is not yielded, so iteration may yield fewer.
    """

    name = "base"

    def __init__(
        self,
        index: DatasetIndex,
        geometry: CropGeometry,
        batch_size: int,
        device: torch.device,
        shard_id: int = 0,
        num_shards: int = 1,
        ids: Iterable[int] | None = None,
        prefetch: int = 2,
        num_threads: int | None = None,
        require_mask: bool = False,
        on_error: str = "reject",
        tiling: str = "paper",
        only_bg_t: bool = True,
    ):
        if not isinstance(index, DatasetIndex):
            raise ConfigError(f"create_loader: expected a DatasetIndex or an index path, got {type(index).__name__}")
        if not isinstance(geometry, CropGeometry):
            raise ConfigError(f"create_loader: expected geometry to be a CropGeometry, got {type(geometry).__name__}")
        for nm, v, lo in (("batch_size", batch_size, 1), ("num_shards", num_shards, 1), ("prefetch", prefetch, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"create_loader: expected {nm} to be an integer >= {lo}, got {v!r}")
        if not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ConfigError(f"create_loader: expected 0 <= shard_id < num_shards={num_shards}, got {shard_id!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError(f"create_loader: expected num_threads to be a positive integer, got {num_threads!r}")
        if on_error not in ("reject", "raise"):
            raise ConfigError(f"create_loader: expected on_error 'reject' or 'raise', got {on_error!r}")
        if tiling not in TILINGS:
            raise ConfigError(f"create_loader: expected tiling in {TILINGS}, got {tiling!r}")
        self.index = index
        self.geometry = geometry
        self.batch_size = batch_size
        self.device = device
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.prefetch = prefetch
        self.num_threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        self.require_mask = bool(require_mask)
        self.on_error = on_error
        self.tiling = tiling
        self.make_bgt = tiling == "paper" and bool(only_bg_t)
        self.rejects: list[dict] = []
        self.fallbacks: list[dict] = []
        self._reject_keys: set[tuple[str, str]] = set()
        self._fallback_keys: set[str] = set()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

        all_ids = index.ids
        if ids is not None:
            known = set(all_ids)
            wanted = sorted({int(i) for i in ids})
            missing = [i for i in wanted if i not in known]
            if missing:
                raise ConfigError(
                    f"create_loader: {len(missing)} requested image id(s) are not in the index "
                    f"{index.path or '<in-memory>'}, e.g. {missing[:5]}"
                )
            all_ids = wanted
        shard = all_ids[shard_id::num_shards]
        if self.require_mask:
            keep = []
            for i in shard:
                if any(a.get("segmentation") is not None for a in index.annotations(i)):
                    keep.append(i)
                    continue
                rec = index.record(i)
                err = SampleError(Reject.MISSING_MASK, "require_mask=True and the index holds no mask for it")
                if on_error == "raise":
                    raise DecodeError(f"{rec.path}: {err}")
                self._record_reject(rec.path, err)
            if len(keep) < len(shard):
                warnings.warn(
                    f"decode ({self.name}): {len(shard) - len(keep)} image(s) without a mask skipped "
                    f"(require_mask=True); see loader.rejects",
                    stacklevel=3,
                )
            shard = keep
        self.ids: list[int] = shard

    # ------------------------------------------------------------------------------------------ public
    def __len__(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.name!r}, images={len(self.ids)}, batches={len(self)}, "
            f"batch_size={self.batch_size}, geometry={self.geometry}, device={self.device}, "
            f"shard={self.shard_id}/{self.num_shards}, tiling={self.tiling!r})"
        )

    def __iter__(self) -> Iterator[Batch]:
        chunks = [self.ids[k : k + self.batch_size] for k in range(0, len(self.ids), self.batch_size)]
        if self.prefetch == 0:
            return self._iter_sync(chunks)
        return self._iter_threaded(chunks)

    def close(self) -> None:
        """Release decoder threads and backend resources (the loader can still be iterated again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------ subclass API
    def decode_fast(self, samples: Sequence[HostSample]) -> list[tuple | SampleError]:
        """Decode, resize and crop JPEG samples of the ``fast`` route (subclasses override).

        Args:
            samples: samples whose probe route is ``"fast"``.

        Returns:
            Per sample: ``(crop, bgt)`` where ``crop`` is the ``uint8 [3, C, C]`` crop (a tensor on any device, or
            a NumPy array/view on the host) resized to ``plan.resized`` and cropped at ``plan.offset``, and
            ``bgt`` the same for the paper's Only-BG-T (:func:`only_bg_t_full` of the decoded pixels) when
            :meth:`wants_bgt`, else ``None``; or a :class:`SampleError` (the base class then tries PIL).
        """
        from .pil import pil_decode_crop

        return [pil_decode_crop(s, self.wants_bgt(s)) for s in samples]

    def wants_bgt(self, sample: HostSample) -> bool:
        """Whether the decoder must also make this sample's paper Only-BG-T crop."""
        return self.make_bgt and sample.strip is not None

    def uses_fast_route(self) -> bool:
        """Whether this backend has a decoder of its own for the ``fast`` route (PIL does everything itself)."""
        return True

    # ------------------------------------------------------------------------------------------ internals
    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"bgsynth-{self.name}")
        return self._pool

    def _map(self, fn: Callable, items: Sequence) -> list:
        if len(items) <= 1 or self.num_threads == 1:
            return [fn(x) for x in items]
        return list(self._threads().map(fn, items))

    def _record_reject(self, path: str, err: SampleError) -> dict:
        entry = {"path": str(path), "reason": err.reason, "detail": err.detail}
        with self._lock:
            key = (entry["path"], entry["reason"])
            if key not in self._reject_keys:
                self._reject_keys.add(key)
                self.rejects.append(entry)
        return entry

    def _record_fallback(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self._fallback_keys:
                self._fallback_keys.add(path)
                self.fallbacks.append({"path": str(path), "reason": reason})

    def _fail(self, path: str, err: SampleError, new: list[dict]) -> None:
        if self.on_error == "raise":
            raise DecodeError(f"{path}: cannot decode with backend {self.name!r} ({err.reason}): {err.detail}")
        new.append(self._record_reject(path, err))

    def _read(self, image_id: int) -> HostSample | tuple[str, SampleError]:
        rec = self.index.record(image_id)
        try:
            return crop_targets(read_sample(rec, self.geometry))
        except SampleError as e:
            return rec.path, e

    def _pil_fallback(self, sample: HostSample) -> tuple | SampleError:
        from .pil import pil_decode_crop

        return pil_decode_crop(sample, self.wants_bgt(sample))

    def _produce(self, chunk: Sequence[int]) -> tuple[Batch | None, list[dict]]:
        """Decode one batch of ids -> (batch or ``None`` if every image was rejected, new rejects)."""
        new: list[dict] = []
        samples: list[HostSample] = []
        for r in self._map(self._read, chunk):
            if isinstance(r, HostSample):
                samples.append(r)
            else:
                self._fail(r[0], r[1], new)
        if self.tiling == "paper":
            for s, st in zip(samples, full_strips(samples)):
                s.strip = st
        results: list[tuple | SampleError | None] = [None] * len(samples)
        fast = [i for i, s in enumerate(samples) if s.probe.route == "fast"] if self.uses_fast_route() else []
        if fast:
            for i, out in zip(fast, self.decode_fast([samples[i] for i in fast])):
                if isinstance(out, SampleError):
                    if out.reason == Reject.SIZE_MISMATCH:
                        results[i] = out
                    else:
                        self._record_fallback(samples[i].path, f"fast decoder refused ({out.detail or out.reason})")
                else:
                    results[i] = out
        slow = [i for i, r in enumerate(results) if r is None]
        if slow:
            if self.uses_fast_route():
                for i in slow:
                    if samples[i].probe.route == "pil":
                        self._record_fallback(samples[i].path, samples[i].probe.why_pil)
            for i, out in zip(slow, self._map(self._pil_fallback, [samples[i] for i in slow])):
                results[i] = out
        good: list[HostSample] = []
        crops: list[torch.Tensor | np.ndarray] = []
        bgts: list[torch.Tensor | np.ndarray] = []
        for s, out in zip(samples, results):
            if isinstance(out, SampleError):
                self._fail(s.path, out, new)
            else:
                good.append(s)
                crops.append(out[0])
                # rows without an Only-BG-T hold the unchanged crop (invalid; never shown as Only-BG-T)
                bgts.append(out[0] if out[1] is None else out[1])
        if not good:
            return None, new
        images = self._stack(crops)
        bgt = self._stack(bgts) if self.make_bgt else None
        return assemble_batch(good, images, self.geometry, self.device, self.tiling, bgt), new

    def _stack(self, crops: list[torch.Tensor | np.ndarray]) -> torch.Tensor:
        if all(isinstance(t, np.ndarray) or t.device.type == "cpu" for t in crops):
            # one NumPy copy: torch.stack of strided uint8 views is slow on a busy CPU (its parallel copy stalls)
            images = torch.from_numpy(np.stack([t if isinstance(t, np.ndarray) else t.numpy() for t in crops]))
            if self.device.type == "cuda":
                images = images.pin_memory()
            return images
        return torch.stack([_to_device(t, self.device) for t in crops])

    def _warn(self, new: list[dict]) -> None:
        if new:
            shown = ", ".join(f"{e['path']} ({e['reason']})" for e in new[:3])
            more = f" and {len(new) - 3} more" if len(new) > 3 else ""
            warnings.warn(
                f"decode ({self.name}): skipped {len(new)} image(s): {shown}{more}; see loader.rejects",
                stacklevel=3,
            )

    def _iter_sync(self, chunks: list[list[int]]) -> Iterator[Batch]:
        for chunk in chunks:
            batch, new = self._produce(chunk)
            self._warn(new)
            if batch is not None:
                yield batch

    def _iter_threaded(self, chunks: list[list[int]]) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def producer() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            batch, new = self._produce(chunk)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        batch, new = self._produce(chunk)
                        event = None
                    if not put((batch, new, event)):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(_Failure(e))

        thread = threading.Thread(target=producer, name=f"bgsynth-{self.name}-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                batch, new, event = item
                self._warn(new)
                if batch is None:
                    continue
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for f in dataclasses.fields(batch):
                        t = getattr(batch, f.name)
                        if t.is_cuda:
                            t.record_stream(current)
                yield batch
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
