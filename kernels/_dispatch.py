"""The one dispatch point of :mod:`bgsynth.kernels`: which implementation (torch reference or Triton) runs an op.

``backend='auto'`` picks Triton when every tensor of the call is on a CUDA device and Triton imports, and the
plain torch reference otherwise. ``backend='torch'`` always runs the reference. ``backend='triton'`` runs the
Triton kernel and raises :class:`~bgsynth.kernels.errors.KernelBackendError` when it cannot: Triton is not installed,
or the tensors are on the CPU while Triton's interpreter is off (``TRITON_INTERPRET=1`` runs Triton kernels on CPU
tensors, which is how the tests compare them with the reference without a GPU).

The environment variable ``BGSYNTH_KERNEL_BACKEND`` (``torch`` or ``triton``) changes what ``'auto'`` means, e.g.
to rule Triton out while debugging on a GPU machine.

Triton is imported lazily, on the first call that needs it: ``import kernels`` works without it, and the
``@triton.jit`` decorators (which read ``TRITON_INTERPRET`` when they run) are only evaluated then.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from .errors import KernelArgumentError, KernelBackendError

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_interpreting", "load_triton_module"]

BACKENDS = ("auto", "torch", "triton")
_ENV = "BGSYNTH_KERNEL_BACKEND"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else at import
        return f"{type(e).__name__}: {e}"
    return None


def triton_available() -> bool:
    """Whether Triton can be imported here (it may still need CUDA tensors or ``TRITON_INTERPRET=1`` to run)."""
    return _triton_import_error() is None


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, tensors: tuple[torch.Tensor | None, ...], op: str) -> str:
    """Resolve ``backend`` to ``'torch'`` or ``'triton'`` for a call of ``op`` on ``tensors``.

    Args:
        backend: ``'auto'``, ``'torch'`` or ``'triton'``.
        tensors: the tensors of the call (``None`` entries are ignored); their devices decide ``'auto'``.
        op: the op's name, for error messages.

    Returns:
        ``'torch'`` or ``'triton'``.

    Raises:
        KernelArgumentError: ``backend`` (or ``BGSYNTH_KERNEL_BACKEND``) is not one of :data:`BACKENDS`.
        KernelBackendError: ``'triton'`` was asked for and cannot run these tensors.
    """
    if backend not in BACKENDS:
        raise KernelArgumentError(f"{op}: expected backend in {BACKENDS}, got {backend!r}")
    devices = {t.device.type for t in tensors if t is not None}
    on_cuda = devices == {"cuda"}
    if backend == "auto":
        preferred = os.environ.get(_ENV, "").strip().lower()
        if preferred not in ("", "auto", "torch", "triton"):
            raise KernelArgumentError(f"{op}: expected {_ENV} to be 'torch', 'triton' or unset, got {preferred!r}")
        if preferred == "torch":
            return "torch"
        if preferred == "triton":
            backend = "triton"
        else:
            return "triton" if on_cuda and triton_available() else "torch"
    if backend == "torch":
        return "torch"
    # backend == 'triton'
    err = _triton_import_error()
    if err is not None:
        raise KernelBackendError(
            f"{op}: backend='triton' was requested but Triton cannot be imported ({err}); "
            "install triton or use backend='torch'"
        )
    if not on_cuda and not triton_interpreting():
        raise KernelBackendError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before the first Triton call "
            f"to run on the CPU), got tensors on {sorted(devices) or ['no device']}; use backend='torch'"
        )
    return "triton"


def load_triton_module(name: str) -> Any:
    """Import the private module ``bgsynth.kernels.<name>`` holding ``@triton.jit`` kernels (first use only).

    Imported relative to this package: an installed bgsynth has no top-level ``kernels`` (the folder is installed
    as ``bgsynth.kernels``), and one module name keeps one compiled copy of each kernel.
    """
    return importlib.import_module(f".{name}", __package__)
