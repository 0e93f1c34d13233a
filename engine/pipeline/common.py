"""Shared machinery of the decode backends: the loader base class (batching, fallbacks, prefetching) and the registry.

Every backend (``pil``, ``torchvision``, ``dali``) differs only in how it turns encoded bytes into the resized,
centre-cropped ``uint8`` pixels of an image. Everything else is done once, for every backend:

* per image, on the host (:mod:`bgsynth.pipeline.host`): the file bytes and their header probe, the
  :class:`~bgsynth.geometry.CropPlan`, masks, union boxes, Only-BG-T strips, labels and ids (identical across
  backends by construction), the paper's full-resolution Only-BG-T (:func:`~bgsynth.pipeline.host.only_bg_t_full`)
  and the PIL reference decode;
* here: the per-file PIL fallback for data a fast decoder does not handle (CMYK JPEG, PNG or other formats in a
  ``.JPEG`` file, files the fast decoder refuses), recorded in ``loader.fallbacks``; rejects (``loader.rejects``,
  with a warning) or a :class:`~bgsynth.errors.DecodeError` for undecodable files; deterministic order, sharding
  and a background producer thread that decodes batch ``k + 1`` while batch ``k`` is consumed (on CUDA on a side
  stream, synchronised with the consumer's stream by an event).

A loader is built from the resolved run settings (:class:`~bgsynth.config.RunConfig`: geometry, device, tiling,
batch size, decoder threads) and its own :class:`DecodeOptions` (shard, ids, prefetch, require_mask, on_error,
only_bg_t); :func:`bgsynth.pipeline.create_loader` resolves both from keyword options.

Orientation: ILSVRC boxes and the index masks are in stored-pixel coordinates, so no backend applies EXIF
orientation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import queue
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..config import RunConfig, available_cores, check_positive_int
from ..errors import BackendUnavailableError, ConfigError, DecodeError
from ..index import DatasetIndex, Reject, require_index
from ..probe import SampleError
from ..types import Batch
from .host import (
    HostSample,
    assemble_batch,
    crop_targets,
    full_strips,
    pil_decode_crop,
    read_sample,
    to_device,
)

__all__ = [
    "DecodeOptions",
    "DecodeLoader",
    "BackendSpec",
    "BACKENDS",
    "register_backend",
    "backend_available",
    "available_cores",
    "default_decode_threads",
    "sharing_cores",
]


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
# Threads
# --------------------------------------------------------------------------------------------------------------

#: most decoder threads a loader starts by default
MAX_DEFAULT_THREADS = 8
#: torch intra-op threads of each decoder thread and of the prefetch thread (``None``: torch's default, i.e. every
#: decoder thread would start its own team of ``torch.get_num_threads()`` OpenMP threads for a resize)
DECODER_TORCH_THREADS: int | None = 1


def default_decode_threads(device: torch.device | str = "cpu") -> int:
    """Decoder threads of a loader whose run does not say (``RunConfig.num_threads=None``).

    * CPU device: a quarter of :func:`available_cores`, at least 1 and at most :data:`MAX_DEFAULT_THREADS`. The
      consumer (compositing, the model) runs torch on the iterating thread, which is left the other cores while
      the loader is iterated (:class:`DecodeOptions` ``share_cores``): decoder threads + torch's intra-op threads
      stay within the cores.
    * CUDA device: every core but one, at most :data:`MAX_DEFAULT_THREADS`; the iterating thread mostly launches
      GPU work.

    >>> default_decode_threads("cpu") >= 1
    True
    """
    cores = available_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(MAX_DEFAULT_THREADS, cores - 1))
    return max(1, min(MAX_DEFAULT_THREADS, cores // 4))


def _single_threaded_torch() -> None:
    """Make torch ops of the calling (decoder or prefetch) thread run on this thread only.

    A torch op called from a thread of our own (torchvision's resize, an ``index_select``) otherwise starts an
    OpenMP team of ``torch.get_num_threads()`` threads for that thread: ``k`` decoder threads would add
    ``k * torch.get_num_threads()`` threads to the consumer's. ``torch.set_num_threads`` is per thread for a
    thread that has started torch already (PyTorch's own pin-memory thread does the same); it also changes the
    default of threads started later, which is put back here by a short-lived thread.
    """
    n = torch.get_num_threads()  # starts torch's per-thread state here, so the 1 below is not overwritten later
    if DECODER_TORCH_THREADS is None or n == DECODER_TORCH_THREADS:
        return
    torch.set_num_threads(DECODER_TORCH_THREADS)
    restore = threading.Thread(target=torch.set_num_threads, args=(n,), name="bgsynth-thread-default")
    restore.start()
    restore.join()


@contextlib.contextmanager
def sharing_cores(decoder_threads: int):
    """While the block runs, torch's intra-op threads (of the calling thread) are at most the cores the decoder
    threads leave: ``max(1, available_cores() - decoder_threads)``; restored after.

    Why: with more busy threads than cores, OpenMP's teams spin-wait for threads that are not running (libgomp
    spins about 300,000 times before it sleeps when its own threads fit the cores; it cannot see other load), and
    a CPU evaluation on a shared machine then ran at a fraction of its idle speed (``benchmarks/bench_decode.py
    --consumer``, docs/decode.md).
    """
    limit = max(1, available_cores() - int(decoder_threads))
    before = torch.get_num_threads()
    if before > limit:
        torch.set_num_threads(limit)
    try:
        yield limit
    finally:
        if before > limit:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# The loader's own options
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """What a loader reads and how it treats bad files (the geometry, device, backend, tiling, batch size and
    decoder threads come from the run's :class:`~bgsynth.config.RunConfig`).

    Attributes:
        shard_id, num_shards: this loader takes ``sorted_ids[shard_id::num_shards]``.
        ids: restrict to these image ids (default: all of the index); stored sorted and unique.
        prefetch: batches decoded ahead by a background thread (0: decode in the consumer's thread).
        require_mask: images without a foreground mask are rejected (``missing_mask``) or raise.
        on_error: ``"reject"`` (skip undecodable images, record them in ``loader.rejects``, warn) or ``"raise"``
            (:class:`~bgsynth.errors.DecodeError` naming the file).
        only_bg_t: with ``tiling="paper"``, also make each image's Only-BG-T crop (``Batch.bgt``); ``False``
            saves the second resize when no consumer needs it (e.g. the challenge's foregrounds).
        share_cores: on a CPU device with ``prefetch > 0``, while the loader is iterated, torch's intra-op threads
            of the iterating thread are lowered to the cores the decoder threads leave (:func:`sharing_cores`,
            restored after); ``False`` leaves them as they are.

    >>> DecodeOptions(ids=[5, 3, 5]).ids
    (3, 5)
    """

    shard_id: int = 0
    num_shards: int = 1
    ids: Iterable[int] | None = None
    prefetch: int = 2
    require_mask: bool = False
    on_error: str = "reject"
    only_bg_t: bool = True
    share_cores: bool = True

    def __post_init__(self):
        check_positive_int(self.num_shards, "num_shards", "create_loader")
        check_positive_int(self.prefetch, "prefetch", "create_loader", minimum=0)
        if not isinstance(self.shard_id, int) or not 0 <= self.shard_id < self.num_shards:
            raise ConfigError(f"create_loader: expected 0 <= shard_id < num_shards={self.num_shards}, "
                              f"got {self.shard_id!r}")
        if self.on_error not in ("reject", "raise"):
            raise ConfigError(f"create_loader: expected on_error 'reject' or 'raise', got {self.on_error!r}")
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(sorted({int(i) for i in self.ids})))


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
        run: the resolved run settings: ``geometry`` (the crop geometry), ``device`` (of the batches),
            ``batch_size`` (images per batch; the last batch may be smaller, rejected images leave their batch
            smaller), ``tiling`` (``"paper"``: the paper's Only-BG-T, tiled at full resolution, ``has_bgt`` by the
            full-resolution margin; ``"crop"``: tiled inside the crop later, by the variants, ``has_bgt`` by the
            crop margin) and ``num_threads`` (decoder threads; ``None``: :func:`default_decode_threads`). Torch ops
            in decoder threads run single-threaded, and on a CPU device the iterating thread's torch threads are
            kept within the cores the decoders leave while it iterates (``options.share_cores``).
        options: what to read and how to treat bad files (:class:`DecodeOptions`).

    Attributes:
        ids: the image ids of this shard, in iteration order.
        rejects: ``{"path", "reason", "detail"}`` of every image skipped so far (one entry per file and reason).
        fallbacks: ``{"path", "reason"}`` of every image a fast decoder left to PIL.

    .. note:: ``len(loader)`` is the number of planned batches, ``ceil(len(ids) / batch_size)``; a batch whose
       images were all rejected is not yielded, so iteration may yield fewer.
    """

    name = "base"

    def __init__(self, index: DatasetIndex, run: RunConfig, options: DecodeOptions | None = None):
        require_index(index, "create_loader")
        if not isinstance(run, RunConfig):
            raise ConfigError(f"{type(self).__name__}: expected a RunConfig, got {type(run).__name__}")
        options = DecodeOptions() if options is None else options
        self.index = index
        self.run = run
        self.options = options
        self.geometry = run.geometry
        self.batch_size = run.batch_size
        self.device = run.device
        self.tiling = run.tiling
        # torch's per-thread state of the constructing thread is set up before any decoder thread changes the
        # default for threads that have none yet (see _single_threaded_torch)
        torch.get_num_threads()
        self.num_threads = run.num_threads or default_decode_threads(self.device)
        self.shard_id = options.shard_id
        self.num_shards = options.num_shards
        self.prefetch = options.prefetch
        self.require_mask = bool(options.require_mask)
        self.on_error = options.on_error
        self.make_bgt = run.tiling == "paper" and bool(options.only_bg_t)
        self.rejects: list[dict] = []
        self.fallbacks: list[dict] = []
        self._reject_keys: set[tuple[str, str]] = set()
        self._fallback_keys: set[str] = set()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        shard = self._select_ids()[self.shard_id :: self.num_shards]
        self.ids: list[int] = self._with_masks(shard) if self.require_mask else shard

    def _select_ids(self) -> list[int]:
        """The sorted ids of the index, or the requested ones (all of which must be in the index)."""
        all_ids = self.index.ids
        wanted = self.options.ids
        if wanted is None:
            return all_ids
        known = set(all_ids)
        missing = [i for i in wanted if i not in known]
        if missing:
            raise ConfigError(
                f"create_loader: {len(missing)} requested image id(s) are not in the index "
                f"{self.index.path or '<in-memory>'}, e.g. {missing[:5]}"
            )
        return list(wanted)

    def _with_masks(self, shard: list[int]) -> list[int]:
        """``require_mask``: the ids whose index entry holds a mask; the others are rejected (or raise)."""
        keep = []
        for i in shard:
            if any(a.get("segmentation") is not None for a in self.index.annotations(i)):
                keep.append(i)
                continue
            rec = self.index.record(i)
            err = SampleError(Reject.MISSING_MASK, "require_mask=True and the index holds no mask for it")
            if self.on_error == "raise":
                raise DecodeError(f"{rec.path}: {err}")
            self._record_reject(rec.path, err)
        if len(keep) < len(shard):
            warnings.warn(
                f"decode ({self.name}): {len(shard) - len(keep)} image(s) without a mask skipped "
                f"(require_mask=True); see loader.rejects",
                stacklevel=4,
            )
        return keep

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
        if self.device.type == "cpu" and self.options.share_cores:
            return self._iter_sharing_cores(chunks)
        return self._iter_threaded(chunks)

    def _iter_sharing_cores(self, chunks: list[list[int]]) -> Iterator[Batch]:
        """:meth:`_iter_threaded` with the iterating thread's torch threads within the cores the decoders leave."""
        with sharing_cores(self.num_threads):
            yield from self._iter_threaded(chunks)

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
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix=f"bgsynth-{self.name}",
                                                               initializer=_single_threaded_torch)
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
        return torch.stack([to_device(t, self.device) for t in crops])

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
                _single_threaded_torch()
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
