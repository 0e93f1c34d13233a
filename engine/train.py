"""Training through the engine's own pipeline, and the paper's remedy shown end to end.

:func:`train` fits a model (the small demo CNN, or any torchvision / timm architecture) on one split of an index:
the split is decoded once (:class:`~bgsynth.trainloader.TrainIterator` keeps it on the device), every step draws
Original / Mixed-Rand / Mixed-Same / Only-FG / No-FG samples with the requested probabilities plus random
resized crop and flip (:class:`~bgsynth.augment.BackgroundSwap`), and the result is saved with
:func:`bgsynth.models.save_checkpoint` (geometry and normalisation recorded) so ``bgsynth eval --model ckpt.pt``
loads it. Deterministic with a seed on the CPU.

:func:`compare_training` is the paper's remedy: the demo model trained with and without Mixed-Rand (same budget,
same seed), both evaluated by :func:`bgsynth.evaluate.evaluate` and the Backgrounds Challenge.

A training run owns its checkpoint (:class:`bgsynth.runs.OutputFolder`, the record ``<out>.bgsynth-run.json``): a
second run with other settings onto the same file is refused unless ``overwrite``. With ``checkpoint_every`` the
run saves its state (model, optimizer, schedule, RNG, data position, history) to ``<out>.state`` every so many
steps and at every epoch's end, and ``resume=True`` continues a killed run from there: on the CPU the finished
weights are bit for bit those of an uninterrupted run. The model has one output per class of the index's label
space (9 for IN-9). With ``compose`` (a :class:`~bgsynth.compose.ComposeSpec`) the training set is a composed one:
the foregrounds of the index on the backgrounds of a second source at a chosen, per-epoch correlation
(:class:`bgsynth.compose_loader.ComposeIterator`).

Both are consumers in the configuration pattern of :mod:`bgsynth.config`: they take the run's resolved
:class:`~bgsynth.config.RunConfig` (geometry, default :data:`~bgsynth.config.DEMO_GEOMETRY`; device; decode and
kernel backends; tiling; batch size; seed; autocast, default ``'auto'``: bf16 on CUDA) and their own frozen config
(:class:`TrainConfig`, :class:`CompareConfig`), or loose keyword options split between the two.

>>> # from bgsynth.sources.synthetic import build_builtin_dataset
>>> # res = train(build_builtin_dataset(), out="demo.pt")           # about a minute on 2 CPU cores
>>> # res.val_accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import time
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .augment import AUGMENT_VARIANTS, parse_probs
from .challenge import run_challenge
from .classes import IN9_MEAN, IN9_STD
from .compose import ComposeSpec
from .compose_loader import ComposeIterator, load_backgrounds, spec_digests
from .config import AMP_DTYPES, DEMO_GEOMETRY, RunConfig, check_positive_int, resolve_options
from .distributed import DistContext, current
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate
from .fileio import atomic_write_bytes, atomic_write_json
from .index import DatasetIndex, require_index
from .models import LoadedModel, Predictor, create_model, load_model, save_checkpoint
from .pipeline import create_loader
from .runs import Fingerprint, OutputFolder, index_digest
from .trainloader import TrainIterator

__all__ = [
    "TrainConfig",
    "TrainResult",
    "CompareConfig",
    "CompareResult",
    "train",
    "evaluate_original",
    "compare_training",
]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("onecycle", "cosine", "constant")
_VAL_BATCH = 128  # images per forward of the final Original check (not the training batch)


# ==============================================================================================================
# Configuration and result
# ==============================================================================================================


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a training job (the run's geometry, device, batch size, seed, ... are its RunConfig).

    Attributes:
        arch: ``'bgsynth_cnn'`` or a torchvision / timm architecture name (random init, 9 outputs).
        split, val_split: training split and the split whose Original accuracy is measured at the end
            (``None``: no validation).
        epochs: passes over the training split.
        lr: peak learning rate (default 0.1 for SGD, 2e-3 for AdamW, scaled by ``batch_size / 64``).
        weight_decay: weight decay (not applied to biases and norm parameters).
        augment: variant probabilities (see :func:`bgsynth.augment.parse_probs`), e.g. ``{'mixed_rand': 1.0}``
            for the paper's Mixed-Rand training set; default Original only. Stored resolved.
        bg_source: ``'pool'`` or ``'batch'`` (see :class:`~bgsynth.augment.SwapConfig`).
        random_resized_crop, flip, scale: geometric augmentation (``scale`` is the crop's area fraction range).
            Random resized crop is off by default: on the demo's 64 px crops of the built-in dataset, 14 epochs
            reach 87.8% Original val accuracy with flips alone and 85.3% with random resized crop (scale
            0.35-1), which needs a longer schedule to pay off (docs/train.md). Switch it on for ImageNet-scale
            training.
        optimizer: ``'sgd'`` (momentum 0.9, Nesterov) or ``'adamw'``.
        schedule: ``'onecycle'`` (25% warm-up, cosine down), ``'cosine'`` or ``'constant'``.
        label_smoothing: cross-entropy label smoothing.
        out: checkpoint path (written with :func:`bgsynth.models.save_checkpoint`); ``None``: not saved.
        channels_last: ``None``: on for CUDA.
        deterministic: deterministic cuDNN algorithms on CUDA (CPU runs replay exactly anyway).
        max_steps: stop after this many steps (a smoke test; the schedule still spans ``epochs``).
        compose: a :class:`~bgsynth.compose.ComposeSpec` (or its fields as a mapping): train on the foregrounds of
            the index composed on the spec's backgrounds at its correlation (a number or one per epoch); then
            ``augment`` must be left at Original (the rule makes every sample a composite).
        checkpoint_every: save the run's state to ``<out>.state`` every this many steps (and at every epoch's
            end); ``None``: at every epoch's end only. Needs ``out``.
        resume: continue from ``<out>.state`` (only a run with an equal fingerprint; without a state file the run
            starts from the beginning).
        overwrite: replace a checkpoint written by a run with other settings (or by no recorded run).
    """

    arch: str = "bgsynth_cnn"
    split: str | None = "train"
    val_split: str | None = "val"
    epochs: int = 14
    lr: float | None = None
    weight_decay: float = 5e-4
    augment: Mapping[str, float] | str | None = None
    bg_source: str = "pool"
    random_resized_crop: bool = False
    flip: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    label_smoothing: float = 0.1
    out: str | os.PathLike | None = None
    channels_last: bool | None = None
    deterministic: bool = True
    max_steps: int | None = None
    compose: ComposeSpec | Mapping | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        check_positive_int(self.epochs, "epochs", "train")
        if self.checkpoint_every is not None:
            check_positive_int(self.checkpoint_every, "checkpoint_every", "train")
        if self.resume and self.out is None:
            raise ConfigError("train: resume continues the run of a checkpoint file; expected out=..., got None")
        if isinstance(self.compose, Mapping):
            object.__setattr__(self, "compose", ComposeSpec(**self.compose))
        if self.compose is not None and not isinstance(self.compose, ComposeSpec):
            raise ConfigError(f"train: expected compose as a ComposeSpec or a mapping, got {type(self.compose).__name__}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"train: expected optimizer in {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"train: expected schedule in {_SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ConfigError(f"train: expected 0 <= label_smoothing < 1, got {self.label_smoothing}")
        if self.max_steps is not None:
            check_positive_int(self.max_steps, "max_steps", "train")
        if self.bg_source not in ("pool", "batch"):
            raise ConfigError(f"train: expected bg_source 'pool' or 'batch', got {self.bg_source!r}")
        object.__setattr__(self, "augment", parse_probs(self.augment))
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))
        if self.compose is not None and self.augment["original"] != 1.0:
            raise ConfigError("train: with compose every sample is a composite of the rule; expected augment left "
                              f"at Original, got {({k: v for k, v in self.augment.items() if v > 0})}")

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def peak_lr(self, batch_size: int) -> float:
        """The peak learning rate for a global batch of ``batch_size``."""
        if self.lr is not None:
            return self.lr
        return (0.1 if self.optimizer == "sgd" else 2e-3) * batch_size / 64.0


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        model: the trained network (CPU, eval mode).
        checkpoint: where it was saved (``None`` when ``out`` was not given).
        val_accuracy: Original top-1 accuracy on ``val_split`` (``None`` without one), ``val_total`` its images.
        history: per epoch ``{"epoch", "loss", "accuracy", "seconds", "images_per_s"}`` (training batches).
        augment_stats: per variant, samples drawn and samples that fell back to Original.
        config: the resolved settings, the run's included (also stored in the checkpoint under ``"train"``).
        seconds: wall time of the whole call; steps / images: optimisation steps and samples seen.
    """

    model: nn.Module
    checkpoint: pathlib.Path | None
    val_accuracy: float | None
    val_total: int
    history: list[dict]
    augment_stats: dict
    config: dict
    seconds: float
    steps: int
    images: int

    def to_dict(self) -> dict:
        """JSON-able summary (without the model)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["checkpoint"] = None if self.checkpoint is None else str(self.checkpoint)
        return d


# ==============================================================================================================
# The steps of a training run
# ==============================================================================================================


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    """Deterministic kernels for the duration where they are not already.

    CPU kernels of the ops the demo uses are deterministic for a fixed thread count, so nothing is switched
    there (``torch.use_deterministic_algorithms`` would also import the compiler stack, seconds on a busy CPU).
    On CUDA, cuDNN is pinned to deterministic algorithms without autotuning.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    prev = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev


def _lr_factor(schedule: str, total: int, warmup: float = 0.25, start: float = 0.1, end: float = 0.01):
    """Multiplier of the peak learning rate at each step (any ``total >= 1``).

    ``onecycle``: linear warm-up from ``start`` over ``warmup * total`` steps, then cosine down to ``end``;
    ``cosine``: cosine from 1 to ``end``; ``constant``: 1.
    """
    w = max(1, int(round(warmup * total))) if schedule == "onecycle" and total > 1 else 0

    def f(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < w:
            return start + (1.0 - start) * step / w
        t = min(1.0, (step - w) / max(1, total - w))
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _rank_run(run: RunConfig, ctx: DistContext) -> tuple[RunConfig, RunConfig]:
    """``(run, rank_run)``: the job's run on this rank's device, and the run this rank's iterator uses.

    Under DDP ``batch_size`` stays the global batch; each rank draws ``batch_size / world`` samples per step, and
    only rank 0 shows progress.
    """
    if run.batch_size < 2:
        raise ConfigError(f"train: expected batch_size >= 2 (BatchNorm), got {run.batch_size!r}")
    if not ctx.enabled:
        return run, run
    if run.device.type == "cuda":
        run = run.replace(device=ctx.device("cuda" if run.device.index is None else run.device))  # cuda:<local rank>
    if run.batch_size % ctx.world_size or run.batch_size // ctx.world_size < 2:
        raise ConfigError(
            f"train: expected the global batch_size to be a multiple of the {ctx.world_size} ranks with at least "
            f"2 samples per rank (BatchNorm), got {run.batch_size}"
        )
    run = run.replace(progress=run.progress and ctx.is_main)
    return run, run.replace(batch_size=run.batch_size // ctx.world_size)


def _train_iterator(index: DatasetIndex, rank_run: RunConfig, config: TrainConfig, ctx: DistContext) -> TrainIterator:
    """The split, decoded and cached, with the swap of ``config`` (its pool decoded once across the ranks); with
    ``compose``, the composed set's iterator over the spec's backgrounds (each rank decodes them)."""
    geometry = dict(random_resized_crop=config.random_resized_crop, flip=config.flip, scale=config.scale,
                    mean=IN9_MEAN, std=IN9_STD, channels_last=_channels_last(config, rank_run))
    if config.compose is not None:
        spec = config.compose
        bg = load_backgrounds(spec.backgrounds, rank_run.replace(progress=False), split=spec.bg_split,
                              per_class=spec.bg_per_class)
        rule = spec.rule(index.label_space, bg.label_space, rank_run.seed)
        return ComposeIterator(index, rule, bg, rank_run, dist=ctx, split=config.split, fixed=spec.fixed,
                               **geometry).prepare()
    it = TrainIterator(index, rank_run, dist=ctx, split=config.split, probs=config.augment,
                       bg_source=config.bg_source, **geometry)
    return it.prepare()


def _channels_last(config: TrainConfig, run: RunConfig) -> bool:
    return run.device.type == "cuda" if config.channels_last is None else bool(config.channels_last)


@dataclasses.dataclass
class _Fit:
    """The optimisation of one run: the network, optimizer, schedule and loss, and what it has done so far."""

    model: nn.Module
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None
    device: torch.device
    steps_per_epoch: int
    max_steps: int | None
    steps: int = 0
    images: int = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns ``(loss, logits)``."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        return loss, logits

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps


def _setup(model: nn.Module, it: TrainIterator, run: RunConfig, config: TrainConfig, ctx: DistContext) -> _Fit:
    """The network (DDP under torchrun), SGD/AdamW without decay on biases and norms, the LR schedule, the loss."""
    steps_per_epoch = len(it)
    if ctx.enabled:  # DDP: every rank must take the same number of steps (shards may differ by an image)
        steps_per_epoch = int(ctx.all_reduce(torch.tensor([steps_per_epoch], dtype=torch.int64), "min").item())
        dev = run.device
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    else:
        net = model
    if steps_per_epoch == 0:
        raise ConfigError(f"train: split {config.split!r} has {it.num_samples()} decodable images, fewer than one "
                          f"batch of {run.batch_size}")
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.peak_lr(run.batch_size)
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True) if config.optimizer == "sgd" else (
        torch.optim.AdamW(groups, lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(config.schedule, steps_per_epoch * config.epochs))
    return _Fit(model=model, net=net, opt=opt, sched=sched,
                scaler=torch.amp.GradScaler("cuda") if run.amp == "fp16" else None,
                loss_fn=nn.CrossEntropyLoss(label_smoothing=float(config.label_smoothing)),
                amp_dtype=AMP_DTYPES.get(run.amp), device=run.device, steps_per_epoch=steps_per_epoch,
                max_steps=config.max_steps)


@dataclasses.dataclass
class _Position:
    """Where a run stands: the next epoch, the batches of it already done, its running sums, the history so far."""

    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list = dataclasses.field(default_factory=list)


_STATE_FORMAT = "bgsynth-train-state/1"


class _Output:
    """The checkpoint a run owns (claimed before any work) and the state a killed run continues from.

    The state file ``<out>.state`` holds the model, optimizer, schedule, grad scaler, RNG states, the data
    position (epoch, batches done) with the epoch's running sums and history, and the augmentation counters; it is
    written atomically on rank 0 every ``checkpoint_every`` steps and at each epoch's end, and removed when the
    checkpoint is written.
    """

    def __init__(self, config: TrainConfig, settings: dict, index: DatasetIndex, ctx: DistContext):
        self.config, self.ctx = config, ctx
        self.path = None if config.out is None else pathlib.Path(config.out).expanduser()
        self.state_path = None if self.path is None else self.path.with_name(self.path.name + ".state")
        self.fingerprint = Fingerprint("train", settings, index=index_digest(index))
        self.folder: OutputFolder | None = None
        self.finished = False

    def claim(self) -> "_Output":
        """Refuse another run's checkpoint (unless ``overwrite``) before any work; record this run's fingerprint."""
        error = None
        if self.path is not None and self.ctx.is_main:
            try:
                self.folder = OutputFolder(self.path, self.fingerprint, overwrite=self.config.overwrite,
                                           resume=self.config.resume, single_file=True).claim()
                # resuming a run that finished: its checkpoint is the result (nothing to train)
                self.finished = bool(self.config.resume and self.folder.previous is not None and self.path.is_file()
                                     and not self.state_path.exists())
                if not self.config.resume:
                    self.state_path.unlink(missing_ok=True)  # a rerun from the start: the old state is not ours
                if not self.finished:
                    self.folder.commit([self.path.name, self.state_path.name])
            except ConfigError as e:
                error = str(e)
        if self.ctx.enabled:
            error, self.finished = self.ctx.broadcast_object((error, self.finished))
        if error is not None:
            raise ConfigError(error)
        return self

    def finished_result(self, model: nn.Module, t0: float) -> "TrainResult":
        """The result of a run that had finished: its checkpoint's weights, settings and val accuracy."""
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)
            model.load_state_dict(ck["state_dict"])
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file, whatever torch says about it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.path}: the finished run's checkpoint cannot be read back ({first}); use "
                                  f"--overwrite to train again") from None
        record = dict(ck.get("train") or {})
        return TrainResult(model=model.to("cpu").eval(), checkpoint=self.path, val_accuracy=ck.get("val_accuracy"),
                           val_total=int(ck.get("val_total") or 0), history=[], augment_stats={}, config=record,
                           seconds=time.perf_counter() - t0, steps=int(record.get("steps") or 0), images=0)

    def due(self, steps: int) -> bool:
        every = self.config.checkpoint_every
        return self.path is not None and every is not None and steps % every == 0

    def save(self, fit: "_Fit", it: TrainIterator, pos: _Position) -> None:
        """Write the state at a step boundary (rank 0; the other ranks hold the same model and optimizer)."""
        if self.path is None or not self.ctx.is_main:
            return
        counts = getattr(it, "counts", None)
        state = {
            "format": _STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint.to_dict(), sort_keys=True),
            "epoch": pos.epoch, "batch": pos.batch, "loss_sum": pos.loss_sum, "correct": pos.correct,
            "seen": pos.seen, "seconds": pos.seconds, "history": pos.history, "steps": fit.steps,
            "images": fit.images, "model": fit.model.state_dict(), "optimizer": fit.opt.state_dict(),
            "scheduler": fit.sched.state_dict(), "scaler": None if fit.scaler is None else fit.scaler.state_dict(),
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "swap_counts": it.swap.counts, "compose_counts": counts,
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.state_path, buf.getvalue())

    def _read_state(self) -> dict:
        path = self.state_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file, whatever torch says about it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: {first}); delete it "
                                  f"to start again, or run without --resume") from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{path}: not a bgsynth training state (expected format {_STATE_FORMAT!r})")
        if state.get("fingerprint") != json.dumps(self.fingerprint.to_dict(), sort_keys=True):
            raise CheckpointError(f"{path}: the training state was written by a run with other settings; delete it "
                                  f"or run without --resume")
        return state

    def restore(self, fit: "_Fit", it: TrainIterator) -> _Position:
        """The position to continue from (``resume``), with the model, optimizer, schedule and RNG restored."""
        if not self.config.resume or self.state_path is None or not self.state_path.is_file():
            if self.config.resume and self.folder is not None and self.folder.previous is not None:
                warnings.warn(f"{self.state_path}: no training state to resume; training from the start",
                              stacklevel=3)
            return _Position()
        st = self._read_state()
        try:
            fit.model.load_state_dict(st["model"])
            fit.opt.load_state_dict(st["optimizer"])
            fit.sched.load_state_dict(st["scheduler"])
            if fit.scaler is not None and st["scaler"] is not None:
                fit.scaler.load_state_dict(st["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.state_path}: the training state does not fit this run ({first})") from None
        torch.set_rng_state(st["rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        if st["swap_counts"] is not None:
            it.swap.counts = st["swap_counts"].to(fit.device)
        if st["compose_counts"] is not None and hasattr(it, "counts"):
            it.counts = st["compose_counts"].to(fit.device)
        fit.steps, fit.images = int(st["steps"]), int(st["images"])
        return _Position(int(st["epoch"]), int(st["batch"]), float(st["loss_sum"]), int(st["correct"]),
                         int(st["seen"]), float(st["seconds"]), list(st["history"]))

    def finish(self) -> None:
        """The checkpoint is written: record it as the run's file and drop the state."""
        if self.folder is None:
            return
        self.state_path.unlink(missing_ok=True)
        self.folder.files.discard(self.state_path.name)
        self.folder.commit([self.path.name])


def _epoch(fit: _Fit, it: TrainIterator, pos: _Position, ctx: DistContext, bar, out: _Output) -> dict:
    """The rest of one pass over the split from ``pos`` (its first batches are skipped when resuming); returns its
    history row (loss and accuracy over every rank's samples). ``pos`` follows every step, for the state file."""
    fit.model.train()
    epoch = pos.epoch
    it.set_epoch(epoch)
    it.skip(pos.batch)
    loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float64, device=fit.device)
    correct = torch.tensor(pos.correct, dtype=torch.int64, device=fit.device)
    te = time.perf_counter() - pos.seconds
    for k, (x, y) in enumerate(it, start=pos.batch):
        if k >= fit.steps_per_epoch:
            break
        loss, logits = fit.step(x, y)
        n = int(y.shape[0])
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        pos.seen += n
        fit.steps += 1
        fit.images += n
        if bar is not None:
            bar.update(1)
            if fit.steps % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}")
        if out.due(fit.steps) and k + 1 < fit.steps_per_epoch and not fit.done:
            pos.batch, pos.loss_sum, pos.correct = k + 1, float(loss_sum), int(correct)
            pos.seconds = time.perf_counter() - te
            out.save(fit, it, pos)
        if fit.done:
            break
    secs = time.perf_counter() - te
    seen = pos.seen
    if ctx.enabled:  # the epoch's figures over every rank's samples
        agg = ctx.all_reduce(torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64), "sum")
        loss_sum, correct, seen = agg[0], agg[1], int(agg[2].item())
    return {"epoch": epoch, "loss": float(loss_sum) / max(seen, 1), "accuracy": float(correct) / max(seen, 1),
            "seconds": secs, "images_per_s": seen / secs if secs > 0 else None}


def _epochs(fit: _Fit, it: TrainIterator, run: RunConfig, config: TrainConfig, ctx: DistContext, out: _Output,
            pos: _Position) -> list[dict]:
    """Every epoch from ``pos`` (until ``max_steps``), with a tqdm bar of loss and accuracy when ``run.progress``;
    the state is saved at each epoch's end."""
    bar = None
    if run.progress:
        from tqdm.auto import tqdm  # optional third-party display, loaded only when asked for

        total = fit.steps_per_epoch * config.epochs
        bar = tqdm(total=total if fit.max_steps is None else min(fit.max_steps, total), desc=f"train {config.arch}",
                   unit="step", initial=fit.steps)
    history = pos.history
    try:
        while pos.epoch < config.epochs and not fit.done:
            history.append(_epoch(fit, it, pos, ctx, bar, out))
            if bar is not None:
                h = history[-1]
                bar.set_postfix(epoch=pos.epoch, loss=f"{h['loss']:.3f}", acc=f"{h['accuracy']:.3f}")
            pos.epoch, pos.batch, pos.loss_sum, pos.correct, pos.seen, pos.seconds = pos.epoch + 1, 0, 0.0, 0, 0, 0.0
            if not fit.done and pos.epoch < config.epochs and out.path is not None:
                out.save(fit, it, pos)
    finally:
        if bar is not None:
            bar.close()
    return history


def _validate(model: nn.Module, index: DatasetIndex, run: RunConfig, config: TrainConfig, ctx: DistContext):
    """Original accuracy on ``val_split`` (rank 0 measures, every rank gets it): ``(accuracy, images)``."""
    val_acc, val_total = None, 0
    if config.val_split is not None and ctx.is_main:
        val_acc, val_total = evaluate_original(model, index, config.val_split,
                                               run.replace(batch_size=_VAL_BATCH, progress=False))
    if ctx.enabled:
        val_acc, val_total = ctx.broadcast_object((val_acc, val_total))
    return val_acc, val_total


def _record(run: RunConfig, config: TrainConfig, index: DatasetIndex, ctx: DistContext, steps: int | None) -> dict:
    """The resolved settings of the run (the checkpoint's ``"train"``): the job's, and the run's ``to_dict()``.
    Without ``steps`` (before the run): the settings its fingerprint is made of."""
    extra = {"num_classes": index.label_space.num_classes}
    if index.label_space.name != "in9":
        extra["label_space"] = index.label_space.to_dict()
    if config.compose is not None:
        extra["compose"] = {**config.compose.to_dict(), **spec_digests(config.compose)}
    return {
        **run.to_dict(),
        "arch": config.arch,
        "split": config.split,
        "val_split": config.val_split,
        "epochs": config.epochs,
        "batch_size": run.batch_size,
        "lr": config.peak_lr(run.batch_size),
        "weight_decay": config.weight_decay,
        "optimizer": config.optimizer,
        "schedule": config.schedule,
        "label_smoothing": float(config.label_smoothing),
        "seed": int(run.seed),
        "augment": {k: v for k, v in config.augment.items() if v > 0},
        "bg_source": config.bg_source,
        "random_resized_crop": bool(config.random_resized_crop),
        "scale": [float(config.scale[0]), float(config.scale[1])],
        "flip": bool(config.flip),
        "geometry": run.geometry.to_dict(),
        "tiling": run.tiling,
        "device": str(run.device),
        "amp": run.amp,
        "steps": steps,
        "index": None if index.path is None else str(index.path),
        "world_size": int(ctx.world_size),
        **extra,
    }


def _gather_stats(stats: dict, ctx: DistContext) -> dict:
    """Samples drawn and fallbacks per variant, over every rank."""
    if not ctx.enabled:
        return stats
    parts = ctx.all_gather_object(stats)
    return {v: {k: sum(int(p[v][k]) for p in parts) for k in stats[v]} for v in stats}


def _save(model: nn.Module, record: dict, run: RunConfig, config: TrainConfig, val, val_total: int,
          ctx: DistContext):
    """Write the checkpoint on rank 0 (geometry, normalisation, settings, val accuracy); every rank gets the path."""
    path = None
    if config.out is not None and ctx.is_main:
        extra = {"geometry": run.geometry, "mean": list(IN9_MEAN), "std": list(IN9_STD),
                 "train": json.loads(json.dumps(record)), "val_accuracy": val, "val_split": config.val_split,
                 "val_total": val_total}
        path = save_checkpoint(model, config.out, arch=config.arch, num_classes=record["num_classes"], extra=extra)
    if ctx.enabled:
        path = ctx.broadcast_object(path)
        ctx.barrier()  # every rank returns once the checkpoint is written
    return path


def train(index, run: RunConfig | None = None, config: TrainConfig | None = None, *, dist: DistContext | None = None,
          pretrained_model: nn.Module | None = None, **options) -> TrainResult:
    """Train a classifier on a split of an index with online background-swap augmentation.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or its path (loaded once, here).
        run: the resolved :class:`~bgsynth.config.RunConfig`: ``batch_size`` (samples per step, default 64),
            ``seed`` (of the initialisation, the order and every augmentation draw), ``geometry`` (decode
            geometry, default :data:`~bgsynth.config.DEMO_GEOMETRY`, 72 -> 64), ``device``, ``amp`` (``'auto'``:
            bf16 autocast on CUDA), ``backend``, ``kernel_backend``, ``tiling`` (the Only-BG-T of the Mixed-*
            backgrounds), ``num_threads``, ``progress`` (default on).
        config: the :class:`TrainConfig`.
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`). Under
            ``torchrun`` every rank calls :func:`train` with the same arguments and the model trains as
            DistributedDataParallel: ``batch_size`` stays the global batch (each rank draws ``batch_size / world``
            samples of its shard of the split per step, so the learning rate and schedule mean the same), every
            rank runs the same number of steps per epoch, the background pool is decoded once across the ranks,
            BatchNorm statistics are per rank, and rank 0 alone measures ``val_split`` and writes ``out``. The
            result (history, stats) is the same on every rank.
        pretrained_model: start from this module instead of a fresh ``arch``.
        **options: loose run options (:data:`bgsynth.config.RUN_OPTIONS`) and :class:`TrainConfig` fields, e.g.
            ``train(index, augment={"mixed_rand": 1.0}, epochs=14, device="cuda", out="mr.pt")``.

    Returns:
        A :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    index = require_index(index, "train", load_paths=True)
    ctx = current() if dist is None else dist
    run, config = resolve_options("train", run, config, TrainConfig, options, batch_kind="train",
                                  default_geometry=DEMO_GEOMETRY, progress=True,
                                  local_rank=ctx.local_rank if ctx.enabled else None)
    run, rank_run = _rank_run(run, ctx)
    index.require_images(index.select(split=config.split) if config.split is not None else index, "train on",
                         split=config.split)
    settings = {}
    for k, v in _record(run, config, index, ctx, None).items():
        if k == "compose":  # one setting per field, so a refusal names the one that differs
            settings.update({f"compose.{name}": value for name, value in v.items()})
        elif k not in ("steps", "index"):
            settings[k] = v
    out = _Output(config, {**settings, "pretrained": pretrained_model is not None}, index, ctx).claim()
    num_classes = index.label_space.num_classes
    with _deterministic(config.deterministic, run.device):
        torch.manual_seed(run.seed)
        model = create_model(config.arch, num_classes=num_classes) if pretrained_model is None else pretrained_model
        if out.finished:
            return out.finished_result(model, t0)
        model = model.to(run.device)
        if _channels_last(config, run):
            model = model.to(memory_format=torch.channels_last)
        it = _train_iterator(index, rank_run, config, ctx)
        fit = _setup(model, it, run, config, ctx)
        history = _epochs(fit, it, run, config, ctx, out, out.restore(fit, it))
        model.eval()
        val_acc, val_total = _validate(model, index, run, config, ctx)
        images = int(ctx.all_reduce(torch.tensor([fit.images], dtype=torch.int64), "sum").item()) if ctx.enabled \
            else fit.images
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    record = _record(run, config, index, ctx, fit.steps)
    ckpt_path = _save(model, record, run, config, val_acc, val_total, ctx)
    out.finish()
    stats = _gather_stats(it.swap.stats(), ctx)
    if isinstance(it, ComposeIterator):
        stats = {**stats, "compose": _gather_stats({"rule": it.stats()}, ctx)["rule"]}
    return TrainResult(
        model=model, checkpoint=ckpt_path, val_accuracy=val_acc, val_total=val_total, history=history,
        augment_stats=stats, config=record, seconds=time.perf_counter() - t0, steps=fit.steps, images=images,
    )


@dataclasses.dataclass(frozen=True)
class _ValConfig:
    """The job config of :func:`evaluate_original` (its split is an argument)."""


def evaluate_original(model: nn.Module, index, split: str | None = "val", run: RunConfig | None = None, *,
                      mean: Sequence[float] = IN9_MEAN, std: Sequence[float] = IN9_STD,
                      **options) -> tuple[float | None, int]:
    """Original top-1 accuracy of a classifier of the index's classes (one output per class) on a split, through
    the plain decode loader and a Predictor.

    Args:
        model: the network (its inputs normalised with ``mean``/``std``).
        index: a :class:`~bgsynth.index.DatasetIndex` or its path.
        split: the split measured (``None``: every image).
        run: the :class:`~bgsynth.config.RunConfig` (geometry, default :data:`~bgsynth.config.DEMO_GEOMETRY`;
            device; decode backend; batch size, default 128; threads), or loose run options.

    Returns:
        ``(accuracy, images)``; accuracy is ``None`` when the split has no images.
    """
    index = require_index(index, "train", load_paths=True)
    run, _ = resolve_options("evaluate_original", run, None, _ValConfig, options, default_geometry=DEMO_GEOMETRY,
                             batch_size=_VAL_BATCH)
    sub = index.select(split=split) if split is not None else index
    if len(sub) == 0:
        return None, 0
    dev = run.device
    loaded = LoadedModel(module=model, num_outputs=index.label_space.num_classes, output_space="in9", mean=tuple(mean),
                         std=tuple(std))
    pred = Predictor(loaded, device=dev, label_space=index.label_space)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    loader = create_loader(sub, backend=run.backend, geometry=run.geometry, batch_size=run.batch_size, device=dev,
                           num_threads=run.num_threads)
    try:
        for batch in loader:
            y = pred.predict(pred.prepare(batch.images))
            correct += (y == batch.labels.to(dev)).sum()
            total += len(batch)
    finally:
        loader.close()
    return (float(correct) / total if total else None), total


# ==============================================================================================================
# The remedy: with and without Mixed-Rand
# ==============================================================================================================


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The settings of :func:`compare_training` (the runs' own settings are ``train``, a :class:`TrainConfig`).

    Attributes:
        augment, baseline: variant probabilities of the two runs (the paper's remedy is ``mixed_rand=1.0``).
        variants: variants to evaluate (:func:`bgsynth.evaluate.evaluate`).
        challenge: also run the Backgrounds Challenge (:func:`bgsynth.challenge.run_challenge`).
        challenge_kwargs: extra arguments of ``run_challenge``.
        eval_split: split evaluated and challenged.
        reuse: reuse a checkpoint in ``out_dir`` trained with the same settings.
        train: the settings both runs share (their ``augment`` and ``out`` are set per run).
    """

    augment: Mapping[str, float] | str = "mixed_rand=1.0"
    baseline: Mapping[str, float] | str = "original=1.0"
    variants: str | Sequence[str] = "all"
    challenge: bool = True
    challenge_kwargs: Mapping[str, Any] | None = None
    eval_split: str = "val"
    reuse: bool = True
    train: TrainConfig = TrainConfig()

    def runs(self) -> dict[str, dict[str, float]]:
        """``{name: probabilities}`` of the two runs (baseline first); a name joins the variants it draws."""
        runs: dict[str, dict[str, float]] = {}
        for probs in (self.baseline, self.augment):
            p = parse_probs(probs)
            name = "+".join(k for k in AUGMENT_VARIANTS if p[k] > 0)
            runs[name if name not in runs else f"{name}_{len(runs)}"] = p
        return runs


@dataclasses.dataclass
class CompareResult:
    """Two models trained with the same budget and seed, one on Original, one with background augmentation.

    Attributes:
        rows: per model name (``'original'``, ``'mixed_rand'``, ...): ``checkpoint``, ``augment``,
            ``val_original`` (training-time check), ``accuracy`` (per variant, from :func:`bgsynth.evaluate.evaluate`),
            ``bg_gap``, ``challenge_accuracy`` (``None`` when the challenge was not run), ``challenge_vulnerable``,
            ``challenge_total``, ``train_seconds``.
    """

    rows: dict[str, dict]
    config: dict

    def table(self) -> str:
        """A Markdown table of the comparison."""
        cols = ["original", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next"]
        have = [c for c in cols if any(c in r["accuracy"] for r in self.rows.values())]

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"

        head = "| training | " + " | ".join(have) + " | BG-Gap | challenge acc. |"
        sep = "|" + "---|" * (len(have) + 3)
        lines = [head, sep]
        for name, r in self.rows.items():
            acc = [pct(r["accuracy"].get(c)) for c in have]
            lines.append(f"| {name} | " + " | ".join(acc) + f" | {pct(r['bg_gap'])} | {pct(r['challenge_accuracy'])} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "config": self.config}


#: options of :func:`compare_training` that are not recorded as extra training settings (the reuse key)
_COMPARE_NAMED = ("augment", "baseline", "epochs", "seed", "geometry", "device", "variants", "challenge",
                  "challenge_kwargs", "eval_split", "reuse", "progress", "tiling")
_TRAIN_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("augment", "out"))


@dataclasses.dataclass(frozen=True)
class _Job:
    """One :func:`compare_training` call, resolved: where, what, and the extra settings its reuse key records."""

    index: DatasetIndex
    out: pathlib.Path
    run: RunConfig
    config: CompareConfig
    extra: dict


def _trained(job: _Job, name: str, probs: dict) -> tuple[pathlib.Path, float | None, float | None]:
    """The checkpoint of one run, trained unless one with the same settings is reused: ``(path, s, val acc)``."""
    run, cfg = job.run, job.config
    ckpt, meta_path = job.out / f"{name}.pt", job.out / f"{name}.train.json"
    settings = {"augment": {k: v for k, v in probs.items() if v > 0}, "epochs": cfg.train.epochs,
                "seed": int(run.seed), "geometry": run.geometry.to_dict(), "tiling": run.tiling,
                "index": None if job.index.path is None else str(job.index.path),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in job.extra.items()}}
    if cfg.reuse and ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == json.loads(json.dumps(settings)):
            return ckpt, meta.get("seconds"), meta.get("val_accuracy")
    if run.progress:
        print(f"compare_training: training {name!r} ({settings['augment']}) for {cfg.train.epochs} epochs")
    res = train(job.index, run, cfg.train.replace(augment=probs, out=ckpt, overwrite=True))  # the reuse key decides
    atomic_write_json(meta_path, {"settings": settings, "seconds": res.seconds, "val_accuracy": res.val_accuracy,
                                  "history": res.history, "augment_stats": res.augment_stats}, indent=1)
    return ckpt, res.seconds, res.val_accuracy


def _challenge(job: _Job, ckpt: pathlib.Path) -> dict:
    """Challenge accuracy of a checkpoint through :func:`bgsynth.challenge.run_challenge`."""
    run = job.run
    res = run_challenge(job.index, Predictor(load_model(str(ckpt)), device=run.device,
                                             label_space=job.index.label_space), split=job.config.eval_split,
                        geometry=run.geometry, device=run.device, seed=run.seed, progress=run.progress,
                        **{"tiling": run.tiling, **dict(job.config.challenge_kwargs or {})})
    return {
        "challenge_accuracy": float(res.accuracy),
        "challenge_vulnerable": int(res.num_vulnerable),
        "challenge_total": int(res.num_foregrounds),
        "challenge_forwards": int(res.forwards),
    }


def _compare_row(job: _Job, name: str, probs: dict) -> dict:
    """Train (or reuse) one run, evaluate it on every variant (and the challenge): its row of the comparison."""
    run, cfg = job.run, job.config
    ckpt, t_train, val = _trained(job, name, probs)
    ev = evaluate(job.index, load_model(str(ckpt)), variants=cfg.variants, split=cfg.eval_split, seed=run.seed,
                  geometry=run.geometry, device=run.device, progress=run.progress, tiling=run.tiling)
    ev.model["name"] = name
    ev.save(job.out / f"eval_{name}")
    row = {
        "checkpoint": str(ckpt),
        "augment": {k: v for k, v in probs.items() if v > 0},
        "val_original": val,
        "train_seconds": t_train,
        "accuracy": {v: ev.accuracy(v) for v in ev.variants},
        "bg_gap": ev.bg_gap,
        "challenge_accuracy": None,
        "challenge_vulnerable": None,
        "challenge_total": None,
        "challenge_forwards": None,
    }
    if cfg.challenge:
        row.update(_challenge(job, ckpt))
    return row


def compare_training(index, out_dir: str | os.PathLike, run: RunConfig | None = None,
                     config: CompareConfig | None = None, **options) -> CompareResult:
    """Train the demo model without and with background augmentation, evaluate both, report BG-Gap and challenge.

    Both runs use the same architecture, epochs, seed, geometry and every other setting; only the variant
    probabilities differ (``baseline`` vs ``augment``; the paper's remedy is ``mixed_rand=1.0``).

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or its path (with ``train`` and ``eval_split`` splits).
        out_dir: where the checkpoints (``<name>.pt``), evaluation results and ``compare.json``/``compare.md`` go.
        run: the :class:`~bgsynth.config.RunConfig` of training, evaluation and challenge alike (geometry default
            :data:`~bgsynth.config.DEMO_GEOMETRY`; ``tiling``: the Only-BG-T of training backgrounds, evaluation
            and challenge).
        config: the :class:`CompareConfig`.
        **options: loose run options, :class:`CompareConfig` fields and :class:`TrainConfig` fields (``epochs``,
            ``lr``, ...: the runs' shared settings).

    Returns:
        A :class:`CompareResult` (also written as ``compare.json`` and ``compare.md`` in ``out_dir``).
    """
    index = require_index(index, "train", load_paths=True)
    extra = {k: v for k, v in options.items() if k not in _COMPARE_NAMED}
    train_kw = {k: options.pop(k) for k in _TRAIN_OPTIONS if k in options}
    run, config = resolve_options("compare_training", run, config, CompareConfig, options, batch_kind="train",
                                  default_geometry=DEMO_GEOMETRY, progress=True)
    if train_kw:
        config = dataclasses.replace(config, train=config.train.replace(**train_kw))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(index, out, run, config, extra)
    rows = {name: _compare_row(job, name, p) for name, p in config.runs().items()}
    result = CompareResult(rows=rows, config={"epochs": config.train.epochs, "seed": int(run.seed),
                                              "geometry": run.geometry.to_dict(), "tiling": run.tiling,
                                              "eval_split": config.eval_split, **{k: str(v) for k, v in extra.items()}})
    atomic_write_json(out / "compare.json", result.to_dict(), indent=1)
    (out / "compare.md").write_text(result.table() + "\n", encoding="utf-8")
    if run.progress:
        print(result.table())
    return result
