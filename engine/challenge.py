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

import numpy as np

from .challenge_result import (
    NOT_FOOLED,
    REFERENCE_BATCH,
    UNMAPPED_U8,
    ChallengeResult,
    ids_digest,
    merge_results,
    reference_cost,
)
from .challenge_search import ORDERS, ChallengeConfig, ChallengeSearch
from .config import RunConfig, resolve_options
from .distributed import current, shard_ids
from .errors import ConfigError, EmptyInputError
from .evaluate import claim_output
from .index import DatasetIndex
from .models import check_label_space
from .pool import build_background_pool, build_background_pool_sharded
from .report.challenge_plots import challenge_plots
from .results import model_digest
from .runs import Fingerprint, OutputFolder, index_digest
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
    "challenge_fingerprint",
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
    if not fg_all:  # the one wording of empty input
        index.require_images(index.select(ids=[]), "search", config.split, what="foregrounds (images with a mask)")
    pool = _background_pool(index, run, config, dist)
    if len(pool) == 0:
        raise EmptyInputError(f"{index.path or '<in-memory index>'}: no backgrounds to search in split "
                              f"{config.split!r}: no image of the split has an Only-BG-T (a margin around its box)")
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
    check_label_space(predictor, index, "run_challenge")


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


#: the files a challenge run writes into its folder (result, matrices, checkpoints, plots)
def _challenge_owned(path: pathlib.Path) -> bool:
    n = path.name
    return (n in ("challenge.json", "challenge_matrix.npz") or (n.startswith("challenge.ckpt") and n.endswith(".npz"))
            or (n.startswith("challenge_") and n.endswith(".png")))


def challenge_fingerprint(index: DatasetIndex, predictor, run: RunConfig, config: ChallengeConfig,
                          world_size: int = 1) -> Fingerprint:
    """What decides a challenge run's output and its checkpoint (:class:`bgsynth.runs.Fingerprint`): every setting
    the search depends on (the batch size and window included: they decide the records and the forwards), the
    index digest and the model's weights digest."""
    settings = {
        "split": config.split if config.split is None or isinstance(config.split, str) else list(config.split),
        "foregrounds": None if config.fg_ids is None else ids_digest(np.asarray(config.fg_ids, np.int64)),
        "bg_per_class": config.bg_per_class, "order": config.order, "full_matrix": bool(config.full_matrix),
        "store_predictions": bool(config.store_predictions), "batch_size": int(run.batch_size),
        "fg_tile": int(config.tile(run.batch_size)), "seed": int(run.seed), "geometry": run.geometry.to_dict(),
        "tiling": run.tiling, "backend": run.backend, "device_type": run.device.type,
        "input_dtype": str(getattr(predictor, "input_dtype", "")).replace("torch.", ""),
        "mean": [float(v) for v in predictor.mean], "std": [float(v) for v in predictor.std],
        "label_protocol": getattr(predictor, "label_protocol", None), "label_space": index.label_space.name,
        "world_size": int(world_size), "share_every": int(config.share_every) if world_size > 1 else 0,
    }
    return Fingerprint("challenge", settings, index=index_digest(index), model=model_digest(predictor))


# size: the API of `bgsynth challenge --out`: the run's inputs and the output folder's options
def challenge_to_dir(index: DatasetIndex, predictor, out_dir: str | os.PathLike, run: RunConfig | None = None,
                     config: ChallengeConfig | None = None, *, plots: bool = True, overwrite: bool = False,
                     **options) -> tuple[ChallengeResult, dict[str, pathlib.Path]]:
    """Run :func:`run_challenge` with its checkpoint in ``out_dir`` and write the result (and plots) there.

    The folder is claimed for this run before any work (:class:`bgsynth.runs.OutputFolder`, with
    :func:`challenge_fingerprint`): a folder written by a challenge run with other settings, data or model is
    refused, naming what differs, unless ``overwrite`` (which deletes that run's files, its checkpoints included,
    and nothing else); ``resume`` continues from the checkpoint only when the fingerprint is equal. An existing
    file at ``out_dir``, or a folder that cannot be written, is refused too.

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
        overwrite: replace the files of another run in ``out_dir``.

    Returns:
        ``(result, paths)``; ``paths`` is empty on ranks other than 0.

    Raises:
        ConfigError: bad options, or the output folder is refused (before any work).
    """
    ctx = current()
    _check_inputs(index, predictor)
    run, config = resolve_challenge(predictor, run, config, options)
    folder = OutputFolder(out_dir, challenge_fingerprint(index, predictor, run, config, ctx.world_size),
                          overwrite=overwrite, resume=config.resume, owned=_challenge_owned)
    out = folder.path
    if ctx.world_size > 1:
        ckpt = out / f"challenge.ckpt.rank{ctx.rank}.npz"
        config = dataclasses.replace(config, shard_id=ctx.rank, num_shards=ctx.world_size, checkpoint=ckpt)
    else:
        config = dataclasses.replace(config, checkpoint=out / "challenge.ckpt.npz")
    claim_output(folder, ctx, ctx.is_main, collective=True)
    if ctx.is_main:  # a killed run leaves its checkpoints recorded as its own
        folder.commit([out / f"challenge.ckpt.rank{r}.npz" for r in range(ctx.world_size)] if ctx.world_size > 1
                      else [config.checkpoint])
    if ctx.world_size > 1:
        result = merge_results(ctx.all_gather_object(run_challenge(index, predictor, run, config, dist=ctx)))
    else:
        result = run_challenge(index, predictor, run, config)
    paths: dict[str, pathlib.Path] = {}
    if ctx.is_main:
        paths.update(result.save(out))
        folder.commit(paths.values())
        if plots:
            paths.update(challenge_plots(result, out, k=config.gallery_k))
            folder.commit(paths.values())
        folder.finish()  # an equal earlier run's files that this one did not write (its plots, its matrix) go
    ctx.barrier()
    return result, paths
