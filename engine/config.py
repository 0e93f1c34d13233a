"""The one resolved run configuration: every default of a run is stated here, once.

In the manner of timm's ``resolve_data_config``: a command or an API call gives what it was told (``None`` for
"not said"), and :func:`resolve_run` turns it into a :class:`RunConfig` whose every field is concrete (the
geometry and where it came from, the device, the decode and kernel backends, the Only-BG-T tiling, the batch
size, the seed, the autocast dtype). Consumers (evaluation, challenge, training, export, preparation) receive the
resolved configuration and read from it; they do not re-derive defaults.

The defaults:

============================  ====================================================================================
crop geometry                 the checkpoint's stored geometry, else :data:`DEFAULT_GEOMETRY` (256 -> 224, the
                              paper's); the demo CNN trains at :data:`DEMO_GEOMETRY` (72 -> 64)
device                        ``'auto'``: CUDA when present (under torchrun, ``cuda:<local rank>``), else CPU
decode backend                ``'auto'`` (:func:`bgsynth.pipeline.auto_backend` picks per device)
kernel backend                ``'auto'`` (Triton on CUDA tensors, torch elsewhere)
tiling                        :data:`DEFAULT_TILING`, ``'paper'``: the authors' full-resolution Only-BG-T
batch size                    :data:`BATCH_SIZES` per job kind and device type
autocast                      ``'auto'``: bfloat16 on CUDA devices that support it, none on the CPU
============================  ====================================================================================

>>> cfg = resolve_run(device="cpu", resize=128, crop=112)
>>> cfg.geometry, cfg.geometry_source, cfg.batch_size, cfg.tiling
(CropGeometry(resize=128, crop=112), 'arguments', 64, 'paper')
>>> resolve_run(device="cpu", stored_geometry={"resize": 72, "crop": 64}).geometry
CropGeometry(resize=72, crop=64)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import torch

from .errors import BackendUnavailableError, ConfigError
from .geometry import CropGeometry
from .types import TILINGS

__all__ = [
    "DEFAULT_GEOMETRY",
    "DEMO_GEOMETRY",
    "DEFAULT_TILING",
    "BATCH_SIZES",
    "AMP_DTYPES",
    "RunConfig",
    "resolve_run",
    "resolve_device",
    "resolve_geometry",
    "resolve_amp",
    "default_batch_size",
    "check_positive_int",
    "resolve_options",
    "RUN_OPTIONS",
    "available_cores",
]

DEFAULT_GEOMETRY = CropGeometry(resize=256, crop=224)
DEMO_GEOMETRY = CropGeometry(resize=72, crop=64)
DEFAULT_TILING = "paper"
#: images per decoded batch (eval, export, pools) and composites per forward (challenge), per device type
BATCH_SIZES = {
    "eval": {"cpu": 64, "cuda": 256},
    "challenge": {"cpu": 64, "cuda": 512},
    "decode": {"cpu": 64, "cuda": 256},
    "train": {"cpu": 64, "cuda": 64},
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_positive_int(value, name: str, owner: str, minimum: int = 1) -> int:
    """``value`` as an int, or a :class:`ConfigError` "expected ``name`` >= minimum, got ..." naming ``owner``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def resolve_device(device: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The one device resolver of bgsynth.

    Args:
        device: ``'auto'``/``None`` (CUDA when present, else CPU), ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        local_rank: under torchrun, the rank's local index: a bare ``'cuda'`` becomes ``cuda:<local rank>``.

    Raises:
        ConfigError: not a cpu/cuda device. BackendUnavailableError: CUDA requested without CUDA.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"expected a device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"expected a cpu or cuda device, got {dev}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {str(device)!r} requested, but torch.cuda.is_available() is False")
        if dev.index is None:
            index = torch.cuda.current_device() if local_rank is None else local_rank % torch.cuda.device_count()
            dev = torch.device("cuda", index)
    return dev


def resolve_geometry(geometry=None, *, resize: int | None = None, crop: int | None = None,
                     stored: Mapping | None = None, checkpoint: str | None = None,
                     default: CropGeometry = DEFAULT_GEOMETRY) -> tuple[CropGeometry, str]:
    """The crop geometry of a run and where it came from: ``'arguments'``, ``'checkpoint'`` or ``'default'``.

    Args:
        geometry: a :class:`CropGeometry`, ``{'resize', 'crop'}`` or ``(resize, crop)``; wins over the rest.
        resize, crop: what a command line said (either may be ``None``: the other side then comes from the
            checkpoint's or the default geometry, the crop never larger than the resize).
        stored: the geometry saved with the model's checkpoint, or ``None``.
        checkpoint: the checkpoint file; named in a one-line warning when a file without a stored geometry
            falls back to the default (official release checkpoints, plain state_dicts and TorchScript carry
            none, and the model may have been trained at another size).
        default: the geometry when nothing else decides (:data:`DEFAULT_GEOMETRY`).
    """
    if geometry is not None:
        if isinstance(geometry, CropGeometry):
            return geometry, "arguments"
        if isinstance(geometry, Mapping) and "resize" in geometry and "crop" in geometry:
            return CropGeometry(int(geometry["resize"]), int(geometry["crop"])), "arguments"
        if isinstance(geometry, (tuple, list)) and len(geometry) == 2:
            return CropGeometry(int(geometry[0]), int(geometry[1])), "arguments"
        raise ConfigError(f"expected geometry as CropGeometry, {{'resize', 'crop'}} or (resize, crop), got {geometry!r}")
    base, source = default, "default"
    if isinstance(stored, Mapping) and "resize" in stored and "crop" in stored:
        base, source = CropGeometry(int(stored["resize"]), int(stored["crop"])), "checkpoint"
    if resize is not None or crop is not None:
        r = int(resize) if resize is not None else max(base.resize, int(crop))
        c = int(crop) if crop is not None else min(base.crop, r)
        return CropGeometry(r, c), "arguments"
    if source == "default" and checkpoint:
        warnings.warn(
            f"{checkpoint}: the checkpoint carries no crop geometry; using the default resize {base.resize} / "
            f"crop {base.crop} (give --resize/--crop to change it)",
            stacklevel=3,
        )
    return base, source


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """``'auto'`` -> ``'bf16'`` on CUDA devices that support it, else ``None``; ``'none'``/``''`` -> ``None``."""
    if amp in ("none", "", None):
        return None
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"expected amp in (None, 'auto', 'bf16', 'fp16'), got {amp!r}")
    return amp


def default_batch_size(kind: str, device: torch.device) -> int:
    """The default batch size of a job kind (:data:`BATCH_SIZES`) on ``device``."""
    if kind not in BATCH_SIZES:
        raise ConfigError(f"expected a batch kind in {sorted(BATCH_SIZES)}, got {kind!r}")
    return BATCH_SIZES[kind]["cuda" if device.type == "cuda" else "cpu"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The resolved settings every consumer shares (see the module docstring for the defaults).

    Attributes:
        geometry: the model's crop geometry; ``geometry_source`` says where it came from.
        device: where decoded batches, composites and the model live.
        backend: decode backend (``'auto'``, ``'dali'``, ``'torchvision'``, ``'pil'``).
        kernel_backend: variant kernels (``'auto'``, ``'torch'``, ``'triton'``).
        tiling: Only-BG-T construction, ``'paper'`` or ``'crop'``.
        batch_size: images per decoded batch (composites per forward for the challenge).
        seed: seed of every random choice of the run (background choice, subsets, orders).
        amp: autocast (``None``, ``'bf16'``, ``'fp16'``).
        num_threads: decoder threads (``None``: the decoder's default).
        progress: show progress bars.
    """

    geometry: CropGeometry = DEFAULT_GEOMETRY
    geometry_source: str = "default"
    device: torch.device = torch.device("cpu")
    backend: str = "auto"
    kernel_backend: str = "auto"
    tiling: str = DEFAULT_TILING
    batch_size: int = 64
    seed: int = 0
    amp: str | None = None
    num_threads: int | None = None
    progress: bool = False

    def __post_init__(self):
        if not isinstance(self.geometry, CropGeometry):
            raise ConfigError(f"RunConfig: expected a CropGeometry, got {type(self.geometry).__name__}")
        if self.tiling not in TILINGS:
            raise ConfigError(f"RunConfig: expected tiling in {TILINGS}, got {self.tiling!r}")
        check_positive_int(self.batch_size, "batch_size", "RunConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"RunConfig: expected an integer seed, got {self.seed!r}")
        if self.num_threads is not None:
            check_positive_int(self.num_threads, "num_threads", "RunConfig")
        if self.kernel_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"RunConfig: expected kernel_backend 'auto', 'torch' or 'triton', got {self.kernel_backend!r}")

    def replace(self, **changes) -> "RunConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able record of the run's settings (results files carry it)."""
        return {
            "geometry": self.geometry.to_dict(),
            "geometry_source": self.geometry_source,
            "device": str(self.device),
            "backend": self.backend,
            "kernel_backend": self.kernel_backend,
            "tiling": self.tiling,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "amp": self.amp,
        }


# size: the one place where a run's loose options are named (keyword-only; RunConfig documents each)
def resolve_run(
    *,
    geometry=None,
    resize: int | None = None,
    crop: int | None = None,
    stored_geometry: Mapping | None = None,
    checkpoint: str | None = None,
    default_geometry: CropGeometry = DEFAULT_GEOMETRY,
    device: str | torch.device | None = "auto",
    local_rank: int | None = None,
    backend: str = "auto",
    kernel_backend: str = "auto",
    tiling: str = DEFAULT_TILING,
    batch_size: int | None = None,
    batch_kind: str = "eval",
    seed: int = 0,
    amp: str | None = "auto",
    num_threads: int | None = None,
    progress: bool = False,
) -> RunConfig:
    """Resolve what a caller said (``None``: not said) into a :class:`RunConfig`.

    Keyword-only by design: the one place where a run's loose settings become a configuration (each argument is
    documented on :class:`RunConfig` and :func:`resolve_geometry`).
    """
    dev = resolve_device(device, local_rank)
    geom, source = resolve_geometry(geometry, resize=resize, crop=crop, stored=stored_geometry,
                                    checkpoint=checkpoint, default=default_geometry)
    bs = default_batch_size(batch_kind, dev) if batch_size is None else check_positive_int(batch_size, "batch_size",
                                                                                            "resolve_run")
    return RunConfig(geometry=geom, geometry_source=source, device=dev, backend=backend,
                     kernel_backend=kernel_backend, tiling=tiling, batch_size=bs, seed=int(seed),
                     amp=resolve_amp(amp, dev), num_threads=num_threads, progress=bool(progress))


#: the option names :func:`resolve_options` sends to :func:`resolve_run` (everything else goes to the job's config)
RUN_OPTIONS = ("geometry", "resize", "crop", "stored_geometry", "checkpoint", "default_geometry", "device",
               "local_rank", "backend", "kernel_backend", "tiling", "batch_size", "batch_kind", "seed", "amp",
               "num_threads", "progress")


def resolve_options(owner: str, run: RunConfig | None, config, config_cls, options: Mapping, **run_defaults):
    """Split a consumer's loose keyword options into its resolved :class:`RunConfig` and its own job config.

    The edge of every consumer (``evaluate``, ``run_challenge``, ``export``, ``prepare``, ``train``): callers may
    pass a ready ``run``/``config``, keyword options, or both (options override fields of the given ones). Run
    options (:data:`RUN_OPTIONS`) are resolved by :func:`resolve_run` with ``run_defaults`` for what the caller
    did not say; the others must be fields of ``config_cls`` (a frozen dataclass). Unknown names are an error that
    lists the valid ones.

    Returns:
        ``(run, config)``.

    >>> @dataclasses.dataclass(frozen=True)
    ... class JobConfig:
    ...     split: str = "val"
    >>> run, cfg = resolve_options("job", None, None, JobConfig, {"split": "train", "device": "cpu"})
    >>> cfg.split, run.device.type
    ('train', 'cpu')
    """
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k in options if k not in fields and k not in RUN_OPTIONS)
    if unknown:
        raise ConfigError(f"{owner}: unknown option(s) {unknown}; expected run options {sorted(RUN_OPTIONS)} or "
                          f"{config_cls.__name__} fields {sorted(fields)}")
    run_kw = {k: v for k, v in options.items() if k in RUN_OPTIONS and k not in fields}  # the job's own name wins
    job_kw = {k: v for k, v in options.items() if k in fields}
    if run is None:
        run = resolve_run(**{**run_defaults, **run_kw})
    elif run_kw:
        run = _override_run(run, run_kw)
    if config is None:
        config = config_cls(**job_kw)
    elif job_kw:
        config = dataclasses.replace(config, **job_kw)
    return run, config


_GEOMETRY_OPTIONS = ("geometry", "resize", "crop", "stored_geometry", "checkpoint", "default_geometry")


def _override_run(run: RunConfig, kw: Mapping) -> RunConfig:
    """A given :class:`RunConfig` with some options changed (the others, the geometry's source included, kept)."""
    changes: dict = {}
    if any(k in kw for k in _GEOMETRY_OPTIONS):
        geom, source = resolve_geometry(kw.get("geometry"), resize=kw.get("resize"), crop=kw.get("crop"),
                                        stored=kw.get("stored_geometry"), checkpoint=kw.get("checkpoint"),
                                        default=kw.get("default_geometry", run.geometry))
        if geom != run.geometry:
            changes.update(geometry=geom, geometry_source=source)
    device = resolve_device(kw["device"], kw.get("local_rank")) if "device" in kw else run.device
    if device != run.device:
        changes["device"] = device
    if "amp" in kw:
        changes["amp"] = resolve_amp(kw["amp"], device)
    if kw.get("batch_size") is not None:
        changes["batch_size"] = check_positive_int(kw["batch_size"], "batch_size", "resolve_options")
    for k in ("backend", "kernel_backend", "tiling", "seed", "num_threads", "progress"):
        if k in kw:
            changes[k] = kw[k]
    return run.replace(**changes) if changes else run


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
