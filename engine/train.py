"""Training through the engine's own pipeline, and the paper's remedy shown end to end.

:func:`train` fits a model (the small demo CNN, or any torchvision / timm architecture) on one split of an index:
the split is decoded once (:class:`~bgsynth.augment.TrainIterator` keeps it on the device), every step draws
Original / Mixed-Rand / Mixed-Same / Only-FG / No-FG samples with the requested probabilities plus random
resized crop and flip (:class:`~bgsynth.augment.BackgroundSwap`), and the result is saved with
:func:`bgsynth.models.save_checkpoint` (geometry and normalisation recorded) so ``bgsynth eval --model ckpt.pt``
loads it. Deterministic with a seed on the CPU.

:func:`compare_training` is the paper's remedy: the demo model trained with and without Mixed-Rand (same budget,
same seed), both evaluated by :func:`bgsynth.evaluate.evaluate` and the Backgrounds Challenge.

>>> # from bgsynth.sources.synthetic import build_builtin_dataset
>>> # res = train(build_builtin_dataset(), out="demo.pt")           # about a minute on 2 CPU cores
>>> # res.val_accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .augment import AUGMENT_VARIANTS, TrainIterator, parse_probs
from .classes import IN9_MEAN, IN9_STD, NUM_IN9
from .config import DEMO_GEOMETRY, resolve_device
from .errors import ConfigError
from .geometry import CropGeometry

__all__ = [
    "TrainResult",
    "CompareResult",
    "train",
    "evaluate_original",
    "compare_training",
]

#: Geometry of the demo model on the built-in dataset (chosen by measurement, see docs/train.md).

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("onecycle", "cosine", "constant")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        model: the trained network (CPU, eval mode).
        checkpoint: where it was saved (``None`` when ``out`` was not given).
        val_accuracy: Original top-1 accuracy on ``val_split`` (``None`` without one), ``val_total`` its images.
        history: per epoch ``{"epoch", "loss", "accuracy", "seconds", "images_per_s"}`` (training batches).
        augment_stats: per variant, samples drawn and samples that fell back to Original.
        config: the resolved settings (also stored in the checkpoint under ``"train"``).
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
        return {
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "val_accuracy": self.val_accuracy,
            "val_total": self.val_total,
            "history": self.history,
            "augment_stats": self.augment_stats,
            "config": self.config,
            "seconds": self.seconds,
            "steps": self.steps,
            "images": self.images,
        }


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


def _load_index(index):
    from .index import DatasetIndex

    if isinstance(index, (str, bytes)) or hasattr(index, "__fspath__"):
        return DatasetIndex.load(index)
    if not isinstance(index, DatasetIndex):
        raise ConfigError(f"train: expected a DatasetIndex or an index path, got {type(index).__name__}")
    return index


def evaluate_original(
    model: nn.Module,
    index,
    split: str | None = "val",
    geometry: CropGeometry | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    backend: str = "auto",
    mean: Sequence[float] = IN9_MEAN,
    std: Sequence[float] = IN9_STD,
    num_threads: int | None = None,
) -> tuple[float | None, int]:
    """Original top-1 accuracy of a 9-class model on a split, through the plain decode loader and a Predictor.

    Returns:
        ``(accuracy, images)``; accuracy is ``None`` when the split has no images.
    """
    from .models import LoadedModel, Predictor
    from .pipeline import create_loader

    index = _load_index(index)
    sub = index.select(split=split) if split is not None else index
    if len(sub) == 0:
        return None, 0
    geometry = DEMO_GEOMETRY if geometry is None else geometry
    dev = resolve_device(device)
    loaded = LoadedModel(module=model, num_outputs=NUM_IN9, output_space="in9", mean=tuple(mean), std=tuple(std))
    pred = Predictor(loaded, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    loader = create_loader(sub, backend=backend, geometry=geometry, batch_size=batch_size, device=dev,
                           num_threads=num_threads)
    try:
        for batch in loader:
            y = pred.predict(pred.prepare(batch.images))
            correct += (y == batch.labels.to(dev)).sum()
            total += len(batch)
    finally:
        loader.close()
    return (float(correct) / total if total else None), total


def train(
    index,
    arch: str = "bgsynth_cnn",
    split: str | None = "train",
    val_split: str | None = "val",
    epochs: int = 14,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    seed: int = 0,
    geometry: CropGeometry | None = None,
    device: str | torch.device = "cpu",
    augment: Mapping[str, float] | str | None = None,
    bg_source: str = "pool",
    random_resized_crop: bool = False,
    flip: bool = True,
    scale: Sequence[float] = (0.35, 1.0),
    optimizer: str = "sgd",
    schedule: str = "onecycle",
    label_smoothing: float = 0.1,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    amp: str | None = "auto",
    channels_last: bool | None = None,
    backend: str = "auto",
    num_threads: int | None = None,
    deterministic: bool = True,
    max_steps: int | None = None,
    pretrained_model: nn.Module | None = None,
    dist=None,
    tiling: str = "paper",
) -> TrainResult:
    """Train a classifier on a split of an index with online background-swap augmentation.

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or its path.
        arch: ``'bgsynth_cnn'`` or a torchvision / timm architecture name (random init, 9 outputs).
        split, val_split: training split and the split whose Original accuracy is measured at the end
            (``None``: no validation).
        epochs: passes over the training split.
        batch_size: samples per step.
        lr: peak learning rate (default 0.1 for SGD, 2e-3 for AdamW, scaled by ``batch_size / 64``).
        weight_decay: weight decay (not applied to biases and norm parameters).
        seed: seed of the initialisation, the order and every augmentation draw.
        geometry: decode geometry (default :data:`DEMO_GEOMETRY`, 72 -> 64).
        device: ``'cpu'``, ``'cuda'`` or ``'auto'``.
        augment: variant probabilities (see :func:`bgsynth.augment.parse_probs`), e.g. ``{'mixed_rand': 1.0}``
            for the paper's Mixed-Rand training set; default Original only.
        bg_source: ``'pool'`` or ``'batch'`` (see :class:`~bgsynth.augment.BackgroundSwap`).
        random_resized_crop, flip, scale: geometric augmentation (``scale`` is the crop's area fraction range).
            Random resized crop is off by default: on the demo's 64 px crops of the built-in dataset, 14 epochs reach
            87.8% Original val accuracy with flips alone and 85.3% with random resized crop (scale 0.35-1), which
            needs a longer schedule to pay off (docs/train.md). Switch it on for ImageNet-scale training.
        optimizer: ``'sgd'`` (momentum 0.9, Nesterov) or ``'adamw'``.
        schedule: ``'onecycle'`` (25% warm-up, cosine down), ``'cosine'`` or ``'constant'``.
        label_smoothing: cross-entropy label smoothing.
        out: checkpoint path (written with :func:`bgsynth.models.save_checkpoint`); ``None``: not saved.
        progress: tqdm bar with loss and images/s.
        amp: ``'auto'`` (bf16 autocast on CUDA), ``'bf16'``, ``'fp16'`` or ``None``.
        channels_last: ``None``: on for CUDA.
        backend: decode backend.
        num_threads: decoder threads.
        deterministic: deterministic cuDNN algorithms on CUDA (CPU runs replay exactly anyway).
        max_steps: stop after this many steps (a smoke test; the schedule still spans ``epochs``).
        pretrained_model: start from this module instead of a fresh ``arch``.
        dist: a :class:`~bgsynth.distributed.DistContext` (default :func:`bgsynth.distributed.current`). Under
            ``torchrun`` every rank calls :func:`train` with the same arguments and the model trains as
            DistributedDataParallel: ``batch_size`` stays the global batch (each rank draws ``batch_size / world``
            samples of its shard of the split per step, so the learning rate and schedule mean the same), every
            rank runs the same number of steps per epoch, the background pool is decoded once across the ranks,
            BatchNorm statistics are per rank, and rank 0 alone measures ``val_split`` and writes ``out``. The
            result (history, stats) is the same on every rank.
        tiling: the Only-BG-T of the Mixed-* backgrounds: ``"paper"`` (tiled at full resolution, as the
            authors) or ``"crop"`` (the crop-space approximation).

    Returns:
        A :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    index = _load_index(index)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"train: expected epochs >= 1, got {epochs!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
        raise ConfigError(f"train: expected batch_size >= 2 (BatchNorm), got {batch_size!r}")
    if optimizer not in _OPTIMIZERS:
        raise ConfigError(f"train: expected optimizer in {_OPTIMIZERS}, got {optimizer!r}")
    if schedule not in _SCHEDULES:
        raise ConfigError(f"train: expected schedule in {_SCHEDULES}, got {schedule!r}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ConfigError(f"train: expected 0 <= label_smoothing < 1, got {label_smoothing}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"train: expected max_steps >= 1 or None, got {max_steps!r}")
    probs = parse_probs(augment)
    geometry = DEMO_GEOMETRY if geometry is None else geometry
    if not isinstance(geometry, CropGeometry):
        raise ConfigError(f"train: expected geometry to be a CropGeometry, got {type(geometry).__name__}")
    from .distributed import current
    from .pool import build_background_pool_sharded

    ctx = current() if dist is None else dist
    dev = resolve_device(device)
    if ctx.enabled and dev.type == "cuda":
        dev = ctx.device("cuda" if dev.index is None else dev)  # cuda:<local rank>
    rank_batch = batch_size
    if ctx.enabled:
        if batch_size % ctx.world_size or batch_size // ctx.world_size < 2:
            raise ConfigError(
                f"train: expected the global batch_size to be a multiple of the {ctx.world_size} ranks with at least "
                f"2 samples per rank (BatchNorm), got {batch_size}"
            )
        rank_batch = batch_size // ctx.world_size
        progress = bool(progress) and ctx.is_main
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp not in (None, "bf16", "fp16"):
        raise ConfigError(f"train: expected amp in (None, 'auto', 'bf16', 'fp16'), got {amp!r}")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    if lr is None:
        lr = (0.1 if optimizer == "sgd" else 2e-3) * batch_size / 64.0
    mean, std = (IN9_MEAN, IN9_STD)

    from .models import create_model, save_checkpoint

    with _deterministic(deterministic, dev):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=NUM_IN9) if pretrained_model is None else pretrained_model
        model = model.to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        it = TrainIterator(
            index, split=split, geometry=geometry, batch_size=rank_batch, device=dev, seed=seed, probs=probs,
            bg_source=bg_source, random_resized_crop=random_resized_crop, flip=flip, backend=backend, scale=scale,
            mean=mean, std=std, channels_last=channels_last, num_threads=num_threads, progress=progress,
            shard_id=ctx.rank, num_shards=ctx.world_size, tiling=tiling,
        )
        if ctx.enabled and it.swap.bg_source == "pool" and it.swap.needs_background and it.swap.pool is None:
            # the whole split's Only-BG-T pool, each JPEG decoded by one rank
            it.swap.pool = build_background_pool_sharded(
                it.index, ctx, geometry=geometry, backend=backend, device=dev, num_threads=num_threads,
                tiling=tiling,
            )
        it.prepare()
        steps_per_epoch = len(it)
        if ctx.enabled:  # DDP: every rank must take the same number of steps (shards may differ by an image)
            steps_per_epoch = int(ctx.all_reduce(torch.tensor([steps_per_epoch], dtype=torch.int64), "min").item())
            net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        else:
            net = model
        if steps_per_epoch == 0:
            raise ConfigError(
                f"train: split {split!r} has {it.num_samples()} decodable images, fewer than one batch of {batch_size}"
            )
        total_steps = steps_per_epoch * epochs
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, total_steps))
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=float(label_smoothing))

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps if max_steps is None else min(max_steps, total_steps), desc=f"train {arch}",
                       unit="step")
        history: list[dict] = []
        steps = images = 0
        done = False
        try:
            for epoch in range(epochs):
                model.train()
                it.set_epoch(epoch)
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                correct = torch.zeros((), dtype=torch.int64, device=dev)
                seen = 0
                te = time.perf_counter()
                for k, (x, y) in enumerate(it):
                    if k >= steps_per_epoch:
                        break
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = net(x)
                        loss = loss_fn(logits.float(), y)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    sched.step()
                    n = int(y.shape[0])
                    loss_sum += loss.detach().double() * n
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += n
                    steps += 1
                    images += n
                    if bar is not None:
                        bar.update(1)
                        if steps % 10 == 0:
                            bar.set_postfix(epoch=epoch, loss=f"{float(loss):.3f}")
                    if max_steps is not None and steps >= max_steps:
                        done = True
                        break
                secs = time.perf_counter() - te
                if ctx.enabled:  # the epoch's figures over every rank's samples
                    agg = ctx.all_reduce(torch.tensor([float(loss_sum), float(correct), float(seen)],
                                                      dtype=torch.float64), "sum")
                    loss_sum, correct, seen = agg[0], agg[1], int(agg[2].item())
                history.append({
                    "epoch": epoch,
                    "loss": float(loss_sum) / max(seen, 1),
                    "accuracy": float(correct) / max(seen, 1),
                    "seconds": secs,
                    "images_per_s": seen / secs if secs > 0 else None,
                })
                if bar is not None:
                    h = history[-1]
                    bar.set_postfix(epoch=epoch, loss=f"{h['loss']:.3f}", acc=f"{h['accuracy']:.3f}")
                if done:
                    break
        finally:
            if bar is not None:
                bar.close()

        model.eval()
        val_acc, val_total = (None, 0)
        if val_split is not None and ctx.is_main:
            val_acc, val_total = evaluate_original(
                model, index, split=val_split, geometry=geometry, device=dev, backend=backend, mean=mean, std=std,
                num_threads=num_threads,
            )
        if ctx.enabled:
            val_acc, val_total = ctx.broadcast_object((val_acc, val_total))
            images = int(ctx.all_reduce(torch.tensor([images], dtype=torch.int64), "sum").item())
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    config = {
        "arch": arch,
        "split": split,
        "val_split": val_split,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": optimizer,
        "schedule": schedule,
        "label_smoothing": float(label_smoothing),
        "seed": int(seed),
        "augment": {k: v for k, v in probs.items() if v > 0},
        "bg_source": bg_source,
        "random_resized_crop": bool(random_resized_crop),
        "scale": [float(scale[0]), float(scale[1])],
        "flip": bool(flip),
        "geometry": geometry.to_dict(),
        "tiling": tiling,
        "device": str(dev),
        "amp": amp,
        "steps": steps,
        "index": None if index.path is None else str(index.path),
        "world_size": int(ctx.world_size),
    }
    stats = it.swap.stats()
    if ctx.enabled:  # samples drawn and fallbacks over every rank
        parts = ctx.all_gather_object(stats)
        stats = {v: {k: sum(int(p[v][k]) for p in parts) for k in stats[v]} for v in stats}
    ckpt_path = None
    if out is not None and ctx.is_main:
        extra = {
            "geometry": geometry,
            "mean": list(mean),
            "std": list(std),
            "train": json.loads(json.dumps(config)),
            "val_accuracy": val_acc,
            "val_split": val_split,
        }
        ckpt_path = save_checkpoint(model, out, arch=arch, num_classes=NUM_IN9, extra=extra)
    if ctx.enabled:
        ckpt_path = ctx.broadcast_object(ckpt_path)
        ctx.barrier()  # every rank returns once the checkpoint is written
    return TrainResult(
        model=model, checkpoint=ckpt_path, val_accuracy=val_acc, val_total=val_total, history=history,
        augment_stats=stats, config=config, seconds=time.perf_counter() - t0, steps=steps, images=images,
    )


# ==============================================================================================================
# The remedy: with and without Mixed-Rand
# ==============================================================================================================


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


def compare_training(
    index,
    out_dir: str | os.PathLike,
    augment: Mapping[str, float] | str = "mixed_rand=1.0",
    baseline: Mapping[str, float] | str = "original=1.0",
    epochs: int = 14,
    seed: int = 0,
    geometry: CropGeometry | None = None,
    device: str | torch.device = "cpu",
    variants: str | Sequence[str] = "all",
    challenge: bool = True,
    challenge_kwargs: Mapping[str, Any] | None = None,
    eval_split: str = "val",
    reuse: bool = True,
    progress: bool = True,
    tiling: str = "paper",
    **train_kwargs: Any,
) -> CompareResult:
    """Train the demo model without and with background augmentation, evaluate both, report BG-Gap and challenge.

    Both runs use the same architecture, epochs, seed, geometry and every other setting; only the variant
    probabilities differ (``baseline`` vs ``augment``; the paper's remedy is ``mixed_rand=1.0``).

    Args:
        index: a :class:`~bgsynth.index.DatasetIndex` or its path (with ``train`` and ``eval_split`` splits).
        out_dir: where the checkpoints (``<name>.pt``), evaluation results and ``compare.json``/``compare.md`` go.
        augment, baseline: variant probabilities of the two runs.
        epochs, seed, geometry, device: shared training settings (``**train_kwargs`` for the rest of
            :func:`train`'s).
        variants: variants to evaluate (:func:`bgsynth.evaluate.evaluate`).
        challenge: also run the Backgrounds Challenge (:func:`bgsynth.challenge.run_challenge`).
        challenge_kwargs: extra arguments of ``run_challenge``.
        tiling: Only-BG-T construction (``"paper"`` or ``"crop"``) of training backgrounds, evaluation and
            challenge alike.
        eval_split: split evaluated and challenged.
        reuse: reuse a checkpoint in ``out_dir`` trained with the same settings.
        progress: progress bars.

    Returns:
        A :class:`CompareResult` (also written as ``compare.json`` and ``compare.md`` in ``out_dir``).
    """
    from .evaluate import evaluate
    from .fileio import atomic_write_json
    from .models import load_model

    index = _load_index(index)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = DEMO_GEOMETRY if geometry is None else geometry
    runs = {}
    for probs in (baseline, augment):
        p = parse_probs(probs)
        used = [k for k in AUGMENT_VARIANTS if p[k] > 0]
        name = "+".join(used)
        if name in runs:
            name = f"{name}_{len(runs)}"
        runs[name] = p
    rows: dict[str, dict] = {}
    for name, p in runs.items():
        ckpt = out / f"{name}.pt"
        settings = {"augment": {k: v for k, v in p.items() if v > 0}, "epochs": epochs, "seed": int(seed),
                    "geometry": geometry.to_dict(), "tiling": tiling,
                    "index": None if index.path is None else str(index.path),
                    **{k: (list(v) if isinstance(v, tuple) else v) for k, v in train_kwargs.items()}}
        meta_path = out / f"{name}.train.json"
        t_train = None
        val = None
        if reuse and ckpt.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("settings") == json.loads(json.dumps(settings)):
                t_train, val = meta.get("seconds"), meta.get("val_accuracy")
            else:
                meta = None
        else:
            meta = None
        if meta is None:
            if progress:
                print(f"compare_training: training {name!r} ({settings['augment']}) for {epochs} epochs")
            res = train(index, epochs=epochs, seed=seed, geometry=geometry, device=device, augment=p, out=ckpt,
                        progress=progress, tiling=tiling, **train_kwargs)
            t_train, val = res.seconds, res.val_accuracy
            atomic_write_json(meta_path, {"settings": settings, "seconds": t_train, "val_accuracy": val,
                                          "history": res.history, "augment_stats": res.augment_stats}, indent=1)
        loaded = load_model(str(ckpt))
        ev = evaluate(index, loaded, variants=variants, split=eval_split, seed=seed, geometry=geometry,
                      device=device, progress=progress, tiling=tiling)
        ev.model["name"] = name
        ev.save(out / f"eval_{name}")
        row = {
            "checkpoint": str(ckpt),
            "augment": {k: v for k, v in p.items() if v > 0},
            "val_original": val,
            "train_seconds": t_train,
            "accuracy": {v: ev.accuracy(v) for v in ev.variants},
            "bg_gap": ev.bg_gap,
            "challenge_accuracy": None,
            "challenge_vulnerable": None,
            "challenge_total": None,
            "challenge_forwards": None,
        }
        if challenge:
            row.update(_challenge(index, ckpt, eval_split, geometry, device, seed, progress,
                                  {"tiling": tiling, **dict(challenge_kwargs or {})}))
        rows[name] = row
    result = CompareResult(rows=rows, config={"epochs": epochs, "seed": int(seed), "geometry": geometry.to_dict(),
                                              "tiling": tiling,
                                              "eval_split": eval_split, **{k: str(v) for k, v in train_kwargs.items()}})
    atomic_write_json(out / "compare.json", result.to_dict(), indent=1)
    (out / "compare.md").write_text(result.table() + "\n", encoding="utf-8")
    if progress:
        print(result.table())
    return result


def _challenge(index, ckpt, split, geometry, device, seed, progress, kwargs) -> dict:
    """Challenge accuracy of a checkpoint through :func:`bgsynth.challenge.run_challenge`."""
    from .challenge import run_challenge
    from .models import Predictor, load_model

    dev = resolve_device(device)
    res = run_challenge(index, Predictor(load_model(str(ckpt)), device=dev), split=split, geometry=geometry,
                        device=dev, seed=seed, progress=progress, **dict(kwargs or {}))
    return {
        "challenge_accuracy": float(res.accuracy),
        "challenge_vulnerable": int(res.num_vulnerable),
        "challenge_total": int(res.num_foregrounds),
        "challenge_forwards": int(res.forwards),
    }
