"""The Backgrounds Challenge: every foreground against every Only-BG-T background, with a fraction of the work.

Semantics (PAPER.md, "Metrics"; the official ``challenge_eval.py``): for every foreground of a split (an image
with a mask and a label) and every Only-BG-T background of the same split, the composite takes the foreground's
pixels (mask M) from the foreground image and every other pixel from the background's Only-BG-T, both in the
model's crop geometry. A foreground is **vulnerable** if at least one background makes the model predict a class
other than the foreground's label (an unmapped ImageNet prediction, ``-1``, is "other than" too, as in the
official script); challenge accuracy = 1 - vulnerable / total. A foreground's own Only-BG-T is one of the
backgrounds: the official script tries the whole ``only_bg_t`` folder, which holds it, and so does this module.

Whether a foreground is vulnerable does not depend on the order in which backgrounds are tried, so the search
here does far less work than the official loop for the identical answer:

* the backgrounds are decoded once (:func:`bgsynth.pool.build_background_pool`) and stay resident on the
  device; composites are made there by :func:`bgsynth.variants.composite` (gather + select + normalise + cast into
  the model's dtype and memory format in one pass) and fed straight to the model;
* **active set**: a foreground leaves the search the moment one background fools it;
* **tiling**: every forward batch holds many (foreground, background) pairs; each active foreground contributes
  a chunk of its next untried backgrounds that grows by half of the number it has already survived (1, 1, 1, 2,
  3, 4, 6, ...), so a foreground fooled at its ``j``-th background costs at most about ``1.5 j`` forwards while
  a robust one costs exactly the number of backgrounds; the first batches ramp up (8, 16, 32, ... pairs) so the
  order learns before many foregrounds are probed;
* **adaptive order** (``order='adaptive'``): each foreground tries first the backgrounds with the highest
  estimated fooling rate *for its class* (target class): fooled / tried pairs of that class, shrunk towards
  the rate at which the background pushed foregrounds of the other classes to a third class (a background that
  pulls the model towards class ``c`` fools everything but ``c``), itself shrunk towards the global rate. Ties
  fall back to a seeded permutation. ``order='reference'`` uses the fixed order of the official loop (the pool
  order, i.e. sorted background ids) with the same tiling.

Everything the schedule depends on is the search state (which pairs were tried and what the model said), so a
run is deterministic for a given (model, data, settings), can be checkpointed between forward batches
(atomically, :func:`bgsynth.fileio.atomic_write_bytes`) and resumed after a kill to the byte-identical result.

The pieces (:mod:`bgsynth.challenge_search`): :class:`ChallengeConfig` (the job's settings), the explicit
:class:`~bgsynth.challenge_search.SearchState` (decisions, active set, order statistics, records: the
checkpoint), and :class:`ChallengeSearch` (admit, step, exchange, save, resume, result); the result and the
merge of shards are in :mod:`bgsynth.challenge_result`. :func:`run_challenge` is the pipeline: resolve the
configuration, choose the foregrounds, build the pool, search, report.

Work is counted in images forwarded ("forwards"), reported next to: brute force (``F x N``), the oracle lower
bound of any exact method (every robust foreground needs all ``N``, every vulnerable one at least 1), and the
official loop's order (per foreground, backgrounds in fixed order in batches of 32, stopping after the first
batch with a fooling background). The latter is exact only when the first fooling index in the fixed order is
known, i.e. with ``full_matrix=True``; otherwise lower and upper bounds derived from what was observed are
reported (see :meth:`ChallengeResult.reference_forwards_bounds`).

>>> from bgsynth.challenge import run_challenge                                     # doctest: +SKIP
>>> res = run_challenge(DatasetIndex.load("index.json"), predictor, split="val")    # doctest: +SKIP
>>> print(f"{res.accuracy:.1%}  ({res.num_vulnerable}/{res.num_foregrounds} vulnerable)")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Mapping, Sequence

from .challenge_result import (
    NOT_FOOLED,
    REFERENCE_BATCH,
    UNMAPPED_U8,
    ChallengeResult,
    merge_results,
    reference_cost,
)
from .challenge_search import ORDERS, ChallengeConfig, ChallengeSearch
from .config import RunConfig, resolve_options
from .distributed import current, shard_ids
from .errors import ConfigError
from .index import DatasetIndex
from .pool import build_background_pool, build_background_pool_sharded
from .report.challenge_plots import challenge_plots
from .types import BackgroundPool

__all__ = [
    "ORDERS",
    "REFERENCE_BATCH",
    "NOT_FOOLED",
    "UNMAPPED_U8",
    "ChallengeConfig",
    "ChallengeResult",
    "ChallengeSearch",
    "run_challenge",
    "resolve_challenge",
    "merge_results",
    "reference_cost",
    "challenge_foregrounds",
    "challenge_to_dir",
]

_PREDICTOR_API = ("mean", "std", "input_dtype", "channels_last", "predict")


def challenge_foregrounds(index: DatasetIndex, split: str | None = "val", fg_ids: Sequence[int] | None = None,
                          fg_per_class: int | None = None, seed: int = 0) -> list[int]:
    """The foreground ids of a challenge: images of ``split`` that carry a mask (sorted).

    Args:
        index: the dataset index.
        split: split name (``None``: all splits).
        fg_ids: restrict to these ids.
        fg_per_class: at most this many per class, chosen with ``seed`` (a balanced subset).
        seed: seed of that choice.
    """
    sub = index.select(split=split, ids=fg_ids, per_class=fg_per_class, seed=seed, require_mask=True)
    return sub.ids


def resolve_challenge(predictor, run: RunConfig | None = None, config: ChallengeConfig | None = None,
                      options: Mapping | None = None) -> tuple[RunConfig, ChallengeConfig]:
    """The resolved :class:`~bgsynth.config.RunConfig` and :class:`ChallengeConfig` of a challenge run.

    :func:`bgsynth.config.resolve_options` with the challenge's defaults: the batch size is the composites per
    forward (``BATCH_SIZES['challenge']``), the device and the crop geometry are the predictor's (the geometry
    stored with its checkpoint, else the default), progress bars are on.

    One name means two things: ``checkpoint`` here is the search-state file (:attr:`ChallengeConfig.checkpoint`),
    while :func:`bgsynth.config.resolve_run`'s ``checkpoint`` is the model's file, named in the warning when it
    carries no geometry. The option goes to the challenge's config only, and the model's file is taken from the
    predictor (``predictor.loaded.provenance['file']``).
    """
    options = dict(options or {})
    state_file = {"checkpoint": options.pop("checkpoint")} if "checkpoint" in options else {}
    loaded = getattr(predictor, "loaded", None)
    run, config = resolve_options(
        "run_challenge", run, config, ChallengeConfig, options, batch_kind="challenge",
        device=getattr(predictor, "device", "cpu"), stored_geometry=getattr(loaded, "geometry", None),
        checkpoint=(getattr(loaded, "provenance", None) or {}).get("file"), progress=True,
    )
    return run, (dataclasses.replace(config, **state_file) if state_file else config)


def run_challenge(index: DatasetIndex, predictor, run: RunConfig | None = None, config: ChallengeConfig | None = None,
                  *, dist=None, **options) -> ChallengeResult:
    """Run the Backgrounds Challenge for a model (see the module docstring for semantics and method).

    Args:
        index: the dataset index (loaded once, by the caller: :meth:`DatasetIndex.load`).
        predictor: a :class:`bgsynth.models.Predictor` (or any object with ``mean``, ``std``, ``input_dtype``,
            ``channels_last`` and ``predict(x) -> int64 [B]`` IN-9 ids, ``-1`` = unmapped).
        run: the resolved run settings (default: resolved from ``options`` by :func:`resolve_challenge`: the
            predictor's device and checkpoint geometry, composites per forward 512 on CUDA / 64 on CPU).
        config: the challenge's settings (:class:`ChallengeConfig`).
        dist: a :class:`~bgsynth.distributed.DistContext` with several ranks, every one of which calls
            :func:`run_challenge` (with its own ``shard_id``): the background pool is then decoded across the
            ranks and gathered (:func:`bgsynth.pool.build_background_pool_sharded`; a collective), and with
            ``order='adaptive'`` the ranks share their order statistics every ``share_every`` steps. ``None``:
            each call decodes the whole pool itself.
        **options: fields of either, by name (they override ``run``/``config``): run options (``geometry``,
            ``resize``, ``crop``, ``device``, ``backend``, ``kernel_backend``, ``tiling``, ``batch_size``, ``seed``,
            ``num_threads``, ``progress``, ...) and :class:`ChallengeConfig` fields (``split``, ``fg_ids``,
            ``bg_per_class``, ``fg_tile``, ``order``, ``full_matrix``, ``store_predictions``, ``checkpoint``,
            ``checkpoint_every``, ``resume``, ``shard_id``, ``num_shards``, ``gallery_k``, ``share_every``).

    Returns:
        A :class:`ChallengeResult`; its ``config`` records the run's settings, model and data.

    Raises:
        ConfigError: bad arguments, no foreground or no background.
        CheckpointError: ``resume`` with a checkpoint of another run (other model, data or settings).
    """
    t_start = time.monotonic()
    _check_inputs(index, predictor)
    run, config = resolve_challenge(predictor, run, config, options)
    if config.resume and config.checkpoint is None:
        raise ConfigError("run_challenge: resume=True needs a checkpoint path")
    fg_all = challenge_foregrounds(index, config.split, config.fg_ids)
    if len(fg_all) == 0:
        raise ConfigError(f"run_challenge: no foreground (image of split {config.split!r} with a mask) in {index!r}")
    pool = _background_pool(index, run, config, dist)
    if len(pool) == 0:
        raise ConfigError(f"run_challenge: no Only-BG-T background in split {config.split!r} of {index!r}")
    search = ChallengeSearch(index, predictor, pool, run, config,
                             fg_ids=shard_ids(fg_all, config.shard_id, config.num_shards), dist=dist)
    if config.resume:
        search.resume(config.checkpoint)
    search.run()
    return search.result(wall_s=time.monotonic() - t_start)


def _check_inputs(index, predictor) -> None:
    if not isinstance(index, DatasetIndex):
        raise ConfigError(f"run_challenge: expected a DatasetIndex (load the file once, with DatasetIndex.load), got "
                          f"{type(index).__name__}")
    for name in _PREDICTOR_API:
        if not hasattr(predictor, name):
            raise ConfigError(f"run_challenge: expected a Predictor-like object with .{name}, got "
                              f"{type(predictor).__name__}")


def _background_pool(index: DatasetIndex, run: RunConfig, config: ChallengeConfig, dist) -> BackgroundPool:
    """The Only-BG-T backgrounds of the split, resident on the run's device (decoded across the ranks under
    ``dist``: each rank decodes a share, all get the whole pool)."""
    kw = dict(geometry=run.geometry, backend=run.backend, device=run.device, split=config.split,
              per_class=config.bg_per_class, seed=run.seed, progress=run.progress, tiling=run.tiling,
              num_threads=run.num_threads, kernel_backend=run.kernel_backend)
    if dist is not None and dist.enabled:
        return build_background_pool_sharded(index, dist, **kw)
    return build_background_pool(index, **kw)


# --------------------------------------------------------------------------------------------------------------
# Run to a folder (the CLI's entry point; distributed-aware)
# --------------------------------------------------------------------------------------------------------------


def challenge_to_dir(index: DatasetIndex, predictor, out_dir: str | os.PathLike, run: RunConfig | None = None,
                     config: ChallengeConfig | None = None, *, plots: bool = True,
                     **options) -> tuple[ChallengeResult, dict[str, pathlib.Path]]:
    """Run :func:`run_challenge` with its checkpoint in ``out_dir`` and write the result (and plots) there.

    Under ``torchrun`` (:func:`bgsynth.distributed.current` with several ranks) each rank searches its shard of
    the foregrounds (with its own checkpoint, ``challenge.ckpt.rank<R>.npz``), the results are gathered and
    merged with :func:`merge_results`, and rank 0 writes the files; every rank returns the merged result.

    Args:
        index: the dataset index.
        predictor, run, config, options: as for :func:`run_challenge` (``resume`` continues from the checkpoint
            in ``out_dir``; ``checkpoint``, ``shard_id`` and ``num_shards`` are set here).
        out_dir: output folder: ``challenge.json``, the checkpoint, ``challenge_class_accuracy.png``, and for
            ``full_matrix`` runs ``challenge_matrix.npz``, ``challenge_gallery.png`` and
            ``challenge_vulnerability.png``.
        plots: write the plots (:func:`bgsynth.report.challenge_plots.challenge_plots`).

    Returns:
        ``(result, paths)``; ``paths`` is empty on ranks other than 0.
    """
    ctx = current()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run, config = resolve_challenge(predictor, run, config, options)
    if ctx.world_size > 1:
        config = dataclasses.replace(config, shard_id=ctx.rank, num_shards=ctx.world_size,
                                     checkpoint=out / f"challenge.ckpt.rank{ctx.rank}.npz")
        result = merge_results(ctx.all_gather_object(run_challenge(index, predictor, run, config, dist=ctx)))
    else:
        config = dataclasses.replace(config, checkpoint=out / "challenge.ckpt.npz")
        result = run_challenge(index, predictor, run, config)
    paths: dict[str, pathlib.Path] = {}
    if ctx.is_main:
        paths.update(result.save(out))
        if plots:
            paths.update(challenge_plots(result, out, k=config.gallery_k))
    ctx.barrier()
    return result, paths
