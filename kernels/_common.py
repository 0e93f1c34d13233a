"""Argument checks and the output epilogue (normalise, cast, memory format) shared by every kernel.

The epilogue is the same for all ops: a uint8 pixel value ``v`` becomes

* ``v`` itself for a uint8 output,
* ``v / 255`` for a floating output without statistics,
* ``(v / 255 - mean[c]) / std[c]`` with statistics (the torch reference applies
  :func:`kornia.enhance.normalize` to ``v / 255``; the Triton kernels do the same float32 operations with
  IEEE-rounded division, then cast to the output dtype),

written in the contiguous or the channels_last memory format.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from collections.abc import Sequence

import torch

from .errors import KernelArgumentError

__all__ = [
    "OutputSpec",
    "resolve_output",
    "check_images",
    "check_rows",
    "alloc_output",
    "advise_hugepages",
    "finish_torch",
    "MAX_INT32",
    "CPU_CHUNK_BYTES",
]

MAX_INT32 = 2**31 - 1
# Bytes of uint8 pixels per step of the fast CPU path (kernels/_cpu.py; a float32 output chunk is 4x this): its
# passes then stay in the CPU caches. On the development machine (2 MiB L2 per core) 1-2 MiB was the fastest of
# 128 KiB .. 8 MiB for all 8 variants at 224 px, by 5-15% (uint8 and normalised float32 outputs).
CPU_CHUNK_BYTES = 1 << 20
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Resolved output of a kernel call.

    Attributes:
        dtype: ``uint8`` or a floating dtype.
        mean, std: ``float32 [3]`` statistics on the output device, or ``None``.
        channels_last: write in the channels_last memory format.
    """

    dtype: torch.dtype
    mean: torch.Tensor | None
    std: torch.Tensor | None
    channels_last: bool

    @property
    def mode(self) -> int:
        """Epilogue code for the Triton kernels: 0 = uint8 copy, 1 = ``v / 255``, 2 = normalise."""
        if self.dtype == torch.uint8:
            return 0
        return 2 if self.mean is not None else 1


def _stat(value, name: str, op: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            t = torch.tensor([float(v) for v in value])
        except (TypeError, ValueError) as e:
            raise KernelArgumentError(f"{op}: expected {name} to be 3 numbers, got {value!r}") from e
    else:
        raise KernelArgumentError(f"{op}: expected {name} to be a sequence of 3 floats or a tensor, got {type(value).__name__}")
    if t.numel() != 3 or t.dtype.is_complex or t.dtype == torch.bool:
        raise KernelArgumentError(f"{op}: expected {name} to hold 3 values (one per RGB channel), got shape {tuple(t.shape)}")
    return t.reshape(3).to(device=device, dtype=torch.float32)


def resolve_output(dtype, mean, std, channels_last: bool, device: torch.device, op: str) -> OutputSpec:
    """Check and resolve the output arguments shared by every op.

    Args:
        dtype: ``torch.uint8``, ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; ``None`` means
            uint8 without statistics and float32 with them.
        mean, std: per-channel statistics on the 0..1 scale (sequences of 3 floats or tensors), both or neither.
        channels_last: write the output in the channels_last memory format.
        device: device of the output.
        op: op name for messages.
    """
    if (mean is None) != (std is None):
        raise KernelArgumentError(f"{op}: expected both mean and std or neither, got mean={mean!r}, std={std!r}")
    if dtype is None:
        dtype = torch.float32 if mean is not None else torch.uint8
    if dtype != torch.uint8 and dtype not in _FLOATS:
        raise KernelArgumentError(f"{op}: expected dtype uint8, float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.uint8 and mean is not None:
        raise KernelArgumentError(f"{op}: normalisation (mean/std) needs a floating dtype, got dtype=torch.uint8")
    m = s = None
    if mean is not None:
        m = _stat(mean, "mean", op, device)
        s = _stat(std, "std", op, device)
        if device.type == "cpu" and bool((s == 0).any()):
            raise KernelArgumentError(f"{op}: expected a non-zero std, got {s.tolist()}")
    return OutputSpec(dtype, m, s, bool(channels_last))


def check_images(t, name: str, op: str, leading: str = "B") -> None:
    """Raise :class:`KernelArgumentError` unless ``t`` is a ``uint8 [*, 3, H, W]`` tensor."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 4 or t.shape[1] != 3 or t.dtype != torch.uint8:
        raise KernelArgumentError(f"{op}: expected {name} uint8 [{leading},3,H,W], got {t.dtype} {tuple(t.shape)}")
    if 3 * t.shape[2] * t.shape[3] > MAX_INT32:
        raise KernelArgumentError(f"{op}: {name} images of {t.shape[2]}x{t.shape[3]} are too large for 32-bit pixel offsets")


def check_rows(t, name: str, op: str, batch: int, device: torch.device, width: int | None = 4) -> None:
    """Raise :class:`KernelArgumentError` unless ``t`` is an integer ``[batch, width]`` (or ``[batch]``) tensor on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    shape = (batch, width) if width is not None else (batch,)
    if tuple(t.shape) != shape or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise KernelArgumentError(f"{op}: expected {name} integer {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise KernelArgumentError(f"{op}: expected {name} on {device}, got {t.device}")


def alloc_output(shape: tuple[int, int, int, int], spec: OutputSpec, device: torch.device) -> torch.Tensor:
    """A new output tensor of ``shape`` as ``spec`` says (dtype, memory format); large CPU outputs are advised to
    use huge pages (:func:`advise_hugepages`)."""
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=spec.dtype, device=device, memory_format=fmt)
    if out.device.type == "cpu":
        advise_hugepages(out)
    return out


HUGEPAGE = 2 << 20
#: smallest CPU output advised to use huge pages: below it the allocator reuses freed heap memory anyway
HUGEPAGE_MIN_BYTES = 4 << 20
_MADV_HUGEPAGE = 14
_LIBC = None


def advise_hugepages(t: torch.Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned part of a large, fresh CPU tensor with transparent huge pages.

    A fresh output of a batch (float32 at 224 px: 38 MB) is new memory, and the first write of each 4 KiB page is
    a page fault: measured at two thirds of the cost of converting a batch into it (``madvise(MADV_HUGEPAGE)`` on
    the range, done before the first write, cut the conversion from 34 to 18 ms). This is what PyTorch's own
    ``THP_MEM_ALLOC_ENABLE=1`` does for every large allocation, here only for the kernels' outputs. Best effort:
    no effect and no error off Linux, below :data:`HUGEPAGE_MIN_BYTES`, or where huge pages are disabled.

    Returns:
        Whether the advice was given.
    """
    global _LIBC
    n = t.numel() * t.element_size()
    if n < HUGEPAGE_MIN_BYTES or not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = (t.data_ptr() + HUGEPAGE - 1) // HUGEPAGE * HUGEPAGE
    end = (t.data_ptr() + n) // HUGEPAGE * HUGEPAGE
    if end <= start:
        return False
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC.madvise.restype = ctypes.c_int
        return _LIBC.madvise(start, end - start, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def finish_torch(u8: torch.Tensor, spec: OutputSpec, fresh: bool = True) -> torch.Tensor:
    """The reference epilogue: normalise/cast a uint8 ``[B,3,H,W]`` result and lay it out as ``spec`` asks.

    ``fresh=False`` says ``u8`` is a caller's tensor: a uint8 result is then always a copy, never ``u8`` itself.
    """
    import kornia

    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    if spec.dtype == torch.uint8:
        out = u8.contiguous(memory_format=fmt)
        return out.clone(memory_format=fmt) if (out is u8 and not fresh) else out
    x = u8.to(torch.float32).div_(255.0)
    if spec.mean is not None:
        x = kornia.enhance.normalize(x, spec.mean, spec.std) if x.shape[0] > 0 else x
    return x.to(spec.dtype).contiguous(memory_format=fmt)
