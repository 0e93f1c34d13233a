"""Throughput benchmarking (``bgsynth bench``): images/s of every stage of an evaluation, and the bottleneck.

For a chosen model, batch sizes, dtype, device and crop geometry, on the built-in data or any index, each stage is
measured on its own (a warm-up, then the median of ``repeats`` timed runs; CUDA work is synchronised before each
clock reading):

=================  ==================================================================================================
``decode``         complete batches (pixels, masks, boxes, strips) from the JPEGs, per available decode backend
                   (:func:`bgsynth.pipeline.create_loader`): images/s
``synthesis``      composites from decoded batches, normalised in the model's dtype and memory format
                   (:func:`bgsynth.variants.synthesize`), per variant and all variants in one call: composites/s
``model``          the forward pass alone on ready composites (:class:`bgsynth.models.Predictor`), per batch size:
                   composites/s
``end_to_end``     :func:`bgsynth.evaluate.evaluate` over the images with all requested variants (decode, synthesis
                   and forward overlapped as in ``bgsynth eval``): images/s
``kernel``         (CUDA) the composite kernel's achieved memory bandwidth and its share of the device's peak
                   (:data:`PEAK_BANDWIDTH_GBS`, ``None`` for a device not in the table)
=================  ==================================================================================================

Every rate is also given in **source images/s** (composites/s divided by the number of variants, since an
evaluation makes that many composites per image), so the stages compare directly: the **bottleneck** is the
slowest of decode (the run's backend), synthesis (all variants) and the model (the run's batch size).

On a CPU device every stage runs with the torch intra-op threads an evaluation's loop has (the cores the decoder
threads leave, :func:`bgsynth.pipeline.common.sharing_cores`; ``device.torch_threads`` in the result): on a shared
machine a parallel region waits for every thread of its team to be scheduled, so a stage timed with more threads
than the evaluation uses would measure the machine's load rather than the stage.

The result is a :class:`BenchResult` (``bench.json``, schema :data:`SCHEMA`) and a bar chart (``bench.png``),
written into an output folder owned by one run (:class:`bgsynth.runs.OutputFolder`); :func:`compare_benches`
puts several ``bench.json`` side by side (one table, one chart). ``benchmarks/gpu_checks.py`` runs the same code on
a GPU.

>>> from bgsynth.bench import peak_bandwidth
>>> peak_bandwidth("NVIDIA H200"), peak_bandwidth("some other device")
(4800.0, None)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import __version__, kernels
from .config import DEFAULT_GEOMETRY, DEMO_GEOMETRY, RunConfig, check_positive_int, resolve_amp, resolve_options
from .errors import ConfigError
from .evaluate import EvalConfig, evaluate
from .fileio import atomic_write_bytes, atomic_write_json, read_json
from .index import DatasetIndex, require_index
from .models import LoadedModel, Predictor, load_model
from .pipeline import auto_backend, available_backends, create_loader
from .pipeline.common import available_cores, default_decode_threads, sharing_cores
from .pool import pool_from_batches
from .runs import Fingerprint, OutputFolder, index_digest
from .types import Batch
from .variants import resolve_variants, synthesize

__all__ = ["SCHEMA", "STAGES", "PEAK_BANDWIDTH_GBS", "BenchConfig", "BenchResult", "run_bench", "load_bench",
           "compare_benches", "bench_chart", "peak_bandwidth", "kernel_bandwidth", "index_sha"]

SCHEMA = "bgsynth-bench/1"
STAGES = ("decode", "synthesis", "model", "end_to_end", "kernel")
#: peak DRAM bandwidth (GB/s) of known devices, matched in order by a substring of ``torch.cuda.get_device_name``
PEAK_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("B200", 8000.0),
    ("H200", 4800.0),
    ("GH200", 4000.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("RTX A6000", 768.0),
)
_AMP = {"auto": "auto", "float32": None, "bf16": "bf16", "fp16": "fp16"}


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth in GB/s of a device by its name (:data:`PEAK_BANDWIDTH_GBS`), ``None`` if unknown."""
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key.lower() in str(device_name).lower():
            return gbs
    return None


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What ``bgsynth bench`` measures (the device, geometry, decode backend, seed and threads are the run's).

    Attributes:
        model: the ``--model`` specification (:func:`bgsynth.models.load_model`), or a loaded model given to
            :func:`run_bench` directly.
        batch_sizes: forward batch sizes of the model stage (empty: the run's batch size).
        dtype: the model's compute dtype: ``'float32'``, ``'bf16'``, ``'fp16'`` (autocast; composites are made in
            it) or ``'auto'`` (bf16 on CUDA devices that support it, float32 on the CPU).
        variants: the variants of the synthesis and end-to-end stages (``'all'`` or names).
        split: the split the images come from (``None``: every image).
        images: how many images (the first of the sorted ids; ``None``: all of the split).
        repeats: timed runs per measurement (their median is reported), after one warm-up run.
        stages: the stages to run (a subset of :data:`STAGES`; ``kernel`` runs on CUDA only).
        decode_backends: the decode backends of the decode stage (``None``: every available one).
    """

    model: Any = "bgsynth_cnn"
    batch_sizes: tuple[int, ...] = ()
    dtype: str = "auto"
    variants: tuple[str, ...] | str = "all"
    split: str | None = "val"
    images: int | None = 96
    repeats: int = 3
    stages: tuple[str, ...] = STAGES
    decode_backends: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.dtype not in _AMP:
            raise ConfigError(f"bench: expected dtype in {tuple(_AMP)}, got {self.dtype!r}")
        object.__setattr__(self, "variants", tuple(resolve_variants(self.variants)))
        object.__setattr__(self, "batch_sizes", tuple(check_positive_int(b, "batch size", "bench")
                                                       for b in self.batch_sizes))
        if self.images is not None:
            check_positive_int(self.images, "images", "bench")
        check_positive_int(self.repeats, "repeats", "bench")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"bench: expected stages among {STAGES}, got {list(self.stages)}")
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.decode_backends is not None:
            object.__setattr__(self, "decode_backends", tuple(self.decode_backends))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model if isinstance(self.model, str) else type(self.model).__name__
        return d


@dataclasses.dataclass
class BenchResult:
    """The measurements of one ``bgsynth bench`` run (JSON: :meth:`to_dict`, schema :data:`SCHEMA`).

    Attributes:
        stages: one row per measurement: ``stage``, ``name`` (e.g. ``decode[torchvision]``), ``rate`` and
            ``unit`` (``images/s`` or ``composites/s``), ``images_per_s`` (in source images), ``batch_size``,
            ``seconds`` (median of the timed runs), ``runs`` (every timed run) and stage details.
        bandwidth: (CUDA) ``kernel``, ``gb_per_s``, ``share_of_peak`` per composite kernel configuration.
        bottleneck: the name of the slowest of decode / synthesis / model (in source images/s).
        device: ``type``, ``name``, ``cores``, ``torch_threads``, ``peak_bandwidth_gbs``.
        config, run: the bench's and the run's settings; ``load_average`` at the start and end (the machine may
            be shared).
    """

    stages: list[dict]
    bandwidth: list[dict]
    bottleneck: str | None
    device: dict
    config: dict
    run: dict
    load_average: dict
    versions: dict
    seconds: float
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"expected a bench result with schema {SCHEMA!r}, got {got!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def rate(self, name: str) -> float | None:
        """The source images/s of a measurement by name (``None`` if it was not measured)."""
        return next((r["images_per_s"] for r in self.stages if r["name"] == name), None)

    def table(self) -> str:
        """The measurements as an aligned text table, the bottleneck named below it."""
        lines = [f"{'stage':<11}{'measurement':<30}{'batch':>6}{'rate':>12}  {'unit':<13}{'source img/s':>13}"]
        for r in self.stages:
            mark = "  <- bottleneck" if r["name"] == self.bottleneck else ""
            lines.append(f"{r['stage']:<11}{r['name']:<30}{r.get('batch_size') or '':>6}{r['rate']:>12,.1f}  "
                         f"{r['unit']:<13}{r['images_per_s']:>13,.1f}{mark}")
        for b in self.bandwidth:
            share = "unknown peak" if b["share_of_peak"] is None else f"{100 * b['share_of_peak']:.0f}% of peak"
            lines.append(f"{'kernel':<11}{b['kernel']:<30}{b['batch_size']:>6}{b['gb_per_s']:>12,.0f}  "
                         f"{'GB/s':<13}{share:>13}")
        if self.bottleneck:
            lines.append(f"bottleneck: {self.bottleneck} ({self.rate(self.bottleneck):,.1f} source images/s)")
        return "\n".join(lines)

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False, index_sha: str | None = None,
             chart: bool = True) -> dict[str, pathlib.Path]:
        """Write ``bench.json`` (and ``bench.png``) into ``out_dir``, claimed for this run's settings
        (:class:`~bgsynth.runs.OutputFolder`: a folder of another bench run is refused unless ``overwrite``)."""
        settings = {"config": self.config, "run": self.run, "device": self.device.get("name")}
        folder = OutputFolder(out_dir, Fingerprint("bench", settings, index=index_sha), overwrite=overwrite,
                              owned=lambda p: p.name in ("bench.json", "bench.png")).claim()
        paths = {"json": folder.path / "bench.json"}
        atomic_write_json(paths["json"], self.to_dict(), indent=1)
        if chart:
            paths["chart"] = bench_chart([self], folder.path / "bench.png", labels=[self.device.get("name", "")])
        folder.commit(paths.values())
        folder.finish()  # no chart of an earlier run beside a rerun without one
        return paths


def load_bench(path: str | os.PathLike) -> BenchResult:
    """A :class:`BenchResult` from a ``bench.json`` file or a folder holding one."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "bench.json"
    if not p.is_file():
        raise ConfigError(f"{path}: expected a bench.json file or a folder holding one, found none")
    d = read_json(p, "bench result")
    try:
        return BenchResult.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (CUDA synchronised around each)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _row(stage: str, name: str, items: int, times: list[float], unit: str, per_image: int = 1, **extra) -> dict:
    """A measurement row: ``items`` per run at the median time; ``per_image`` items make one source image."""
    med = statistics.median(times)
    rate = items / med if med > 0 else float("inf")
    return {"stage": stage, "name": name, "rate": rate, "unit": unit, "images_per_s": rate / per_image,
            "seconds": med, "runs": [round(t, 6) for t in times], **extra}


# ----------------------------------------------------------------------------------------------- the stages
class _Bench:
    """One bench run: the selected images, the model, the run's settings, and the rows measured so far."""

    def __init__(self, index: DatasetIndex, loaded: LoadedModel, run: RunConfig, config: BenchConfig):
        self.index, self.run, self.config = index, run, config
        self.predictor = Predictor(loaded, device=run.device, amp=run.amp, label_space=index.label_space)
        self.variants = list(config.variants)
        self.rows: list[dict] = []
        self.bandwidth: list[dict] = []
        self.batches: list[Batch] | None = None
        self.pool = None

    def decode_backends(self) -> list[str]:
        given = self.config.decode_backends
        names = available_backends() if given is None else list(given)
        missing = [b for b in names if b not in available_backends()]
        if missing:
            raise ConfigError(f"bench: decode backend(s) {missing} are not installed; available: {available_backends()}")
        return names

    def loader(self, backend: str):
        return create_loader(self.index, run=self.run.replace(backend=backend))

    def decode(self, backend: str) -> None:
        def epoch():
            loader = self.loader(backend)
            for batch in loader:
                pass
            loader.close()

        times = _timed(epoch, self.run.device, self.config.repeats)
        self.rows.append(_row("decode", f"decode[{backend}]", len(self.index), times, "images/s",
                              backend=backend, batch_size=self.run.batch_size))

    def decoded(self) -> list[Batch]:
        """The images decoded once with the run's backend (kept for synthesis), and their background pool."""
        if self.batches is None:
            loader = self.loader(self.run.backend)
            self.batches = list(loader)
            loader.close()
            crop = self.run.geometry.crop
            self.pool = pool_from_batches(self.batches, crop, self.run.device, backend=self.run.kernel_backend,
                                          num_classes=self.index.label_space.num_classes)
        return self.batches

    def synthesis(self, names: list[str]) -> None:
        batches, p = self.decoded(), self.predictor
        n = sum(len(b) for b in batches)

        def work():
            for b in batches:
                synthesize(b, names, pool=self.pool, seed=self.run.seed, normalize=(p.mean, p.std),
                           dtype=p.input_dtype, channels_last=p.channels_last, backend=self.run.kernel_backend)

        label = "all" if len(names) > 1 else names[0]
        times = _timed(work, self.run.device, self.config.repeats)
        self.rows.append(_row("synthesis", f"synthesis[{label}]", n * len(names), times, "composites/s",
                              per_image=len(names), variants=names, batch_size=self.run.batch_size))

    def model(self, batch_size: int) -> None:
        g = torch.Generator().manual_seed(0)
        crop = self.run.geometry.crop
        x = self.predictor.prepare(torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, generator=g))
        calls = max(1, -(-len(self.index) // batch_size))  # about as many composites as the other stages make
        times = _timed(lambda: [self.predictor.logits(x) for _ in range(calls)], self.run.device, self.config.repeats)
        self.rows.append(_row("model", f"model[batch={batch_size}]", calls * batch_size, times, "composites/s",
                              per_image=len(self.variants), batch_size=batch_size))

    def end_to_end(self) -> None:
        cfg = EvalConfig(variants=tuple(self.variants), split=None, examples_per_class=0, record_provenance=False)
        run = self.run.replace(progress=False)
        times = _timed(lambda: evaluate(self.index, self.predictor, run=run, config=cfg), self.run.device,
                       self.config.repeats)
        self.rows.append(_row("end_to_end", "end_to_end", len(self.index), times, "images/s",
                              variants=self.variants, batch_size=self.run.batch_size))

    def kernel(self) -> None:
        self.bandwidth.extend(kernel_bandwidth(self.run.device, crop=self.run.geometry.crop))

    def bottleneck(self) -> str | None:
        """The slowest (in source images/s) of what an evaluation chains: decode with the run's backend,
        synthesis of all variants, the model at the run's batch size (else the first measured)."""
        synth = "synthesis[all]" if len(self.variants) > 1 else f"synthesis[{self.variants[0]}]"
        models = [r for r in self.rows if r["stage"] == "model"]
        model = next((r for r in models if r["batch_size"] == self.run.batch_size), models[0] if models else None)
        rows = [r for r in self.rows if r["name"] in (f"decode[{self.run.backend}]", synth)] + ([model] if model else [])
        return min(rows, key=lambda r: r["images_per_s"])["name"] if rows else None


def _measure(bench: _Bench, progress: bool) -> None:
    c = bench.config
    steps: list[tuple[str, Callable[[], None]]] = []
    if "decode" in c.stages:
        steps += [(f"decode[{b}]", lambda b=b: bench.decode(b)) for b in bench.decode_backends()]
    if "synthesis" in c.stages:
        steps += [(f"synthesis[{v}]", lambda v=v: bench.synthesis([v])) for v in bench.variants]
        if len(bench.variants) > 1:
            steps.append(("synthesis[all]", lambda: bench.synthesis(bench.variants)))
    if "model" in c.stages:
        sizes = c.batch_sizes or (bench.run.batch_size,)
        steps += [(f"model[batch={b}]", lambda b=b: bench.model(b)) for b in sizes]
    if "end_to_end" in c.stages:
        steps.append(("end_to_end", bench.end_to_end))
    if "kernel" in c.stages and bench.run.device.type == "cuda":
        steps.append(("kernel", bench.kernel))
    bar = None
    if progress:
        from tqdm.auto import tqdm  # tqdm only for a visible bar

        bar = tqdm(total=len(steps), desc="bench", unit="step")
    for name, step in steps:
        if bar is not None:
            bar.set_postfix_str(name)
        step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def run_bench(index: DatasetIndex, run: RunConfig | None = None, config: BenchConfig | None = None,
              **options: Any) -> BenchResult:
    """Measure every stage's throughput (see the module docstring) and name the bottleneck.

    Args:
        index: the loaded :class:`~bgsynth.index.DatasetIndex` (e.g. the built-in dataset's).
        run: the resolved run configuration (device, geometry, decode and kernel backends, tiling, batch size,
            seed, decoder threads, progress); default: resolved from ``options`` (the demo geometry 72 -> 64 for
            ``bgsynth_cnn``, 256 -> 224 otherwise, unless the checkpoint stores one).
        config: the :class:`BenchConfig`; default: made from ``options``.
        **options: run options and :class:`BenchConfig` fields by name (``model=``, ``batch_sizes=``,
            ``dtype=``, ``images=``, ``repeats=``, ``stages=``, ``device=``, ``resize=``, ``crop=``, ...).

    Returns:
        The :class:`BenchResult`; :meth:`BenchResult.save` writes it.
    """
    require_index(index, "run_bench")
    cfg_model = options.get("model", config.model if config is not None else BenchConfig.model)
    loaded = cfg_model if isinstance(cfg_model, LoadedModel) else load_model(cfg_model)
    default_geometry = DEMO_GEOMETRY if loaded.arch == "bgsynth_cnn" else DEFAULT_GEOMETRY
    run, config = resolve_options("run_bench", run, config, BenchConfig, options, batch_kind="eval",
                                  default_geometry=default_geometry, stored_geometry=loaded.geometry,
                                  device="auto")
    run = run.replace(amp=resolve_amp(_AMP[config.dtype], run.device))  # the bench's dtype is the run's autocast
    if config.batch_sizes and "batch_size" not in options:
        run = run.replace(batch_size=config.batch_sizes[0])  # the evaluation's batch is the first one asked for
    if run.backend == "auto":
        run = run.replace(backend=auto_backend(run.device))
    sub = _images(index, config)
    t0, load0 = time.perf_counter(), os.getloadavg()
    bench = _Bench(sub, loaded, run, config)
    # every stage runs with the torch threads an evaluation's loop has (on CPU: the cores the decoders leave)
    sharing = run.device.type == "cpu"
    with sharing_cores(run.num_threads or default_decode_threads(run.device)) if sharing else contextlib.nullcontext():
        device = _device(run.device)
        _measure(bench, run.progress)
    return BenchResult(
        stages=bench.rows, bandwidth=bench.bandwidth, bottleneck=bench.bottleneck(), device=device,
        config=config.to_dict() | {"images": len(sub), "model_arch": loaded.arch}, run=run.to_dict(),
        load_average={"start": list(load0), "end": list(os.getloadavg())},
        versions=_versions(), seconds=time.perf_counter() - t0,
    )


def _images(index: DatasetIndex, config: BenchConfig) -> DatasetIndex:
    """The first ``config.images`` images (sorted ids) of the split; :class:`EmptyInputError` when none."""
    sub = index.select(split=config.split) if config.split is not None else index
    if config.images is not None:
        sub = sub.select(ids=sub.ids[: config.images])
    index.require_images(sub, "benchmark", split=config.split)
    return sub


def _device(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {"type": device.type, "name": name, "cores": available_cores(), "torch_threads": torch.get_num_threads(),
            "peak_bandwidth_gbs": peak_bandwidth(name) if device.type == "cuda" else None}


def _versions() -> dict:
    out = {"bgsynth": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------- CUDA bandwidth
def kernel_bandwidth(device: torch.device | str, batch: int = 256, pool: int = 1024, crop: int = 224,
                     iters: int = 20, backend: str = "auto") -> list[dict]:
    """Achieved memory bandwidth of the kernels on ``device`` (CUDA), as a share of its peak.

    Three configurations on device-resident data: a Mixed-* composite in uint8 (mask 1 + foreground 3 + background
    3 bytes read, 3 written per pixel), the model-ready one (normalised bfloat16, channels_last: 6 bytes written)
    and the Only-BG-T tiling in uint8 (3 read, 3 written). Every input byte counts as read (a masked load still
    fetches whole DRAM sectors). The median of 5 timings of ``iters`` launches (CUDA events).

    Args:
        device: a CUDA device.
        batch, pool, crop: images per launch, background rows, crop side.
        iters: launches per timing.
        backend: the kernel backend (``'auto'``: Triton; ``'torch'``: the reference, for a comparison).

    Returns:
        ``[{"kernel", "batch_size", "gb_per_s", "share_of_peak", "seconds"}]``; ``share_of_peak`` is ``None`` for
        a device not in :data:`PEAK_BANDWIDTH_GBS`.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ConfigError(f"kernel_bandwidth: expected a CUDA device, got {dev}")
    g = torch.Generator(device=dev).manual_seed(0)
    fg = torch.randint(0, 256, (batch, 3, crop, crop), device=dev, dtype=torch.uint8, generator=g)
    keep = torch.rand((batch, 1, crop, crop), device=dev, generator=g) < 0.4
    bg = torch.randint(0, 256, (pool, 3, crop, crop), device=dev, dtype=torch.uint8, generator=g)
    rows = torch.randint(0, pool, (batch,), device=dev, generator=g)
    boxes = torch.tensor([[crop // 4, crop // 4, 3 * crop // 4, 3 * crop // 4]], device=dev).repeat(batch, 1)
    strips = torch.tensor([[0, 0, crop // 4, crop]], device=dev).repeat(batch, 1)  # the left margin, full height
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    px = batch * crop * crop
    cases = {
        "composite mixed uint8": (lambda: kernels.composite(fg, keep, bg, rows, backend=backend), px * (1 + 3 + 3 + 3)),
        "composite mixed bf16 norm CL": (lambda: kernels.composite(fg, keep, bg, rows, mean=mean, std=std,
                                                                   dtype=torch.bfloat16, channels_last=True,
                                                                   backend=backend), px * (1 + 3 + 3 + 6)),
        "tile_fill uint8": (lambda: kernels.tile_fill(fg, boxes, strips, backend=backend), px * (3 + 3)),
    }
    peak = peak_bandwidth(torch.cuda.get_device_name(dev))
    out = []
    for name, (fn, nbytes) in cases.items():
        t = _cuda_seconds(fn, dev, iters)
        gbs = nbytes / t / 1e9
        out.append({"kernel": name, "batch_size": batch, "gb_per_s": gbs, "seconds": t,
                    "share_of_peak": None if peak is None else gbs / peak})
    return out


def _cuda_seconds(fn: Callable[[], Any], dev: torch.device, iters: int) -> float:
    """Seconds per call of ``fn``: median of 5 CUDA-event timings of ``iters`` calls, after a warm-up call."""
    fn()
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- comparing runs
def compare_benches(results: Sequence[BenchResult], labels: Sequence[str] | None = None) -> str:
    """Several runs side by side: one row per measurement, one column of source images/s per run."""
    results = list(results)
    if not results:
        raise ConfigError("compare_benches: expected at least one bench result")
    labels = list(labels) if labels is not None else [r.device.get("name", f"run {k}") for k, r in enumerate(results)]
    names: list[str] = []
    for r in results:
        names += [row["name"] for row in r.stages if row["name"] not in names]
    w = max(12, *(len(n) for n in names))
    cols = [f"{lab[:22]:>24}" for lab in labels]
    lines = [f"{'source images/s':<{w}}" + "".join(cols)]
    for n in names:
        cells = [r.rate(n) for r in results]
        lines.append(f"{n:<{w}}" + "".join(f"{'-' if v is None else f'{v:,.1f}':>24}" for v in cells))
    lines.append(f"{'bottleneck':<{w}}" + "".join(f"{(r.bottleneck or '-')[:22]:>24}" for r in results))
    return "\n".join(lines)


def bench_chart(results: Sequence[BenchResult], path: str | os.PathLike, labels: Sequence[str] | None = None
                ) -> pathlib.Path:
    """A horizontal bar chart of source images/s per measurement (log scale), one colour per run; the
    bottleneck of each run outlined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    results = list(results)
    labels = list(labels) if labels is not None else [f"run {k}" for k in range(len(results))]
    names: list[str] = []
    for r in results:
        names += [row["name"] for row in r.stages if row["name"] not in names]
    height = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) * max(1, len(results)) + 1.5))
    y = np.arange(len(names))
    for k, (r, lab) in enumerate(zip(results, labels)):
        vals = [r.rate(n) or 0.0 for n in names]
        bars = ax.barh(y + k * height, vals, height=height, label=lab)
        for n, bar in zip(names, bars):
            if n == r.bottleneck:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
    ax.set_yticks(y + height * (len(results) - 1) / 2)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("source images/s (log scale; outlined: the bottleneck)")
    if len(results) > 1 or labels[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return pathlib.Path(path)


def index_sha(index: DatasetIndex) -> str:
    """The index digest recorded with a bench folder (:func:`bgsynth.runs.index_digest`)."""
    return index_digest(index)
