"""The training iterator: one split of an index, decoded once, background-swapped on the device every step.

:class:`TrainIterator` yields ``(images, labels)`` batches: the split is decoded by
:func:`bgsynth.pipeline.create_loader` (DALI where available), cached on the device when it fits, reshuffled per
epoch by an order that is a pure function of ``(seed, epoch, image id)`` (:mod:`bgsynth.rng`), sharded by the one
sharding rule (:func:`bgsynth.distributed.shard_ids`), and augmented by a :class:`~bgsynth.augment.BackgroundSwap`
whose backgrounds come from the split's pool (:mod:`bgsynth.pool`, built once) or from the batch itself.

It takes the run's resolved :class:`~bgsynth.config.RunConfig` (geometry, device, decode and kernel backends,
tiling, batch size, seed, threads, progress) and its own :class:`LoaderConfig` (split, shard, order, cache); the
swap is given ready or as :class:`~bgsynth.augment.SwapConfig` options. :meth:`TrainIterator.skip` starts a pass
part-way (a resumed training run), and a subclass may choose the backgrounds itself
(:class:`bgsynth.compose_loader.ComposeIterator`). Loose keyword options are split among the
three (:func:`bgsynth.config.resolve_options`), so ``TrainIterator(index, batch_size=64, probs={...},
shard_id=r, num_shards=w)`` works as before.

>>> # it = TrainIterator("index.json", probs={"mixed_rand": 1.0}, batch_size=64, device="cuda")
>>> # for images, labels in it: ...
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, Sequence

import torch

from .augment import SWAP_OPTIONS, AugmentedBatch, BackgroundSwap, SwapConfig, swap_config
from .config import RUN_OPTIONS, RunConfig, check_positive_int, resolve_options
from .distributed import DistContext, shard_ids
from .errors import ConfigError
from .index import DatasetIndex, require_index
from .pipeline import create_loader
from .pool import build_background_pool, build_background_pool_sharded
from .rng import hash_bits
from .types import BackgroundPool, Batch
from .variants import background_pool_from_batch

__all__ = ["LoaderConfig", "TrainIterator"]

_S_ORDER = 7  # the order's stream of the counter-based generator (the swap's streams: bgsynth.augment)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """What a :class:`TrainIterator` iterates over and in which order (validated here).

    Attributes:
        split: split to train on (``None``: every image of the index).
        epoch: first epoch (each full pass advances it; :meth:`TrainIterator.set_epoch` replays one).
        shard_id, num_shards: this process trains on ``shard_ids(ids, shard_id, num_shards)``.
        drop_last: drop the last, partial batch of an epoch (BatchNorm dislikes tiny batches).
        shuffle: reshuffle every epoch (else ascending image id).
        cache: ``True``, ``False`` or ``'auto'`` (cache when the decoded shard takes at most
            ``cache_limit_bytes``). Uncached, each epoch decodes windows of ``window_batches`` batches of the
            epoch's order (one loader per window) and shuffles within each window by the same order.
    """

    split: str | None = "train"
    epoch: int = 0
    shard_id: int = 0
    num_shards: int = 1
    drop_last: bool = True
    shuffle: bool = True
    cache: bool | str = "auto"
    cache_limit_bytes: int = 2 << 30
    window_batches: int = 32

    def __post_init__(self):
        check_positive_int(self.epoch, "epoch", "LoaderConfig", minimum=0)
        check_positive_int(self.window_batches, "window_batches", "LoaderConfig")
        check_positive_int(self.num_shards, "num_shards", "LoaderConfig")
        if not 0 <= check_positive_int(self.shard_id, "shard_id", "LoaderConfig", minimum=0) < self.num_shards:
            raise ConfigError(f"LoaderConfig: expected 0 <= shard_id < num_shards, got {self.shard_id}, "
                              f"{self.num_shards}")
        if self.cache not in (True, False, "auto"):
            raise ConfigError(f"LoaderConfig: expected cache True, False or 'auto', got {self.cache!r}")


_LOADER_OPTIONS = tuple(f.name for f in dataclasses.fields(LoaderConfig))


def _split_swap_options(options: dict) -> dict:
    """Take the :class:`SwapConfig` options out of ``options`` (``seed`` and ``kernel_backend`` stay: run's)."""
    unknown = sorted(k for k in options if k not in RUN_OPTIONS and k not in _LOADER_OPTIONS and k not in SWAP_OPTIONS)
    if unknown:
        raise ConfigError(f"TrainIterator: unknown option(s) {unknown}; expected run options {sorted(RUN_OPTIONS)}, "
                          f"LoaderConfig fields {list(_LOADER_OPTIONS)} or SwapConfig fields {list(SWAP_OPTIONS)}")
    return {k: options.pop(k) for k in list(options) if k in SWAP_OPTIONS and k not in RUN_OPTIONS}


class TrainIterator:
    """``(images, labels)`` training batches of one split, background-swapped on the device.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or the path of one.
        run: the resolved :class:`~bgsynth.config.RunConfig` (geometry: decode geometry, the random resized crop
            works inside its crop; batch_size: samples per batch; seed: of the order and every draw; device,
            backend, kernel_backend, tiling, num_threads, progress).
        config: the :class:`LoaderConfig`.
        swap: a ready :class:`~bgsynth.augment.BackgroundSwap`, or a :class:`~bgsynth.augment.SwapConfig` (its
            seed and kernel backend are the run's; ``channels_last`` defaults to on for CUDA).
        pool: the swap's :class:`~bgsynth.types.BackgroundPool` (built from the split's Only-BG-T when needed and
            not given: from the cache itself when unsharded, else with :mod:`bgsynth.pool`, so every shard draws
            from the same pool; decoded across the ranks of ``dist``).
        dist: a :class:`~bgsynth.distributed.DistContext`: this rank's shard (``shard_id``/``num_shards`` from it)
            and the collective pool decode.
        **options: loose run options (:data:`bgsynth.config.RUN_OPTIONS`), :class:`LoaderConfig` fields and
            :class:`~bgsynth.augment.SwapConfig` fields (``probs``, ``bg_source``, ``random_resized_crop``,
            ``flip``, ``scale``, ``ratio``, ``bg_transform``, ``mean``, ``std``, ``dtype``, ``channels_last``).

    Attributes:
        swap: the :class:`~bgsynth.augment.BackgroundSwap`.
        ids: image ids of this shard (ascending).
        epoch: the epoch of the next pass.
        last: the :class:`~bgsynth.augment.AugmentedBatch` of the latest batch (provenance: variant, background
            ids, params).

    .. note:: The order reshuffles per epoch as ``argsort(hash(seed, epoch, id))`` over this shard's ids. The
       shard itself is the same every epoch (the one sharding rule), which lets each rank keep its images decoded.

    >>> # it = TrainIterator("index.json", probs={"mixed_rand": 1.0}, batch_size=64)
    >>> # for images, labels in it: ...
    """

    #: whether the backgrounds are the split's own Only-BG-T (a subclass with a pool of its own sets False, so
    #: the decoded split carries no Only-BG-T crops)
    OWN_BACKGROUNDS = True

    def __init__(self, index: DatasetIndex | str, run: RunConfig | None = None, config: LoaderConfig | None = None,
                 *, swap: BackgroundSwap | SwapConfig | None = None, pool: BackgroundPool | None = None,
                 dist: DistContext | None = None, **options):
        swap_kw = _split_swap_options(options)
        if dist is not None and dist.enabled:
            options.update(shard_id=dist.rank, num_shards=dist.world_size)
        self.run, self.config = resolve_options("TrainIterator", run, config, LoaderConfig, options, batch_kind="train")
        self.dist = dist
        self.index = self._select(index)
        self.ids = shard_ids(self.index.ids, self.config.shard_id, self.config.num_shards)
        self.epoch = self.config.epoch
        self.swap = self._make_swap(swap, swap_kw, pool)
        # bytes per cached image: crop + mask (+ the paper Only-BG-T crop when backgrounds come from the batch/cache)
        self._bgt_needed = self.run.tiling == "paper" and self.swap.needs_background and self.OWN_BACKGROUNDS
        need = len(self.ids) * (4 + 3 * self._bgt_needed) * self.run.geometry.crop**2
        cache = self.config.cache
        self.cache = bool(cache) if cache != "auto" else need <= self.config.cache_limit_bytes
        self.store: Batch | None = None
        self.last: AugmentedBatch | None = None
        self.rejects: list[dict] = []
        self._skip = 0

    # ------------------------------------------------------------------------------------------ setup
    def _select(self, index) -> DatasetIndex:
        index = require_index(index, "TrainIterator", load_paths=True)
        split = self.config.split
        sub = index.select(split=split) if split is not None else index
        if len(sub) == 0:
            raise ConfigError(f"TrainIterator: split {split!r} of {index.path or '<in-memory index>'} has no images")
        return sub

    def _make_swap(self, swap, swap_kw: dict, pool: BackgroundPool | None) -> BackgroundSwap:
        if isinstance(swap, BackgroundSwap):
            if swap_kw:
                raise ConfigError(f"TrainIterator: give either a ready swap or swap options, not both "
                                  f"({sorted(swap_kw)})")
            if pool is not None:
                swap.pool = pool
            return swap
        swap_kw.setdefault("channels_last", self.run.device.type == "cuda")
        cfg = swap_config(swap, seed=self.run.seed, kernel_backend=self.run.kernel_backend, **swap_kw)
        return BackgroundSwap(config=cfg, pool=pool)

    @property
    def geometry(self):
        return self.run.geometry

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def batch_size(self) -> int:
        return self.run.batch_size

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def split(self) -> str | None:
        return self.config.split

    @property
    def pool(self) -> BackgroundPool | None:
        return self.swap.pool

    def _decode(self, ids: Sequence[int], desc: str) -> Batch | None:
        r = self.run
        loader = create_loader(self.index, backend=r.backend, geometry=r.geometry, batch_size=max(r.batch_size, 64),
                               device=r.device, ids=ids, num_threads=r.num_threads, tiling=r.tiling,
                               only_bg_t=self._bgt_needed)
        batches = loader
        if r.progress:
            from tqdm.auto import tqdm  # optional third-party display, loaded only when asked for

            batches = tqdm(loader, desc=desc, unit="batch", leave=False)
        try:
            parts = [b.to(r.device) for b in batches]
        finally:
            loader.close()
        self.rejects.extend(getattr(loader, "rejects", []))
        return Batch.cat(parts) if parts else None

    def _build_pool(self) -> BackgroundPool:
        """The split's Only-BG-T pool, labelled in the index's label space (its ``num_classes``: Mixed-Same needs
        every class of the space, beyond IN-9's 9 too)."""
        r = self.run
        if self.store is not None and self.config.num_shards == 1:
            # the cache holds the whole split: its Only-BG-T rows are the pool (no second decode)
            pool = background_pool_from_batch(self.store, backend=r.kernel_backend)
        else:
            kw = dict(geometry=r.geometry, backend=r.backend, device=r.device, num_threads=r.num_threads,
                      tiling=r.tiling)
            if self.dist is not None and self.dist.enabled:  # each JPEG decoded by one rank
                pool = build_background_pool_sharded(self.index, self.dist, **kw)
            else:
                pool = build_background_pool(self.index, progress=r.progress, **kw)
        n = self.index.label_space.num_classes
        return pool if pool.num_classes == n else BackgroundPool(pool.images, pool.labels, pool.image_ids, n)

    def prepare(self) -> "TrainIterator":
        """Decode the cache and build the pool now (otherwise done by the first iteration)."""
        if self.cache and self.store is None:
            self.store = self._decode(self.ids, "decode train split")
            if self.store is None:
                raise ConfigError(f"TrainIterator: no image of split {self.split!r} could be decoded")
        if self.swap.bg_source == "pool" and self.swap.needs_background and self.swap.pool is None:
            self.swap.pool = self._build_pool()
            if len(self.swap.pool) == 0:
                warnings.warn(
                    "TrainIterator: the background pool is empty (no image has an Only-BG-T); Mixed-* samples fall "
                    "back to Original",
                    stacklevel=2,
                )
        return self

    # ------------------------------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next pass (order and augmentation draws depend on it)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"TrainIterator.set_epoch: expected an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def num_samples(self) -> int:
        """Samples of this shard per epoch (after decoding, the images that decoded)."""
        return len(self.store) if self.store is not None else len(self.ids)

    def __len__(self) -> int:
        n, bs = self.num_samples(), self.batch_size
        return n // bs if self.config.drop_last else -(-n // bs)

    def order(self, image_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """Positions of ``image_ids`` in the epoch's order: ``argsort(hash(seed, epoch, id))`` (or by id)."""
        key = hash_bits(image_ids, self.seed, epoch, _S_ORDER) if self.config.shuffle else image_ids.to(torch.int64)
        return torch.argsort(key, stable=True)

    def _cached_batches(self, epoch: int) -> Iterator[Batch]:
        bs = self.batch_size
        perm = self.order(self.store.image_ids, epoch)
        n = len(perm)
        stop = n - n % bs if self.config.drop_last else n
        for k in range(0, stop, bs):
            yield self.store.slice(perm[k : k + bs])

    def _streamed_batches(self, epoch: int) -> Iterator[Batch]:
        """Windows of the epoch's order, each decoded by one loader and re-ordered by the same key."""
        bs = self.batch_size
        ids_t = torch.tensor(self.ids, dtype=torch.int64)
        order_ids = ids_t[self.order(ids_t, epoch)].tolist()
        win = bs * self.config.window_batches
        carry: Batch | None = None
        for w in range(0, len(order_ids), win):
            batch = self._decode(order_ids[w : w + win], f"decode window {w // win}")
            if batch is None:
                continue
            batch = batch.slice(self.order(batch.image_ids, epoch))
            if carry is not None:
                batch, carry = Batch.cat([carry, batch]), None
            n = len(batch)
            full = n - n % bs
            for k in range(0, full, bs):
                yield batch.slice(slice(k, k + bs))
            if full < n:
                carry = batch.slice(slice(full, n))
        if carry is not None and not self.config.drop_last:
            yield carry

    def skip(self, batches: int) -> None:
        """Start the next pass at its batch ``batches``: the earlier batches of the epoch's order are passed over
        without being augmented (a resumed training run continues where it stopped; the order and every draw are
        pure functions of ``(seed, epoch, image id)``, so the rest of the pass is the uninterrupted one's)."""
        self._skip = check_positive_int(batches, "batches", "TrainIterator.skip", minimum=0)

    def _augment(self, batch: Batch, epoch: int) -> AugmentedBatch:
        """The training composites of one decoded batch (the swap; a subclass may choose the backgrounds)."""
        return self.swap.apply_batch(batch, epoch=epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.prepare()
        epoch = self.epoch
        skip, self._skip = self._skip, 0
        batches = self._cached_batches(epoch) if self.store is not None else self._streamed_batches(epoch)
        for k, batch in enumerate(batches):
            if k < skip:
                continue
            out = self._augment(batch, epoch)
            self.last = out
            yield out.images, out.labels
        self.epoch = epoch + 1
