"""Decode: index entries -> :class:`Batch` of images, masks, boxes, strips, labels and ids on a device.

Backends (registry :data:`BACKENDS`, chosen by :func:`create_loader`):

* ``dali``: NVIDIA DALI, ``device="mixed"`` decode on CUDA, DALI's CPU-only mode (``device_id=None``) elsewhere.
* ``torchvision``: ``torchvision.io.decode_jpeg`` (batched nvJPEG on CUDA, libjpeg-turbo on CPU threads).
* ``pil``: the plain reference (PIL decode, bilinear antialiased resize, centre crop).

All backends share one host preparation (:mod:`bgsynth.pipeline.common`): masks, boxes, strips, labels, ids and
rejects are identical by construction; pixels agree within a small tolerance (docs/decode.md).

>>> from bgsynth.pipeline import available_backends
>>> "pil" in available_backends()
True
"""

from __future__ import annotations

import torch

from ..config import RunConfig, resolve_options
from ..errors import BackendUnavailableError, ConfigError
from ..index import DatasetIndex, require_index
from .common import BACKENDS, BackendSpec, DecodeLoader, DecodeOptions, backend_available, register_backend

__all__ = [
    "DecodeLoader",
    "DecodeOptions",
    "BACKENDS",
    "BackendSpec",
    "register_backend",
    "available_backends",
    "auto_backend",
    "create_loader",
]

_DALI_PIP = "pip install nvidia-dali-cuda130   (or the build matching your CUDA: nvidia-dali-cuda120, ...)"

register_backend(BackendSpec(
    "dali", "bgsynth.pipeline.dali:DALILoader", ("nvidia.dali",), _DALI_PIP,
    "NVIDIA DALI: mixed (nvJPEG) decode on CUDA, CPU-only mode elsewhere; fused resize+crop",
))
register_backend(BackendSpec(
    "torchvision", "bgsynth.pipeline.tv:TorchvisionLoader", ("torchvision",), "pip install torchvision",
    "torchvision.io.decode_jpeg (batched nvJPEG on CUDA, libjpeg-turbo threads on CPU) + v2 resize",
))
register_backend(BackendSpec(
    "pil", "bgsynth.pipeline.pil:PILLoader", ("PIL",), "pip install pillow",
    "PIL decode + BILINEAR resize + crop (the reference)",
))

# Preference order of ``backend="auto"`` per device type (the first one installed wins). On CUDA, DALI's nvJPEG
# decode with its own thread pool is the fast path, then torchvision's batched nvJPEG. On CPU
# (benchmarks/bench_decode.py, docs/decode.md): torchvision's libjpeg-turbo + uint8 antialiased resize is the
# fastest complete pipeline, DALI's CPU-only mode (crop-window resize) a close second, PIL about the reference.
AUTO_ORDER = {"cuda": ("dali", "torchvision", "pil"), "cpu": ("torchvision", "dali", "pil")}


def available_backends() -> list[str]:
    """Names of the registered decode backends whose dependencies are installed."""
    return [name for name in BACKENDS if backend_available(name)]


def auto_backend(device: torch.device | str = "cpu") -> str:
    """The backend ``backend="auto"`` chooses for ``device`` (see :data:`AUTO_ORDER`)."""
    dev = torch.device(device)
    for name in AUTO_ORDER["cuda" if dev.type == "cuda" else "cpu"]:
        if backend_available(name):
            return name
    raise BackendUnavailableError(f"no decode backend is installed; install one with: {BACKENDS['pil'].install}")


def create_loader(
    index: DatasetIndex,
    run: RunConfig | None = None,
    options: DecodeOptions | None = None,
    **kwargs,
) -> DecodeLoader:
    """Create a decode loader: a re-iterable of :class:`Batch` over (a shard of) an index.

    Order is deterministic: sorted image ids (optionally restricted to ``ids``), then ``ids[shard_id::num_shards]``,
    cut into batches of ``batch_size`` (the last partial batch included). Each image is decoded without EXIF
    orientation, resized (shorter side to ``geometry.resize``, the exact size of its
    :class:`~bgsynth.geometry.CropPlan`, bilinear, antialiased) and centre-cropped to ``geometry.crop``; its mask
    and union box go through the same plan with nearest neighbour. Batch ``k + 1`` is decoded by a background
    thread while batch ``k`` is consumed (``prefetch`` batches ahead).

    Args:
        index: the :class:`DatasetIndex` (load an index file once, at the edge, with ``DatasetIndex.load``).
        run: the resolved run settings (:class:`~bgsynth.config.RunConfig`): ``backend`` (``"auto"``, ``"dali"``,
            ``"torchvision"`` or ``"pil"``, see :data:`BACKENDS`), ``geometry`` (default 256 -> 224),
            ``batch_size`` (default :data:`bgsynth.config.BATCH_SIZES` ``["decode"]``), ``device`` of the yielded
            batches (default ``"cpu"``), ``tiling`` (``"paper"``, default: Only-BG-T tiled on the stored image at
            full resolution, then resized and cropped like the image, ``Batch.bgt``; ``"crop"``: tiled inside the
            crop by the variants, the faster approximation) and ``num_threads`` (decoder threads, default
            :func:`~bgsynth.pipeline.common.default_decode_threads`: a quarter of the cores on a CPU device, all
            but one on CUDA; see docs/decode.md "Threads").
        options: shard, ids, prefetch, require_mask, on_error, only_bg_t, share_cores (:class:`DecodeOptions`).
        **kwargs: any of those by name (``backend=``, ``geometry=``, ``batch_size=``, ``device=``, ``tiling=``,
            ``num_threads=``, ``shard_id=``, ``num_shards=``, ``ids=``, ``prefetch=``, ``require_mask=``,
            ``on_error=``, ``only_bg_t=``, ``share_cores=``), overriding ``run`` and ``options``.

    Returns:
        A :class:`DecodeLoader` (``len()`` = number of batches; attributes ``ids``, ``rejects``, ``fallbacks``).

    Raises:
        BackendUnavailableError: the backend (or CUDA) is not installed; the message has the pip command.
        ConfigError: not a :class:`DatasetIndex`, unknown backend or option, or an out-of-range argument.

    >>> loader = create_loader(DatasetIndex.load("index.json"), backend="pil", batch_size=32)   # doctest: +SKIP
    >>> for batch in loader:                                                                    # doctest: +SKIP
    ...     batch.images.shape, batch.masks.shape                             # [B,3,224,224], [B,1,224,224]
    """
    require_index(index, "create_loader")
    run, options = resolve_options("create_loader", run, options, DecodeOptions, kwargs, batch_kind="decode",
                                   device="cpu")
    if not isinstance(run.backend, str):
        raise ConfigError(f"create_loader: expected a backend name, got {run.backend!r}")
    name = auto_backend(run.device) if run.backend == "auto" else run.backend
    if name not in BACKENDS:
        raise ConfigError(f"create_loader: unknown decode backend {run.backend!r}; expected 'auto' or one of "
                          f"{sorted(BACKENDS)}")
    return BACKENDS[name].load()(index, run, options)
