"""Errors of :mod:`bgsynth.kernels`.

The kernels are the floor below everything else in bgsynth and import nothing of it, so they carry their own
small error types. Both derive from the built-in kind a caller would expect (``ValueError`` for a bad argument,
``RuntimeError`` for a backend that cannot run), and :mod:`bgsynth.errors` re-exports them; the CLI reports them
like every other bgsynth error.
"""

from __future__ import annotations

__all__ = ["KernelError", "KernelArgumentError", "KernelBackendError"]


class KernelError(Exception):
    """Base class of the errors the kernels raise on purpose."""


class KernelArgumentError(KernelError, ValueError):
    """A tensor or option given to a kernel has the wrong shape, dtype, device or value (the message says which)."""


class KernelBackendError(KernelError, RuntimeError):
    """The kernel backend that was asked for (Triton) cannot run here; the message says why and what to do."""
