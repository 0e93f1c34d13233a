"""Evaluation: every requested variant in one pass over the data, composites fed straight to the model.

:func:`evaluate` decodes each image of a split once, synthesizes all requested variants in-batch on the device
(normalised, in the model's dtype and memory format, see :func:`bgsynth.variants.synthesize`) and forwards them.
Every composite leaves one row in :class:`~bgsynth.results.EvalRecords`, and every metric is a pure function of
those rows (:func:`~bgsynth.results.metrics_from_records`), so records of several shards or ranks can simply be
concatenated and scored again (:func:`~bgsynth.results.merge_results`).

The run is configured by two objects, resolved once at the edge (:func:`bgsynth.config.resolve_options`): the
:class:`~bgsynth.config.RunConfig` (geometry, device, decode and kernel backends, tiling, batch size, seed) and the
job's own :class:`EvalConfig` (variants, split, subset, shards, memory budget). :class:`_Evaluation` runs it as a
short pipeline of steps.

Data flow of a single-process run with Mixed-* variants and no pool given (``two_phase``):

1. One pass of the decode loader (it prefetches: decoding batch k+1 overlaps the model on batch k). Per batch,
   the non-Mixed variants are synthesized and forwarded, and the decoded batch is kept for phase 2.
2. The pool is made from the kept batches' Only-BG-T (:func:`bgsynth.pool.pool_from_batches`); the Mixed-*
   variants are synthesized from the kept batches and forwarded.

So each JPEG is decoded exactly once. When the kept batches would not fit ``cache_bytes``, or for a manual
shard, or when given a pool, the pool comes from :func:`bgsynth.pool.build_background_pool_sharded` (or the
argument) and all variants run in one loop.

Under ``torchrun`` (:mod:`bgsynth.distributed`) each rank runs the same two phases on its shard of the image ids;
between them the ranks' Only-BG-T parts are gathered into the whole split's pool (still one decode per JPEG in
the whole job), and at the end the records are gathered, so the metrics equal a single-process run's.

>>> from bgsynth.index import DatasetIndex
>>> from bgsynth.models import load_model
>>> index = DatasetIndex.load("index.json")                                                  # doctest: +SKIP
>>> result = evaluate(index, load_model("ckpt.pt"), variants="all", device="cuda")            # doctest: +SKIP
>>> result.accuracy("mixed_rand"), result.bg_gap                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import RunConfig, available_cores, check_positive_int, resolve_options
from .distributed import DistContext, current, shard_ids
from .errors import ConfigError
from .index import DatasetIndex, require_index
from .models import LABEL_PROTOCOLS, LoadedModel, Predictor, check_label_space
from .pipeline import create_loader
from .pool import build_background_pool_sharded, gather_background_pool, pool_from_batches
from .report import write_report
from .runs import Fingerprint, OutputFolder, index_digest
from .results import (
    RECORD_COLUMNS,
    VARIANT_ORDER,
    EvalRecords,
    EvalResult,
    metrics_from_records,
    model_digest,
    normalise_pairing,
    pick_examples,
)
from .types import BackgroundPool, Batch
from .variants import MIXED_VARIANTS, synthesize
from .variants import resolve_variants as _registry_names

__all__ = [
    "EvalConfig",
    "evaluate",
    "evaluate_to_dir",
    "eval_fingerprint",
    "claim_output",
    "cpu_thread_split",
    "model_threads",
    "EVAL_OUTPUTS",
    "resolve_variants",
    "MIXED_VARIANTS",
]


def resolve_variants(variants: str | Sequence[str]) -> tuple[str, ...]:
    """``'all'``, a comma-separated string or a list of names (registry or paper names) -> tuple in the paper's
    order (:data:`~bgsynth.results.VARIANT_ORDER`), validated against :data:`bgsynth.variants.VARIANTS`."""
    names = set(_registry_names(variants))
    return tuple(v for v in VARIANT_ORDER if v in names)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What an evaluation evaluates; how it runs (geometry, device, backends, tiling, batch size, seed) is its
    :class:`~bgsynth.config.RunConfig`.

    Attributes:
        variants: ``'all'``, a comma-separated string or a list of variant names; stored resolved, as a tuple in
            the paper's order (:func:`resolve_variants`).
        split: split(s) to evaluate (``None``: every image of the index).
        per_class: evaluate only N images per class of the split (a balanced quick subset, seeded choice).
        label_protocol: ``'official'`` or ``'restricted'`` (used when the model is a LoadedModel; a Predictor
            brings its own).
        record_provenance: keep the per-composite records in the result (needed for ``provenance.csv`` and for
            merging shards; metrics are computed from them either way).
        examples_per_class: images per class whose composites are kept for the report's contact sheet (0: none).
        cache_bytes: memory budget for keeping decoded batches so that Mixed-* needs no second decode
            (``None``: 40% of free GPU memory, or min(8 GiB, 25% of RAM)); 0 forces the pool-first path.
        prefetch: batches the loader decodes ahead.
        shard_id, num_shards: evaluate ``ids[shard_id::num_shards]`` of the sorted image ids (a manual shard,
            merged later with :func:`~bgsynth.results.merge_results`; no collectives).
        groups: add per-group metrics (foreground class x background class: accuracy per group, average and worst
            group) to the Mixed-* variants (:func:`bgsynth.results.group_metrics`).
        pairing: ``{fg_class: [aligned bg classes]}``: which groups are aligned (adds ``aligned_gap``; implies
            ``groups``).
    """

    variants: tuple[str, ...] | str = "all"
    split: str | tuple[str, ...] | None = "val"
    per_class: int | None = None
    label_protocol: str = "official"
    record_provenance: bool = True
    examples_per_class: int = 1
    cache_bytes: int | None = None
    prefetch: int = 2
    shard_id: int = 0
    num_shards: int = 1
    groups: bool = False
    pairing: Any = None

    def __post_init__(self):
        object.__setattr__(self, "variants", resolve_variants(self.variants))
        object.__setattr__(self, "pairing", normalise_pairing(self.pairing))
        if self.pairing is not None:
            object.__setattr__(self, "groups", True)
        if self.split is not None and not isinstance(self.split, str):
            object.__setattr__(self, "split", tuple(self.split))
        if self.per_class is not None:
            check_positive_int(self.per_class, "per_class", "EvalConfig")
        check_positive_int(self.examples_per_class, "examples_per_class", "EvalConfig", minimum=0)
        check_positive_int(self.prefetch, "prefetch", "EvalConfig", minimum=0)
        if self.cache_bytes is not None:
            check_positive_int(self.cache_bytes, "cache_bytes", "EvalConfig", minimum=0)
        if self.label_protocol not in LABEL_PROTOCOLS:
            raise ConfigError(f"EvalConfig: expected label_protocol in {LABEL_PROTOCOLS}, got {self.label_protocol!r}")
        s, n = self.shard_id, self.num_shards
        if not (isinstance(n, int) and n >= 1 and isinstance(s, int) and 0 <= s < n):
            raise ConfigError(f"EvalConfig: expected 0 <= shard_id < num_shards, got shard_id={s}, num_shards={n}")

    def to_dict(self) -> dict:
        """JSON-able record of the job's settings."""
        d = dataclasses.asdict(self)
        d["variants"] = list(self.variants)
        d["split"] = self.split if self.split is None or isinstance(self.split, str) else list(self.split)
        d["pairing"] = None if self.pairing is None else {str(k): list(v) for k, v in self.pairing.items()}
        return d


def evaluate(
    index: DatasetIndex,
    model: LoadedModel | Predictor,
    run: RunConfig | None = None,
    config: EvalConfig | None = None,
    *,
    pool: BackgroundPool | None = None,
    dist: DistContext | None = None,
    **options: Any,
) -> EvalResult:
    """Evaluate a model on all requested variants of a split in one pass over the data.

    Args:
        index: the loaded :class:`~bgsynth.index.DatasetIndex` (load a file once with ``DatasetIndex.load``).
        model: a :class:`~bgsynth.models.LoadedModel` (wrapped in a :class:`~bgsynth.models.Predictor` on the run's
            device, full precision unless ``amp`` says otherwise, with ``label_protocol``) or a ready
            :class:`~bgsynth.models.Predictor` (its device and autocast are the run's).
        run: the resolved run configuration; default: resolved from ``options`` (:func:`bgsynth.config.resolve_run`):
            the geometry defaults to the checkpoint's, else 256 -> 224 (a checkpoint file without one is named in a
            warning); the device to the Predictor's, else the CPU; the batch size to ``BATCH_SIZES['eval']``.
        config: the job's :class:`EvalConfig`; default: made from ``options``.
        pool: a :class:`~bgsynth.types.BackgroundPool` for Mixed-*; default: the Only-BG-T images of the same
            split (all shards share it).
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`). Under
            ``torchrun`` with several ranks (and ``num_shards=1``) every rank must call :func:`evaluate` with the
            same arguments: each evaluates its shard of the image ids, the Mixed-* background pool is gathered
            from all shards (each JPEG is decoded by one rank), the per-composite records are gathered, and every
            rank returns the merged result, identical in records and metrics to a single-process run (contact-sheet
            composites are rendered on rank 0 only; ``timing['ranks']`` holds the per-rank figures).
        **options: run options (``geometry``, ``resize``, ``crop``, ``device``, ``backend``, ``kernel_backend``,
            ``tiling``, ``batch_size``, ``seed`` (of the Mixed-* background choice), ``amp``, ``num_threads``,
            ``progress``) and :class:`EvalConfig` fields (``variants``, ``split``, ``per_class``, ...); they
            override ``run`` and ``config``. Unknown names are an error listing the valid ones.

    Returns:
        An :class:`~bgsynth.results.EvalResult`; ``config`` in its JSON holds the run's and the job's settings.
    """
    predictor, run, config = _resolve(index, model, run, config, options)
    return _Evaluation(index, predictor, run, config, pool, dist).run()


def _resolve(index, model, run, config, options) -> tuple[Predictor, RunConfig, EvalConfig]:
    """The predictor and the resolved run and job configurations of an evaluation (checked before any work)."""
    require_index(index, "evaluate")
    loaded = _loaded_model(model)
    defaults = dict(batch_kind="eval", progress=True, device="cpu", amp=None,
                    stored_geometry=getattr(loaded, "geometry", None),
                    checkpoint=(getattr(loaded, "provenance", None) or {}).get("file"))
    if isinstance(model, Predictor):
        defaults.update(device=model.device, amp=model.amp)
    run, config = resolve_options("evaluate", run, config, EvalConfig, options, **defaults)
    if isinstance(model, Predictor):
        predictor = model
        run = run.replace(device=predictor.device, amp=predictor.amp)  # the Predictor's placement is the run's
    else:
        predictor = Predictor(model, device=run.device, amp=run.amp, label_protocol=config.label_protocol,
                              label_space=index.label_space)
    check_label_space(predictor, index, "evaluate")
    return predictor, run, config


def _loaded_model(model) -> LoadedModel:
    if isinstance(model, Predictor):
        return model.loaded
    if isinstance(model, LoadedModel):
        return model
    raise ConfigError(f"evaluate: expected a LoadedModel or Predictor, got {type(model).__name__}")


def _dist_context(dist, config: EvalConfig) -> tuple[DistContext, bool]:
    """``(context, distributed)``: the process group's context when it splits this job, else a single process."""
    ctx = current() if dist is None else dist
    if not isinstance(ctx, DistContext):
        raise ConfigError(f"evaluate: expected dist to be a DistContext or None, got {type(ctx).__name__}")
    if ctx.enabled and config.num_shards == 1:
        return ctx, True
    return DistContext.single(), False  # a manual shard (or one process): no collectives


def _select(index: DatasetIndex, config: EvalConfig) -> DatasetIndex:
    """The images of the job: the split, optionally a balanced per-class subset (seeded choice)."""
    sub = index.select(split=config.split) if config.split is not None else index
    if config.per_class is not None:
        sub = sub.select(per_class=int(config.per_class), seed=0)
    index.require_images(sub, "evaluate", config.split)
    return sub


def cpu_thread_split(device: torch.device | str, model_threads: int | None = None,
                     decode_threads: int | None = None) -> tuple[int | None, int | None]:
    """How a command that owns its process splits the CPU between the model and the decoder.

    On a CPU device the model's intra-op threads and the decoder threads share the cores: torch's OpenMP threads
    spin at every barrier, so one that is descheduled by a decoder thread (or by another process on a shared
    machine) stalls the whole forward (measured on 2 cores at load 7: 3,600 forwards of the demo CNN took 5.2 s
    with 1 thread and 29 s with 2). The default therefore gives the decoder one core and the model the others
    (at least one), so the two overlap instead of preempting each other. On CUDA the model runs on the GPU:
    ``(None, None)`` keeps torch's and the decoder's own defaults.

    Args:
        device: the run's device.
        model_threads, decode_threads: what the user asked for (``None``: the default).

    Returns:
        ``(model_threads, decode_threads)``; ``None`` for "leave the default".

    >>> cpu_thread_split("cpu", 3, 2)
    (3, 2)
    """
    if torch.device(device).type != "cpu":
        return model_threads, decode_threads
    cores = available_cores()
    decode = decode_threads if decode_threads is not None else 1
    model = model_threads if model_threads is not None else max(1, min(torch.get_num_threads(), cores - decode))
    return model, decode


@contextlib.contextmanager
def model_threads(device: torch.device | str, threads: int | None = None):
    """While the block runs, torch's intra-op threads are the model's share of :func:`cpu_thread_split` (on a CPU
    device; restored after), as the ``eval`` and ``challenge`` commands set for their whole process.

    For a caller that runs other work in between (the demo trains its model with torch's default threads, so a
    cached model stays the one a fresh run trains): an evaluation or a challenge run with torch's default of one
    thread per core next to the decoder thread, or beside any other load, ran at 0.4x (on 2 cores at load 3.7:
    339 against 780 composites/s for the demo's evaluation; the same predictions).

    Args:
        device: the run's device (``cuda``: nothing changes).
        threads: the model's threads (``None``: :func:`cpu_thread_split`'s default).
    """
    model, _decode = cpu_thread_split(device, threads)
    before = torch.get_num_threads()
    if model is not None and model != before:
        torch.set_num_threads(model)
    try:
        yield
    finally:
        if model is not None and model != before:
            torch.set_num_threads(before)


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 << 30
    return int(min(8 << 30, 0.25 * avail))


class _Evaluation:
    """One :func:`evaluate` call as a pipeline of short steps (see the module docstring for the data flow):
    the pool-first path when batches are not kept, the decode pass, the Mixed-* pass from the kept batches, the
    records, their gathering over ranks, and the result."""

    def __init__(self, index: DatasetIndex, predictor: Predictor, run: RunConfig, config: EvalConfig,
                 pool: BackgroundPool | None, dist: DistContext | None):
        self.t_start = time.perf_counter()
        self.index, self.predictor, self.run_cfg, self.config = index, predictor, run, config
        self.ctx, self.distributed = _dist_context(dist, config)
        self.shard = (self.ctx.rank, self.ctx.world_size) if self.distributed else (config.shard_id, config.num_shards)
        self.progress = run.progress and self.ctx.is_main
        self.names = config.variants
        self.mixed = [v for v in self.names if v in MIXED_VARIANTS]
        self.plain = [v for v in self.names if v not in MIXED_VARIANTS]
        self.forwards0, self.backoffs0 = predictor.forwards, predictor.oom_backoffs
        self.sub = _select(index, config)
        self.all_ids = self.sub.ids
        self.n_img = len(shard_ids(self.all_ids, *self.shard))
        self.pool = pool
        self.two_phase = self._keeps_batches()
        self.pool_source = self._pool_source()
        self.t_pool = self.t_loop = 0.0
        self.chunks: dict[str, list[tuple]] = {v: [] for v in self.names}
        self.meta: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kept: list[Batch] = []
        self.rejects: list = []
        self.backend_name = run.backend

    def run(self) -> EvalResult:
        self._build_pool()
        self._passes()
        records = self._records()
        records, tally = self._gather(records)
        return self._result(records, tally)

    # ------------------------------------------------------------------------------------------ the pool
    def _keeps_batches(self) -> bool:
        """Keep the decoded batches for a Mixed-* second phase (each JPEG decoded once)? A manual shard cannot: it
        needs the whole split's pool; ranks can, by gathering the pool parts. Every rank must take the same path."""
        cfg, crop = self.config, self.run_cfg.geometry.crop
        cache_bytes = _default_cache_bytes(self.run_cfg.device) if cfg.cache_bytes is None else cfg.cache_bytes
        need = self.n_img * (4 * crop * crop + 64)
        return (bool(self.mixed) and self.pool is None and (self.shard[1] == 1 or self.distributed)
                and self.ctx.all_true(need <= cache_bytes))

    def _pool_source(self) -> str:
        if not self.mixed:
            return "none"
        if self.pool is not None:
            return "given"
        from_ranks = f", gathered from {self.ctx.world_size} ranks" if self.distributed else ""
        how = "kept from the evaluation pass" if self.two_phase else "build_background_pool"
        return f"same split ({how}{from_ranks})"

    def _build_pool(self) -> None:
        """The pool-first path: the split's pool decoded up front (over the ranks), or the given pool moved."""
        r = self.run_cfg
        if self.mixed and self.pool is None and not self.two_phase:
            t = time.perf_counter()
            self.pool = build_background_pool_sharded(
                self.sub, self.ctx, geometry=r.geometry, backend=r.backend, device=r.device, progress=self.progress,
                tiling=r.tiling, kernel_backend=r.kernel_backend, num_threads=r.num_threads)
            self.pool = self._in_label_space(self.pool)
            self.t_pool = time.perf_counter() - t
        if self.pool is not None:
            self.pool = self.pool.to(r.device)

    def _in_label_space(self, pool: BackgroundPool) -> BackgroundPool:
        """A pool of this index's backgrounds knows the index's class count (Mixed-Next's ``(y + 1) mod N``)."""
        n = self.index.label_space.num_classes
        return pool if pool.num_classes == n else dataclasses.replace(pool, num_classes=n)

    # ------------------------------------------------------------------------------------------ the passes
    def _passes(self) -> None:
        """Phase 1, the decode pass, and (keeping batches) phase 2, Mixed-* from the kept batches."""
        r = self.run_cfg
        loader = create_loader(self.sub, backend=r.backend, geometry=r.geometry, batch_size=r.batch_size,
                               device=r.device, shard_id=self.shard[0], num_shards=self.shard[1],
                               prefetch=self.config.prefetch, num_threads=r.num_threads, tiling=r.tiling,
                               only_bg_t="only_bg_t" in self.names or self.two_phase)
        bar = _progress(self.progress, self.n_img * len(self.names), f"eval {len(self.names)} variants")
        t = time.perf_counter()
        try:
            self._decode_pass(loader, bar)
            if self.two_phase and (self.kept or self.distributed):  # every rank joins the gather, even one without images
                self._mixed_pass(bar)
        finally:
            loader.close()
            if bar is not None:
                bar.close()
        self.t_loop = time.perf_counter() - t
        self.rejects = list(getattr(loader, "rejects", []))
        self.backend_name = getattr(loader, "name", r.backend)

    def _decode_pass(self, loader, bar) -> None:
        first_pass = self.plain if self.two_phase else list(self.names)
        n_seen = 0
        for batch in loader:
            if batch.device != self.run_cfg.device:
                batch = batch.to(self.run_cfg.device, non_blocking=True)
            self.meta.append((batch.image_ids, batch.labels))
            if first_pass:
                self._forward(batch, first_pass)
            if self.two_phase:
                self.kept.append(batch)
            n_seen += len(batch)
            _advance(bar, len(batch) * len(first_pass), n_seen)

    def _mixed_pass(self, bar) -> None:
        r = self.run_cfg
        t = time.perf_counter()
        pool = pool_from_batches(self.kept, r.geometry.crop, r.device, backend=r.kernel_backend)
        pool = gather_background_pool(pool, self.ctx) if self.distributed else pool
        self.pool = self._in_label_space(pool)
        self.t_pool = time.perf_counter() - t
        kept, self.kept = self.kept, []
        for batch in kept:
            self._forward(batch, self.mixed)
            _advance(bar, len(batch) * len(self.mixed), None)

    def _forward(self, batch: Batch, names: Sequence[str]) -> None:
        """Synthesize ``names`` of a batch (normalised, cast and laid out for the model) and keep the predictions."""
        p = self.predictor
        outs = synthesize(batch, list(names), pool=self.pool, seed=self.run_cfg.seed, normalize=(p.mean, p.std),
                          dtype=p.input_dtype, channels_last=p.channels_last, backend=self.run_cfg.kernel_backend)
        for v in names:
            o = outs[v]
            self.chunks[v].append((p.predict(o.images), o.valid, o.bg_ids, o.bg_labels))

    # ------------------------------------------------------------------------------------------ records
    def _records(self) -> EvalRecords:
        records = _collect(self.chunks, self.meta, self.names, self.run_cfg.seed)
        if len(np.unique(records.image_id)) * len(self.names) != len(records):
            raise ConfigError("evaluate: internal error: records do not cover every (image, variant) exactly once")
        return records

    def _gather(self, records: EvalRecords) -> tuple[EvalRecords, dict]:
        """Every rank's records, rejects and counts (under torchrun every rank gets all of them: the merged
        records are the single-process records); ``tally`` holds the counts the result reports."""
        forwards = int(self.predictor.forwards - self.forwards0)
        backoffs = int(self.predictor.oom_backoffs - self.backoffs0)
        mine = {"rank": int(self.ctx.rank), "images": int(len(np.unique(records.image_id))),
                "planned": int(self.n_img), "forwards": forwards, "seconds": time.perf_counter() - self.t_start,
                "loop_seconds": self.t_loop, "pool_seconds": self.t_pool}
        if not self.distributed:
            return records, dict(rejects=self.rejects, ranks=[mine], forwards=forwards, backoffs=backoffs,
                                 planned=self.n_img)
        parts = self.ctx.all_gather_object((records, self.rejects, mine, backoffs))
        ranks = [p[2] for p in parts]
        return EvalRecords.cat([p[0] for p in parts]), dict(
            rejects=self._sorted_rejects([r for p in parts for r in p[1]]), ranks=ranks,
            forwards=sum(t["forwards"] for t in ranks), backoffs=sum(p[3] for p in parts), planned=len(self.all_ids))

    def _sorted_rejects(self, rejects: list) -> list:
        """The ranks' rejects in the order of the images' ids (then path and reason)."""
        order = {int(i): k for k, i in enumerate(self.all_ids)}
        by_path = {self.sub.record(i).path: int(i) for i in self.all_ids} if rejects else {}
        return sorted(rejects, key=lambda r: (order.get(by_path.get(r.get("path"), -1), -1), str(r.get("path")),
                                              str(r.get("reason"))))

    # ------------------------------------------------------------------------------------------ the result
    def _result(self, records: EvalRecords, tally: dict) -> EvalResult:
        c = self.config
        metrics = metrics_from_records(records, self.index.label_space, groups=c.groups or None, pairing=c.pairing)
        seconds = time.perf_counter() - self.t_start
        examples = pick_examples(records, int(self.config.examples_per_class))
        return EvalResult(
            variants=list(self.names), metrics=metrics["variants"], bg_gap=metrics["bg_gap"],
            label_protocol=self.predictor.label_protocol,
            model=dict(self.predictor.loaded.provenance, predictor=self.predictor.describe()),
            config=self._config_dict(), dataset=self._dataset_dict(records, tally),
            timing=self._timing_dict(records, tally, seconds), versions=_versions(), examples=examples,
            records=records if self.config.record_provenance else None,
            example_images=self._example_images(examples["image_ids"], records),
            label_space=self.index.label_space,
        )

    def _config_dict(self) -> dict:
        """``config`` of results.json: the keys of every bgsynth.eval/1 file, then the rest of the run's and the
        job's settings (:meth:`RunConfig.to_dict`, :meth:`EvalConfig.to_dict`)."""
        r, c = self.run_cfg, self.config
        d = {
            "index": str(self.index.path.resolve()) if self.index.path is not None else None,
            "split": c.to_dict()["split"],
            "per_class": c.per_class,
            "seed": int(r.seed),
            "geometry": r.geometry.to_dict(),
            "geometry_source": r.geometry_source,
            "tiling": r.tiling,
            "backend": self.backend_name,
            "device": str(r.device),
            "batch_size": int(r.batch_size),
            "shard_id": 0 if self.distributed else int(c.shard_id),
            "num_shards": 1 if self.distributed else int(c.num_shards),
            "pool": {"size": int(len(self.pool)) if self.pool is not None else 0, "source": self.pool_source},
            "single_decode": bool(self.two_phase or not self.mixed),
            "world_size": int(self.ctx.world_size),
        }
        extra = {**r.to_dict(), **c.to_dict()}
        return {**d, **{k: v for k, v in extra.items() if k not in d and k != "variants"}}

    def _dataset_dict(self, records: EvalRecords, tally: dict) -> dict:
        done_ids = np.unique(records.image_id)
        n_done = int(len(done_ids))
        labels = self.sub.labels(done_ids.tolist())
        n = self.index.label_space.num_classes
        return {
            "images": n_done,
            "planned": int(tally["planned"]),
            "split_images": int(len(self.all_ids)),
            "per_class": np.bincount(labels, minlength=n)[:n].tolist() if n_done else [0] * n,
            "rejects": tally["rejects"],
        }

    def _timing_dict(self, records: EvalRecords, tally: dict, seconds: float) -> dict:
        n_done = int(len(np.unique(records.image_id)))
        return {
            "seconds": seconds,
            "pool_seconds": self.t_pool,
            "loop_seconds": self.t_loop,
            "images": n_done,
            "composites": int(len(records)),
            "images_per_s": n_done / seconds if seconds > 0 else None,
            "composites_per_s": len(records) / seconds if seconds > 0 else None,
            "forwards": int(tally["forwards"]),
            "oom_backoffs": int(tally["backoffs"]),
            **({"ranks": tally["ranks"]} if self.distributed else {}),
        }

    def _example_images(self, ids: list[int], records: EvalRecords) -> dict | None:
        """uint8 composites of the contact sheet's images with their records (predictions); rank 0 only."""
        if not ids or not self.ctx.is_main:
            return None
        try:
            return _example_composites(self.sub, ids, self.names, self.pool, self.run_cfg, records)
        except Exception as e:  # noqa: BLE001 - examples are illustrative; never lose a finished run over them
            warnings.warn(f"could not render example composites for the report ({type(e).__name__}: {e})", stacklevel=2)
            return None


def _collect(chunks, meta, names, seed) -> EvalRecords:
    """The records of the passes, sorted: one row per (image, variant)."""
    if not meta:  # every image was rejected by the decoder
        return EvalRecords.empty(names, seed)
    ids = torch.cat([m[0] for m in meta]).cpu().numpy().astype(np.int64)
    labels = torch.cat([m[1] for m in meta]).cpu().numpy().astype(np.int64)
    cols: dict[str, list] = {c: [] for c in RECORD_COLUMNS}
    for vi, v in enumerate(names):
        parts = chunks[v]
        pred = torch.cat([p[0] for p in parts]).cpu().numpy()
        valid = torch.cat([p[1] for p in parts]).cpu().numpy().astype(bool)
        bg_id = torch.cat([p[2] for p in parts]).cpu().numpy()
        bg_label = torch.cat([p[3] for p in parts]).cpu().numpy()
        if len(pred) != len(ids):
            raise ConfigError(f"evaluate: internal error: {len(pred)} predictions for {len(ids)} images in {v}")
        cols["image_id"].append(ids)
        cols["variant"].append(np.full(len(ids), vi, np.int64))
        cols["label"].append(labels)
        cols["pred"].append(pred)
        cols["bg_id"].append(bg_id)
        cols["bg_label"].append(bg_label)
        cols["valid"].append(valid)
    return EvalRecords(tuple(names), int(seed), *(np.concatenate(cols[c]) for c in RECORD_COLUMNS)).sorted()


def _example_composites(sub: DatasetIndex, ids, names, pool, run: RunConfig, records: EvalRecords) -> dict:
    """uint8 composites of a few images for the contact sheet, with their records (predictions)."""
    loader = create_loader(sub, backend=run.backend, geometry=run.geometry, batch_size=max(1, len(ids)),
                           device=run.device, ids=list(ids), prefetch=0, tiling=run.tiling)
    batches = list(loader)
    if not batches:
        return {}
    batch = Batch.cat(batches) if len(batches) > 1 else batches[0]
    # rows in the order asked for (class order), not the loader's id order; images that failed to decode drop out
    pos = {int(i): r for r, i in enumerate(batch.image_ids.cpu().tolist())}
    order = [pos[int(i)] for i in ids if int(i) in pos]
    batch = batch.slice(torch.as_tensor(order, dtype=torch.int64, device=batch.device))
    outs = synthesize(batch, list(names), pool=pool, seed=run.seed, backend=run.kernel_backend)
    got = batch.image_ids.cpu().numpy()
    images = torch.stack([outs[v].images.cpu() for v in names], dim=1)  # [n, V, 3, C, C]
    pred, valid = _example_records(records, got, len(names))
    return {
        "variants": list(names),
        "image_ids": got.tolist(),
        "labels": batch.labels.cpu().numpy().tolist(),
        "images": images if images.dtype == torch.uint8 else images.clamp(0, 255).round().to(torch.uint8),
        "pred": pred,
        "valid": valid,
    }


def _example_records(records: EvalRecords, image_ids: np.ndarray, n_variants: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, valid)`` of the records, ``[n images, V variants]`` (-1 / False where there is no record)."""
    key = {(int(i), int(v)): r for r, (i, v) in enumerate(zip(records.image_id, records.variant))}
    pred = np.full((len(image_ids), n_variants), -1, np.int64)
    valid = np.zeros((len(image_ids), n_variants), bool)
    for a, i in enumerate(image_ids):
        for b in range(n_variants):
            r = key.get((int(i), b))
            if r is not None:
                pred[a, b] = records.pred[r]
                valid[a, b] = records.valid[r]
    return pred, valid


def _versions() -> dict:
    v = {"bgsynth": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": np.__version__}
    # only what this process already uses (importing timm just to name its version costs seconds)
    for key, mod in (("torchvision", "torchvision"), ("timm", "timm"), ("dali", "nvidia.dali"), ("triton", "triton")):
        m = sys.modules.get(mod)
        if m is not None:
            v[key] = getattr(m, "__version__", None)
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpu"] = torch.cuda.get_device_name()
    return v


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # tqdm only for a visible bar

    return tqdm(total=total, desc=desc, unit="comp", unit_scale=False, dynamic_ncols=True, smoothing=0.1)


def _advance(bar, composites: int, images: int | None) -> None:
    if bar is None:
        return
    bar.update(composites)
    if images is not None:
        el = bar.format_dict.get("elapsed", 0.0) or 0.0
        if el > 0:
            bar.set_postfix_str(f"{images / el:.0f} img/s", refresh=False)


#: the files an evaluation writes into its folder (results, provenance, the report and its figures)
EVAL_OUTPUTS = ("results.json", "results.csv", "provenance.csv", "report.md", "accuracy.png", "per_class.png",
                "bg_class.png", "examples.png")


def _eval_owned(path: pathlib.Path) -> bool:
    return path.name in EVAL_OUTPUTS


def eval_fingerprint(index: DatasetIndex, predictor: Predictor, run: RunConfig, config: EvalConfig) -> Fingerprint:
    """What decides an evaluation's output (:class:`bgsynth.runs.Fingerprint`): the settings that change its
    numbers (not the batch size, device or progress), the index digest and the model's weights digest."""
    c = config.to_dict()
    settings = {k: c[k] for k in ("variants", "split", "per_class", "shard_id", "num_shards", "groups", "pairing")}
    settings.update(seed=int(run.seed), geometry=run.geometry.to_dict(), tiling=run.tiling, backend=run.backend,
                    amp=run.amp, label_protocol=predictor.label_protocol, mean=[float(v) for v in predictor.mean],
                    std=[float(v) for v in predictor.std], input_dtype=str(predictor.input_dtype).replace("torch.", ""),
                    label_space=index.label_space.name)
    return Fingerprint("eval", settings, index=index_digest(index), model=model_digest(predictor))


def claim_output(folder: OutputFolder, ctx: DistContext, writes: bool, collective: bool) -> None:
    """Claim ``folder`` (:meth:`bgsynth.runs.OutputFolder.claim`) and record the run in it before any work.

    Args:
        folder: the output folder with the run's fingerprint.
        ctx: the distributed context.
        writes: this process writes the folder (rank 0, or a manual shard).
        collective: every rank takes part (the ranks of one job): a refusal on rank 0 stops every rank.

    Raises:
        ConfigError: the folder is refused (another run's, a file, not writable), on every rank of the job.
    """
    err: ConfigError | None = None
    if writes:
        try:
            folder.claim().commit()
        except ConfigError as e:
            err = e
    if collective and ctx.enabled:
        msg = ctx.broadcast_object(None if err is None else str(err))
        if msg is not None and err is None:
            raise ConfigError(f"rank 0 refused the output folder: {msg}")
    if err is not None:
        raise err


# size: the API of `bgsynth eval --out`: the evaluation's inputs and the output folder's options
def evaluate_to_dir(
    index: DatasetIndex,
    model: LoadedModel | Predictor,
    out_dir: str | os.PathLike,
    provenance: bool = False,
    report: bool = True,
    name: str | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> tuple[EvalResult, dict[str, pathlib.Path]]:
    """:func:`evaluate`, then write ``results.json``, ``results.csv``, optionally ``provenance.csv``, and the
    report (``report.md``, ``accuracy.png``, ``per_class.png``, ``bg_class.png``, ``examples.png``) into ``out_dir``.

    The folder is claimed for this run before any work (:class:`bgsynth.runs.OutputFolder`): the run's
    fingerprint (:func:`eval_fingerprint`: settings, index digest, model digest) is recorded in
    ``bgsynth-run.json``; a folder written by an evaluation with other settings, data or model is refused, naming
    what differs, unless ``overwrite`` (which deletes that run's files and nothing else); a path that is an existing
    file, or a folder that cannot be written, is refused too. Files the evaluation does not write are never
    touched.

    Args:
        index, model: as for :func:`evaluate`.
        out_dir: output folder (created).
        provenance: also write ``provenance.csv`` (one row per composite).
        report: also write the Markdown report and figures. Without it no report work is done: no example
            composites are rendered unless ``examples_per_class`` is given.
        name: display name of the model in tables (default: its arch or file stem).
        overwrite: replace the files of another run in ``out_dir``.
        **kwargs: passed to :func:`evaluate` (``run``, ``config``, ``pool``, ``dist`` and options).

    Returns:
        ``(result, paths)`` with ``paths`` keyed ``json``, ``csv``, ``provenance``, ``report``.

    Raises:
        ConfigError: bad options, or the output folder is refused (before any work).

    Under ``torchrun`` every rank calls it; every rank gets the merged result, rank 0 alone writes the files
    (``paths`` is empty on the other ranks).
    """
    run, config, pool, dist = (kwargs.pop(k, None) for k in ("run", "config", "pool", "dist"))
    ctx = dist or current()
    if not report and "examples_per_class" not in kwargs:
        kwargs["examples_per_class"] = 0  # examples only feed the report
    predictor, run, config = _resolve(index, model, run, config, kwargs)
    manual_shard = config.num_shards > 1  # a manual shard writes its own folder; ranks merge first
    writes = ctx.is_main or manual_shard
    folder = OutputFolder(out_dir, eval_fingerprint(index, predictor, run, config), overwrite=overwrite,
                          owned=_eval_owned)
    claim_output(folder, ctx, writes, collective=not manual_shard)
    result = _Evaluation(index, predictor, run, config, pool, dist).run()
    if name:
        result.model["name"] = str(name)
    paths: dict[str, pathlib.Path] = {}
    if writes:
        paths = result.save(folder.path, provenance=provenance)
        folder.commit(paths.values())
        if report:
            t = time.time()
            paths["report"] = write_report(result, folder.path)
            folder.commit([p for p in (folder.path / n for n in EVAL_OUTPUTS)
                           if p.is_file() and p.stat().st_mtime >= t - 1.0] + [paths["report"]])
        folder.finish()  # an equal earlier run's files that this one did not write (provenance.csv) go
    if not manual_shard:
        ctx.barrier()  # every rank returns once the files are there
    return result, paths
