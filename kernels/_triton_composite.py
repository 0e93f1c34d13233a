"""Triton kernel of :func:`bgsynth.kernels.composite.composite` (imported lazily by its launcher)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_common import store_pixels

__all__ = ["composite_kernel"]


# size: a Triton kernel takes every pointer, stride and compile-time flag as an argument
@triton.jit
def composite_kernel(
    fg_ptr, keep_ptr, bg_ptr, idx_ptr, box_ptr, mean_ptr, std_ptr, out_ptr,
    H, W, N, n_blocks,
    s_fb, s_fc, s_fy, s_fx,
    s_kb, s_ky, s_kx,
    s_gb, s_gc, s_gy, s_gx,
    s_ob, s_oc, s_oy, s_ox,
    HAS_KEEP: tl.constexpr, INVERT: tl.constexpr, HAS_BOX: tl.constexpr, HAS_BG: tl.constexpr,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    # one program = one block of BLOCK pixels of one image (all 3 channels); grid = B * n_blocks
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    y = offs // W
    x = offs % W
    b64 = b.to(tl.int64)

    # take: pixel comes from fg; drop: from the background (or black). Built without boolean negation.
    take = valid
    drop = offs < 0
    if HAS_KEEP:
        k = tl.load(keep_ptr + b64 * s_kb + y * s_ky + x * s_kx, mask=valid, other=0)
        if INVERT:
            take = valid & (k == 0)
            drop = valid & (k != 0)
        else:
            take = valid & (k != 0)
            drop = valid & (k == 0)
    if HAS_BOX:
        x0 = tl.load(box_ptr + b64 * 4 + 0)
        y0 = tl.load(box_ptr + b64 * 4 + 1)
        x1 = tl.load(box_ptr + b64 * 4 + 2)
        y1 = tl.load(box_ptr + b64 * 4 + 3)
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        outside = (x < x0) | (x > x1) | (y < y0) | (y > y1)
        take = take & outside
        drop = drop | (valid & inside)

    dst = out_ptr + b64 * s_ob + y * s_oy + x * s_ox
    src = fg_ptr + b64 * s_fb + y * s_fy + x * s_fx
    if HAS_BG:
        r = tl.load(idx_ptr + b64)
        bg_ok = (r >= 0) & (r < N)  # any other index means black (memory-safe, no host check needed)
        r_safe = tl.where(bg_ok, r, 0)
        need_bg = drop & bg_ok
        gsrc = bg_ptr + r_safe * s_gb + y * s_gy + x * s_gx
    for c in tl.static_range(3):
        v = tl.load(src + c * s_fc, mask=take, other=0)
        if HAS_BG:
            g = tl.load(gsrc + c * s_gc, mask=need_bg, other=0)
            v = tl.where(take, v, g)
        store_pixels(dst + c * s_oc, v, c, mean_ptr, std_ptr, valid, MODE)
