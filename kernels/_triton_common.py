"""Triton helpers shared by the kernels (imported lazily, only when a Triton kernel is first launched)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["store_pixels", "BLOCK"]

# Pixels per program: a flattened block of one image's H*W plane, all three channels.
BLOCK = 1024


@triton.jit
def store_pixels(ptr, v, c: tl.constexpr, mean_ptr, std_ptr, mask, MODE: tl.constexpr):
    """Write uint8 values ``v`` of channel ``c`` at ``ptr``: copied (MODE 0), ``v/255`` (1) or normalised (2).

    Division is IEEE-rounded (``div_rn``) so the float32 result equals torch's ``(v / 255 - mean) / std``.
    """
    if MODE == 0:
        tl.store(ptr, v, mask=mask)
    else:
        x = tl.math.div_rn(v.to(tl.float32), 255.0)
        if MODE == 2:
            m = tl.load(mean_ptr + c)
            s = tl.load(std_ptr + c)
            x = tl.math.div_rn(x - m, s)
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
