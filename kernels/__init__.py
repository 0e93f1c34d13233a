"""Device kernels of bgsynth: the pixel work of the variants.

* :func:`composite`: gather a background row, select per pixel, normalise, cast and lay out, in one pass.
* :func:`tile_fill`: the Only-BG-T tiling gather (with the same epilogue).

Each op has a plain torch reference (``*_torch``) and a Triton kernel; :func:`resolve_backend` is the one dispatch
point (Triton on CUDA tensors when it imports, torch elsewhere; ``backend='torch'|'triton'`` overrides). On CPU
tensors the torch backend runs a fast twin of the reference with the same results (:mod:`bgsynth.kernels._cpu`);
:func:`mask_reuse` lets the composites of one batch share their per-pixel mask there. Triton is imported only when
a Triton kernel is first launched, so this package imports without it.
"""

from ._cpu import mask_reuse
from ._dispatch import BACKENDS, resolve_backend, triton_available, triton_interpreting
from .composite import composite, composite_torch
from .errors import KernelArgumentError, KernelBackendError, KernelError
from .tile import tile_fill, tile_fill_torch

__all__ = [
    "BACKENDS",
    "KernelArgumentError",
    "KernelBackendError",
    "KernelError",
    "composite",
    "composite_torch",
    "mask_reuse",
    "resolve_backend",
    "tile_fill",
    "tile_fill_torch",
    "triton_available",
    "triton_interpreting",
]
