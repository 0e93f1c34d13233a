"""Gather + composite (+ normalise + cast + memory format) in one pass.

Per image ``b`` and pixel ``p`` the output takes the foreground image's pixel where ``take[b, p]`` holds, and
otherwise the background row ``bg[bg_index[b]]`` (black when ``bg`` is ``None`` or ``bg_index[b] < 0``), with

    take = (keep != 0) XOR invert          (all True when keep is None)
           AND NOT inside(boxes[b])        (only when boxes is given)

then the shared epilogue (:mod:`bgsynth.kernels._common`): uint8 copy, ``v / 255``, or ``(v / 255 - mean) / std``, cast
to ``dtype`` and written contiguous or channels_last. This one op builds every variant but Only-BG-T:

============  ======================================================
Original      ``composite(x)``
Only-BG-B     ``composite(x, boxes=box)``
No-FG         ``composite(x, mask, invert=True)``
Only-FG       ``composite(x, mask)``
Mixed-*       ``composite(x, mask, pool_images, pool_rows)``
============  ======================================================

The Triton kernel reads each input pixel once (the background only where it is used) and writes each output
element once: no full-size intermediate, whatever the output dtype and layout.

One file, three layers: :func:`composite_torch` (plain torch reference, normalisation by
:func:`kornia.enhance.normalize`), :func:`_launch_triton` (launcher of :mod:`bgsynth.kernels._triton_composite`), and
:func:`composite`, the torch-facing op that checks its arguments and dispatches (:mod:`bgsynth.kernels._dispatch`).
The torch backend runs the reference on CUDA tensors and its fast, bit-identical CPU twin
(:func:`bgsynth.kernels._cpu.composite_cpu`) on CPU tensors.
"""

from __future__ import annotations

import torch

from ._common import (
    MAX_INT32,
    OutputSpec,
    alloc_output,
    check_images,
    check_rows,
    finish_torch,
    resolve_output,
)
from ._cpu import composite_cpu
from ._dispatch import load_triton_module, resolve_backend
from .errors import KernelArgumentError
from .tile import _int32_addressable, raise_too_many, select_u8

__all__ = ["composite", "composite_torch"]


# size: one fused pass, and every option is a stage of it (select, gather, normalise, cast, layout, backend)
def composite(
    fg: torch.Tensor,
    keep: torch.Tensor | None = None,
    bg: torch.Tensor | None = None,
    bg_index: torch.Tensor | None = None,
    mean=None,
    std=None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    *,
    invert: bool = False,
    boxes: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Composite foreground pixels over gathered background rows (or black), normalise, cast, lay out.

    Args:
        fg: uint8 images whose pixels are kept.
        keep: per-pixel selector (bool or uint8; non-zero = take the ``fg`` pixel); ``None`` keeps every pixel.
        bg: uint8 background images (e.g. a :class:`~bgsynth.pipeline.batch.BackgroundPool`'s ``images``), or
            ``None`` for black.
        bg_index: row of ``bg`` for each image; a negative index means black. Indices ``>= N`` are a caller
            bug: rejected on CPU tensors, rendered black on CUDA (checking there would cost a host sync).
        mean, std: optional per-channel statistics (0..1 scale, 3 values each): output ``(v / 255 - mean) / std``.
        dtype: output dtype (``uint8``, ``float32``, ``float16``, ``bfloat16``); ``None``: uint8, or float32 when
            ``mean``/``std`` are given. A floating dtype without statistics gives ``v / 255``.
        channels_last: write the output in the channels_last memory format.
        invert: take the ``fg`` pixel where ``keep`` is zero instead (No-FG without a negated mask copy).
        boxes: inclusive boxes ``(x0, y0, x1, y1)``; pixels inside a box never come from ``fg`` (Only-BG-B
            computed in the kernel, without a box mask). Empty boxes (``x1 < x0``) change nothing.
        backend: ``'auto'`` (Triton on CUDA tensors, torch elsewhere), ``'torch'`` or ``'triton'``. On CPU tensors
            ``'torch'`` is the fast CPU path (:mod:`bgsynth.kernels._cpu`), equal to :func:`composite_torch`.

    Returns:
        A new tensor; the inputs are not modified.

    Shape:
        - fg: ``[B, 3, H, W]``; keep: ``[B, 1, H, W]``; bg: ``[N, 3, H, W]``; bg_index: ``[B]``;
          boxes: ``[B, 4]``
        - output: ``[B, 3, H, W]``

    >>> fg = torch.full((2, 3, 2, 2), 200, dtype=torch.uint8)
    >>> keep = torch.tensor([[[[1, 0], [0, 1]]]] * 2, dtype=torch.bool)
    >>> bg = torch.full((1, 3, 2, 2), 7, dtype=torch.uint8)
    >>> composite(fg, keep, bg, torch.tensor([0, -1]))[:, 0].tolist()
    [[[200, 7], [7, 200]], [[200, 0], [0, 200]]]
    """
    op = "composite"
    _check_args(fg, keep, bg, bg_index, boxes, invert)
    dev = fg.device
    spec = resolve_output(dtype, mean, std, channels_last, dev, op)
    which = resolve_backend(backend, (fg, keep, bg, bg_index, boxes), op)
    if which == "triton":
        return _launch_triton(fg, keep, bg, bg_index, spec, bool(invert), boxes)
    torch_impl = composite_cpu if dev.type == "cpu" else composite_torch  # the same result (tests/test_kernels.py)
    return torch_impl(fg, keep, bg, bg_index, spec, invert=bool(invert), boxes=boxes)


def _check_args(fg, keep, bg, bg_index, boxes, invert) -> None:
    """The argument checks of :func:`composite` (shapes, dtypes, devices, row indices), with the ``expected X,
    got Y`` messages."""
    op = "composite"
    check_images(fg, "fg", op)
    B, _, H, W = fg.shape
    dev = fg.device
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (B, 1, H, W):
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise KernelArgumentError(f"{op}: expected keep of shape {(B, 1, H, W)}, got {got}")
        if keep.dtype not in (torch.bool, torch.uint8):
            raise KernelArgumentError(f"{op}: expected keep bool or uint8, got {keep.dtype}")
        if keep.device != dev:
            raise KernelArgumentError(f"{op}: expected keep on {dev}, got {keep.device}")
    elif invert:
        raise KernelArgumentError(f"{op}: invert=True needs a keep mask")
    if bg is not None:
        check_images(bg, "bg", op, leading="N")
        if tuple(bg.shape[2:]) != (H, W):
            raise KernelArgumentError(f"{op}: expected bg images of size {H}x{W} (as fg), got {tuple(bg.shape[2:])}")
        if bg.device != dev:
            raise KernelArgumentError(f"{op}: expected bg on {dev}, got {bg.device}")
        if bg_index is None:
            raise KernelArgumentError(f"{op}: bg was given without bg_index (the row of bg for each image)")
        check_rows(bg_index, "bg_index", op, B, dev, width=None)
        if dev.type == "cpu" and B > 0 and int(bg_index.max()) >= bg.shape[0]:
            raise KernelArgumentError(
                f"{op}: expected bg_index < {bg.shape[0]} (rows of bg) or negative (black), got {int(bg_index.max())}"
            )
    elif bg_index is not None:
        raise KernelArgumentError(f"{op}: bg_index was given without bg")
    if boxes is not None:
        check_rows(boxes, "boxes", op, B, dev)


def composite_torch(
    fg: torch.Tensor,
    keep: torch.Tensor | None = None,
    bg: torch.Tensor | None = None,
    bg_index: torch.Tensor | None = None,
    spec: OutputSpec | None = None,
    *,
    invert: bool = False,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch reference of :func:`composite` (no argument checks; ``spec=None`` means a uint8 output).

    Shape: as :func:`composite`.
    """
    if spec is None:
        spec = OutputSpec(torch.uint8, None, None, False)
    B, _, H, W = fg.shape
    dev = fg.device
    # computed in the output's memory layout: a decoder's channels_last crops are not converted twice
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    given, fg = fg, fg.contiguous(memory_format=fmt)
    take = None  # bool [B, 1, H, W] or None (every pixel from fg)
    if keep is not None:
        take = (keep == 0) if invert else (keep != 0)
    if boxes is not None:
        box = boxes.to(torch.int64)
        ys = torch.arange(H, device=dev)
        xs = torch.arange(W, device=dev)
        out_y = (ys[None] < box[:, 1:2]) | (ys[None] > box[:, 3:4])  # [B, H]
        out_x = (xs[None] < box[:, 0:1]) | (xs[None] > box[:, 2:3])  # [B, W]
        outside = (out_y[:, :, None] | out_x[:, None, :])[:, None]
        take = outside if take is None else take & outside
    if take is None:
        return finish_torch(fg, spec, fresh=fg is not given)
    if bg is not None and bg.shape[0] > 0:
        n = bg.shape[0]
        r = bg_index.to(torch.int64)
        ok = ((r >= 0) & (r < n)).to(torch.uint8)
        back = bg.index_select(0, r.clamp(0, n - 1)).contiguous(memory_format=fmt) * ok[:, None, None, None]
        return finish_torch(select_u8(take, fg, back), spec)
    return finish_torch(select_u8(take, fg), spec)


def _launch_triton(fg, keep, bg, bg_index, spec: OutputSpec, invert: bool, boxes) -> torch.Tensor:
    B, _, H, W = fg.shape
    out = alloc_output((B, 3, H, W), spec, fg.device)
    if B == 0 or H == 0 or W == 0:
        return out
    mod = load_triton_module("_triton_composite")
    block = load_triton_module("_triton_common").BLOCK
    n_blocks = (H * W + block - 1) // block
    if B * n_blocks > MAX_INT32:
        raise_too_many(B, n_blocks)
    fg = _int32_addressable(fg)
    has_keep = keep is not None
    if has_keep:
        keep = _int32_addressable(keep.view(torch.uint8) if keep.dtype == torch.bool else keep)
        ks = (keep.stride(0), keep.stride(2), keep.stride(3))
    else:
        keep, ks = out, (0, 0, 0)
    has_bg = bg is not None and bg.shape[0] > 0
    if has_bg:
        bg = _int32_addressable(bg)
        idx = bg_index.to(torch.int64).contiguous()
        gs, n = bg.stride(), bg.shape[0]
    else:
        bg, idx, gs, n = out, out, (0, 0, 0, 0), 0
    has_box = boxes is not None
    box = boxes.to(torch.int32).contiguous() if has_box else out
    mean = spec.mean if spec.mean is not None else out
    std = spec.std if spec.std is not None else out
    mod.composite_kernel[(B * n_blocks,)](
        fg, keep, bg, idx, box, mean, std, out,
        H, W, n, n_blocks,
        *fg.stride(),
        *ks,
        *gs,
        *out.stride(),
        HAS_KEEP=has_keep, INVERT=invert, HAS_BOX=has_box, HAS_BG=has_bg,
        MODE=spec.mode, BLOCK=block,
    )
    return out
